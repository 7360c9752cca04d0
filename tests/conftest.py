from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _vectors_dir() -> Path:
    env = os.environ.get("TRIO_SIGN_VECTORS")
    if env:
        return Path(env)
    return REPO.parent / "shared" / "vectors"


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    """``../shared/vectors`` (or ``$TRIO_SIGN_VECTORS``). Missing vectors are an error, not a skip:
    CI always has ``shared/`` beside the checkout."""
    path = _vectors_dir()
    if not path.is_dir():
        raise RuntimeError(f"test vectors not found at {path}; set TRIO_SIGN_VECTORS")
    return path


@pytest.fixture(scope="session")
def nsm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local NSM root shared by the tests that boot a real enclave."""
    from trio_sign.nitro import LocalNsm

    path = tmp_path_factory.mktemp("nsm")
    LocalNsm.from_dir(path, create=True).close()
    return path
