"""The NSM client: CBOR messages (sans-io), NsmDevice over a fake transport, the ioctl plumbing,
entropy seeding, and the real device where there is one."""

from __future__ import annotations

import ctypes
import hashlib
import os
import struct
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from trio_sign import TrioSignError
from trio_sign.crypto._sodium import memzero
from trio_sign.nitro import (
    NSM_IOCTL_RAW,
    AsyncNsm,
    EntropySeed,
    EphemeralRecipientKey,
    LocalNsm,
    NsmDevice,
    NsmError,
    NsmLike,
    _nsm_device,
    decode_attestation,
    encrypt_for_recipient,
    seed_entropy,
)
from trio_sign.nitro._nsm_device import (
    RNDADDENTROPY,
    IoctlTransport,
    decode_response,
    encode_request,
    pack_rand_pool_info,
)


class FakeNsm:
    """Answers requests in the real NSM CBOR format (serde externally tagged enums)."""

    def __init__(self) -> None:
        self.pcrs = {i: bytes(48) for i in range(32)}
        self.locked = set(range(16))  # 0..15 are read-only from inside the enclave
        self.requests: list[Any] = []
        self.raw_answer: bytes | None = None

    def __call__(self, request: bytes) -> bytes:
        if self.raw_answer is not None:
            return self.raw_answer
        req = cbor2.loads(request)
        self.requests.append(req)
        return cbor2.dumps(self._answer(req))

    def _answer(self, req: Any) -> Any:
        if req == "GetRandom":
            return {"GetRandom": {"random": os.urandom(256)}}
        if req == "DescribeNSM":
            return {
                "DescribeNSM": {
                    "version_major": 1,
                    "version_minor": 0,
                    "version_patch": 0,
                    "module_id": "i-0123-enc0123",
                    "max_pcrs": 32,
                    "locked_pcrs": sorted(self.locked),
                    "digest": "SHA384",
                }
            }
        ((name, args),) = req.items()
        if name == "Attestation":
            assert list(args) == ["user_data", "nonce", "public_key"]
            return {"Attestation": {"document": b"\x84" + cbor2.dumps(args)}}
        index = args["index"]
        if index >= 32:
            return {"Error": "InvalidIndex"}
        if name == "DescribePCR":
            return {"DescribePCR": {"lock": index in self.locked, "data": self.pcrs[index]}}
        if name == "ExtendPCR":
            if index in self.locked:
                return {"Error": "ReadOnlyIndex"}
            self.pcrs[index] = hashlib.sha384(self.pcrs[index] + args["data"]).digest()
            return {"ExtendPCR": {"data": self.pcrs[index]}}
        if name == "LockPCR":
            self.locked.add(index)
            return "LockPCR"
        return {"Error": "InvalidOperation"}


@pytest.fixture
def fake() -> FakeNsm:
    return FakeNsm()


@pytest.fixture
def device(fake: FakeNsm) -> NsmDevice:
    return NsmDevice(fake)


# -- sans-io ------------------------------------------------------------------------------


def test_request_encoding_is_serde_externally_tagged() -> None:
    assert encode_request("GetRandom") == b"\x69GetRandom"
    assert encode_request("DescribeNSM") == cbor2.dumps("DescribeNSM")
    assert encode_request("DescribePCR", {"index": 16}) == bytes.fromhex(
        "a1" + "6b" + b"DescribePCR".hex() + "a1" + "65" + b"index".hex() + "10"
    )
    att = encode_request("Attestation", {"user_data": None, "nonce": b"n", "public_key": None})
    assert cbor2.loads(att) == {
        "Attestation": {"user_data": None, "nonce": b"n", "public_key": None}
    }
    assert att.index(b"user_data") < att.index(b"nonce") < att.index(b"public_key")
    with pytest.raises(ValueError, match="needs parameters"):
        encode_request("LockPCR")


def test_request_size_limit() -> None:
    big = {"user_data": bytes(4096), "nonce": None, "public_key": None}
    with pytest.raises(NsmError) as info:
        encode_request("Attestation", big)
    assert info.value.reason == "request_too_large"


@pytest.mark.parametrize(
    ("answer", "variant", "expected"),
    [
        ({"GetRandom": {"random": b"r"}}, "GetRandom", {"random": b"r"}),
        ("LockPCR", "LockPCR", None),
        ("LockPCRs", "LockPCRs", None),
    ],
)
def test_decode_response(answer: Any, variant: str, expected: Any) -> None:
    assert decode_response(cbor2.dumps(answer), variant) == expected


@pytest.mark.parametrize(
    ("raw", "variant", "reason"),
    [
        (cbor2.dumps({"Error": "InvalidIndex"}), "DescribePCR", "InvalidIndex"),
        (cbor2.dumps({"Error": "InputTooLarge"}), "Attestation", "InputTooLarge"),
        (cbor2.dumps({"Error": 3}), "GetRandom", "bad_response"),
        (cbor2.dumps({"GetRandom": {"random": b"r"}}), "DescribeNSM", "bad_response"),
        (cbor2.dumps("GetRandom"), "GetRandom", "bad_response"),
        (cbor2.dumps({"LockPCR": None}), "LockPCR", "bad_response"),
        (cbor2.dumps([1]), "GetRandom", "bad_response"),
        (b"\xff\x00", "GetRandom", "bad_response"),
        (b"", "GetRandom", "bad_response"),
    ],
)
def test_decode_response_errors(raw: bytes, variant: str, reason: str) -> None:
    with pytest.raises(NsmError) as info:
        decode_response(raw, variant)
    assert info.value.reason == reason
    assert isinstance(info.value, TrioSignError)


# -- NsmDevice over the fake --------------------------------------------------------------


def test_attestation(device: NsmDevice, fake: FakeNsm) -> None:
    doc = device.attestation(nonce=b"n" * 32, public_key=b"spki")
    assert doc.startswith(b"\x84")
    assert fake.requests[-1] == {
        "Attestation": {"user_data": None, "nonce": b"n" * 32, "public_key": b"spki"}
    }
    device.attestation()
    assert fake.requests[-1] == {
        "Attestation": {"user_data": None, "nonce": None, "public_key": None}
    }
    with pytest.raises(TypeError, match="nonce"):
        device.attestation(nonce="text")  # type: ignore[arg-type]


def test_pcrs(device: NsmDevice) -> None:
    assert device.describe_pcr(0) == (True, bytes(48))
    assert device.describe_pcr(16) == (False, bytes(48))
    manifest = hashlib.sha384(b"manifest").digest()
    new = device.extend_pcr(16, manifest)
    assert new == hashlib.sha384(bytes(48) + manifest).digest()
    device.lock_pcr(16)
    assert device.describe_pcr(16) == (True, new)
    with pytest.raises(NsmError, match="ReadOnlyIndex") as info:
        device.extend_pcr(16, b"x")
    assert info.value.reason == "ReadOnlyIndex"
    with pytest.raises(NsmError) as info:
        device.describe_pcr(40)
    assert info.value.reason == "InvalidIndex"
    for bad in (-1, 65536, True):
        with pytest.raises(ValueError, match="PCR index"):
            device.describe_pcr(bad)
    with pytest.raises(TypeError, match="data"):
        device.extend_pcr(17, "x")  # type: ignore[arg-type]


def test_get_random_and_describe(device: NsmDevice) -> None:
    assert len(device.get_random()) == 256
    info = device.describe_nsm()
    assert info["max_pcrs"] == 32
    assert info["digest"] == "SHA384"
    assert info["locked_pcrs"] == list(range(16))


@pytest.mark.parametrize(
    "answer",
    [
        {"GetRandom": {"random": "text"}},
        {"GetRandom": {}},
        {"DescribePCR": {"lock": 1, "data": b""}},
    ],
)
def test_bad_field_types(device: NsmDevice, fake: FakeNsm, answer: Any) -> None:
    fake.raw_answer = cbor2.dumps(answer)
    call = device.get_random if "GetRandom" in answer else lambda: device.describe_pcr(1)
    with pytest.raises(NsmError) as info:
        call()
    assert info.value.reason == "bad_response"


def test_describe_nsm_checks_fields(device: NsmDevice, fake: FakeNsm) -> None:
    fake.raw_answer = cbor2.dumps({"DescribeNSM": {"version_major": 1}})
    with pytest.raises(NsmError, match="version_minor"):
        device.describe_nsm()
    good = fake._answer("DescribeNSM")
    good["DescribeNSM"]["locked_pcrs"] = ["0"]
    fake.raw_answer = cbor2.dumps(good)
    with pytest.raises(NsmError, match="locked_pcrs"):
        device.describe_nsm()


def test_close_is_idempotent_and_final(fake: FakeNsm) -> None:
    closed: list[int] = []
    with NsmDevice(fake, on_close=lambda: closed.append(1)) as device:
        device.get_random()
    device.close()
    assert closed == [1]
    with pytest.raises(ValueError, match="closed"):
        device.get_random()


async def test_async_wrapper(device: NsmDevice) -> None:
    nsm = AsyncNsm(device)
    assert len(await nsm.get_random()) == 256
    assert (await nsm.describe_nsm())["module_id"].startswith("i-")
    assert (await nsm.attestation(user_data=b"u")).startswith(b"\x84")
    await nsm.extend_pcr(20, b"x")
    await nsm.lock_pcr(20)
    assert (await nsm.describe_pcr(20))[0] is True


async def test_async_wrapper_runs_in_a_thread(fake: FakeNsm) -> None:
    import threading

    main = threading.get_ident()
    seen: list[int] = []

    def transport(request: bytes) -> bytes:
        seen.append(threading.get_ident())
        return fake(request)

    await AsyncNsm(NsmDevice(transport)).get_random()
    assert seen
    assert seen[0] != main


# -- the ioctl plumbing, with the kernel side emulated -----------------------------------


def test_ioctl_number_and_struct_layout() -> None:
    # _IOWR(0x0A, 0, 32-byte struct) = dir 3 << 30 | size 32 << 16 | type 0x0A << 8 | nr 0
    assert NSM_IOCTL_RAW == (3 << 30) | (32 << 16) | (0x0A << 8) | 0 == 3223325184
    assert ctypes.sizeof(_nsm_device._NsmRaw) == 32
    # _IOW('R', 3, int[2]) = 1 << 30 | 8 << 16 | 0x52 << 8 | 3
    assert (1 << 30) | (8 << 16) | (ord("R") << 8) | 3 == RNDADDENTROPY


def _kernel(answer: bytes, seen: list[bytes]) -> Any:
    """An ``fcntl.ioctl`` stand-in that does what drivers/misc/nsm.c does with nsm_raw."""

    def ioctl(fd: int, request: int, arg: Any, mutate: bool) -> int:
        assert request == NSM_IOCTL_RAW
        assert mutate is True
        raw = _nsm_device._NsmRaw.from_buffer(arg)
        seen.append(ctypes.string_at(raw.request.addr, raw.request.len))
        assert raw.response.len == 0x3000
        ctypes.memmove(raw.response.addr, answer, len(answer))
        raw.response.len = len(answer)
        return 0

    return ioctl


def test_ioctl_transport(monkeypatch: pytest.MonkeyPatch, fake: FakeNsm) -> None:
    seen: list[bytes] = []
    answer = cbor2.dumps({"GetRandom": {"random": b"\x07" * 256}})
    monkeypatch.setattr(_nsm_device, "_ioctl", _kernel(answer, seen))
    device = NsmDevice(IoctlTransport(fd=-1))
    assert device.get_random() == b"\x07" * 256
    assert seen == [b"\x69GetRandom"]


def test_ioctl_transport_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int, request: int, arg: Any, mutate: bool) -> int:
        raise OSError(90, "Message too long")  # EMSGSIZE

    monkeypatch.setattr(_nsm_device, "_ioctl", failing)
    with pytest.raises(NsmError, match="too large") as info:
        IoctlTransport(fd=-1)(b"x")
    assert (info.value.reason, info.value.errno) == ("ioctl_failed", 90)
    with pytest.raises(NsmError) as info:
        IoctlTransport(fd=-1)(bytes(4097))
    assert info.value.reason == "request_too_large"

    def lying(fd: int, request: int, arg: Any, mutate: bool) -> int:
        _nsm_device._NsmRaw.from_buffer(arg).response.len = 0x3001
        return 0

    monkeypatch.setattr(_nsm_device, "_ioctl", lying)
    with pytest.raises(NsmError) as info:
        IoctlTransport(fd=-1)(b"x")
    assert info.value.reason == "bad_response"


def test_open_missing_device(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        NsmDevice.open(str(tmp_path / "nsm"))


# -- entropy ------------------------------------------------------------------------------


def test_rand_pool_info_packing() -> None:
    data = bytes(range(32))
    packed = pack_rand_pool_info(data, entropy_bits=256)
    assert isinstance(packed, bytearray)
    assert packed == struct.pack("=ii", 256, 32) + data
    assert packed[:8] == (256).to_bytes(4, "little") + (32).to_bytes(4, "little")
    with pytest.raises(ValueError, match="entropy_bits"):
        pack_rand_pool_info(data, entropy_bits=257)
    with pytest.raises(ValueError, match="per call"):
        pack_rand_pool_info(bytes(1017), entropy_bits=0)


class _Random32:
    def get_random(self) -> bytes:
        return os.urandom(32)


def test_seed_without_credit_writes(tmp_path: Path) -> None:
    sink = tmp_path / "random"
    sink.write_bytes(b"")
    result = seed_entropy(_Random32(), credit=False, path=str(sink))
    assert result == EntropySeed(32, False, "not requested")
    assert len(sink.read_bytes()) == 32


def test_seed_credit_refused_falls_back_to_write(tmp_path: Path) -> None:
    sink = tmp_path / "random"
    sink.write_bytes(b"")
    result = seed_entropy(_Random32(), path=str(sink))  # ioctl on a regular file: ENOTTY
    assert not result.credited
    assert result.detail is not None
    assert result.detail.startswith("RNDADDENTROPY refused")
    assert len(sink.read_bytes()) == 32


def test_seed_credit_ioctl_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[int, bytes]] = []

    def ioctl(fd: int, request: int, arg: Any, mutate: bool) -> int:
        calls.append((request, bytes(arg)))
        return 0

    monkeypatch.setattr(_nsm_device, "_ioctl", ioctl)
    sink = tmp_path / "random"
    sink.write_bytes(b"")
    assert seed_entropy(_Random32(), path=str(sink)) == EntropySeed(32, True)
    ((request, arg),) = calls
    assert request == RNDADDENTROPY
    assert arg[:8] == struct.pack("=ii", 256, 32)
    assert sink.read_bytes() == b""  # credited through the ioctl only


def test_seed_real_rndaddentropy() -> None:
    """Credits 32 bytes of OS randomness to this machine's pool (harmless), if permitted."""
    if not os.access("/dev/random", os.W_OK):
        pytest.skip("/dev/random is not writable here")
    result = seed_entropy(_Random32())
    if not result.credited:
        pytest.skip(f"RNDADDENTROPY not permitted here: {result.detail}")
    assert result.nbytes == 32


# -- the real device ----------------------------------------------------------------------

_no_nsm = pytest.mark.skipif(not os.path.exists("/dev/nsm"), reason="no /dev/nsm here")


@_no_nsm
def test_real_device() -> None:  # pragma: no cover - only inside a Nitro Enclave
    with NsmDevice.open() as device:
        info = device.describe_nsm()
        assert info["digest"] == "SHA384"
        assert len(device.get_random()) > 0
        locked, value = device.describe_pcr(0)
        assert locked
        assert len(value) == 48
        doc = device.attestation(nonce=b"n" * 32)
        assert doc[:4] == bytes.fromhex("8444a101")


@_no_nsm
async def test_real_device_async() -> None:  # pragma: no cover - only inside a Nitro Enclave
    with trio.fail_after(10):
        device = await trio.to_thread.run_sync(NsmDevice.open)
        try:
            assert (await AsyncNsm(device).describe_nsm())["max_pcrs"] >= 16
        finally:
            device.close()


# -- the local stand-in through the same interfaces ---------------------------------------


async def test_async_wrapper_drives_local_nsm() -> None:
    local: NsmLike = LocalNsm()  # mypy checks LocalNsm has NsmDevice's method shapes
    nsm = AsyncNsm(local)
    assert len(await nsm.get_random()) > 0
    assert (await nsm.describe_pcr(0))[0] is True
    new = await nsm.extend_pcr(16, hashlib.sha384(b"manifest").digest())
    await nsm.lock_pcr(16)
    assert await nsm.describe_pcr(16) == (True, new)
    doc = await nsm.attestation(nonce=b"n" * 32, public_key=b"spki")
    assert decode_attestation(doc).public_key == b"spki"


async def test_kms_recipient_flow_with_local_nsm() -> None:
    """Enclave key -> attestation doc -> (KMS stand-in) envelope for the doc's key -> unwrap."""
    nsm = AsyncNsm(LocalNsm())
    recipient = await trio.to_thread.run_sync(EphemeralRecipientKey.generate)
    with recipient:
        doc = await nsm.attestation(public_key=recipient.public_key_der)
        spki = decode_attestation(doc).public_key
        assert spki is not None
        public = serialization.load_der_public_key(spki)
        assert isinstance(public, rsa.RSAPublicKey)
        blob = encrypt_for_recipient(public, b"\x01" * 32)
        data_key = recipient.decrypt_recipient_ciphertext(blob)
        try:
            assert data_key == b"\x01" * 32
        finally:
            memzero(data_key)
        assert data_key == bytes(32)
