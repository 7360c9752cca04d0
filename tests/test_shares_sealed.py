"""Sealed key-share bundles: the sans-io codec, the file helpers and dev key wrapping."""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import os
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_sign import KeyWrapError, ShareFileError
from trio_sign.crypto import _sodium, _stream
from trio_sign.shares import (
    ChunkDecrypted,
    DevKeyFile,
    EndOfBundle,
    Event,
    HeaderReceived,
    SealedDecoder,
    SealedEncoder,
    ShareRecord,
    encode_bundle,
    read_sealed,
    read_sealed_header,
    reseal,
    seal_file,
    write_plaintext,
)
from trio_sign.shares._keywrap import canonical_json
from trio_sign.shares._sealed import (
    MAGIC,
    MIN_CHUNK_SIZE,
    build_header,
    encryption_context_for,
)

from .forged_bundles import forged_bundle, packed, raw_bundle
from .share_helpers import ORDER_8, make_record, point_of, random_scalar


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> DevKeyFile:
    return DevKeyFile.create(tmp_path_factory.mktemp("k") / "dev.key")


@pytest.fixture(scope="module")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> DevKeyFile:
    return DevKeyFile.create(tmp_path_factory.mktemp("k") / "other.key")


RECORDS = [make_record(f"acct-{i:03d}") for i in range(9)]


@pytest.fixture(scope="module")
def bundle(key: DevKeyFile) -> bytes:
    """9 records, 2 per chunk at the minimum chunk size: 5 chunks."""
    return encode_bundle(RECORDS, key, chunk_size=MIN_CHUNK_SIZE)


def frames(data: bytes) -> tuple[int, list[tuple[int, int]]]:
    """(offset of the first frame, [(frame start, frame end)]) by walking the lengths."""
    (hlen,) = struct.unpack_from(">I", data, 8)
    pos = 12 + hlen + 24
    first = pos
    out = []
    while pos < len(data):
        (clen,) = struct.unpack_from(">I", data, pos)
        out.append((pos, pos + 4 + clen))
        pos += 4 + clen
    return first, out


def decode(
    data: bytes, provider: DevKeyFile, cuts: list[int] | None = None, *, decrypt: bool = True
) -> list[Event]:
    """Feed ``data`` in pieces split at ``cuts``; answer HeaderReceived with the data key."""
    dec = SealedDecoder(decrypt=decrypt)
    events: list[Event] = []
    bounds = [0, *sorted(set(cuts or [])), len(data)]
    try:
        for a, b in itertools.pairwise(bounds):
            new = dec.receive_data(data[a:b])
            events.extend(new)
            if decrypt and any(isinstance(e, HeaderReceived) for e in new):
                h = next(e for e in new if isinstance(e, HeaderReceived)).header
                k = provider.decrypt_data_key(
                    base64.b64decode(h["encrypted_data_key"]), h["encryption_context"]
                )
                dec.set_data_key(k)
                _sodium.memzero(k)
                events.extend(dec.receive_data(b""))
        events.extend(dec.receive_eof())
    finally:
        dec.close()
    return events


def decode_error(data: bytes, provider: DevKeyFile, **kw: Any) -> ShareFileError:
    with pytest.raises(ShareFileError) as info:
        decode(data, provider, **kw)
    return info.value


def records_of(data: bytes, provider: DevKeyFile) -> list[ShareRecord]:
    return list(read_sealed(io.BytesIO(data), provider))


def sealed_error(data: bytes, provider: DevKeyFile) -> ShareFileError:
    with pytest.raises(ShareFileError) as info:
        records_of(data, provider)
    return info.value


# -- round trips ---------------------------------------------------------------------------


def test_round_trip_in_memory(bundle: bytes, key: DevKeyFile) -> None:
    back = records_of(bundle, key)
    assert len(back) == len(RECORDS)
    for a, b in zip(RECORDS, back, strict=True):
        assert a.same_as(b)


def test_events(bundle: bytes, key: DevKeyFile) -> None:
    events = decode(bundle, key)
    assert isinstance(events[0], HeaderReceived)
    h = events[0].header
    assert h["format"] == "trio-sign/sealed-key-shares"
    assert h["version"] == 1
    assert h["record_format"] == "binary-v1"
    assert h["key_provider"] == "dev-key-file"
    assert h["kms_key_id"] == key.key_id
    assert h["encryption_context"] == {"format": "trio-sign/sealed-key-shares"}
    assert (h["accounts"], h["chunks"], h["chunk_size"]) == (9, 5, MIN_CHUNK_SIZE)
    chunks = [e for e in events if isinstance(e, ChunkDecrypted)]
    assert [c.index for c in chunks] == [0, 1, 2, 3, 4]
    assert all(len(c.plaintext) <= MIN_CHUNK_SIZE for c in chunks)
    assert "plaintext" not in repr(chunks[0])
    assert events[-1] == EndOfBundle(9, 5, hashlib.sha256(bundle).hexdigest())


def test_seal_file_round_trip(tmp_path: Path, key: DevKeyFile) -> None:
    src, dst = tmp_path / "shares.json", tmp_path / "shares.json.enc"
    with open(src, "wb") as f:
        write_plaintext(f, RECORDS)
    calls: list[tuple[int, int]] = []
    res = seal_file(
        src,
        dst,
        key,
        chunk_size=1000,
        encryption_context={"env": "test"},
        progress=lambda d, t: calls.append((d, t)),
    )
    assert (res.accounts, res.chunks) == (9, 2)
    assert calls == [(9, 0), (9, 9)]
    assert res.sha256 == res.sha256_hex
    data = dst.read_bytes()
    assert res.sha256_hex == hashlib.sha256(data).hexdigest()
    assert stat.S_IMODE(os.stat(dst).st_mode) == 0o600
    assert not (tmp_path / "shares.json.enc.tmp").exists()
    with open(dst, "rb") as f:
        header, fp = read_sealed_header(f)
    assert fp == res.sha256_hex
    assert header["encryption_context"] == {"env": "test", "format": "trio-sign/sealed-key-shares"}
    with open(dst, "rb") as f:
        back = list(read_sealed(f, key))
    assert all(a.same_as(b) for a, b in zip(RECORDS, back, strict=True))
    assert len(back) == 9


def test_seal_zero_accounts(tmp_path: Path, key: DevKeyFile) -> None:
    src, dst = tmp_path / "empty.json", tmp_path / "empty.enc"
    with open(src, "wb") as f:
        write_plaintext(f, [])
    res = seal_file(src, dst, key)
    assert (res.accounts, res.chunks) == (0, 1)
    data = dst.read_bytes()
    _first, fr = frames(data)
    assert len(fr) == 1
    assert fr[0][1] - fr[0][0] == 4 + _stream.ABYTES  # one empty FINAL chunk
    assert records_of(data, key) == []


def test_seal_refuses_bad_input_and_writes_nothing(tmp_path: Path, key: DevKeyFile) -> None:
    src, dst = tmp_path / "bad.json", tmp_path / "bad.enc"
    bad = make_record("z", verifying_share=point_of(random_scalar()))
    with open(src, "wb") as f:
        write_plaintext(f, [*RECORDS, bad])
    with pytest.raises(ShareFileError) as info:
        seal_file(src, dst, key)
    assert (info.value.reason, info.value.line) == ("share_mismatch", 11)
    assert list(tmp_path.iterdir()) == [src]


def test_seal_refuses_to_overwrite(tmp_path: Path, key: DevKeyFile) -> None:
    src, dst = tmp_path / "s.json", tmp_path / "s.enc"
    with open(src, "wb") as f:
        write_plaintext(f, RECORDS[:2])
    dst.write_bytes(b"keep me")
    with pytest.raises(ShareFileError) as info:
        seal_file(src, dst, key)
    assert info.value.reason == "output_exists"
    assert dst.read_bytes() == b"keep me"
    seal_file(src, dst, key, overwrite=True)
    assert len(records_of(dst.read_bytes(), key)) == 2


class _FileChangingKey:
    """A provider that rewrites the plaintext between the two sealing passes."""

    def __init__(self, inner: DevKeyFile, path: Path, new_content: bytes) -> None:
        self.inner, self.path, self.new_content = inner, path, new_content
        self.provider, self.key_id = inner.provider, inner.key_id

    def generate_data_key(self, context: Mapping[str, str]) -> tuple[bytearray, bytes]:
        self.path.write_bytes(self.new_content)
        return self.inner.generate_data_key(context)

    def decrypt_data_key(self, blob: bytes, context: Mapping[str, str]) -> bytearray:
        return self.inner.decrypt_data_key(blob, context)

    def names_key(self, key_id: str) -> bool:
        return self.inner.names_key(key_id)


@pytest.mark.parametrize("change", ["same_count", "bad_record"])
def test_seal_detects_input_changed_between_passes(
    tmp_path: Path, key: DevKeyFile, change: str
) -> None:
    src, dst = tmp_path / "s.json", tmp_path / "s.enc"
    with open(src, "wb") as f:
        write_plaintext(f, RECORDS[:3])
    replacement = io.BytesIO()
    bad = make_record("acct-002", verifying_share=point_of(random_scalar()))
    write_plaintext(
        replacement, [*RECORDS[:2], make_record("acct-002") if change == "same_count" else bad]
    )
    provider = _FileChangingKey(key, src, replacement.getvalue())
    with pytest.raises(ShareFileError) as info:
        seal_file(src, dst, provider)
    assert info.value.reason == "input_changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def test_seal_rejects_silly_chunk_size(tmp_path: Path, key: DevKeyFile) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        seal_file(tmp_path / "x", tmp_path / "y", key, chunk_size=10)


def test_reseal(tmp_path: Path, key: DevKeyFile, other_key: DevKeyFile, bundle: bytes) -> None:
    src, dst = tmp_path / "a.enc", tmp_path / "b.enc"
    src.write_bytes(bundle)
    res = reseal(src, dst, key, other_key)
    data = dst.read_bytes()
    assert (res.accounts, res.chunks) == (9, 5)
    assert res.sha256_hex == hashlib.sha256(data).hexdigest()
    back = records_of(data, other_key)
    assert all(a.same_as(b) for a, b in zip(RECORDS, back, strict=True))
    with pytest.raises(KeyWrapError):
        records_of(data, key)
    with pytest.raises(ShareFileError, match="exists"):
        reseal(src, dst, key, other_key)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.integers(min_value=1, max_value=3000), max_size=12))
def test_any_chunking_gives_the_same_events(
    bundle: bytes, key: DevKeyFile, cuts: list[int]
) -> None:
    cuts = [c for c in cuts if c < len(bundle)]
    assert decode(bundle, key, cuts) == decode(bundle, key)


def test_one_byte_at_a_time(bundle: bytes, key: DevKeyFile) -> None:
    assert decode(bundle, key, list(range(1, len(bundle)))) == decode(bundle, key)


# -- integrity -----------------------------------------------------------------------------


def test_truncated_at_every_cut_point(bundle: bytes, key: DevKeyFile) -> None:
    first, fr = frames(bundle)
    boundaries = {0, 8, 12, first - 24, first} | {a for a, _ in fr}
    for cut in range(len(bundle)):
        err = decode_error(bundle[:cut], key)
        assert err.reason == "truncated", cut
        if cut in {a for a, _ in fr}:
            n = [a for a, _ in fr].index(cut)
            assert f"after {n} of 5 chunks" in str(err)
    assert boundaries  # frame boundaries are among the cut points above


def test_truncated_mid_frame_message(bundle: bytes, key: DevKeyFile) -> None:
    _, fr = frames(bundle)
    err = decode_error(bundle[: fr[2][0] + 10], key)
    assert "inside chunk 2" in str(err)


def test_bad_magic(bundle: bytes, key: DevKeyFile) -> None:
    for i in range(8):
        data = bytearray(bundle)
        data[i] ^= 0x20
        assert decode_error(bytes(data), key).reason == "bad_magic"
    assert decode_error(b'{"format": "trio', key).reason == "bad_magic"


def _with_header(bundle: bytes, header_bytes: bytes) -> bytes:
    (hlen,) = struct.unpack_from(">I", bundle, 8)
    return MAGIC + struct.pack(">I", len(header_bytes)) + header_bytes + bundle[12 + hlen :]


def _header(bundle: bytes) -> dict[str, Any]:
    (hlen,) = struct.unpack_from(">I", bundle, 8)
    h: dict[str, Any] = json.loads(bundle[12 : 12 + hlen])
    return h


@pytest.mark.parametrize(
    "change",
    [
        {"format": "trio-sign/key-shares"},
        {"version": 2},
        {"ciphersuite": "FROST-RISTRETTO255-SHA512-v1"},
        {"record_format": "json"},
        {"encrypted_data_key": "***"},
        {"encryption_context": {"env": "x"}},
        {"encryption_context": {"format": 1}},
        {"chunk_size": 10},
        {"accounts": -1},
        {"chunks": 0},
        {"chunks": 99},
        {"key_provider": ""},
        {"extra": 1},
    ],
)
def test_bad_header_fields(bundle: bytes, key: DevKeyFile, change: dict[str, Any]) -> None:
    h = _header(bundle)
    h.update(change)
    err = decode_error(_with_header(bundle, canonical_json(h)), key)
    assert err.reason == "bad_header"


def test_bad_header_framing(bundle: bytes, key: DevKeyFile) -> None:
    h = _header(bundle)
    del h["chunks"]
    assert "missing field" in str(decode_error(_with_header(bundle, canonical_json(h)), key))
    pretty = json.dumps(_header(bundle), sort_keys=True).encode()
    assert "canonical" in str(decode_error(_with_header(bundle, pretty), key))
    assert decode_error(_with_header(bundle, b"[1, 2"), key).reason == "bad_header"
    assert decode_error(_with_header(bundle, b"\xff"), key).reason == "bad_header"
    assert decode_error(MAGIC + struct.pack(">I", 0), key).reason == "bad_header"
    assert decode_error(MAGIC + struct.pack(">I", 65537), key).reason == "bad_header"


def test_header_bit_flips_never_accepted(bundle: bytes, key: DevKeyFile) -> None:
    """Flip every bit of the length field and the header JSON: always refused.

    A flip inside the wrapped key's fields is refused by the key provider (KeyWrapError);
    everything else is bad_header, or tampered at chunk 0 (the header is chunk 0's AD), or
    truncated when the length field grows past the file.
    """
    (hlen,) = struct.unpack_from(">I", bundle, 8)
    seen = set()
    for byte in range(8, 12 + hlen):
        for bit in range(8):
            data = bytearray(bundle)
            data[byte] ^= 1 << bit
            outcome, message = "accepted", ""
            try:
                decode(bytes(data), key)
            except ShareFileError as exc:
                outcome, message = exc.reason, str(exc)
            except KeyWrapError:
                outcome = "keywrap"
            assert outcome in {"bad_header", "tampered", "truncated", "keywrap"}, (byte, bit)
            if outcome == "tampered":
                assert "chunk 0" in message
            seen.add(outcome)
    assert {"bad_header", "tampered", "keywrap"} <= seen


def test_stream_header_flip_is_tampered(bundle: bytes, key: DevKeyFile) -> None:
    first, _ = frames(bundle)
    for i in range(first - 24, first):
        data = bytearray(bundle)
        data[i] ^= 4
        err = decode_error(bytes(data), key)
        assert err.reason == "tampered"
        assert "chunk 0" in str(err)


def test_chunk_bit_flips_name_the_chunk(bundle: bytes, key: DevKeyFile) -> None:
    _, fr = frames(bundle)
    for index, (a, b) in enumerate(fr):
        for pos in range(a + 4, b):
            data = bytearray(bundle)
            data[pos] ^= 1 << (pos % 8)
            err = decode_error(bytes(data), key)
            assert err.reason == "tampered", (index, pos)
            assert f"chunk {index} " in str(err)
        if index == 0:
            assert "wrong data key or tampered header" in str(err)


def test_chunk_length_flips_refused(bundle: bytes, key: DevKeyFile) -> None:
    _, fr = frames(bundle)
    for a, _b in fr:
        for bit in range(32):
            data = bytearray(bundle)
            data[a + bit // 8] ^= 1 << (bit % 8)
            err = decode_error(bytes(data), key)
            assert err.reason in {"chunk_too_large", "tampered", "truncated"}


def test_swapped_chunks_refused_as_tampered(bundle: bytes, key: DevKeyFile) -> None:
    _, fr = frames(bundle)
    parts = [bundle[a:b] for a, b in fr]
    for i, j in [(0, 1), (1, 2), (1, 3), (2, 3)]:
        swapped = list(parts)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        data = bundle[: fr[0][0]] + b"".join(swapped)
        err = decode_error(data, key)
        assert err.reason == "tampered"
        assert f"chunk {i} " in str(err)


def test_dropped_or_duplicated_chunk_refused(bundle: bytes, key: DevKeyFile) -> None:
    _, fr = frames(bundle)
    parts = [bundle[a:b] for a, b in fr]
    head = bundle[: fr[0][0]]
    assert decode_error(head + b"".join(parts[:2] + parts[3:]), key).reason == "tampered"
    assert decode_error(head + b"".join(parts[:3] + parts[2:]), key).reason == "tampered"
    assert decode_error(head + b"".join(parts[:-1]), key).reason == "truncated"


def test_trailing_data(bundle: bytes, key: DevKeyFile) -> None:
    err = decode_error(bundle + b"\0", key)
    assert err.reason == "trailing_data"
    err = decode_error(bundle + bundle, key, cuts=[len(bundle)])
    assert err.reason == "trailing_data"


def test_count_mismatch_records(key: DevKeyFile) -> None:
    a, b = make_record("a"), make_record("b")
    data = raw_bundle(key, [(packed(a, b), _stream.TAG_FINAL)], accounts=3)
    err = sealed_error(data, key)
    assert err.reason == "count_mismatch"
    assert "holds 2 records" in str(err)


def test_count_mismatch_chunks(key: DevKeyFile) -> None:
    a, b = make_record("a"), make_record("b")
    early = raw_bundle(key, [(packed(a), _stream.TAG_FINAL)], accounts=2, n_chunks=2)
    assert decode_error(early, key).reason == "count_mismatch"
    late = raw_bundle(
        key, [(packed(a), _stream.TAG_MESSAGE), (packed(b), _stream.TAG_MESSAGE)], accounts=2
    )
    err = decode_error(late, key)
    assert err.reason == "count_mismatch"
    assert "should be FINAL" in str(err)


def test_unexpected_tag_is_tampered(key: DevKeyFile) -> None:
    data = raw_bundle(key, [(packed(make_record("a")), 1)], accounts=1)
    assert decode_error(data, key).reason == "tampered"


def test_chunk_too_large(key: DevKeyFile) -> None:
    recs = [make_record(f"r{i}") for i in range(3)]
    data = raw_bundle(key, [(packed(*recs), _stream.TAG_FINAL)], accounts=3)
    err = decode_error(data, key)
    assert err.reason == "chunk_too_large"
    # refused from the length field alone: nothing past it is needed
    _, fr = frames(data)
    assert decode_error(data[: fr[0][0] + 4], key).reason == "chunk_too_large"


def test_short_frame_is_tampered(bundle: bytes, key: DevKeyFile) -> None:
    _, fr = frames(bundle)
    data = bundle[: fr[0][0]] + struct.pack(">I", 5) + b"\0" * 5
    assert decode_error(data, key).reason == "tampered"


def test_record_straddling_chunk_end(key: DevKeyFile) -> None:
    data = raw_bundle(key, [(packed(make_record("a"))[:-1], _stream.TAG_FINAL)], accounts=1)
    err = sealed_error(data, key)
    assert (err.reason, err.line) == ("bad_record", 1)


# -- record-level reasons, numbered ----------------------------------------------------------


def _one_bad(key: DevKeyFile, bad: ShareRecord | bytes) -> ShareFileError:
    good = [make_record("a"), make_record("b")]
    body = packed(*good) + (bad if isinstance(bad, bytes) else packed(bad))
    data = raw_bundle(key, [(body, _stream.TAG_FINAL)], accounts=3, chunk_size=4096)
    return sealed_error(data, key)


def _raw_record(account_id: bytes, rest: ShareRecord) -> bytes:
    return bytes([len(account_id)]) + account_id + packed(rest)[1 + len(rest.account_id) :]


@pytest.mark.parametrize(
    ("reason", "bad"),
    [
        ("bad_account_id", lambda: _raw_record(b"", make_record("x"))),
        ("bad_account_id", lambda: _raw_record(b"a\nb", make_record("x"))),
        ("bad_account_id", lambda: _raw_record(b"\xff\xfe", make_record("x"))),
        ("zero_identifier", lambda: make_record("c", identifier=bytes(32))),
        (
            "non_canonical_scalar",
            lambda: make_record("c", identifier=_sodium.L.to_bytes(32, "little")),
        ),
        ("non_canonical_scalar", lambda: make_record("c", signing_share=bytearray(b"\xff" * 32))),
        ("zero_signing_share", lambda: make_record("c", signing_share=bytearray(32))),
        ("invalid_point", lambda: make_record("c", verifying_share=ORDER_8)),
        ("invalid_point", lambda: make_record("c", group_public_key=b"\x01" + bytes(31))),
        ("share_mismatch", lambda: make_record("c", verifying_share=point_of(random_scalar()))),
        ("bad_threshold", lambda: make_record("c", min_signers=1)),
        ("bad_threshold", lambda: make_record("c", min_signers=5, max_signers=4)),
        ("duplicate_account", lambda: make_record("a")),
    ],
)
def test_record_reasons_with_record_number(key: DevKeyFile, reason: str, bad: Any) -> None:
    err = _one_bad(key, bad())
    assert (err.reason, err.line) == (reason, 3)
    assert str(err).startswith("record 3: ")
    if reason == "duplicate_account":
        assert "record 1" in str(err)


def test_read_sealed_can_skip_point_checks(key: DevKeyFile) -> None:
    bad = make_record("c", verifying_share=point_of(random_scalar()))
    data = encode_bundle([make_record("a"), bad], key)
    assert sealed_error(data, key).reason == "share_mismatch"
    assert len(list(read_sealed(io.BytesIO(data), key, verify_points=False))) == 2


# -- the encoder and decoder as state machines ----------------------------------------------


def test_decoder_refuses_misuse(bundle: bytes, key: DevKeyFile) -> None:
    dec = SealedDecoder()
    with pytest.raises(Exception, match="set_data_key"):
        dec.set_data_key(bytes(32))
    dec.receive_data(bundle)
    with pytest.raises(KeyWrapError):
        dec.set_data_key(b"short")
    with pytest.raises(Exception, match="set_data_key"):
        dec.receive_eof()
    dec.close()
    with pytest.raises(ShareFileError) as info:
        dec.receive_data(b"x")
    assert info.value.reason == "closed"


def test_decoder_error_is_sticky(bundle: bytes, key: DevKeyFile) -> None:
    dec = SealedDecoder()
    with pytest.raises(ShareFileError) as first:
        dec.receive_data(b"NOTMAGIC")
    with pytest.raises(ShareFileError) as again:
        dec.receive_data(bundle)
    assert again.value is first.value


def test_decoder_zeroes_key_copy_and_state(bundle: bytes, key: DevKeyFile) -> None:
    _, fr = frames(bundle)
    dec = SealedDecoder()
    (ev,) = dec.receive_data(bundle[: fr[-1][0]])  # stop before the FINAL chunk
    assert isinstance(ev, HeaderReceived)
    dk = key.decrypt_data_key(
        base64.b64decode(ev.header["encrypted_data_key"]), ev.header["encryption_context"]
    )
    dec.set_data_key(dk)
    copy = dec._key
    assert copy is not None
    assert copy == dk
    assert copy is not dk
    dec.receive_data(b"")
    assert copy == bytes(32)  # zeroed as soon as the stream state was initialised
    pull = dec._pull
    assert pull is not None
    assert pull._state != bytes(_stream.STATE_BYTES)
    dec.close()
    assert pull._state == bytes(_stream.STATE_BYTES)


def test_wrong_data_key_is_tampered_chunk_0(bundle: bytes, key: DevKeyFile) -> None:
    dec = SealedDecoder()
    dec.receive_data(bundle)
    dec.set_data_key(bytes(32))
    with pytest.raises(ShareFileError) as info:
        dec.receive_data(b"")
    assert info.value.reason == "tampered"
    assert "wrong data key or tampered header" in str(info.value)


def test_encoder_checks_counts(key: DevKeyFile) -> None:
    ctx = encryption_context_for()
    dk, blob = key.generate_data_key(ctx)
    header = build_header(
        provider=key,
        encrypted_data_key=blob,
        encryption_context=ctx,
        chunk_size=MIN_CHUNK_SIZE,
        accounts=2,
        chunks=1,
    )
    enc = SealedEncoder(header, dk)
    enc.start()
    enc.add_record(make_record("a"))
    with pytest.raises(ShareFileError) as info:
        enc.finish()
    assert info.value.reason == "count_mismatch"
    assert enc._chunk == bytes(MIN_CHUNK_SIZE)


# -- read_sealed_header ----------------------------------------------------------------------


def test_read_sealed_header(bundle: bytes) -> None:
    header, fp = read_sealed_header(io.BytesIO(bundle))
    assert header["accounts"] == 9
    assert fp == hashlib.sha256(bundle).hexdigest()
    _, fr = frames(bundle)
    with pytest.raises(ShareFileError) as info:
        read_sealed_header(io.BytesIO(bundle[: fr[-1][0]]))
    assert info.value.reason == "truncated"
    with pytest.raises(ShareFileError) as info:
        read_sealed_header(io.BytesIO(bundle + bundle[fr[0][0] : fr[0][1]]))
    assert info.value.reason == "trailing_data"
    with pytest.raises(ShareFileError) as info:
        read_sealed_header(io.BytesIO(b"garbage!" + bundle[8:]))
    assert info.value.reason == "bad_magic"


# -- dev key file ----------------------------------------------------------------------------


def test_dev_key_file(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    k = DevKeyFile.create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    obj = json.loads(path.read_text())
    assert obj["format"] == "trio-sign/dev-kms-key"
    assert obj["version"] == 1
    assert obj["key_id"] == k.key_id
    assert k.key_id.startswith("dev-")
    assert obj["key"] not in repr(k)
    with pytest.raises(KeyWrapError, match="overwrite"):
        DevKeyFile.create(path)
    k2 = DevKeyFile.load(path)
    ctx = {"format": "x", "env": "test"}
    dk, blob = k.generate_data_key(ctx)
    assert len(dk) == 32
    assert isinstance(dk, bytearray)
    assert k2.decrypt_data_key(blob, ctx) == dk
    k2.close()
    assert k2._key == bytes(32)
    with pytest.raises(KeyWrapError, match="closed"):
        k2.decrypt_data_key(blob, ctx)


def test_dev_key_refusals(key: DevKeyFile, other_key: DevKeyFile) -> None:
    ctx = {"format": "x"}
    _dk, blob = key.generate_data_key(ctx)
    with pytest.raises(KeyWrapError) as info:
        other_key.decrypt_data_key(blob, ctx)
    assert str(info.value) == (
        f"bundle was sealed under key {key.key_id}, but the key file holds {other_key.key_id}"
    )
    with pytest.raises(KeyWrapError, match="context differs or the blob was tampered"):
        key.decrypt_data_key(blob, {"format": "y"})
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(KeyWrapError, match="tampered"):
        key.decrypt_data_key(bytes(tampered), ctx)
    with pytest.raises(KeyWrapError, match="length"):
        key.decrypt_data_key(blob[:-1], ctx)
    with pytest.raises(KeyWrapError, match="not a dev-key-file blob"):
        key.decrypt_data_key(b"nope", ctx)


def test_wrong_dev_key_refuses_bundle(bundle: bytes, other_key: DevKeyFile) -> None:
    with pytest.raises(KeyWrapError, match="sealed under key"):
        records_of(bundle, other_key)


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[]",
        b'{"format": "trio-sign/dev-kms-key", "version": 2, "key_id": "dev-0", "key": ""}',
        b'{"format": "trio-sign/dev-kms-key", "version": 1, "key_id": "x", "key": ""}',
        b'{"format": "trio-sign/dev-kms-key", "version": 1, "key_id": "dev-0011223344556677",'
        b' "key": "00"}',
        b"x" * 5000,
    ],
)
def test_dev_key_bad_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "k.json"
    path.write_bytes(content)
    with pytest.raises(KeyWrapError):
        DevKeyFile.load(path)
    with pytest.raises(KeyWrapError, match="cannot read"):
        DevKeyFile.load(tmp_path / "missing")


# -- hostile input: no decrypted chunk left behind, no count trusted ---------------------------


def _damage(bundle: bytes, how: str) -> tuple[bytes, str]:
    _, fr = frames(bundle)
    last_start, last_end = fr[-1]
    if how == "one_byte_appended":
        return bundle + b"\0", "trailing_data"
    if how == "final_chunk_tampered":
        flipped = bytes([bundle[last_end - 1] ^ 1])
        return bundle[: last_end - 1] + flipped, "tampered"
    assert how == "final_chunk_too_large"
    return (
        bundle[:last_start] + struct.pack(">I", 1 << 30) + bundle[last_start + 4 :],
        "chunk_too_large",
    )


@pytest.mark.parametrize(
    "how", ["one_byte_appended", "final_chunk_tampered", "final_chunk_too_large"]
)
def test_failed_receive_zeroes_every_chunk_it_decrypted(
    bundle: bytes, key: DevKeyFile, decrypted: list[bytearray], how: str
) -> None:
    """A call that raises hands out no events, so it must zero the chunks it decrypted."""
    data, reason = _damage(bundle, how)
    dec = SealedDecoder()
    (ev,) = dec.receive_data(data)  # the whole bundle in one call; it waits for the key
    assert isinstance(ev, HeaderReceived)
    dk = key.decrypt_data_key(
        base64.b64decode(ev.header["encrypted_data_key"]), ev.header["encryption_context"]
    )
    dec.set_data_key(dk)
    _sodium.memzero(dk)
    with pytest.raises(ShareFileError) as info:
        dec.receive_data(b"")  # decrypts chunks 0..3 (and 4), then fails in the same call
    assert info.value.reason == reason
    assert len(decrypted) >= 4
    assert all(len(b) > 0 for b in decrypted)
    assert all(b == bytes(len(b)) for b in decrypted)


def test_read_sealed_zeroes_unread_chunks_when_a_record_fails(
    key: DevKeyFile, decrypted: list[bytearray]
) -> None:
    """One 1 MiB read decrypts every chunk; a bad record in chunk 1 must not strand 2..n."""
    records = [make_record(f"acct-{i:03d}") for i in range(12)]
    records[3] = make_record("acct-000")  # duplicate, in chunk 1 of 6
    data = encode_bundle(records, key, chunk_size=MIN_CHUNK_SIZE)
    got: list[ShareRecord] = []
    with pytest.raises(ShareFileError) as info:
        got.extend(read_sealed(io.BytesIO(data), key))
    assert (info.value.reason, info.value.line) == ("duplicate_account", 4)
    for rec in got:
        rec.zero()
    assert len(decrypted) == 6
    assert all(b == bytes(len(b)) for b in decrypted)


def test_read_sealed_closed_early_zeroes_every_chunk(
    bundle: bytes, key: DevKeyFile, decrypted: list[bytearray]
) -> None:
    gen = read_sealed(io.BytesIO(bundle), key)
    first = next(gen)
    gen.close()
    first.zero()
    assert len(decrypted) == 5
    assert all(b == bytes(len(b)) for b in decrypted)


def test_header_count_checked_against_the_bundle_size(key: DevKeyFile) -> None:
    """2**24 accounts claimed, 3 records present: refused at the header, naming both."""
    data = forged_bundle(key, [make_record(f"acct-{i}") for i in range(3)], accounts=1 << 24)
    dec = SealedDecoder(total_bytes=len(data))
    with pytest.raises(ShareFileError) as info:
        dec.receive_data(data)
    assert info.value.reason == "truncated"
    assert str(info.value) == (
        f"the header declares 16777216 accounts, but a {len(data)}-byte bundle holds 3 at most "
        "(truncated, or a forged header)"
    )
    assert dec.header is not None  # parsed, then refused before any key is asked for
    with pytest.raises(ShareFileError) as info:
        read_sealed_header(io.BytesIO(data))  # shares inspect
    assert "declares 16777216 accounts" in str(info.value)

    class Pipe(io.BytesIO):
        def seekable(self) -> bool:
            return False

    header, _ = read_sealed_header(Pipe(data))  # no size known: the framing walk still works
    assert header["accounts"] == 1 << 24
    # Without the size, the full read fails at the end, having held one chunk at a time.
    got: list[ShareRecord] = []
    with pytest.raises(ShareFileError) as info:
        got.extend(read_sealed(io.BytesIO(data), key))
    assert info.value.reason == "count_mismatch"
    assert len(got) == 3
    for rec in got:
        rec.zero()


def test_header_count_check_bounds(key: DevKeyFile) -> None:
    """The bound is exact: the most records a size can hold passes, one more is refused."""
    recs = [make_record(c) for c in "abc"]  # 1-byte ids: the smallest records
    exact = forged_bundle(key, recs, accounts=3)
    assert [r.account_id for r in records_of(exact, key)] == ["a", "b", "c"]
    SealedDecoder(total_bytes=len(exact)).receive_data(exact)
    over = forged_bundle(key, recs, accounts=4)
    with pytest.raises(ShareFileError) as info:
        SealedDecoder(total_bytes=len(over)).receive_data(over)
    assert "declares 4 accounts" in str(info.value)
    assert "holds 3 at most" in str(info.value)
    with pytest.raises(ShareFileError) as info:
        SealedDecoder(total_bytes=len(exact) - 1).receive_data(exact)
    assert "holds 2 at most" in str(info.value)
    with pytest.raises(ValueError, match="total_bytes"):
        SealedDecoder(total_bytes=-1)


def test_reseal_refuses_a_forged_count_before_asking_for_a_key(
    tmp_path: Path, key: DevKeyFile, other_key: DevKeyFile
) -> None:
    src = tmp_path / "forged.enc"
    src.write_bytes(forged_bundle(key, [make_record("a")], accounts=1 << 24))

    class NoKey(DevKeyFile):
        def __init__(self) -> None:
            pass

        def generate_data_key(self, context: Mapping[str, str]) -> tuple[bytearray, bytes]:
            raise AssertionError("asked for a data key")

    with pytest.raises(ShareFileError) as info:
        reseal(src, tmp_path / "out.enc", key, NoKey())
    assert info.value.reason == "truncated"
    assert not (tmp_path / "out.enc").exists()
