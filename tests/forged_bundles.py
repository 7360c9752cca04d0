"""Sealed bundles whose header and chunks say what a test wants (bypassing the encoder's
checks). Authentic: whoever holds the key can make them."""

from __future__ import annotations

import io
import struct

from trio_sign.crypto import _sodium, _stream
from trio_sign.shares import DevKeyFile, ShareRecord
from trio_sign.shares._keywrap import canonical_json
from trio_sign.shares._sealed import MAGIC, MIN_CHUNK_SIZE, build_header, encryption_context_for


def packed(*recs: ShareRecord) -> bytes:
    """The records' binary form, back to back (a chunk's plaintext)."""
    buf = bytearray(sum(r.binary_size() for r in recs))
    pos = 0
    for r in recs:
        pos = r.pack_into(buf, pos)
    return bytes(buf)


def raw_bundle(
    provider: DevKeyFile,
    chunks: list[tuple[bytes, int]],
    *,
    accounts: int,
    n_chunks: int | None = None,
    chunk_size: int = MIN_CHUNK_SIZE,
) -> bytes:
    """A bundle with arbitrary chunk plaintexts and tags and a header declaring ``accounts``
    and ``n_chunks`` (default: as many as given)."""
    ctx = encryption_context_for()
    dk, blob = provider.generate_data_key(ctx)
    try:
        header = build_header(
            provider=provider,
            encrypted_data_key=blob,
            encryption_context=ctx,
            chunk_size=chunk_size,
            accounts=accounts,
            chunks=n_chunks if n_chunks is not None else len(chunks),
        )
        hb = canonical_json(header)
        prefix = MAGIC + struct.pack(">I", len(hb)) + hb
        push = _stream.SecretStreamPush(dk)
        try:
            out = [prefix, push.header]
            for pt, tag in chunks:
                ct = push.push(pt, ad=prefix, tag=tag)
                out.append(struct.pack(">I", len(ct)) + ct)
            return b"".join(out)
        finally:
            push.close()
    finally:
        _sodium.memzero(dk)


def forged_bundle(
    provider: DevKeyFile, records: list[ShareRecord], *, accounts: int, chunk_size: int = 4096
) -> bytes:
    """``records`` in one FINAL chunk, under a valid key, with a header declaring ``accounts``:
    only the count is a lie."""
    return raw_bundle(
        provider, [(packed(*records), _stream.TAG_FINAL)], accounts=accounts, chunk_size=chunk_size
    )


def with_signature_record(bundle: bytes, public_key: bytes, signature: bytes) -> bytes:
    """``bundle`` with its signature record (if any) replaced by one that says what a test
    wants: any key, any 64 bytes (not checked here)."""
    from trio_sign.shares import BundleSignature, inspect_sealed
    from trio_sign.shares._signature import SIGNATURE_RECORD_BYTES

    _, end = inspect_sealed(io.BytesIO(bundle))
    body = bundle[: len(bundle) - (0 if end.signature is None else SIGNATURE_RECORD_BYTES)]
    return body + BundleSignature(public_key, signature).encode()


def unsigned(bundle: bytes) -> bytes:
    """``bundle``'s body without its signature record (the fingerprint is unchanged)."""
    from trio_sign.shares import inspect_sealed
    from trio_sign.shares._signature import SIGNATURE_RECORD_BYTES

    _, end = inspect_sealed(io.BytesIO(bundle))
    return bundle[: len(bundle) - (0 if end.signature is None else SIGNATURE_RECORD_BYTES)]
