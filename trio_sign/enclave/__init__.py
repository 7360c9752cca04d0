"""The enclave side: session pool, SignService handlers, and the process's supervision tree."""

from ._config import EnclaveConfig as EnclaveConfig
from ._pool import DEFAULT_MAX_SESSIONS as DEFAULT_MAX_SESSIONS
from ._pool import DEFAULT_SESSION_TTL_S as DEFAULT_SESSION_TTL_S
from ._pool import CommitResult as CommitResult
from ._pool import PoolError as PoolError
from ._pool import PoolErrorKind as PoolErrorKind
from ._pool import SessionPool as SessionPool
from ._serve import serve_dev_enclave as serve_dev_enclave
from ._service import SignService as SignService

__all__ = [
    "DEFAULT_MAX_SESSIONS",
    "DEFAULT_SESSION_TTL_S",
    "CommitResult",
    "EnclaveConfig",
    "PoolError",
    "PoolErrorKind",
    "SessionPool",
    "SignService",
    "serve_dev_enclave",
]
