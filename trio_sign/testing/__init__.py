"""Public helpers for tests, demos and benchmarks: test key material, never production keys."""

from ._keygen import GenerateReport as GenerateReport
from ._keygen import generate_share_files as generate_share_files
from ._keygen import service_file_name as service_file_name
from ._pki import CertificateAuthority as CertificateAuthority
from ._pki import DevPki as DevPki
from ._pki import make_ca as make_ca
from ._pki import make_dev_pki as make_dev_pki
from ._pki import make_leaf as make_leaf

__all__ = [
    "CertificateAuthority",
    "DevPki",
    "GenerateReport",
    "generate_share_files",
    "make_ca",
    "make_dev_pki",
    "make_leaf",
    "service_file_name",
]
