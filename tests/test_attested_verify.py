"""verify_channel, sans-io: a document made by a local NSM at a fixed time passes with the
right inputs, and any single change (of what the enclave bound, of what the client expects,
of the time) is refused with the reason of that check. The deltas head is not pinned: a
changed one passes, and the verified binding reports it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_sign.attested import (
    CHANNEL_REASONS,
    AttestedChannelError,
    ChannelPolicy,
    spki_of_certificate,
    verify_channel,
)
from trio_sign.nitro import DEFAULT_LOCAL_PCRS, REASONS, LocalNsm
from trio_sign.nitro._binding import NO_DELTAS, Binding, encode_binding

from .attested_helpers import CONFIG, SHARES, self_signed_p256

NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
NONCE = bytes(range(32))
CERT_PEM, _KEY, SPKI = self_signed_p256()


@pytest.fixture(scope="module")
def nsm() -> Iterator[LocalNsm]:
    local = LocalNsm(clock=lambda: NOW)
    yield local
    local.close()


@pytest.fixture(scope="module")
def other_root() -> Iterator[LocalNsm]:
    local = LocalNsm(clock=lambda: NOW)
    yield local
    local.close()


def _policy(nsm: LocalNsm, **changes: object) -> ChannelPolicy:
    base = ChannelPolicy(
        shares_sha256=SHARES,
        pcrs=dict(DEFAULT_LOCAL_PCRS),
        root_pem=nsm.root_pem,
        config_sha256=CONFIG,
        max_age_s=60.0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def _document(
    nsm: LocalNsm,
    *,
    public_key: bytes | None = SPKI,
    shares: bytes = SHARES,
    config: bytes = CONFIG,
    deltas: bytes = NO_DELTAS,
    nonce: bytes | None = NONCE,
    user_data: bytes | None = None,
) -> bytes:
    if user_data is None:
        user_data = encode_binding(Binding(shares=shares, deltas=deltas, config=config))
    return nsm.attestation(public_key=public_key, user_data=user_data, nonce=nonce)


def _flip(value: bytes, index: int) -> bytes:
    out = bytearray(value)
    out[index % len(out)] ^= 0x01
    return bytes(out)


def test_the_reasons_are_the_documents_and_the_channels() -> None:
    assert set(REASONS) <= set(CHANNEL_REASONS)
    assert {"spki_mismatch", "bad_binding", "shares_mismatch", "config_mismatch"} <= set(
        CHANNEL_REASONS
    )
    assert all(text and "\n" not in text for text in CHANNEL_REASONS.values())


def test_a_faithful_document_passes(nsm: LocalNsm) -> None:
    verified = verify_channel(
        _document(nsm), peer_spki_der=SPKI, nonce=NONCE, policy=_policy(nsm), now=NOW
    )
    assert verified.binding == Binding(shares=SHARES, deltas=NO_DELTAS, config=CONFIG)
    assert verified.peer_spki_der == SPKI
    assert verified.attestation.nonce == NONCE


def test_the_spki_is_the_certificates() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = x509.load_pem_x509_certificate(CERT_PEM).public_bytes(Encoding.DER)
    assert spki_of_certificate(der) == SPKI
    with pytest.raises(AttestedChannelError) as info:
        spki_of_certificate(b"\x30\x03\x02\x01\x01")
    assert info.value.reason == "bad_tls"


#: One change each: (what, reason). Byte changes flip one bit at a drawn position.
CHANGES = [
    ("bound public_key", "spki_mismatch"),
    ("peer certificate", "spki_mismatch"),
    ("no public_key", "spki_mismatch"),
    ("bound nonce", "nonce_mismatch"),
    ("expected nonce", "nonce_mismatch"),
    ("no nonce", "nonce_mismatch"),
    ("bound shares", "shares_mismatch"),
    ("pinned shares", "shares_mismatch"),
    ("bound config", "config_mismatch"),
    ("pinned config", "config_mismatch"),
    ("pcr0", "pcr_mismatch"),
    ("pcr1", "pcr_mismatch"),
    ("pcr2", "pcr_mismatch"),
    ("user_data", "bad_binding"),
    ("no user_data", "bad_binding"),
    ("root", "chain_untrusted"),
    ("later", "stale_document"),
    ("earlier", "stale_document"),
    ("much later", "cert_expired"),
    ("debug", "debug_mode"),
    ("signature", "bad_signature"),
]


@pytest.mark.parametrize("change", CHANGES, ids=[what for what, _ in CHANGES])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(position=st.integers(0, 255))
def test_any_single_change_is_refused(
    nsm: LocalNsm, other_root: LocalNsm, change: tuple[str, str], position: int
) -> None:
    what, reason = change
    document = _document(nsm)
    spki, nonce, pins, now = SPKI, NONCE, _policy(nsm), NOW
    if what == "bound public_key":
        document = _document(nsm, public_key=_flip(SPKI, position))
    elif what == "peer certificate":
        spki = self_signed_p256()[2]
    elif what == "no public_key":
        document = _document(nsm, public_key=None)
    elif what == "bound nonce":
        document = _document(nsm, nonce=_flip(NONCE, position))
    elif what == "expected nonce":
        nonce = _flip(NONCE, position)
    elif what == "no nonce":
        document = _document(nsm, nonce=None)
    elif what == "bound shares":
        document = _document(nsm, shares=_flip(SHARES, position))
    elif what == "pinned shares":
        pins = _policy(nsm, shares_sha256=_flip(SHARES, position))
    elif what == "bound config":
        document = _document(nsm, config=_flip(CONFIG, position))
    elif what == "pinned config":
        pins = _policy(nsm, config_sha256=_flip(CONFIG, position))
    elif what.startswith("pcr"):
        index = int(what[3:])
        pcrs = dict(DEFAULT_LOCAL_PCRS)
        pcrs[index] = _flip(pcrs[index], position)
        pins = _policy(nsm, pcrs=pcrs)
    elif what == "user_data":
        binding = encode_binding(Binding(shares=SHARES, deltas=NO_DELTAS, config=CONFIG))
        index = position % len(binding)
        document = _document(nsm, user_data=_flip(binding, index))
        start = binding.index(NO_DELTAS)
        if start <= index < start + len(NO_DELTAS):
            # Inside the deltas head: not pinned, so it passes, and the change is reported.
            verified = verify_channel(
                document, peer_spki_der=spki, nonce=nonce, policy=pins, now=now
            )
            assert verified.binding.deltas != NO_DELTAS
            return
        if binding.index(SHARES) <= index < binding.index(SHARES) + 32:
            reason = "shares_mismatch"
        elif binding.index(CONFIG) <= index < binding.index(CONFIG) + 32:
            reason = "config_mismatch"
    elif what == "no user_data":
        document = nsm.attestation(public_key=SPKI, nonce=NONCE)
    elif what == "root":
        document = _document(other_root)
    elif what == "later":
        now = NOW + timedelta(seconds=61 + position)
    elif what == "earlier":
        now = NOW - timedelta(seconds=2)  # the leaf is valid from 3 s before the document
        pins = _policy(nsm, max_age_s=1.0)
    elif what == "much later":
        now = NOW + timedelta(hours=4)
    elif what == "debug":
        debug = LocalNsm(
            root_key=nsm._root.key, root_cert=nsm.root_certificate, debug=True, clock=lambda: NOW
        )
        document = _document(debug)
    elif what == "signature":
        document = document[:-1] + bytes([document[-1] ^ 0x01])
    with pytest.raises(AttestedChannelError) as info:
        verify_channel(document, peer_spki_der=spki, nonce=nonce, policy=pins, now=now)
    assert info.value.reason == reason, info.value


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deltas=st.binary(min_size=32, max_size=32))
def test_the_deltas_head_is_reported_not_pinned(nsm: LocalNsm, deltas: bytes) -> None:
    verified = verify_channel(
        _document(nsm, deltas=deltas),
        peer_spki_der=SPKI,
        nonce=NONCE,
        policy=_policy(nsm),
        now=NOW,
    )
    assert verified.binding.deltas == deltas


def test_config_is_checked_only_when_pinned(nsm: LocalNsm) -> None:
    verify_channel(
        _document(nsm, config=bytes(32)),
        peer_spki_der=SPKI,
        nonce=NONCE,
        policy=_policy(nsm, config_sha256=None),
        now=NOW,
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"shares_sha256": SHARES.hex()}, "shares_sha256 must be 32 bytes"),
        ({"shares_sha256": SHARES[:31]}, "shares_sha256 must be 32 bytes"),
        ({"config_sha256": b"x"}, "config_sha256 must be 32 bytes"),
        ({"pcrs": {0: bytes(48), 1: bytes(48)}}, "pin PCR2"),
        ({"pcrs": {0: bytes(48), 1: bytes(48), 2: bytes(48)}}, "debug-mode"),
        ({"pcrs": {**DEFAULT_LOCAL_PCRS, 3: b"short"}}, "PCR3"),
        ({"max_age_s": 0}, "max_age_s"),
    ],
)
def test_policy_errors(nsm: LocalNsm, changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _policy(nsm, **changes)


def test_debug_pins_are_allowed_only_with_allow_debug(nsm: LocalNsm) -> None:
    zeros = {0: bytes(48), 1: bytes(48), 2: bytes(48)}
    debug = LocalNsm(
        root_key=nsm._root.key, root_cert=nsm.root_certificate, debug=True, clock=lambda: NOW
    )
    verify_channel(
        _document(debug),
        peer_spki_der=SPKI,
        nonce=NONCE,
        policy=_policy(nsm, pcrs=zeros, allow_debug=True),
        now=NOW,
    )


def test_a_naive_time_or_no_nonce_is_a_caller_bug(nsm: LocalNsm) -> None:
    document = _document(nsm)
    with pytest.raises(ValueError, match="aware"):
        verify_channel(
            document, peer_spki_der=SPKI, nonce=NONCE, policy=_policy(nsm), now=datetime(2026, 1, 1)
        )
    with pytest.raises(ValueError, match="nonce"):
        verify_channel(document, peer_spki_der=SPKI, nonce=b"", policy=_policy(nsm), now=NOW)


@pytest.mark.parametrize(
    "user_data",
    [
        cbor2.dumps({1: b"", "shares": SHARES}),  # keys of mixed types
        cbor2.dumps([SHARES, NO_DELTAS, CONFIG]),
        cbor2.dumps({"shares": SHARES, "deltas": NO_DELTAS, "config": CONFIG}),  # not canonical
        SHARES,  # the version-1 binding: the bare fingerprint
        b"\xff",
    ],
)
def test_a_malformed_binding_is_bad_binding(nsm: LocalNsm, user_data: bytes) -> None:
    with pytest.raises(AttestedChannelError) as info:
        verify_channel(
            _document(nsm, user_data=user_data),
            peer_spki_der=SPKI,
            nonce=NONCE,
            policy=_policy(nsm),
            now=NOW,
        )
    assert info.value.reason == "bad_binding"


def test_the_public_api_is_all_and_only_all() -> None:
    """As tests/test_exports.py does for the other packages."""
    import trio_sign.attested as package

    exported = package.__all__
    assert len(exported) == len(set(exported))
    assert all(hasattr(package, name) for name in exported)
    public = {a for a in vars(package) if not a.startswith("_")}
    modules = {a for a in public if type(getattr(package, a)).__name__ == "module"}
    assert public - modules - {"annotations"} <= set(exported)
