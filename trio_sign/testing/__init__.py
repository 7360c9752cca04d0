"""Public helpers for tests, demos and benchmarks: test key material, never production keys."""

from ._keygen import GenerateReport as GenerateReport
from ._keygen import generate_share_files as generate_share_files
from ._keygen import service_file_name as service_file_name
from ._pki import DevPki as DevPki
from ._pki import make_dev_pki as make_dev_pki

__all__ = ["DevPki", "GenerateReport", "generate_share_files", "make_dev_pki", "service_file_name"]
