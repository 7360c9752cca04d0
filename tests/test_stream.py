"""trio_sign.crypto._stream: secretstream and XChaCha20-Poly1305-IETF into caller buffers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.bindings import (
    crypto_secretstream_xchacha20poly1305_init_pull,
    crypto_secretstream_xchacha20poly1305_pull,
    crypto_secretstream_xchacha20poly1305_state,
)

from trio_sign.crypto import _stream

KEY = bytes(range(32))


def test_constants() -> None:
    assert _stream.HEADER_BYTES == 24
    assert _stream.ABYTES == 17
    assert _stream.AEAD_NONCE_BYTES == 24
    assert _stream.AEAD_ABYTES == 16
    assert _stream.TAG_MESSAGE == 0
    assert _stream.TAG_FINAL == 3


@given(st.lists(st.binary(max_size=300), max_size=5), st.binary(max_size=40))
def test_secretstream_round_trip(messages: list[bytes], ad: bytes) -> None:
    push = _stream.SecretStreamPush(KEY)
    cts = [
        push.push(m, ad=ad, tag=_stream.TAG_FINAL if i == len(messages) - 1 else 0)
        for i, m in enumerate(messages)
    ]
    push.close()
    pull = _stream.SecretStreamPull(push.header, KEY)
    for i, (m, ct) in enumerate(zip(messages, cts, strict=True)):
        out = bytearray(len(m))
        tag = pull.pull_into(out, ct, ad=ad)
        assert tag == (_stream.TAG_FINAL if i == len(messages) - 1 else _stream.TAG_MESSAGE)
        assert out == m
    pull.close()


def test_interoperates_with_pynacl() -> None:
    push = _stream.SecretStreamPush(KEY)
    ct = push.push(b"hello", ad=b"ad", tag=_stream.TAG_FINAL)
    state = crypto_secretstream_xchacha20poly1305_state()
    crypto_secretstream_xchacha20poly1305_init_pull(state, push.header, KEY)
    assert crypto_secretstream_xchacha20poly1305_pull(state, ct, b"ad") == (
        b"hello",
        _stream.TAG_FINAL,
    )


def test_pull_refuses_tampering_and_zeroes_output() -> None:
    push = _stream.SecretStreamPush(KEY)
    ct = bytearray(push.push(b"secret!!", ad=b"a", tag=0))
    pull = _stream.SecretStreamPull(push.header, KEY)
    out = bytearray(b"x" * 8)
    assert pull.pull_into(out, ct, ad=b"b") is None
    assert out == bytes(8)
    ct[3] ^= 1
    assert pull.pull_into(out, ct, ad=b"a") is None
    assert pull.pull_into(out, b"short", ad=b"a") is None
    ct[3] ^= 1
    assert pull.pull_into(out, ct, ad=b"a") == 0  # state unchanged by failures
    assert out == b"secret!!"


def test_wrong_key_refused() -> None:
    push = _stream.SecretStreamPush(KEY)
    ct = push.push(b"m", ad=None, tag=0)
    pull = _stream.SecretStreamPull(push.header, bytes(32))
    assert pull.pull_into(bytearray(1), ct, ad=None) is None


def test_close_zeroes_state_and_refuses_use() -> None:
    push = _stream.SecretStreamPush(KEY)
    pull = _stream.SecretStreamPull(push.header, KEY)
    for obj in (push, pull):
        obj.close()
        assert obj._state == bytes(_stream.STATE_BYTES)
        obj.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        push.push(b"", ad=None, tag=0)
    with pytest.raises(ValueError, match="closed"):
        pull.pull_into(bytearray(), bytes(17), ad=None)


def test_length_checks() -> None:
    with pytest.raises(ValueError, match="key"):
        _stream.SecretStreamPush(b"short")
    with pytest.raises(ValueError, match="header"):
        _stream.SecretStreamPull(b"short", KEY)
    push = _stream.SecretStreamPush(KEY)
    with pytest.raises(ValueError, match="too small"):
        push.push_into(bytearray(3), b"abc", ad=None, tag=0)
    ct = push.push(b"abc", ad=None, tag=0)
    pull = _stream.SecretStreamPull(push.header, KEY)
    with pytest.raises(ValueError, match="too small"):
        pull.pull_into(bytearray(2), ct, ad=None)


@given(st.binary(max_size=100), st.binary(max_size=40))
def test_aead_round_trip(message: bytes, ad: bytes) -> None:
    nonce = bytes(range(24))
    ct = _stream.aead_encrypt(message, ad=ad, nonce=nonce, key=KEY)
    assert len(ct) == len(message) + 16
    out = bytearray(len(message))
    assert _stream.aead_decrypt_into(out, ct, ad=ad, nonce=nonce, key=KEY)
    assert out == message


def test_aead_refusals() -> None:
    nonce = bytes(24)
    ct = bytearray(_stream.aead_encrypt(b"key material", ad=b"ctx", nonce=nonce, key=KEY))
    out = bytearray(12)
    assert not _stream.aead_decrypt_into(out, ct, ad=b"other", nonce=nonce, key=KEY)
    assert out == bytes(12)
    assert not _stream.aead_decrypt_into(out, ct, ad=b"ctx", nonce=bytes(23) + b"\1", key=KEY)
    assert not _stream.aead_decrypt_into(out, ct, ad=b"ctx", nonce=nonce, key=bytes(32))
    assert not _stream.aead_decrypt_into(out, ct[:10], ad=b"ctx", nonce=nonce, key=KEY)
    assert not _stream.aead_decrypt_into(out, ct, ad=b"ctx", nonce=b"short", key=KEY)
    ct[0] ^= 0x80
    assert not _stream.aead_decrypt_into(out, ct, ad=b"ctx", nonce=nonce, key=KEY)
    with pytest.raises(ValueError, match="nonce"):
        _stream.aead_encrypt(b"", ad=None, nonce=b"x", key=KEY)
    with pytest.raises(ValueError, match="too small"):
        _stream.aead_decrypt_into(bytearray(1), bytes(ct), ad=b"ctx", nonce=nonce, key=KEY)
