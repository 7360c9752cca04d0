"""The participant's sealed share store: passphrase (Argon2id) and KMS data keys,
XChaCha20-Poly1305 with the header as associated data, atomic durable replacement."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.participant_helpers import SUITES, deal
from trio_sign import _atomic
from trio_sign.participant import (
    KmsKey,
    ParticipantStoreError,
    PassphraseKey,
    SealedShareStore,
    _store,
)
from trio_sign.shares import ShareRecord

FAST = {"opslimit": 1, "memlimit": _store.MIN_MEMLIMIT}


def records(n: int = 3) -> list[ShareRecord]:
    return [deal(f"acct-{i}", SUITES[i % 3]).records[1] for i in range(n)]


def copies(recs: list[ShareRecord]) -> list[ShareRecord]:
    return [
        ShareRecord(
            r.account_id,
            r.identifier,
            bytearray(r.signing_share),
            r.verifying_share,
            r.group_public_key,
            r.min_signers,
            r.max_signers,
            r.policy,
            r.ciphersuite,
        )
        for r in recs
    ]


def test_round_trip_with_a_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "p.store"
    recs = records()
    kept = copies(recs)
    with SealedShareStore.create(path, "ops-1", recs, PassphraseKey("correct horse", **FAST)):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    obj = json.loads(path.read_text())
    assert obj["key"]["type"] == "passphrase"
    assert obj["key"]["kdf"] == "argon2id13"
    assert (obj["key"]["opslimit"], obj["key"]["memlimit"]) == (1, _store.MIN_MEMLIMIT)
    assert obj["cipher"] == "xchacha20poly1305-ietf"
    text = path.read_text()
    for r in kept:
        assert r.signing_share.hex() not in text
    with SealedShareStore.open(path, PassphraseKey("correct horse")) as store:
        assert store.participant_id == "ops-1"
        assert sorted(store.accounts()) == sorted(r.account_id for r in kept)
        for r in kept:
            got = store.share(r.account_id)
            assert got is not None
            assert got.same_as(r)
        assert store.share("nope") is None
        held = store.share(kept[0].account_id)
        assert "signing_share=<secret>" in repr(held)
        assert "ops-1" in repr(store)
    assert held is not None
    assert not any(held.signing_share)  # zeroed on close


def test_wrong_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "p.store"
    SealedShareStore.create(path, "ops-1", records(1), PassphraseKey("s3cret-A", **FAST)).close()
    with pytest.raises(ParticipantStoreError) as info:
        SealedShareStore.open(path, PassphraseKey("s3cret-B"))
    assert info.value.reason == "wrong_key_or_tampered"
    assert str(path) in str(info.value)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "tamper",
    ["ciphertext", "nonce", "participant_id", "opslimit", "salt", "truncate"],
)
def test_tampered_file(tmp_path: Path, tamper: str) -> None:
    path = tmp_path / "p.store"
    SealedShareStore.create(path, "ops-1", records(2), PassphraseKey("pw", **FAST)).close()
    obj = json.loads(path.read_text())
    if tamper == "ciphertext":
        raw = bytearray(base64.b64decode(obj["ciphertext"]))
        raw[10] ^= 1
        obj["ciphertext"] = base64.b64encode(raw).decode()
    elif tamper == "nonce":
        obj["nonce"] = "00" * 24
    elif tamper == "participant_id":
        obj["participant_id"] = "ops-2"
    elif tamper == "opslimit":
        obj["key"]["opslimit"] = 2
    elif tamper == "salt":
        obj["key"]["salt"] = "00" * 16
    else:
        cut = base64.b64decode(obj["ciphertext"])[:-20]
        obj["ciphertext"] = base64.b64encode(cut).decode()
    path.write_text(json.dumps(obj))
    with pytest.raises(ParticipantStoreError) as info:
        SealedShareStore.open(path, PassphraseKey("pw"))
    assert info.value.reason == "wrong_key_or_tampered"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"format": "x"}, "not a trio-sign/participant-store"),
        ({"version": 2}, "version 2"),
        ({"extra": 1}, "fields must be exactly"),
        ({"cipher": "aes"}, "cipher must be"),
        ({"nonce": "zz"}, "nonce must be hex"),
        ({"nonce": "00"}, "24 bytes"),
        ({"key": {"type": "passphrase"}}, "is not"),
        ({"key": {"type": "kms", "key_id": "k", "encrypted_data_key": "AA=="}}, "not a passphrase"),
    ],
)
def test_bad_format(tmp_path: Path, change: dict[str, Any], words: str) -> None:
    path = tmp_path / "p.store"
    SealedShareStore.create(path, "ops-1", records(1), PassphraseKey("pw", **FAST)).close()
    obj = json.loads(path.read_text()) | change
    path.write_text(json.dumps(obj))
    with pytest.raises(ParticipantStoreError, match=words) as info:
        SealedShareStore.open(path, PassphraseKey("pw"))
    assert info.value.reason == "bad_format"


def test_hostile_kdf_cost_refused_before_the_kdf(tmp_path: Path) -> None:
    path = tmp_path / "p.store"
    SealedShareStore.create(path, "ops-1", records(1), PassphraseKey("pw", **FAST)).close()
    obj = json.loads(path.read_text())
    obj["key"]["memlimit"] = 1 << 40
    path.write_text(json.dumps(obj))
    with pytest.raises(ParticipantStoreError, match="cost out of bounds"):
        SealedShareStore.open(path, PassphraseKey("pw"))


def test_a_file_others_may_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.store"
    SealedShareStore.create(path, "ops-1", records(1), PassphraseKey("pw", **FAST)).close()
    path.chmod(0o644)
    with pytest.raises(ParticipantStoreError, match="chmod 600") as info:
        SealedShareStore.open(path, PassphraseKey("pw"))
    assert info.value.reason == "unreadable"
    with pytest.raises(ParticipantStoreError, match="cannot read"):
        SealedShareStore.open(tmp_path / "missing", PassphraseKey("pw"))


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "p.store"
    SealedShareStore.create(path, "ops-1", records(1), PassphraseKey("pw", **FAST)).close()
    with pytest.raises(ParticipantStoreError) as info:
        SealedShareStore.create(path, "ops-1", records(1), PassphraseKey("pw", **FAST))
    assert info.value.reason == "exists"


def test_a_crash_during_write_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "p.store"
    first = records(2)
    kept = copies(first)
    store = SealedShareStore.create(path, "ops-1", first, PassphraseKey("pw", **FAST))
    before = path.read_bytes()
    store.put(deal("acct-new", SUITES[0]).records[1])

    def power_cut(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_atomic, "os", FailingOs(power_cut))
    with pytest.raises(OSError, match="Input/output"):
        store.save()
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.store"]  # no temporary left behind
    with SealedShareStore.open(path, PassphraseKey("pw")) as again:
        assert sorted(again.accounts()) == sorted(r.account_id for r in kept)
    # and once the disk works, the new share is durable
    store.save()
    with SealedShareStore.open(path, PassphraseKey("pw")) as again:
        assert "acct-new" in again.accounts()
    store.close()
    with pytest.raises(ParticipantStoreError, match="closed"):
        store.save()


class FailingOs:
    """``os`` as trio_sign._atomic sees it, with fsync failing (a dying disk)."""

    def __init__(self, fsync: Any) -> None:
        self.fsync = fsync

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def test_duplicate_accounts_refused(tmp_path: Path) -> None:
    rec = records(1)[0]
    with pytest.raises(ParticipantStoreError, match="twice"):
        SealedShareStore.create(tmp_path / "x", "p", [rec, rec], PassphraseKey("pw", **FAST))


class FakeKms:
    """The two KMS calls, with a real key wrap (XChaCha20-Poly1305 under a local master key)
    and the encryption context bound as associated data."""

    def __init__(self) -> None:
        self.master = os.urandom(32)
        self.calls: list[str] = []

    def generate_data_key(
        self, *, KeyId: str, KeySpec: str, EncryptionContext: dict[str, str]
    ) -> dict[str, bytes]:
        from trio_sign.crypto._stream import aead_encrypt

        self.calls.append("GenerateDataKey")
        assert KeySpec == "AES_256"
        key = os.urandom(32)
        nonce = os.urandom(24)
        ad = json.dumps(EncryptionContext, sort_keys=True).encode()
        blob = nonce + aead_encrypt(key, ad=ad, nonce=nonce, key=self.master)
        return {"Plaintext": key, "CiphertextBlob": blob, "KeyId": KeyId.encode()}

    def decrypt(
        self, *, CiphertextBlob: bytes, EncryptionContext: dict[str, str]
    ) -> dict[str, bytes]:
        from trio_sign.crypto._stream import aead_decrypt_into

        self.calls.append("Decrypt")
        out = bytearray(32)
        ad = json.dumps(EncryptionContext, sort_keys=True).encode()
        if not aead_decrypt_into(
            out, CiphertextBlob[24:], ad=ad, nonce=CiphertextBlob[:24], key=self.master
        ):
            raise RuntimeError("InvalidCiphertextException")
        return {"Plaintext": bytes(out)}


def test_round_trip_with_kms(tmp_path: Path) -> None:
    kms = FakeKms()
    path = tmp_path / "k.store"
    recs = records(3)
    kept = copies(recs)
    SealedShareStore.create(path, "ops-1", recs, KmsKey(kms, "alias/participant")).close()
    obj = json.loads(path.read_text())
    assert obj["key"]["type"] == "kms"
    assert obj["key"]["key_id"] == "alias/participant"
    with SealedShareStore.open(path, KmsKey(kms, "alias/participant")) as store:
        for r in kept:
            got = store.share(r.account_id)
            assert got is not None
            assert got.same_as(r)
    assert kms.calls == ["GenerateDataKey", "Decrypt"]
    # the encryption context binds the participant: a file relabelled for another fails at KMS
    obj["participant_id"] = "ops-2"
    path.write_text(json.dumps(obj))
    with pytest.raises(ParticipantStoreError) as info:
        SealedShareStore.open(path, KmsKey(kms, "alias/participant"))
    assert info.value.reason == "kms"
    assert "RuntimeError" in str(info.value)


def test_passphrase_repr_and_close() -> None:
    key = PassphraseKey(bytearray(b"hunter2"), **FAST)
    assert "hunter2" not in repr(key)
    key.close()
    assert not any(key._passphrase)
    with pytest.raises(ParticipantStoreError, match="empty"):
        PassphraseKey("")


_CRASH_CHILD = r"""
import os, signal, sys
from pathlib import Path
from trio_sign import _atomic
from trio_sign.participant import PassphraseKey, SealedShareStore
from tests.participant_helpers import deal

path = Path(sys.argv[1])
store = SealedShareStore.open(path, PassphraseKey("pw"))
store.put(deal("acct-new", "FROST-ED25519-SHA512-v1").records[1])

class KilledAtRename:
    # os as trio_sign._atomic sees it: the process dies (SIGKILL) just before the rename
    def __getattr__(self, name):
        if name in ("replace", "rename", "link"):
            os.kill(os.getpid(), signal.SIGKILL)
        return getattr(os, name)

_atomic.os = KilledAtRename()
store.save()
"""


def test_killed_during_save_leaves_the_old_file(tmp_path: Path) -> None:
    """kill -9 after the new file is written and fsynced, before the rename: the store is
    the old one, whole; the temporary is left under its hidden name (docs: _atomic)."""
    import subprocess
    import sys

    path = tmp_path / "p.store"
    first = records(2)
    kept = copies(first)
    SealedShareStore.create(path, "ops-1", first, PassphraseKey("pw", **FAST)).close()
    before = path.read_bytes()
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_CHILD, str(path)], cwd=root, timeout=120, check=False
    )
    assert proc.returncode == -9
    assert path.read_bytes() == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "p.store"]
    assert len(leftovers) == 1
    assert leftovers[0].startswith(".p.store.")
    with SealedShareStore.open(path, PassphraseKey("pw")) as again:
        assert sorted(again.accounts()) == sorted(r.account_id for r in kept)
        assert "acct-new" not in again.accounts()
