"""The enclave side: session pool, SignService handlers, and the process's supervision tree."""

from ._config import EnclaveConfig as EnclaveConfig
from ._config import enclave_config as enclave_config
from ._deltas import DeltaStoreError as DeltaStoreError
from ._deltas import DeltaWriter as DeltaWriter
from ._deltas import EnclaveDeltas as EnclaveDeltas
from ._exit import EnclaveExit as EnclaveExit
from ._exit import ExitCode as ExitCode
from ._lifecycle import TRANSITIONS as TRANSITIONS
from ._lifecycle import EnclaveEvent as EnclaveEvent
from ._lifecycle import EnclaveLifecycle as EnclaveLifecycle
from ._lifecycle import EnclaveState as EnclaveState
from ._lifecycle import LifecycleError as LifecycleError
from ._link import ParentLink as ParentLink
from ._measured import DEFAULT_CONFIG_PATH as DEFAULT_CONFIG_PATH
from ._measured import DEVELOPMENT_CONFIG as DEVELOPMENT_CONFIG
from ._measured import MeasuredConfig as MeasuredConfig
from ._measured import MeasuredConfigError as MeasuredConfigError
from ._measured import development_config as development_config
from ._measured import load_measured_config as load_measured_config
from ._measured import parse_measured_config as parse_measured_config
from ._pool import DEFAULT_MAX_SESSIONS as DEFAULT_MAX_SESSIONS
from ._pool import DEFAULT_SESSION_TTL_S as DEFAULT_SESSION_TTL_S
from ._pool import CommitResult as CommitResult
from ._pool import PoolError as PoolError
from ._pool import PoolErrorKind as PoolErrorKind
from ._pool import SessionPool as SessionPool
from ._preload import PreloadError as PreloadError
from ._preload import PreloadReport as PreloadReport
from ._serve import EnclaveHandle as EnclaveHandle
from ._serve import configure_gc_for_serving as configure_gc_for_serving
from ._serve import serve_dev_enclave as serve_dev_enclave
from ._serve import serve_enclave as serve_enclave
from ._service import SignService as SignService

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_MAX_SESSIONS",
    "DEFAULT_SESSION_TTL_S",
    "DEVELOPMENT_CONFIG",
    "TRANSITIONS",
    "CommitResult",
    "EnclaveConfig",
    "EnclaveEvent",
    "EnclaveExit",
    "EnclaveHandle",
    "EnclaveLifecycle",
    "EnclaveState",
    "ExitCode",
    "LifecycleError",
    "MeasuredConfig",
    "MeasuredConfigError",
    "ParentLink",
    "PoolError",
    "PoolErrorKind",
    "PreloadError",
    "PreloadReport",
    "SessionPool",
    "SignService",
    "configure_gc_for_serving",
    "development_config",
    "enclave_config",
    "load_measured_config",
    "parse_measured_config",
    "serve_dev_enclave",
    "serve_enclave",
    "DeltaWriter",
    "EnclaveDeltas",
    "DeltaStoreError",
]
