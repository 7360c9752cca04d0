"""Scheme A preload end to end over the boot channel: the enclave side (attestation, CMS
envelope, streamed sealed bundle) against the parent side with the development KMS."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from trio_sign.enclave._preload import PreloadError, preload_shares
from trio_sign.nitro import (
    AsyncNsm,
    AttestationError,
    AttestationMessage,
    EventsConfigMessage,
    HelloMessage,
    LocalNsm,
    MessageStream,
    RecipientCiphertextMessage,
    decode_attestation,
    encrypt_for_recipient,
)
from trio_sign.parent import DevRecipientKms, PreloadRefused, RecipientKms, serve_preload
from trio_sign.shares import (
    DevKeyFile,
    SealedLoader,
    ShareRecord,
    encode_bundle,
    read_sealed_header,
)

from .enclave_helpers import make_accounts

N = 40


@pytest.fixture(scope="module")
def nsm() -> LocalNsm:
    return LocalNsm()


@pytest.fixture(scope="module")
def records() -> list[ShareRecord]:
    store, accounts = make_accounts(N)
    store.close()
    return [a.service for a in accounts.values()]


@pytest.fixture
def key(tmp_path: Path) -> DevKeyFile:
    return DevKeyFile.create(tmp_path / "dev.key")


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "bundle.enc"
    path.write_bytes(data)
    return path


Parent = Callable[[MessageStream], Awaitable[Any]]


async def run_both(nsm: LocalNsm, parent: Parent, **enclave_kw: Any) -> tuple[Any, Any]:
    """Run the enclave side and ``parent`` concurrently; return each side's result or error."""
    a, b = trio.testing.memory_stream_pair()
    results: dict[str, Any] = {}

    async def enclave_side() -> None:
        try:
            results["enclave"] = await preload_shares(MessageStream(a), AsyncNsm(nsm), **enclave_kw)
        except Exception as exc:
            results["enclave"] = exc
        finally:
            await a.aclose()

    async def parent_side() -> None:
        try:
            results["parent"] = await parent(MessageStream(b))
        except Exception as exc:
            results["parent"] = exc
        finally:
            await b.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(enclave_side)
        nursery.start_soon(parent_side)
    return results["enclave"], results["parent"]


def _dev_parent(path: Path, kms: RecipientKms, **kw: Any) -> Parent:
    return lambda channel: serve_preload(channel, path, kms, **kw)


async def test_preload_success(
    tmp_path: Path, nsm: LocalNsm, key: DevKeyFile, records: list[ShareRecord]
) -> None:
    path = _write(tmp_path, encode_bundle(records, key, chunk_size=2048))
    kms = DevRecipientKms(key, root_pem=nsm.root_pem)
    (store, report), result = await run_both(nsm, _dev_parent(path, kms, chunk_bytes=1000))
    assert len(store) == N
    assert report.accounts == N
    assert report.sha256 == store.fingerprint == result.sha256
    assert report.bundle_bytes == path.stat().st_size
    assert result.ok
    assert result.accounts == N
    for rec in records:
        got = store[rec.account_id]
        assert bytes(got.signing_share) == bytes(rec.signing_share)
    # the attestation the enclave sent carried a fresh RSA-2048 key
    doc = decode_attestation(report.attestation_document)
    assert doc.public_key is not None
    public = serialization.load_der_public_key(doc.public_key)
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 2048
    assert report.events is None  # the parent did not say where the gateway's events are
    store.close()


async def test_events_settings_travel_before_the_envelope(
    tmp_path: Path, nsm: LocalNsm, key: DevKeyFile, records: list[ShareRecord]
) -> None:
    """The parent tells the enclave where the gateway's events are (so the EIF need not)."""
    path = _write(tmp_path, encode_bundle(records, key))
    kms = DevRecipientKms(key, root_pem=nsm.root_pem)
    events = EventsConfigMessage(gateway_url="https://gw.internal:8443", node_id="node-b")
    (store, report), result = await run_both(nsm, _dev_parent(path, kms, events=events))
    assert result.ok
    assert report.events == events
    assert len(store) == N
    store.close()


@pytest.mark.parametrize("where", ["twice", "after_the_envelope"])
async def test_events_out_of_place_is_a_protocol_error(
    tmp_path: Path, nsm: LocalNsm, key: DevKeyFile, records: list[ShareRecord], where: str
) -> None:
    path = _write(tmp_path, encode_bundle(records, key))
    kms = DevRecipientKms(key, root_pem=nsm.root_pem)
    events = EventsConfigMessage(gateway_url="https://gw.internal", node_id="n")

    async def parent(channel: MessageStream) -> None:
        await channel.receive_expected(HelloMessage)
        attestation = await channel.receive_expected(AttestationMessage)
        with path.open("rb") as f:
            header, _ = read_sealed_header(f)
        envelope = await kms(attestation.document, header)
        await channel.send(events)
        if where == "twice":
            await channel.send(events)
        await channel.send(RecipientCiphertextMessage(ciphertext=envelope))
        if where == "after_the_envelope":
            await channel.send(events)
        await channel.receive()

    error, _ = await _expect_failure(nsm, parent, "protocol")
    assert "EventsConfigMessage" in str(error)


async def _expect_failure(
    nsm: LocalNsm, parent: Parent, reason: str, **kw: Any
) -> tuple[PreloadError, Any]:
    enclave, parent_result = await run_both(nsm, parent, **kw)
    assert isinstance(enclave, PreloadError), enclave
    assert enclave.reason == reason, enclave
    return enclave, parent_result


def _flip(data: bytes, pos: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 0x01
    return bytes(out)


async def test_tampered_bundle(
    tmp_path: Path, nsm: LocalNsm, key: DevKeyFile, records: list[ShareRecord]
) -> None:
    data = encode_bundle(records, key, chunk_size=2048)
    path = _write(tmp_path, _flip(data, len(data) - 100))
    kms = DevRecipientKms(key, root_pem=nsm.root_pem)
    _, parent = await _expect_failure(nsm, _dev_parent(path, kms), "tampered")
    assert isinstance(parent, PreloadRefused)
    assert parent.reason == "tampered"


async def test_truncated_bundle(
    tmp_path: Path, nsm: LocalNsm, key: DevKeyFile, records: list[ShareRecord]
) -> None:
    """The parent's own header walk catches a truncated file, so make it lie: it asks KMS with
    the whole file, then forwards a truncated one."""
    data = encode_bundle(records, key, chunk_size=2048)
    path = _write(tmp_path, data)
    kms = DevRecipientKms(key, root_pem=nsm.root_pem)

    async def kms_then_truncate(document: bytes, header: dict[str, Any]) -> bytes:
        envelope = await kms(document, header)
        path.write_bytes(data[: len(data) - 2048 - 21])
        return envelope

    await _expect_failure(nsm, _dev_parent(path, kms_then_truncate), "truncated")


async def test_corrupt_bundle(
    tmp_path: Path, nsm: LocalNsm, key: DevKeyFile, records: list[ShareRecord]
) -> None:
    data = encode_bundle(records, key)
    # The parent reads the header to ask KMS, so a corrupt file stops it first; corrupt the
    # bytes it forwards after asking instead (a parent that lies about what it sends).
    path = _write(tmp_path, data)
    kms = DevRecipientKms(key, root_pem=nsm.root_pem)

    async def kms_then_corrupt(document: bytes, header: dict[str, Any]) -> bytes:
        envelope = await kms(document, header)
        path.write_bytes(b"NOTSEAL!" + data[8:])
        return envelope

    await _expect_failure(nsm, _dev_parent(path, kms_then_corrupt), "bad_magic")


async def test_duplicate_accounts(
    tmp_path: Path, nsm: LocalNsm, key: DevKeyFile, records: list[ShareRecord]
) -> None:
    path = _write(tmp_path, encode_bundle([*records, records[3]], key))
    kms = DevRecipientKms(key, root_pem=nsm.root_pem)
    error, _ = await _expect_failure(nsm, _dev_parent(path, kms), "duplicate_account")
    assert "record 41" in str(error)


async def test_wrong_data_key_in_envelope(
    tmp_path: Path, nsm: LocalNsm, key: DevKeyFile, records: list[ShareRecord]
) -> None:
    """A parent that wraps some other 32-byte key: chunk 0 does not authenticate."""
    path = _write(tmp_path, encode_bundle(records, key))

    async def wrong_key_kms(document: bytes, header: dict[str, Any]) -> bytes:
        public = serialization.load_der_public_key(decode_attestation(document).public_key or b"")
        assert isinstance(public, rsa.RSAPublicKey)
        return encrypt_for_recipient(public, os.urandom(32))

    error, _ = await _expect_failure(nsm, _dev_parent(path, wrong_key_kms), "tampered")
    assert "wrong data key" in str(error)


async def test_envelope_for_another_key(
    tmp_path: Path, nsm: LocalNsm, key: DevKeyFile, records: list[ShareRecord]
) -> None:
    path = _write(tmp_path, encode_bundle(records, key))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()

    async def other_recipient(document: bytes, header: dict[str, Any]) -> bytes:
        return encrypt_for_recipient(other, os.urandom(32))

    error, _ = await _expect_failure(nsm, _dev_parent(path, other_recipient), "key_unwrap")
    assert "recipient" in str(error)


async def test_kms_refuses_wrong_key(
    tmp_path: Path, nsm: LocalNsm, records: list[ShareRecord], key: DevKeyFile
) -> None:
    path = _write(tmp_path, encode_bundle(records, key))
    other_key = DevKeyFile.create(tmp_path / "other.key")
    kms = DevRecipientKms(other_key, root_pem=nsm.root_pem)
    _, parent = await _expect_failure(nsm, _dev_parent(path, kms), "protocol")
    assert "sealed under key" in str(parent)


async def test_kms_policy_refuses_debug_enclave(
    tmp_path: Path, records: list[ShareRecord], key: DevKeyFile
) -> None:
    debug_nsm = LocalNsm(debug=True)
    path = _write(tmp_path, encode_bundle(records, key))
    kms = DevRecipientKms(key, root_pem=debug_nsm.root_pem, production=True)
    _, parent = await _expect_failure(debug_nsm, _dev_parent(path, kms), "protocol")
    assert isinstance(parent, AttestationError)
    assert parent.reason == "debug_mode"


async def test_memory_limit(
    tmp_path: Path, nsm: LocalNsm, key: DevKeyFile, records: list[ShareRecord]
) -> None:
    path = _write(tmp_path, encode_bundle(records, key))
    kms = DevRecipientKms(key, root_pem=nsm.root_pem)

    def memory_check(accounts: int) -> None:
        raise PreloadError(f"{accounts} accounts do not fit", reason="memory")

    error, parent = await _expect_failure(
        nsm, _dev_parent(path, kms), "memory", memory_check=memory_check
    )
    assert "40 accounts" in str(error)
    assert isinstance(parent, PreloadRefused)
    assert parent.reason == "memory"


async def test_timeout_cancels_cleanly(
    tmp_path: Path,
    nsm: LocalNsm,
    key: DevKeyFile,
    records: list[ShareRecord],
    monkeypatch: pytest.MonkeyPatch,
    mock_clock: trio.testing.MockClock,
) -> None:
    """A parent that stalls mid-bundle: the caller's deadline cancels preload, and the partial
    store and the data key are zeroed."""
    import trio_sign.enclave._preload as preload_mod

    loaders: list[Any] = []
    zeroed: list[bytearray] = []

    class SpyLoader(SealedLoader):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            loaders.append(self)

        def abort(self) -> None:
            if self._store is not None:
                zeroed.append(self._store._arena)
            super().abort()

    monkeypatch.setattr(preload_mod, "SealedLoader", SpyLoader)
    data = encode_bundle(records, key, chunk_size=1024)
    path = _write(tmp_path, data)
    kms = DevRecipientKms(key, root_pem=nsm.root_pem)
    a, b = trio.testing.memory_stream_pair()

    async def stalling_parent() -> None:
        channel = MessageStream(b)
        await channel.receive_expected(HelloMessage)
        att = await channel.receive_expected(AttestationMessage)
        from trio_sign.shares import read_sealed_header

        with path.open("rb") as f:
            header, _ = read_sealed_header(f)
        await channel.send(RecipientCiphertextMessage(ciphertext=await kms(att.document, header)))
        from trio_sign.nitro import BundleChunkMessage

        await channel.send(BundleChunkMessage(data=data[: len(data) // 2]))
        stalled.set()
        await trio.sleep_forever()

    async def clock_driver() -> None:
        # Worker threads (RSA keygen, NSM) make autojump unsafe; jump by hand once stalled.
        await stalled.wait()
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(30)

    stalled = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stalling_parent)
        nursery.start_soon(clock_driver)
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(30):
                await preload_shares(MessageStream(a), AsyncNsm(nsm))
        assert trio.current_time() - start == pytest.approx(30, abs=0.01)
        nursery.cancel_scope.cancel()
    assert len(loaders) == 1
    assert loaders[0]._store is None
    assert zeroed
    assert all(arena == bytearray(len(arena)) for arena in zeroed)
