"""Attestation documents: the 8 real AWS documents, tampering, time, roots, PCR/nonce policy."""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_sign import TrioSignError, nitro
from trio_sign.cli import _attestation
from trio_sign.nitro import (
    AWS_NITRO_ROOT_PEM,
    AWS_NITRO_ROOT_SHA256,
    MAX_DOCUMENT_BYTES,
    REASONS,
    AttestationError,
    LocalNsm,
    decode_attestation,
    verify_attestation,
)
from trio_sign.nitro._cose import (
    decode_sign1,
    der_to_raw,
    raw_to_der,
    sig_structure,
    sign1_es384,
)

NOW = datetime(2026, 11, 24, 13, 0, tzinfo=UTC)


def _manifest(vectors_dir: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(
        (vectors_dir / "nitro" / "manifest.json").read_text()
    )["attestation"]
    return entries


def _names() -> list[str]:
    # Parametrize by name without the fixture (collection time); the manifest is checked below.
    return [
        "base_prod_indefinite_map",
        "blocky_debug",
        "blocky_prod",
        "evervault_beta_debug",
        "evervault_beta_prod",
        "evervault_ga_debug",
        "signal_svr2_debug",
        "signal_svr2_prod",
    ]


@pytest.fixture(scope="module")
def manifest(vectors_dir: Path) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in _manifest(vectors_dir)}


def _doc(vectors_dir: Path, name: str) -> bytes:
    return (vectors_dir / "nitro" / "attestation" / f"{name}.cose").read_bytes()


def _reason(exc: pytest.ExceptionInfo[AttestationError]) -> str:
    reason: str = exc.value.reason
    assert reason in REASONS
    assert str(exc.value) == f"{reason}: {exc.value.message}"
    assert "\n" not in str(exc.value)
    return reason


def _with_payload(document: bytes, edit: Any) -> bytes:
    """The document with its payload map decoded, edited, and re-encoded (signature unchanged)."""
    outer = cbor2.loads(document)
    payload = cbor2.loads(outer[2])
    edit(payload)
    outer[2] = cbor2.dumps(payload)
    return cbor2.dumps(outer)


def _self_signed_root() -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "not-aws")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2019, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2049, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA384())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


# -- the pinned root ------------------------------------------------------------------------------


def test_embedded_root_is_the_published_aws_root(vectors_dir: Path) -> None:
    embedded = x509.load_pem_x509_certificate(AWS_NITRO_ROOT_PEM.encode())
    der = embedded.public_bytes(serialization.Encoding.DER)
    assert hashlib.sha256(der).hexdigest() == AWS_NITRO_ROOT_SHA256
    assert AWS_NITRO_ROOT_SHA256 == (
        "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
    )
    shipped = (vectors_dir / "nitro" / "root" / "AWS_NitroEnclaves_Root-G1.pem").read_bytes()
    assert x509.load_pem_x509_certificate(shipped) == embedded
    assert embedded.subject.rfc4514_string() == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"


# -- the real documents ---------------------------------------------------------------------------


def test_manifest_lists_the_eight_documents(manifest: dict[str, dict[str, Any]]) -> None:
    assert sorted(manifest) == _names()
    assert sum(e["debug_mode"] for e in manifest.values()) == 4


@pytest.mark.parametrize("name", _names())
def test_real_document_verifies_at_its_timestamp(
    vectors_dir: Path, manifest: dict[str, dict[str, Any]], name: str
) -> None:
    entry = manifest[name]
    doc = verify_attestation(_doc(vectors_dir, name), at="document")
    assert doc.module_id == entry["module_id"]
    assert doc.digest == "SHA384"
    assert doc.timestamp_ms == entry["timestamp_ms"]
    assert doc.timestamp == datetime.fromisoformat(entry["timestamp_utc"])
    assert doc.verified_at == doc.timestamp
    assert doc.debug_mode is entry["debug_mode"]
    assert sorted(doc.pcrs) == list(range(16))
    for i in (0, 1, 2, 3, 4, 8):
        assert doc.pcrs[i].hex() == entry[f"pcr{i}"]
    assert all(len(v) == 48 for v in doc.pcrs.values())
    assert doc.not_before == datetime.fromisoformat(entry["chain_valid_from"])
    assert doc.not_after == datetime.fromisoformat(entry["chain_valid_until"])
    assert doc.not_after - doc.not_before == pytest.approx(
        timedelta(hours=3), abs=timedelta(seconds=10)
    )
    for field in ("public_key", "user_data", "nonce"):
        value = getattr(doc, field)
        assert (None if value is None else len(value)) == entry[f"{field}_len"]
    roles = [c.role for c in doc.chain]
    assert roles == ["leaf", "cabundle[3]", "cabundle[2]", "cabundle[1]", "root"]
    assert doc.chain[-1].subject == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"
    assert doc.chain[0].subject.startswith(f"CN={entry['module_id']}.")
    for cert, issuer in zip(doc.chain, doc.chain[1:], strict=False):
        assert cert.issuer == issuer.subject


@pytest.mark.parametrize("name", _names())
def test_production_refuses_exactly_the_debug_documents(
    vectors_dir: Path, manifest: dict[str, dict[str, Any]], name: str
) -> None:
    document = _doc(vectors_dir, name)
    if manifest[name]["debug_mode"]:
        with pytest.raises(AttestationError) as exc:
            verify_attestation(document, at="document", production=True)
        assert _reason(exc) == "debug_mode"
    else:
        assert not verify_attestation(document, at="document", production=True).debug_mode


def test_indefinite_length_payload_map_parses(vectors_dir: Path) -> None:
    document = _doc(vectors_dir, "base_prod_indefinite_map")
    assert decode_sign1(document).payload[:1] == b"\xbf"
    doc = decode_attestation(document)
    assert doc.user_data is not None
    assert len(doc.user_data) == 20
    assert doc.public_key is None
    assert doc.nonce is None


def test_1024_byte_fields_decode(vectors_dir: Path) -> None:
    doc = verify_attestation(_doc(vectors_dir, "blocky_prod"), at="document", production=True)
    assert doc.public_key is not None
    assert doc.user_data is not None
    assert doc.nonce is not None
    assert (len(doc.public_key), len(doc.user_data), len(doc.nonce)) == (1024, 1024, 1024)


def test_tagged_cose_sign1_is_accepted(vectors_dir: Path) -> None:
    tagged = b"\xd2" + _doc(vectors_dir, "signal_svr2_prod")
    assert verify_attestation(tagged, at="document").module_id.startswith("i-09b153b9b6859a1de")


# -- tampering ------------------------------------------------------------------------------------


def test_flipped_payload_bit_is_bad_signature(vectors_dir: Path) -> None:
    document = bytearray(_doc(vectors_dir, "blocky_prod"))
    pcr4 = decode_attestation(bytes(document)).pcrs[4]
    offset = document.index(pcr4) + 7
    document[offset] ^= 0x01
    assert decode_attestation(bytes(document)).pcrs[4] != pcr4
    with pytest.raises(AttestationError) as exc:
        verify_attestation(bytes(document), at="document")
    assert _reason(exc) == "bad_signature"


@pytest.mark.parametrize("position", [-1, -48, -49, -96])
def test_flipped_signature_bit_is_bad_signature(vectors_dir: Path, position: int) -> None:
    document = bytearray(_doc(vectors_dir, "evervault_beta_prod"))
    document[position] ^= 0x80
    with pytest.raises(AttestationError) as exc:
        verify_attestation(bytes(document), at="document")
    assert _reason(exc) == "bad_signature"


def test_dropped_intermediate_breaks_the_chain(vectors_dir: Path) -> None:
    document = _with_payload(_doc(vectors_dir, "blocky_prod"), lambda p: p["cabundle"].pop(2))
    with pytest.raises(AttestationError) as exc:
        verify_attestation(document, at="document")
    assert _reason(exc) == "chain_untrusted"
    assert "cabundle[2]" in exc.value.message


def test_valid_leaf_of_the_same_instance_does_not_sign_another_document(
    vectors_dir: Path,
) -> None:
    # blocky_debug and blocky_prod come from the same parent instance: the debug enclave's leaf
    # chains to the prod document's cabundle, but it did not sign the prod payload.
    other_leaf = decode_attestation(_doc(vectors_dir, "blocky_debug")).certificate
    document = _with_payload(_doc(vectors_dir, "blocky_prod"), _set("certificate", other_leaf))
    with pytest.raises(AttestationError) as exc:
        verify_attestation(document, at=datetime(2024, 9, 7, 15, tzinfo=UTC))
    assert _reason(exc) == "bad_signature"


# -- time -----------------------------------------------------------------------------------------


def test_now_is_past_the_leaf_window(vectors_dir: Path) -> None:
    document = _doc(vectors_dir, "base_prod_indefinite_map")
    for at in (NOW, None, "now"):
        with pytest.raises(AttestationError) as exc:
            verify_attestation(document, at=at)
        assert _reason(exc) == "cert_expired"
        assert exc.value.message.startswith("leaf certificate CN=i-0368fa67e156d6d23-enc")
        assert "valid 2026-01-03T20:40:25Z..2026-01-03T23:40:28Z" in exc.value.message


def test_before_the_window_is_not_yet_valid(vectors_dir: Path) -> None:
    with pytest.raises(AttestationError) as exc:
        verify_attestation(
            _doc(vectors_dir, "blocky_prod"), at=datetime(2024, 9, 7, 14, 37, 35, tzinfo=UTC)
        )
    assert _reason(exc) == "cert_not_yet_valid"
    assert "leaf certificate" in exc.value.message


def test_explicit_time_inside_the_window_passes(vectors_dir: Path) -> None:
    at = datetime(2024, 9, 7, 19, 0, tzinfo=timezone(timedelta(hours=2)))
    doc = verify_attestation(_doc(vectors_dir, "blocky_prod"), at=at)
    assert doc.verified_at == datetime(2024, 9, 7, 17, 0, tzinfo=UTC)


def test_naive_or_unknown_time_is_a_caller_bug(vectors_dir: Path) -> None:
    with pytest.raises(ValueError, match="aware"):
        verify_attestation(_doc(vectors_dir, "blocky_prod"), at=datetime(2024, 9, 7, 15))
    with pytest.raises(ValueError, match="expected"):
        verify_attestation(_doc(vectors_dir, "blocky_prod"), at="yesterday")  # type: ignore[arg-type]


def test_max_age(vectors_dir: Path) -> None:
    document = _doc(vectors_dir, "blocky_prod")
    at = datetime(2024, 9, 7, 15, 37, 39, 545000, tzinfo=UTC)
    verify_attestation(document, at=at, max_age=timedelta(hours=1))
    with pytest.raises(AttestationError) as exc:
        verify_attestation(document, at=at, max_age=timedelta(minutes=59))
    assert _reason(exc) == "stale_document"


# -- roots ----------------------------------------------------------------------------------------


def test_another_root_is_untrusted(vectors_dir: Path) -> None:
    with pytest.raises(AttestationError) as exc:
        verify_attestation(
            _doc(vectors_dir, "blocky_prod"), at="document", root_pem=_self_signed_root()
        )
    assert _reason(exc) == "chain_untrusted"
    assert "cabundle[0] (CN=aws.nitro-enclaves) is not the pinned root (CN=not-aws" in str(
        exc.value
    )


def test_pinning_the_shipped_root_file_works(vectors_dir: Path) -> None:
    pem = (vectors_dir / "nitro" / "root" / "AWS_NitroEnclaves_Root-G1.pem").read_text()
    verify_attestation(_doc(vectors_dir, "signal_svr2_prod"), at="document", root_pem=pem)


def test_root_that_is_not_pem_is_bad_root(vectors_dir: Path) -> None:
    with pytest.raises(AttestationError) as exc:
        verify_attestation(_doc(vectors_dir, "blocky_prod"), at="document", root_pem=b"nope")
    assert _reason(exc) == "bad_root"


# -- policy ---------------------------------------------------------------------------------------


def test_pcr_pin_mismatch_names_the_pcr(vectors_dir: Path) -> None:
    document = _doc(vectors_dir, "blocky_prod")
    with pytest.raises(AttestationError) as exc:
        verify_attestation(document, at="document", expected_pcrs={2: bytes(48)})
    assert _reason(exc) == "pcr_mismatch"
    assert exc.value.message.startswith("PCR 2 is d5dcbdea0aa39c80..., expected 0000")
    with pytest.raises(AttestationError) as exc:
        verify_attestation(document, at="document", expected_pcrs={16: bytes(48)})
    assert _reason(exc) == "pcr_mismatch"
    assert exc.value.message == "PCR 16 is not in the document"


def test_matching_pcr_pins_pass(vectors_dir: Path, manifest: dict[str, dict[str, Any]]) -> None:
    entry = manifest["evervault_beta_prod"]
    pins = {i: bytes.fromhex(entry[f"pcr{i}"]) for i in (0, 1, 2, 8)}
    doc = verify_attestation(
        _doc(vectors_dir, "evervault_beta_prod"), at="document", expected_pcrs=pins, production=True
    )
    assert {i: doc.pcrs[i] for i in pins} == pins


def test_nonce(vectors_dir: Path) -> None:
    document = _doc(vectors_dir, "evervault_beta_prod")
    nonce = decode_attestation(document).nonce
    assert nonce is not None
    assert len(nonce) == 256
    verify_attestation(document, at="document", expected_nonce=nonce)
    with pytest.raises(AttestationError) as exc:
        verify_attestation(document, at="document", expected_nonce=nonce[:-1] + b"\0")
    assert _reason(exc) == "nonce_mismatch"
    with pytest.raises(AttestationError) as exc:
        verify_attestation(
            _doc(vectors_dir, "signal_svr2_prod"), at="document", expected_nonce=b"n"
        )
    assert _reason(exc) == "nonce_mismatch"
    assert exc.value.message == "the document carries no nonce"


# -- malformed input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "not valid CBOR"),
        (b"\x83\x40\xa0\x40", "4-element"),
        (cbor2.dumps({"a": 1}), "4-element"),
        (b"\xd3\x84\x44\xa1\x01\x38\x22\xa0\x40\x40", "tag 19"),
        (b"\xd8\x12\x84\x44\xa1\x01\x38\x22\xa0\x40\x40", "one byte"),
        (cbor2.dumps([b"\xa1\x01\x26", {}, b"", bytes(96)]), "ES384"),
        (cbor2.dumps([b"", {}, b"", bytes(96)]), "ES384"),
        (cbor2.dumps([b"\xa1\x01\x38\x22", {}, None, bytes(96)]), "detached"),
        (cbor2.dumps([b"\xa1\x01\x38\x22", {}, b"", bytes(64)]), "64 bytes"),
        (cbor2.dumps([b"\xa2\x01\x38\x22\x02\x80", {}, b"", bytes(96)]), "critical"),
        (cbor2.dumps([b"\xa1\x01\x38\x22", [], b"", bytes(96)]), "unprotected"),
        (cbor2.dumps([b"\xa1\x01\x38\x22", {}, b"", bytes(96)]) + b"\x00", "trailing"),
        (bytes(MAX_DOCUMENT_BYTES + 1), "limit"),
    ],
)
def test_bad_cose(data: bytes, needle: str) -> None:
    with pytest.raises(AttestationError) as exc:
        verify_attestation(data)
    assert _reason(exc) == "bad_cose"
    assert needle in exc.value.message


def _set(key: str, value: Any) -> Any:
    return lambda p: p.__setitem__(key, value)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda p: p.pop("module_id"), "no 'module_id'"),
        (_set("digest", "SHA256"), "only 'SHA384'"),
        (_set("timestamp", -1), "timestamp"),
        (_set("timestamp", True), "timestamp"),
        (_set("timestamp", 2**62), "out of range"),
        (_set("pcrs", {}), "1..32"),
        (_set("pcrs", {32: bytes(48)}), "outside 0..31"),
        (_set("pcrs", {0: bytes(47)}), "PCR 0"),
        (_set("certificate", None), "certificate"),
        (_set("cabundle", []), "cabundle"),
        (_set("cabundle", [b"x", 3]), "cabundle[1]"),
        (_set("user_data", bytes(1025)), "user_data is 1025 bytes"),
        (_set("nonce", "text"), "nonce is neither"),
        (_set("public_key", bytes(1025)), "public_key is 1025 bytes"),
    ],
)
def test_bad_payload(vectors_dir: Path, edit: Any, needle: str) -> None:
    document = _with_payload(_doc(vectors_dir, "blocky_prod"), edit)
    with pytest.raises(AttestationError) as exc:
        decode_attestation(document)
    assert _reason(exc) == "bad_payload"
    assert needle in exc.value.message


def test_payload_that_is_not_a_map() -> None:
    with pytest.raises(AttestationError) as exc:
        decode_attestation(cbor2.dumps([b"\xa1\x01\x38\x22", {}, cbor2.dumps([1]), bytes(96)]))
    assert _reason(exc) == "bad_payload"


def test_unknown_keys_are_skipped_and_absent_optionals_are_none(vectors_dir: Path) -> None:
    def edit(p: dict[Any, Any]) -> None:
        p["future_field"] = [1, 2, 3]
        p[7] = b"x"
        del p["nonce"]

    doc = decode_attestation(_with_payload(_doc(vectors_dir, "blocky_prod"), edit))
    assert doc.nonce is None
    assert doc.user_data is not None


def test_unparseable_certificate_is_bad_cert(vectors_dir: Path) -> None:
    document = _with_payload(_doc(vectors_dir, "blocky_prod"), _set("certificate", b"\x30\x00"))
    with pytest.raises(AttestationError) as exc:
        verify_attestation(document, at="document")
    assert _reason(exc) == "bad_cert"
    assert exc.value.message == "leaf is not a DER X.509 certificate"


def test_errors_are_trio_sign_errors() -> None:
    assert issubclass(AttestationError, TrioSignError)


# -- the COSE helpers -----------------------------------------------------------------------------


def test_signature_conversion_round_trips(vectors_dir: Path) -> None:
    sign1 = decode_sign1(_doc(vectors_dir, "blocky_prod"))
    assert der_to_raw(raw_to_der(sign1.signature)) == sign1.signature
    assert sign1.encode() == _doc(vectors_dir, "blocky_prod")
    assert sign1.sig_structure() == sig_structure(sign1.protected, sign1.payload)
    assert sign1.sig_structure().startswith(b"\x84\x6aSignature1\x44\xa1\x01\x38\x22\x40")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_corruption_only_ever_raises_attestation_error(
    vectors_dir: Path, data: st.DataObject
) -> None:
    document = bytearray(_doc(vectors_dir, "evervault_beta_prod"))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(document) - 1))
        document[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(len(document) - 8, len(document)))
    reason = "ok"
    try:
        verify_attestation(bytes(document[:cut]), at="document")
    except AttestationError as exc:
        reason = exc.reason
    assert reason == "ok" or reason in REASONS


# -- the CLI (trio-sign attestation verify; _main.py wires it, so drive add_parser directly) ------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trio-sign")
    _attestation.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["attestation", "verify", *argv])
    code: int = args.func(args)
    return code


def test_cli_prints_the_fields(vectors_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = vectors_dir / "nitro" / "attestation" / "blocky_debug.cose"
    pcr4 = decode_attestation(path.read_bytes()).pcrs[4].hex()
    assert pcr4.startswith("45706d7b621e4620")
    assert _cli([str(path), "--at", "document", "--pcr", f"4={pcr4}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "attestation document OK (signature; chain; validity at 2024-09-07T14:38:06.508Z; PCR 4)"
    )
    assert "module_id   i-0a22e5c5f24d22174-enc0191ccebaf8feaba\n" in out
    assert "timestamp   2024-09-07T14:38:06.508Z  (1725719886508 ms)\n" in out
    assert "mode        DEBUG (PCR0, PCR1, PCR2 are zero)\n" in out
    assert f"  PCR0   {'00' * 48}  (debug)\n" in out
    assert f"  PCR4   {pcr4}  (pinned)\n" in out
    assert f"sha256 {AWS_NITRO_ROOT_SHA256} (the AWS root)" in out
    assert "user_data   1024 bytes  " + "01" * 16 + "...\n" in out
    assert "  root         CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US\n" in out
    assert "valid 2024-09-07T14:38:03Z .. 2024-09-07T17:38:06Z" in out


def test_cli_json(vectors_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = vectors_dir / "nitro" / "attestation" / "evervault_beta_prod.cose"
    assert _cli([str(path), "--at", "document", "--production", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["valid"] is True
    assert info["debug_mode"] is False
    assert info["timestamp"] == "2022-10-13T08:58:02.136Z"
    assert info["pcrs"]["0"].startswith("f4d48b81a460c991")
    assert info["nonce"]["length"] == 256
    assert info["user_data"] is None
    assert [c["role"] for c in info["chain"]] == [
        "leaf",
        "cabundle[3]",
        "cabundle[2]",
        "cabundle[1]",
        "root",
    ]
    assert info["root"]["sha256"] == AWS_NITRO_ROOT_SHA256


@pytest.mark.parametrize("encoding", ["raw", "base64", "base64-lines", "urlsafe"])
def test_cli_reads_raw_or_base64(
    vectors_dir: Path, tmp_path: Path, encoding: str, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = _doc(vectors_dir, "signal_svr2_prod")
    data = {
        "raw": raw,
        "base64": base64.b64encode(raw) + b"\n",
        "base64-lines": base64.encodebytes(raw),
        "urlsafe": base64.urlsafe_b64encode(raw).rstrip(b"="),
    }[encoding]
    path = tmp_path / "doc"
    path.write_bytes(data)
    assert _cli([str(path), "--at", "document"]) == 0
    assert "i-09b153b9b6859a1de" in capsys.readouterr().out


def test_cli_reads_stdin(
    vectors_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = _doc(vectors_dir, "blocky_prod")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
    assert _cli(["-", "--at", "document"]) == 0
    assert "i-0a22e5c5f24d22174-enc0191cceb4289903f" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ([], "cert_expired"),
        (["--at", "now"], "cert_expired"),
        (["--at", "2024-09-07T14:00:00"], "cert_not_yet_valid"),
        (["--at", "document", "--production"], "debug_mode"),
        (["--at", "document", "--pcr", f"3={'11' * 48}"], "pcr_mismatch"),
        (["--at", "document", "--nonce", "00"], "nonce_mismatch"),
        (["--at", "document", "--max-age", "0"], None),
    ],
)
def test_cli_failures_raise_with_the_reason(
    vectors_dir: Path, extra: list[str], reason: str | None
) -> None:
    path = vectors_dir / "nitro" / "attestation" / "blocky_debug.cose"
    if reason is None:
        assert _cli([str(path), *extra]) == 0
        return
    with pytest.raises(AttestationError) as exc:
        _cli([str(path), *extra])
    assert str(exc.value).startswith(f"{reason}: ")


def test_cli_explicit_time_naive_is_utc(vectors_dir: Path) -> None:
    path = vectors_dir / "nitro" / "attestation" / "blocky_debug.cose"
    assert _cli([str(path), "--at", "2024-09-07T17:38:00"]) == 0
    assert _cli([str(path), "--at", "2024-09-07T19:38:00+02:00"]) == 0
    with pytest.raises(AttestationError) as exc:
        _cli([str(path), "--at", "2024-09-07T17:39:00Z"])
    assert exc.value.reason == "cert_expired"


def test_cli_matching_nonce(vectors_dir: Path) -> None:
    path = vectors_dir / "nitro" / "attestation" / "blocky_prod.cose"
    nonce = decode_attestation(path.read_bytes()).nonce
    assert nonce is not None
    assert _cli([str(path), "--at", "document", "--nonce", nonce.hex()]) == 0


@pytest.mark.parametrize(
    "extra",
    [
        ["--pcr", "4"],
        ["--pcr", "x=00"],
        ["--pcr", "32=" + "00" * 48],
        ["--pcr", "4=" + "00" * 47],
        ["--pcr", "4=zz"],
        ["--pcr", f"4={'00' * 48}", "--pcr", f"4={'11' * 48}"],
        ["--at", "yesterday"],
        ["--nonce", "xyz"],
        ["--max-age", "-1"],
        ["--max-age", "soon"],
    ],
)
def test_cli_usage_errors(
    vectors_dir: Path, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = vectors_dir / "nitro" / "attestation" / "blocky_prod.cose"
    with pytest.raises(SystemExit) as exc:
        _cli([str(path), *extra])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cli_same_pcr_twice_with_the_same_value_is_fine(vectors_dir: Path) -> None:
    path = vectors_dir / "nitro" / "attestation" / "blocky_prod.cose"
    pcr1 = decode_attestation(path.read_bytes()).pcrs[1].hex()
    assert _cli([str(path), "--at", "document", "--pcr", f"1={pcr1}", "--pcr", f"1=0x{pcr1}"]) == 0


def test_cli_with_a_local_nsm_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nsm = LocalNsm.from_dir(tmp_path / "nsm", create=True)
    path = tmp_path / "doc.cose"
    path.write_bytes(nsm.attestation(nonce=b"\x01\x02"))
    root = tmp_path / "nsm" / "local-nsm-root.pem"
    assert _cli([str(path), "--root", str(root), "--production", "--nonce", "0102"]) == 0
    out = capsys.readouterr().out
    assert f"root        {root}, sha256 " in out
    assert "(the AWS root)" not in out
    assert "nonce       2 bytes  0102\n" in out
    with pytest.raises(AttestationError) as exc:
        _cli([str(path)])
    assert exc.value.reason == "chain_untrusted"


def test_cli_garbage_and_oversized_files(tmp_path: Path) -> None:
    path = tmp_path / "doc"
    for data in (b"hello world", b"QUJD", b"\x00\x01"):
        path.write_bytes(data)
        with pytest.raises(AttestationError) as exc:
            _cli([str(path)])
        assert exc.value.reason == "bad_cose"
    path.write_bytes(b"A" * (2 * MAX_DOCUMENT_BYTES + 1))
    with pytest.raises(AttestationError) as exc:
        _cli([str(path)])
    assert exc.value.reason == "bad_cose"
    assert "larger than" in exc.value.message


# -- certificate roles (a hand-built chain: root -> intermediates -> leaf) ------------------------


def _key_usage(*, ds: bool = False, kcs: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=ds,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=kcs,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool | None,
    path_length: int | None = None,
    usage: x509.KeyUsage | None,
    digest: hashes.SHA256 | hashes.SHA384 | None = None,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(hours=1))
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length), critical=True
        )
    if usage is not None:
        builder = builder.add_extension(usage, critical=False)
    return builder.sign(issuer_key, digest or hashes.SHA384())


def _signed_document(
    intermediates: list[dict[str, Any]], leaf: dict[str, Any], leaf_curve: Any = None
) -> tuple[bytes, bytes]:
    """(document, root PEM) for root -> intermediates (top first) -> leaf; kwargs per cert."""
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = _cert("root", root_key, None, ca=True, usage=_key_usage(kcs=True))
    issuer = (root.subject, root_key)
    bundle = [root]
    for i, spec in enumerate(intermediates):
        key = ec.generate_private_key(ec.SECP384R1())
        cert = _cert(f"ca{i}", key, issuer, **spec)
        bundle.append(cert)
        issuer = (cert.subject, key)
    leaf_key = ec.generate_private_key(leaf_curve or ec.SECP384R1())
    leaf_cert = _cert("leaf", leaf_key, issuer, **leaf)
    payload = {
        "module_id": "i-0-enc0",
        "digest": "SHA384",
        "timestamp": int(NOW.timestamp() * 1000),
        "pcrs": {0: b"\1" * 48},
        "certificate": leaf_cert.public_bytes(serialization.Encoding.DER),
        "cabundle": [c.public_bytes(serialization.Encoding.DER) for c in bundle],
        "public_key": None,
        "user_data": None,
        "nonce": None,
    }
    signer = leaf_key if isinstance(leaf_key.curve, ec.SECP384R1) else root_key
    document = sign1_es384(cbor2.dumps(payload), signer)
    return document, root.public_bytes(serialization.Encoding.PEM)


_CA = {"ca": True, "usage": _key_usage(kcs=True)}
_LEAF = {"ca": False, "usage": _key_usage(ds=True)}


def test_hand_built_chain_passes() -> None:
    document, root = _signed_document([_CA, {**_CA, "path_length": 0}], _LEAF)
    doc = verify_attestation(document, root_pem=root, at=NOW, production=True)
    assert [c.subject for c in doc.chain] == ["CN=leaf", "CN=ca1", "CN=ca0", "CN=root"]
    # A leaf without basicConstraints is an end entity too.
    document, root = _signed_document([_CA], {**_LEAF, "ca": None})
    verify_attestation(document, root_pem=root, at=NOW)


@pytest.mark.parametrize(
    ("intermediates", "leaf", "needle"),
    [
        ([{**_CA, "ca": False}], _LEAF, "CN=ca0 is not a CA"),
        ([{**_CA, "ca": None}], _LEAF, "CN=ca0 is not a CA"),
        ([{**_CA, "usage": _key_usage(ds=True)}], _LEAF, "CN=ca0 does not allow keyCertSign"),
        ([{**_CA, "usage": None}], _LEAF, "CN=ca0 does not allow keyCertSign"),
        ([{**_CA, "path_length": 0}, _CA], _LEAF, "CN=ca0 allows pathLen 0 but 1 CAs follow"),
        ([_CA], {**_LEAF, "ca": True}, "CN=leaf is a CA"),
        ([_CA], {**_LEAF, "usage": _key_usage(kcs=True)}, "CN=leaf does not allow digital"),
        ([_CA], {**_LEAF, "usage": None}, "CN=leaf does not allow digitalSignature"),
    ],
)
def test_certificate_roles_are_enforced(
    intermediates: list[dict[str, Any]], leaf: dict[str, Any], needle: str
) -> None:
    document, root = _signed_document(intermediates, leaf)
    with pytest.raises(AttestationError) as exc:
        verify_attestation(document, root_pem=root, at=NOW)
    assert _reason(exc) == "bad_cert_usage"
    assert needle in exc.value.message


def test_non_p384_or_non_sha384_certificates_are_bad_cert() -> None:
    document, root = _signed_document([_CA], _LEAF, leaf_curve=ec.SECP256R1())
    with pytest.raises(AttestationError) as exc:
        verify_attestation(document, root_pem=root, at=NOW)
    assert _reason(exc) == "bad_cert"
    assert "CN=leaf does not have a P-384 key" in exc.value.message
    document, root = _signed_document([{**_CA, "digest": hashes.SHA256()}], _LEAF)
    with pytest.raises(AttestationError) as exc:
        verify_attestation(document, root_pem=root, at=NOW)
    assert _reason(exc) == "bad_cert"
    assert "CN=ca0 is not signed with ECDSA-SHA384" in exc.value.message


def test_nitro_exports_the_attestation_api() -> None:
    mine = {
        "AWS_NITRO_ROOT_PEM",
        "AWS_NITRO_ROOT_SHA256",
        "MAX_DOCUMENT_BYTES",
        "MAX_USER_FIELD_BYTES",
        "REASONS",
        "AttestationDocument",
        "AttestationError",
        "CertificateInfo",
        "VerifiedAttestation",
        "decode_attestation",
        "verify_attestation",
        "DEFAULT_LOCAL_PCRS",
        "LocalNsm",
        "load_pcr_json",
    }
    assert mine <= set(nitro.__all__)
    assert all(hasattr(nitro, name) for name in nitro.__all__)


_CBOR_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.binary(max_size=64)
    | st.text(max_size=12)
    | st.floats(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.integers(-2, 40) | st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=8,
)
_KEYS = ["module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "nonce"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replacements=st.dictionaries(st.sampled_from(_KEYS), _CBOR_VALUES, min_size=1))
def test_arbitrary_payload_values_are_decoded_or_refused_cleanly(
    vectors_dir: Path, replacements: dict[str, Any]
) -> None:
    document = _with_payload(_doc(vectors_dir, "blocky_prod"), lambda p: p.update(replacements))
    try:
        doc = decode_attestation(document)
    except AttestationError as exc:
        assert exc.reason == "bad_payload"  # noqa: PT017 - hypothesis body, not a raises block
    else:
        assert isinstance(doc.module_id, str)
