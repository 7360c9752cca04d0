"""Public helpers for tests, demos and benchmarks: test key material, never production keys."""

from ._keygen import GenerateReport as GenerateReport
from ._keygen import generate_share_files as generate_share_files
from ._keygen import service_file_name as service_file_name

__all__ = ["GenerateReport", "generate_share_files", "service_file_name"]
