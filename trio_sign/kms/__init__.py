"""KMS: the boto3 paths (data-key provider, the parent's ``Recipient`` decrypt) and the local
KMS stand-in that speaks the real KMS JSON protocol (development and tests only)."""

from ._client import KMS_PROVIDER as KMS_PROVIDER
from ._client import KmsBundleSigner as KmsBundleSigner
from ._client import KmsDataKeyProvider as KmsDataKeyProvider
from ._client import KmsRecipientDataKey as KmsRecipientDataKey
from ._client import KmsRecipientError as KmsRecipientError
from ._client import KmsRecipientKms as KmsRecipientKms
from ._client import make_kms_client as make_kms_client
from ._client import same_key as same_key
from ._server import MAX_REQUEST_BYTES as MAX_REQUEST_BYTES
from ._server import KeyPolicy as KeyPolicy
from ._server import KmsApp as KmsApp
from ._server import KmsError as KmsError
from ._server import LocalKms as LocalKms
from ._server import PolicyError as PolicyError
from ._server import serve_kms_local as serve_kms_local
from ._store import KeyStore as KeyStore
from ._store import KeyStoreError as KeyStoreError
from ._store import LocalKey as LocalKey

__all__ = [
    "KMS_PROVIDER",
    "MAX_REQUEST_BYTES",
    "KeyPolicy",
    "KeyStore",
    "KeyStoreError",
    "KmsApp",
    "KmsBundleSigner",
    "KmsDataKeyProvider",
    "KmsError",
    "KmsRecipientDataKey",
    "KmsRecipientError",
    "KmsRecipientKms",
    "LocalKey",
    "LocalKms",
    "PolicyError",
    "make_kms_client",
    "same_key",
    "serve_kms_local",
]
