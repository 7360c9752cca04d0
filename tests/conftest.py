from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trio_sign.crypto import _stream

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


@pytest.fixture(autouse=True)
def _restore_trio_sign_logger() -> Iterator[None]:
    """Tests that call the CLI in-process run ``configure_logging``, which points the
    ``trio_sign`` logger at that test's captured stderr and stops propagation. Put it back
    afterwards, so later tests' records reach ``caplog`` and never a closed capture file."""
    logger = logging.getLogger("trio_sign")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture
def decrypted(monkeypatch: pytest.MonkeyPatch) -> list[bytearray | memoryview]:
    """Every buffer the decoder decrypts a chunk into, in order."""
    buffers: list[bytearray | memoryview] = []
    real = _stream.SecretStreamPull.pull_into

    def spy(
        self: _stream.SecretStreamPull,
        out: bytearray | memoryview,
        ciphertext: Any,
        *,
        ad: Any,
    ) -> int | None:
        buffers.append(out)
        return real(self, out, ciphertext, ad=ad)

    monkeypatch.setattr(_stream.SecretStreamPull, "pull_into", spy)
    return buffers
