"""Signed bundles (DESIGN §12; issue 13, deliverable 5): the signature record, the fingerprint it
signs, the loader's trust check, and the enclave's preload refusing in production what a
pinned key did not sign (the review's hostile-parent attack included)."""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import itertools
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto_min import sign_service_pb2 as pb
from trio_sign._errors import ShareFileError
from trio_sign.crypto import _sodium
from trio_sign.enclave import EnclaveExit, ExitCode, serve_enclave
from trio_sign.enclave._config import EnclaveConfig
from trio_sign.enclave._measured import DEVELOPMENT_CONFIG, MeasuredConfig, parse_measured_config
from trio_sign.enclave._preload import PreloadError, bundle_signing_keys, preload_shares
from trio_sign.nitro import (
    AsyncNsm,
    LocalNsm,
    MessageStream,
    decode_attestation,
    encrypt_for_recipient,
)
from trio_sign.parent import DevRecipientKms, PreloadRefused, RecipientKms, serve_preload
from trio_sign.rpc import open_grpc_channel
from trio_sign.shares import (
    BundleSignature,
    BundleTrust,
    CeremonyKey,
    DevKeyFile,
    EndOfBundle,
    SealedDecoder,
    SealedLoader,
    ShareRecord,
    ShareStore,
    SigningError,
    encode_bundle,
    inspect_sealed,
    read_sealed,
    reseal,
    seal_file,
    sign_bundle,
    verify_digest,
    write_plaintext_file,
)
from trio_sign.shares._signature import SIGNATURE_RECORD_BYTES
from trio_sign.transport import connect

from .enclave_helpers import make_accounts, parent
from .forged_bundles import unsigned, with_signature_record

N = 12


@pytest.fixture(scope="module")
def records() -> list[ShareRecord]:
    store, accounts = make_accounts(N)
    store.close()
    return [a.service for a in accounts.values()]


@pytest.fixture
def key(tmp_path: Path) -> DevKeyFile:
    return DevKeyFile.create(tmp_path / "dev.key")


@pytest.fixture(scope="module")
def ceremony() -> CeremonyKey:
    return CeremonyKey.generate()


@pytest.fixture(scope="module")
def stranger() -> CeremonyKey:
    return CeremonyKey.generate()


@pytest.fixture(scope="module")
def nsm() -> LocalNsm:
    return LocalNsm()


# -- the format ------------------------------------------------------------------------------


def test_sign_verify_round_trip(
    records: list[ShareRecord], key: DevKeyFile, ceremony: CeremonyKey
) -> None:
    bundle = encode_bundle(records, key, chunk_size=1024, signer=ceremony)
    header, end = inspect_sealed(io.BytesIO(bundle))
    assert header["kind"] == "base"
    assert end.signature == BundleSignature.decode(bundle[-SIGNATURE_RECORD_BYTES:])
    assert end.signature.public_key == ceremony.public_key
    # the fingerprint is the body's SHA-256 (the record is not part of it), and it is signed
    body = bundle[:-SIGNATURE_RECORD_BYTES]
    assert end.sha256_hex == hashlib.sha256(body).hexdigest()
    assert end.signature.verifies(end.digest)
    assert verify_digest(ceremony.public_key, end.digest, end.signature.signature)
    # the loader accepts it when the key is pinned, and says who signed
    store = ShareStore.load_sealed(
        io.BytesIO(bundle), key, trust=BundleTrust.pinned([ceremony.public_key])
    )
    assert store.signer == ceremony.public_key
    assert store.fingerprint == end.sha256_hex
    assert len(store) == N
    store.close()
    # reading every record (tools) works on a signed bundle too
    got = list(read_sealed(io.BytesIO(bundle), key))
    assert [r.account_id for r in got] == [r.account_id for r in records]
    for r in got:
        r.zero()


def test_re_signing_keeps_the_fingerprint(
    records: list[ShareRecord], key: DevKeyFile, ceremony: CeremonyKey, stranger: CeremonyKey
) -> None:
    plain = encode_bundle(records, key)
    signed = sign_bundle(plain, ceremony)
    other = sign_bundle(signed, stranger)
    fingerprints = {inspect_sealed(io.BytesIO(b))[1].sha256_hex for b in (plain, signed, other)}
    assert fingerprints == {hashlib.sha256(plain).hexdigest()}  # unsigned: the whole file
    assert len(other) == len(signed) == len(plain) + SIGNATURE_RECORD_BYTES
    record = inspect_sealed(io.BytesIO(other))[1].signature
    assert record is not None
    assert record.public_key == stranger.public_key


def test_the_decoder_refuses_what_follows_the_record(
    records: list[ShareRecord], key: DevKeyFile, ceremony: CeremonyKey
) -> None:
    signed = encode_bundle(records, key, signer=ceremony)
    for data, reason in (
        (signed + b"\0", "trailing_data"),  # more than one record's worth
        (signed[:-1], "bad_signature_record"),  # a record cut short
        (unsigned(signed) + b"TSSIGv2\0" + bytes(96), "trailing_data"),  # not our record
    ):
        decoder = SealedDecoder(decrypt=False)

        def decode(decoder: SealedDecoder = decoder, data: bytes = data) -> None:
            decoder.receive_data(data)
            decoder.receive_eof()

        with pytest.raises(ShareFileError) as info:
            decode()
        assert info.value.reason == reason
    # fed one byte at a time, the record still parses (and is not hashed)
    decoder = SealedDecoder(decrypt=False)
    events = [ev for i in range(len(signed)) for ev in decoder.receive_data(signed[i : i + 1])]
    events += decoder.receive_eof()
    end = events[-1]
    assert isinstance(end, EndOfBundle)
    assert end.signature is not None
    assert end.sha256_hex == hashlib.sha256(unsigned(signed)).hexdigest()


def test_a_garbage_stream_after_the_final_chunk_is_refused_without_buffering(
    records: list[ShareRecord], key: DevKeyFile
) -> None:
    decoder = SealedDecoder(decrypt=False)
    decoder.receive_data(encode_bundle(records, key))
    with pytest.raises(ShareFileError) as info:
        decoder.receive_data(b"TSSIGv1\0" + bytes(1 << 20))
    assert info.value.reason == "trailing_data"


def test_sign_bundle_digest_refuses_a_signer_whose_signatures_do_not_verify(
    records: list[ShareRecord], key: DevKeyFile, ceremony: CeremonyKey
) -> None:
    class Liar:
        public_key = ceremony.public_key

        def sign_digest(self, digest: bytes) -> bytes:
            return bytes(64)

    with pytest.raises(SigningError, match="does not verify"):
        encode_bundle(records, key, signer=Liar())


def test_ceremony_key_file(tmp_path: Path, ceremony: CeremonyKey) -> None:
    path = tmp_path / "ceremony.key"
    ceremony.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(SigningError, match="refusing to overwrite"):
        ceremony.save(path)
    loaded = CeremonyKey.load(path)
    assert loaded.public_key == ceremony.public_key
    assert loaded.sign_digest(bytes(32)) == ceremony.sign_digest(bytes(32))
    assert "seed" not in repr(loaded)
    assert loaded.public_key.hex() in repr(loaded)
    loaded.close()
    with pytest.raises(SigningError, match="closed"):
        loaded.sign_digest(bytes(32))
    # a file whose public key does not match its seed is refused
    text = path.read_text().replace(
        ceremony.public_key.hex(), CeremonyKey.generate().public_key.hex()
    )
    (tmp_path / "bad.key").write_text(text)
    with pytest.raises(SigningError, match="does not match"):
        CeremonyKey.load(tmp_path / "bad.key")


# -- the loader's trust check ----------------------------------------------------------------


def _refusal(bundle: bytes, key: DevKeyFile, trust: BundleTrust) -> tuple[str, list[bytearray]]:
    """Load ``bundle`` under ``trust``; return the refusal's reason and every arena the loader
    allocated (all must be zero afterwards: the check runs before anything is returned)."""
    arenas: list[bytearray] = []
    real_grow = ShareStore._grow

    def grow(self: ShareStore, need: int, limit: int | None = None) -> None:
        real_grow(self, need, limit)
        arenas.append(self._arena)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ShareStore, "_grow", grow)
        with pytest.raises(ShareFileError) as info:
            ShareStore.load_sealed(io.BytesIO(bundle), key, trust=trust)
    return info.value.reason, arenas


def _variants(
    records: list[ShareRecord], key: DevKeyFile, ceremony: CeremonyKey, stranger: CeremonyKey
) -> dict[str, bytes]:
    signed = encode_bundle(records, key, chunk_size=1024, signer=ceremony)
    record = BundleSignature.decode(signed[-SIGNATURE_RECORD_BYTES:])
    flipped = bytearray(record.signature)
    flipped[5] ^= 0x40
    return {
        "signed": signed,
        "unsigned": unsigned(signed),
        "foreign": encode_bundle(records, key, chunk_size=1024, signer=stranger),
        "tampered_signature": with_signature_record(signed, record.public_key, bytes(flipped)),
        "resigned_by_another_key": sign_bundle(signed, stranger),
        # the stranger's signature, relabelled as the pinned key's
        "stolen_name": with_signature_record(
            signed,
            ceremony.public_key,
            BundleSignature.decode(
                sign_bundle(signed, stranger)[-SIGNATURE_RECORD_BYTES:]
            ).signature,
        ),
    }


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        ("unsigned", "bundle_unsigned"),
        ("foreign", "bundle_signer_unknown"),
        ("tampered_signature", "bundle_signature_invalid"),
        ("resigned_by_another_key", "bundle_signer_unknown"),
        ("stolen_name", "bundle_signature_invalid"),
    ],
)
def test_the_loader_refuses_what_a_pinned_key_did_not_sign(
    records: list[ShareRecord],
    key: DevKeyFile,
    ceremony: CeremonyKey,
    stranger: CeremonyKey,
    variant: str,
    reason: str,
) -> None:
    bundle = _variants(records, key, ceremony, stranger)[variant]
    got, arenas = _refusal(bundle, key, BundleTrust.pinned([ceremony.public_key]))
    assert got == reason
    assert arenas
    assert all(a == bytes(len(a)) for a in arenas)  # everything decrypted is zeroed


def test_development_accepts_unsigned_but_not_a_bad_signature(
    records: list[ShareRecord],
    key: DevKeyFile,
    ceremony: CeremonyKey,
    stranger: CeremonyKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    v = _variants(records, key, ceremony, stranger)
    dev = BundleTrust.pinned(None)
    store = ShareStore.load_sealed(io.BytesIO(v["unsigned"]), key, trust=dev)
    assert store.signer is None
    assert len(store) == N
    store.close()
    assert "DEVELOPMENT: unsigned base bundle accepted" in caplog.text
    store = ShareStore.load_sealed(io.BytesIO(v["foreign"]), key, trust=dev)
    assert store.signer == stranger.public_key
    store.close()
    assert _refusal(v["tampered_signature"], key, dev)[0] == "bundle_signature_invalid"
    # an empty pin list accepts nothing
    assert _refusal(v["signed"], key, BundleTrust.pinned([]))[0] == "bundle_signer_unknown"


def test_a_delta_is_not_a_base(
    records: list[ShareRecord], key: DevKeyFile, ceremony: CeremonyKey
) -> None:
    delta = encode_bundle(records, key, signer=ceremony, kind="delta")
    assert inspect_sealed(io.BytesIO(delta))[0]["kind"] == "delta"
    unwrapped: list[object] = []

    def unwrap(header: dict[str, Any]) -> bytearray:
        unwrapped.append(header)
        return bytearray(32)

    loader = SealedLoader(unwrap=unwrap, trust=BundleTrust.pinned([ceremony.public_key]))
    with pytest.raises(ShareFileError) as info:
        loader.feed(delta)
    assert info.value.reason == "bundle_kind"
    assert unwrapped == []  # refused from the header, before any key was asked for
    store = ShareStore.load_sealed(
        io.BytesIO(delta), key, trust=BundleTrust.pinned([ceremony.public_key], kind="delta")
    )
    store.close()


def test_seal_file_and_reseal_sign(
    tmp_path: Path,
    records: list[ShareRecord],
    key: DevKeyFile,
    ceremony: CeremonyKey,
    stranger: CeremonyKey,
) -> None:
    plain = tmp_path / "shares.json"
    write_plaintext_file(plain, records)
    out = tmp_path / "shares.enc"
    result = seal_file(plain, out, key, signer=ceremony)
    assert result.signer == ceremony.public_key
    header, end = inspect_sealed(io.BytesIO(out.read_bytes()))
    assert end.sha256_hex == result.sha256
    assert end.signature is not None
    assert end.signature.verifies(end.digest)
    assert header["kind"] == "base"
    # re-encryption is a new body: re-signed by the key given, or unsigned without one
    new_key = DevKeyFile.create(tmp_path / "new.key")
    again = reseal(out, tmp_path / "re.enc", key, new_key, signer=stranger)
    _, end2 = inspect_sealed(io.BytesIO((tmp_path / "re.enc").read_bytes()))
    assert again.signer == stranger.public_key
    assert end2.sha256_hex == again.sha256
    assert end2.signature is not None
    assert end2.signature.verifies(end2.digest)
    assert again.sha256 != result.sha256
    bare = reseal(out, tmp_path / "bare.enc", key, new_key)
    assert bare.signer is None
    assert inspect_sealed(io.BytesIO((tmp_path / "bare.enc").read_bytes()))[1].signature is None

    # a signer that fails leaves nothing behind
    class Broken:
        public_key = ceremony.public_key

        def sign_digest(self, digest: bytes) -> bytes:
            raise SigningError("KMS said no")

    with pytest.raises(SigningError):
        seal_file(plain, tmp_path / "never.enc", key, signer=Broken())
    assert not (tmp_path / "never.enc").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    new_key.close()


# -- the enclave's preload ------------------------------------------------------------------


Parent = Callable[[MessageStream], Awaitable[Any]]


async def run_both(nsm: LocalNsm, parent_side: Parent, **enclave_kw: Any) -> tuple[Any, Any]:
    a, b = trio.testing.memory_stream_pair()
    results: dict[str, Any] = {}

    async def enclave() -> None:
        try:
            results["enclave"] = await preload_shares(MessageStream(a), AsyncNsm(nsm), **enclave_kw)
        except Exception as exc:
            results["enclave"] = exc
        finally:
            await a.aclose()

    async def host() -> None:
        try:
            results["parent"] = await parent_side(MessageStream(b))
        except Exception as exc:
            results["parent"] = exc
        finally:
            await b.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(enclave)
        nursery.start_soon(host)
    return results["enclave"], results["parent"]


def _serving(path: Path, kms: RecipientKms) -> Parent:
    return lambda channel: serve_preload(channel, path, kms, chunk_bytes=777)


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        ("unsigned", "bundle_unsigned"),
        ("foreign", "bundle_signer_unknown"),
        ("tampered_signature", "bundle_signature_invalid"),
        ("resigned_by_another_key", "bundle_signer_unknown"),
    ],
)
async def test_production_preload_refuses(
    tmp_path: Path,
    nsm: LocalNsm,
    records: list[ShareRecord],
    key: DevKeyFile,
    ceremony: CeremonyKey,
    stranger: CeremonyKey,
    variant: str,
    reason: str,
) -> None:
    path = tmp_path / "bundle.enc"
    path.write_bytes(_variants(records, key, ceremony, stranger)[variant])
    kms = DevRecipientKms(key, root_pem=nsm.root_pem)
    enclave, host = await run_both(nsm, _serving(path, kms), signing_keys=[ceremony.public_key])
    assert isinstance(enclave, PreloadError)
    assert enclave.reason == reason
    assert isinstance(host, PreloadRefused)  # the parent hears the same reason
    assert host.reason == reason


async def test_production_preload_loads_a_bundle_a_pinned_key_signed(
    tmp_path: Path,
    nsm: LocalNsm,
    records: list[ShareRecord],
    key: DevKeyFile,
    ceremony: CeremonyKey,
    stranger: CeremonyKey,
) -> None:
    path = tmp_path / "bundle.enc"
    path.write_bytes(encode_bundle(records, key, signer=ceremony))
    kms = DevRecipientKms(key, root_pem=nsm.root_pem)
    (store, report), result = await run_both(
        nsm, _serving(path, kms), signing_keys=[stranger.public_key, ceremony.public_key]
    )
    assert result.ok
    assert report.signer == ceremony.public_key
    assert report.sha256 == store.fingerprint == result.sha256
    assert len(store) == N
    store.close()


async def test_a_hostile_parent_cannot_make_its_own_bundle(
    tmp_path: Path,
    nsm: LocalNsm,
    records: list[ShareRecord],
    ceremony: CeremonyKey,
) -> None:
    """The review's attack: anyone can encrypt to the RSA key in the attestation document, so a
    parent skips KMS, seals a bundle of its own (the real account ids, its own group keys)
    under a data key of its own, and hands that key to the enclave itself. The bundle decrypts
    and authenticates; it is refused because no pinned key signed it."""
    own_store, own_accounts = make_accounts(N)  # the parent's own key material
    own_store.close()
    own = [a.service for a in own_accounts.values()]
    assert {r.account_id for r in own} == {r.account_id for r in records}
    parent_key = DevKeyFile.create(tmp_path / "parents-own.key")
    own_signer = CeremonyKey.generate()

    async def answer_it_myself(document: bytes, header: dict[str, Any]) -> bytes:
        # No KMS: unwrap the parent's own data key and encrypt it to the attestation's RSA key.
        public_der = decode_attestation(document).public_key
        assert public_der is not None
        public = serialization.load_der_public_key(public_der)
        assert isinstance(public, rsa.RSAPublicKey)
        data_key = parent_key.decrypt_data_key(
            base64.b64decode(header["encrypted_data_key"]), header["encryption_context"]
        )
        try:
            return encrypt_for_recipient(public, data_key)
        finally:
            _sodium.memzero(data_key)

    for signer, reason in ((None, "bundle_unsigned"), (own_signer, "bundle_signer_unknown")):
        path = tmp_path / f"hostile-{reason}.enc"
        path.write_bytes(encode_bundle(own, parent_key, signer=signer))
        enclave, host = await run_both(
            nsm, _serving(path, answer_it_myself), signing_keys=[ceremony.public_key]
        )
        assert isinstance(enclave, PreloadError), enclave
        assert enclave.reason == reason
        assert isinstance(host, PreloadRefused)
        # the same bundle loads where nothing is pinned: decryption alone proves nothing
        (store, report), _ = await run_both(nsm, _serving(path, answer_it_myself))
        assert len(store) == N
        assert report.signer == (None if signer is None else signer.public_key)
        store.close()
    for r in own:
        r.zero()


async def test_an_older_bundle_signed_by_the_pinned_key_still_loads(
    tmp_path: Path,
    nsm: LocalNsm,
    records: list[ShareRecord],
    key: DevKeyFile,
    ceremony: CeremonyKey,
) -> None:
    """Rollback is not the enclave's to stop: the gateway pins each shard's fingerprint
    (DESIGN §10, §12) and refuses a node that serves another one."""
    older = encode_bundle(records[: N // 2], key, signer=ceremony)
    newer = encode_bundle(records, key, signer=ceremony)
    kms = DevRecipientKms(key, root_pem=nsm.root_pem)
    fingerprints = []
    for name, data, count in (("old", older, N // 2), ("new", newer, N)):
        path = tmp_path / f"{name}.enc"
        path.write_bytes(data)
        (store, report), result = await run_both(
            nsm, _serving(path, kms), signing_keys=[ceremony.public_key]
        )
        assert result.ok
        assert len(store) == count
        fingerprints.append(report.sha256)
        store.close()
    assert fingerprints[0] != fingerprints[1]  # what the gateway's pin tells apart


# -- which keys the enclave pins ------------------------------------------------------------


#: An open default policy, written out (issue 14): these tests are about bundles, not approvals.
OPEN_DEFAULT = "\n[policies.default]\napprovers = []\nthreshold = 0\n"


def _measured(text: str, *, development: bool = False) -> MeasuredConfig:
    parsed = parse_measured_config((text + OPEN_DEFAULT).encode(), source="test enclave.toml")
    if development:
        return MeasuredConfig(source=parsed.source, sha256=parsed.sha256, development=True)
    return parsed


def test_bundle_signing_keys(ceremony: CeremonyKey) -> None:
    pinned = _measured(f'[bundles]\nsigning_keys = ["{ceremony.public_key.hex()}"]\n')
    bare = _measured("[limits]\nmax_sessions = 10\n")
    dev = parse_measured_config(DEVELOPMENT_CONFIG, source="work_dir/enclave.toml")
    for nsm_spec in ("device", "local:/nsm"):
        assert bundle_signing_keys(EnclaveConfig(measured=pinned, nsm=nsm_spec)) == (
            ceremony.public_key,
        )
        # the built-in development configuration (even from a file) is development
        assert bundle_signing_keys(EnclaveConfig(measured=dev, nsm=nsm_spec)) is None
    # with the local NSM stand-in, a configuration that pins nothing is development...
    assert bundle_signing_keys(EnclaveConfig(measured=bare, nsm="local:/nsm")) is None
    # ... and on the Nitro NSM it accepts no bundle at all
    assert bundle_signing_keys(EnclaveConfig(measured=bare, nsm="device")) == ()


# -- the enclave process: exit reason ----------------------------------------------------------


@pytest.mark.parametrize("variant", ["unsigned", "foreign", "tampered_signature"])
async def test_the_enclave_exits_with_the_reason_and_serves_nothing(
    tmp_path: Path,
    nsm_dir: Path,
    records: list[ShareRecord],
    ceremony: CeremonyKey,
    stranger: CeremonyKey,
    variant: str,
) -> None:
    reason = {
        "unsigned": "bundle_unsigned",
        "foreign": "bundle_signer_unknown",
        "tampered_signature": "bundle_signature_invalid",
    }[variant]
    measured = _measured(f'[bundles]\nsigning_keys = ["{ceremony.public_key.hex()}"]\n')
    async with parent(tmp_path, records, nsm_dir) as fake:
        # re-seal the fake parent's bundle under its key, as the variant says
        kms_key = DevKeyFile.load(fake.dir / "dev.key")
        fake.bundle.write_bytes(_variants(records, kms_key, ceremony, stranger)[variant])
        kms_key.close()
        with pytest.raises(EnclaveExit) as info:
            await serve_enclave(fake.config(measured=measured), nsm=LocalNsm.from_dir(nsm_dir))
        assert not (fake.dir / "grpc.sock").exists()  # nothing was ever served
    assert info.value.code == ExitCode.PRELOAD_FAILED
    assert info.value.reason == reason
    assert fake.states[-1].state == "failed"
    assert fake.states[-1].reason == reason
    assert fake.exits == [int(ExitCode.PRELOAD_FAILED)]
    assert isinstance(fake.preload_errors[0], PreloadRefused)
    assert fake.preload_errors[0].reason == reason


async def test_the_enclave_serves_a_bundle_its_pinned_key_signed(
    tmp_path: Path, nsm_dir: Path, records: list[ShareRecord], ceremony: CeremonyKey
) -> None:
    """GetStatus.shares_sha256 is the fingerprint: the body, without the signature record."""
    measured = _measured(f'[bundles]\nsigning_keys = ["{ceremony.public_key.hex()}"]\n')
    async with parent(tmp_path, records, nsm_dir) as fake, trio.open_nursery() as nursery:
        kms_key = DevKeyFile.load(fake.dir / "dev.key")
        signed = encode_bundle(records, kms_key, signer=ceremony)
        kms_key.close()
        fake.bundle.write_bytes(signed)
        handle = await nursery.start(
            functools.partial(
                serve_enclave, fake.config(measured=measured), nsm=LocalNsm.from_dir(nsm_dir)
            )
        )
        async with open_grpc_channel(await connect(handle.addresses[0])) as ch:
            status = pb.GetStatusResponse.FromString(
                await ch.unary_unary("/trio_sign.v1.SignService/GetStatus", b"")
            )
        assert status.state == "serving"
        assert status.accounts == N
        assert status.shares_sha256 == hashlib.sha256(unsigned(signed)).hexdigest()
        await handle.drain()
    assert fake.exits == [0]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=6),
    extra=st.binary(max_size=120),
)
def test_any_split_gives_the_same_end_and_only_one_record_may_follow(
    signed_bundle: bytes, cuts: list[int], extra: bytes
) -> None:
    """However the parent frames the bytes, the decoder ends with the same fingerprint and
    record; and whatever else follows the FINAL chunk is refused, never buffered into a
    second record."""

    def run(data: bytes) -> EndOfBundle:
        decoder = SealedDecoder(decrypt=False)
        points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
        events = []
        for a, b in itertools.pairwise(points):
            events += decoder.receive_data(data[a:b])
        events += decoder.receive_eof()
        end = events[-1]
        assert isinstance(end, EndOfBundle)
        return end

    end = run(signed_bundle)
    assert end.sha256_hex == hashlib.sha256(unsigned(signed_bundle)).hexdigest()
    assert end.signature is not None
    assert end.signature.verifies(end.digest)
    if extra:
        with pytest.raises(ShareFileError) as info:
            run(signed_bundle + extra)
        assert info.value.reason == "trailing_data"
        body = unsigned(signed_bundle)
        if len(extra) != SIGNATURE_RECORD_BYTES or not extra.startswith(b"TSSIGv1\0"):
            with pytest.raises(ShareFileError) as info:
                run(body + extra)
            assert info.value.reason in ("trailing_data", "bad_signature_record")


@pytest.fixture(scope="module")
def signed_bundle(
    records: list[ShareRecord], ceremony: CeremonyKey, tmp_path_factory: pytest.TempPathFactory
) -> bytes:
    key = DevKeyFile.create(tmp_path_factory.mktemp("k") / "dev.key")
    try:
        return encode_bundle(records, key, chunk_size=1024, signer=ceremony)
    finally:
        key.close()
