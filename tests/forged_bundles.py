"""Sealed bundles whose header says what a test wants (bypassing the encoder's count checks)."""

from __future__ import annotations

import struct

from trio_sign.crypto import _sodium, _stream
from trio_sign.shares import DevKeyFile, ShareRecord
from trio_sign.shares._keywrap import canonical_json
from trio_sign.shares._sealed import MAGIC, build_header, encryption_context_for


def forged_bundle(
    provider: DevKeyFile, records: list[ShareRecord], *, accounts: int, chunk_size: int = 4096
) -> bytes:
    """``records`` in one FINAL chunk, under a valid key, with a header declaring ``accounts``.

    Authentic (whoever holds the key can make it): only the count is a lie.
    """
    ctx = encryption_context_for()
    dk, blob = provider.generate_data_key(ctx)
    try:
        header = build_header(
            provider=provider,
            encrypted_data_key=blob,
            encryption_context=ctx,
            chunk_size=chunk_size,
            accounts=accounts,
            chunks=1,
        )
        hb = canonical_json(header)
        prefix = MAGIC + struct.pack(">I", len(hb)) + hb
        plaintext = bytearray(sum(r.binary_size() for r in records))
        pos = 0
        for r in records:
            pos = r.pack_into(plaintext, pos)
        push = _stream.SecretStreamPush(dk)
        try:
            ct = push.push(plaintext, ad=prefix, tag=_stream.TAG_FINAL)
            return prefix + push.header + struct.pack(">I", len(ct)) + ct
        finally:
            push.close()
            _sodium.memzero(plaintext)
    finally:
        _sodium.memzero(dk)
