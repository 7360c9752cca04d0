"""The parent (host) side: preload service and the development KMS stand-in."""

from ._channels import serve_log_connection as serve_log_connection
from ._channels import serve_status_connection as serve_status_connection
from ._dev_kms import DevRecipientKms as DevRecipientKms
from ._preload import CHUNK_BYTES as CHUNK_BYTES
from ._preload import PreloadRefused as PreloadRefused
from ._preload import RecipientKms as RecipientKms
from ._preload import serve_preload as serve_preload

__all__ = [
    "CHUNK_BYTES",
    "DevRecipientKms",
    "PreloadRefused",
    "RecipientKms",
    "serve_log_connection",
    "serve_preload",
    "serve_status_connection",
]
