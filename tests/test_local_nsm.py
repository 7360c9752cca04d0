"""LocalNsm: AWS-format documents from a local CA, NSM PCR semantics, the on-disk root."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trio_sign.nitro import AttestationError, verify_attestation
from trio_sign.nitro._local_nsm import (
    DEFAULT_LOCAL_PCRS,
    LEAF_LIFETIME,
    ROOT_BUNDLE_FILE,
    ROOT_CERT_FILE,
    LocalNsm,
    load_pcr_json,
)
from trio_sign.nitro._nsm_device import AsyncNsm, NsmError, NsmLike

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def nsm(clock: Clock) -> LocalNsm:
    return LocalNsm(clock=clock)


def _payload(document: bytes) -> dict[object, object]:
    payload: dict[object, object] = cbor2.loads(cbor2.loads(document)[2])
    return payload


# -- documents ------------------------------------------------------------------------------------


def test_document_verifies_against_the_local_root(nsm: LocalNsm) -> None:
    document = nsm.attestation(user_data=b"shares sha256", nonce=b"n" * 32)
    doc = verify_attestation(document, root_pem=nsm.root_pem, at=T0, production=True)
    assert doc.module_id == nsm.module_id
    assert doc.timestamp == T0
    assert doc.user_data == b"shares sha256"
    assert doc.nonce == b"n" * 32
    assert doc.public_key is None
    assert not doc.debug_mode
    assert {i: doc.pcrs[i] for i in (0, 1, 2)} == dict(DEFAULT_LOCAL_PCRS)
    assert [c.role for c in doc.chain] == [
        "leaf",
        "cabundle[3]",
        "cabundle[2]",
        "cabundle[1]",
        "root",
    ]
    # Like AWS: the leaf starts 3 s before the document and ends 3 h after it.
    assert doc.not_before == T0 - timedelta(seconds=3)
    assert doc.not_after == T0 + LEAF_LIFETIME
    assert doc.chain[0].subject.startswith(f"CN={nsm.module_id}.")


def test_document_fails_against_the_aws_root(nsm: LocalNsm) -> None:
    with pytest.raises(AttestationError) as exc:
        verify_attestation(nsm.attestation(), at=T0)
    assert exc.value.reason == "chain_untrusted"


def test_document_has_the_aws_shape(nsm: LocalNsm) -> None:
    document = nsm.attestation()
    assert document[:7] == bytes.fromhex("8444a1013822a0")  # untagged, {1:-35}, {}
    outer = cbor2.loads(document)
    assert len(outer[3]) == 96
    assert outer[2][:1] == b"\xa9"  # a definite map of 9 entries, like 2022-2024 AWS docs
    payload = _payload(document)
    assert list(payload) == [
        "module_id",
        "digest",
        "timestamp",
        "pcrs",
        "certificate",
        "cabundle",
        "public_key",
        "user_data",
        "nonce",
    ]
    assert payload["digest"] == "SHA384"
    assert payload["timestamp"] == int(T0.timestamp() * 1000)
    pcrs = payload["pcrs"]
    assert isinstance(pcrs, dict)
    assert sorted(pcrs) == list(range(16))
    assert all(len(v) == 48 for v in pcrs.values())
    assert payload["public_key"] is None
    assert payload["user_data"] is None
    assert payload["nonce"] is None
    cabundle = payload["cabundle"]
    assert isinstance(cabundle, list)
    assert len(cabundle) == 4
    root = x509.load_pem_x509_certificate(nsm.root_pem)
    assert cabundle[0] == root.public_bytes(serialization.Encoding.DER)


def test_certificate_extensions_copy_aws(nsm: LocalNsm) -> None:
    payload = _payload(nsm.attestation())
    assert isinstance(payload["certificate"], bytes)
    assert isinstance(payload["cabundle"], list)
    leaf = x509.load_der_x509_certificate(payload["certificate"])
    cas = [x509.load_der_x509_certificate(c) for c in payload["cabundle"]]

    def ext(
        cert: x509.Certificate, kind: type[x509.ExtensionType]
    ) -> x509.Extension[x509.ExtensionType]:
        return cert.extensions.get_extension_for_class(kind)

    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical
    assert bc.value == x509.BasicConstraints(ca=False, path_length=None)
    ku = ext(leaf, x509.KeyUsage)
    assert not ku.critical
    assert isinstance(ku.value, x509.KeyUsage)
    assert ku.value.digital_signature
    assert ku.value.content_commitment
    assert not ku.value.key_cert_sign
    for cert, path_length in zip(cas, [None, 2, 1, 0], strict=True):
        bc = ext(cert, x509.BasicConstraints)
        assert bc.critical
        assert bc.value == x509.BasicConstraints(ca=True, path_length=path_length)
        ku = ext(cert, x509.KeyUsage)
        assert ku.critical
        assert isinstance(ku.value, x509.KeyUsage)
        assert ku.value.key_cert_sign
        assert ku.value.crl_sign is (path_length != 0)
        assert cert.signature_hash_algorithm is not None
        assert cert.signature_hash_algorithm.name == "sha384"
    assert leaf.signature_hash_algorithm is not None
    assert leaf.signature_hash_algorithm.name == "sha384"


def test_leaf_lives_three_hours(nsm: LocalNsm) -> None:
    document = nsm.attestation()
    verify_attestation(document, root_pem=nsm.root_pem, at=T0 + LEAF_LIFETIME)
    with pytest.raises(AttestationError) as exc:
        verify_attestation(
            document, root_pem=nsm.root_pem, at=T0 + LEAF_LIFETIME + timedelta(seconds=1)
        )
    assert exc.value.reason == "cert_expired"
    assert exc.value.message.startswith("leaf certificate")


def test_intermediates_are_renewed_as_time_passes(nsm: LocalNsm, clock: Clock) -> None:
    first = _payload(nsm.attestation())["cabundle"]
    clock.now = T0 + timedelta(days=30)
    later = nsm.attestation()
    doc = verify_attestation(later, root_pem=nsm.root_pem, at=clock.now)
    assert doc.cabundle[0] == first[0]  # type: ignore[index]
    assert doc.cabundle[1:] != tuple(first[1:])  # type: ignore[index]


def test_each_document_has_its_own_leaf(nsm: LocalNsm) -> None:
    a = verify_attestation(nsm.attestation(), root_pem=nsm.root_pem, at=T0)
    b = verify_attestation(nsm.attestation(), root_pem=nsm.root_pem, at=T0)
    assert a.certificate != b.certificate
    assert a.cabundle == b.cabundle


def test_debug_mode_zeroes_pcr0_to_2(clock: Clock) -> None:
    nsm = LocalNsm(clock=clock, debug=True, pcrs={0: b"\1" * 48, 4: b"\4" * 48})
    doc = verify_attestation(nsm.attestation(), root_pem=nsm.root_pem, at=T0)
    assert doc.debug_mode
    assert doc.pcrs[0] == doc.pcrs[1] == doc.pcrs[2] == bytes(48)
    assert doc.pcrs[4] == b"\4" * 48
    with pytest.raises(AttestationError) as exc:
        verify_attestation(nsm.attestation(), root_pem=nsm.root_pem, at=T0, production=True)
    assert exc.value.reason == "debug_mode"


def test_pcrs_from_nitro_cli_json(tmp_path: Path, clock: Clock) -> None:
    measurements = {
        "Measurements": {
            "HashAlgorithm": "Sha384 { ... }",
            "PCR0": "11" * 48,
            "PCR1": "22" * 48,
            "PCR2": "33" * 48,
        }
    }
    path = tmp_path / "pcrs.json"
    path.write_text(json.dumps(measurements))
    pcrs = load_pcr_json(path)
    assert pcrs == {0: b"\x11" * 48, 1: b"\x22" * 48, 2: b"\x33" * 48}
    assert load_pcr_json({"0": "11" * 48}) == {0: b"\x11" * 48}
    nsm = LocalNsm(clock=clock, pcrs=pcrs)
    doc = verify_attestation(
        nsm.attestation(), root_pem=nsm.root_pem, at=T0, expected_pcrs=pcrs, production=True
    )
    assert doc.pcrs[3] == bytes(48)
    with pytest.raises(AttestationError) as exc:
        verify_attestation(
            nsm.attestation(), root_pem=nsm.root_pem, at=T0, expected_pcrs={1: b"\x11" * 48}
        )
    assert exc.value.reason == "pcr_mismatch"
    assert exc.value.message.startswith("PCR 1 is 2222")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"PCR0": "11" * 47}, "47 bytes"),
        ({"PCR0": "zz"}, "not hex"),
        ({"PCR32": "11" * 48}, "outside"),
        ([], "not an object"),
    ],
)
def test_pcr_json_errors(tmp_path: Path, data: object, match: str) -> None:
    path = tmp_path / "pcrs.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        load_pcr_json(path)


def test_bad_constructor_pcrs() -> None:
    with pytest.raises(ValueError, match=r"0\.\.15"):
        LocalNsm(pcrs={16: bytes(48)})
    with pytest.raises(ValueError, match="expected 48"):
        LocalNsm(pcrs={0: bytes(32)})


# -- user fields ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1024])
def test_user_fields_round_trip(nsm: LocalNsm, size: int) -> None:
    fields = {
        "user_data": os.urandom(size),
        "nonce": os.urandom(size),
        "public_key": os.urandom(size),
    }
    doc = verify_attestation(
        nsm.attestation(**fields),
        root_pem=nsm.root_pem,
        at=T0,
        expected_nonce=fields["nonce"],
    )
    assert (doc.user_data, doc.nonce, doc.public_key) == (
        fields["user_data"],
        fields["nonce"],
        fields["public_key"],
    )


@pytest.mark.parametrize("field", ["user_data", "nonce", "public_key"])
def test_user_fields_above_1024_are_refused(nsm: LocalNsm, field: str) -> None:
    with pytest.raises(NsmError) as exc:
        nsm.attestation(**{field: bytes(1025)})
    assert exc.value.reason == "InputTooLarge"
    assert field in str(exc.value)
    with pytest.raises(TypeError):
        nsm.attestation(**{field: "text"})  # type: ignore[arg-type]


# -- PCRs -----------------------------------------------------------------------------------------


def test_extend_and_lock(nsm: LocalNsm) -> None:
    assert nsm.describe_pcr(16) == (False, bytes(48))
    first = nsm.extend_pcr(16, b"manifest")
    assert first == hashlib.sha384(bytes(48) + b"manifest").digest()
    second = nsm.extend_pcr(16, b"more")
    assert second == hashlib.sha384(first + b"more").digest()
    assert nsm.describe_pcr(16) == (False, second)
    assert 16 not in _payload(nsm.attestation())["pcrs"]  # type: ignore[operator]

    nsm.lock_pcr(16)
    nsm.lock_pcr(16)  # idempotent
    assert nsm.describe_pcr(16) == (True, second)
    with pytest.raises(NsmError) as exc:
        nsm.extend_pcr(16, b"late")
    assert exc.value.reason == "ReadOnlyIndex"
    assert nsm.describe_pcr(16) == (True, second)
    assert 16 in nsm.describe_nsm()["locked_pcrs"]

    # A locked PCR is part of every later document, and can be pinned.
    doc = verify_attestation(
        nsm.attestation(), root_pem=nsm.root_pem, at=T0, expected_pcrs={16: second}
    )
    assert sorted(doc.pcrs) == [*range(16), 16]


@pytest.mark.parametrize("index", [0, 1, 2, 4, 8, 15])
def test_boot_pcrs_are_read_only(nsm: LocalNsm, index: int) -> None:
    locked, value = nsm.describe_pcr(index)
    assert locked
    for call in (lambda: nsm.extend_pcr(index, b"x"), lambda: nsm.lock_pcr(index)):
        with pytest.raises(NsmError) as exc:
            call()
        assert exc.value.reason == "ReadOnlyIndex"
    assert nsm.describe_pcr(index) == (True, value)


def test_bad_indexes_and_data(nsm: LocalNsm) -> None:
    for call in (nsm.describe_pcr, nsm.lock_pcr, lambda i: nsm.extend_pcr(i, b"x")):
        with pytest.raises(NsmError) as exc:
            call(32)
        assert exc.value.reason == "InvalidIndex"
        for bad in (-1, 65536, True):
            with pytest.raises(ValueError, match=r"0\.\.65535"):
                call(bad)
    with pytest.raises(TypeError):
        nsm.extend_pcr(16, "text")  # type: ignore[arg-type]
    with pytest.raises(NsmError) as exc:
        nsm.extend_pcr(16, bytes(4096))
    assert exc.value.reason == "request_too_large"
    assert nsm.describe_pcr(16) == (False, bytes(48))


def test_describe_nsm_and_random(nsm: LocalNsm) -> None:
    info = nsm.describe_nsm()
    assert info == {
        "version_major": 1,
        "version_minor": 0,
        "version_patch": 0,
        "module_id": nsm.module_id,
        "max_pcrs": 32,
        "locked_pcrs": list(range(16)),
        "digest": "SHA384",
    }
    a, b = nsm.get_random(), nsm.get_random()
    assert len(a) == len(b) == 256
    assert a != b


async def test_async_wrapper_and_protocol(nsm: LocalNsm) -> None:
    device: NsmLike = nsm  # LocalNsm satisfies the device protocol (checked by mypy)
    async_nsm = AsyncNsm(device)
    document = await async_nsm.attestation(nonce=b"abc")
    assert verify_attestation(document, root_pem=nsm.root_pem, at=T0).nonce == b"abc"
    assert await async_nsm.extend_pcr(17, b"x") == hashlib.sha384(bytes(48) + b"x").digest()
    with nsm:
        pass


# -- the root on disk -----------------------------------------------------------------------------


def test_from_dir_creates_and_shares_a_root(tmp_path: Path, clock: Clock) -> None:
    directory = tmp_path / "nsm"
    with pytest.raises(FileNotFoundError):
        LocalNsm.from_dir(directory)
    parent = LocalNsm.from_dir(directory, create=True, clock=clock)
    key_file = directory / ROOT_BUNDLE_FILE
    cert_file = directory / ROOT_CERT_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert cert_file.read_bytes() == parent.root_pem
    assert b"PRIVATE KEY" not in cert_file.read_bytes()

    enclave = LocalNsm.from_dir(directory, create=True, clock=clock)  # loads, does not replace
    assert enclave.root_pem == parent.root_pem
    assert enclave.module_id != parent.module_id
    doc = verify_attestation(enclave.attestation(), root_pem=cert_file.read_bytes(), at=T0)
    assert doc.module_id == enclave.module_id


def test_from_dir_race_ends_with_one_root(tmp_path: Path) -> None:
    roots: list[bytes] = []

    def make() -> None:
        roots.append(LocalNsm.from_dir(tmp_path, create=True).root_pem)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(roots) == 4
    assert len(set(roots)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [ROOT_BUNDLE_FILE, ROOT_CERT_FILE]


def test_from_dir_refuses_a_readable_key(tmp_path: Path) -> None:
    LocalNsm.from_dir(tmp_path, create=True)
    (tmp_path / ROOT_BUNDLE_FILE).chmod(0o644)
    with pytest.raises(NsmError) as exc:
        LocalNsm.from_dir(tmp_path)
    assert exc.value.reason == "bad_local_root"
    assert "chmod 600" in str(exc.value)


def test_from_dir_refuses_a_corrupt_bundle(tmp_path: Path) -> None:
    LocalNsm.from_dir(tmp_path, create=True)
    (tmp_path / ROOT_BUNDLE_FILE).write_bytes(b"garbage")
    with pytest.raises(NsmError) as exc:
        LocalNsm.from_dir(tmp_path)
    assert exc.value.reason == "bad_local_root"


def test_root_key_and_cert_must_match() -> None:
    a, b = LocalNsm(), LocalNsm()
    with pytest.raises(ValueError, match="does not match"):
        LocalNsm(root_key=a._root.key, root_cert=b.root_certificate)
    with pytest.raises(ValueError, match="needs its private key"):
        LocalNsm(root_cert=a.root_certificate)
