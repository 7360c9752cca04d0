"""trio_sign: an MPC co-signing service (FROST Ed25519, RFC 9591) for AWS Nitro Enclaves."""

from ._errors import FrostError as FrostError
from ._errors import InternalError as InternalError
from ._errors import InvalidSignatureShareError as InvalidSignatureShareError
from ._errors import KeyWrapError as KeyWrapError
from ._errors import ShareFileError as ShareFileError
from ._errors import TrioSignError as TrioSignError

__version__ = "0.1.0"

__all__ = [
    "FrostError",
    "InternalError",
    "InvalidSignatureShareError",
    "KeyWrapError",
    "ShareFileError",
    "TrioSignError",
    "__version__",
]
