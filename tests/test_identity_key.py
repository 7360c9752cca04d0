"""The delta identity key (DESIGN §12, §13): genesis inside an enclave, sealed under KMS with
the Recipient flow, unsealed at boot and checked against the pinned public key; with the local
KMS (boto3, a key policy pinning the local NSM's PCRs) and the local NSM."""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from trio_sign.crypto import _sodium
from trio_sign.enclave._identity import (
    IdentityKeyError,
    SealedIdentity,
    genesis,
    identity_context,
    seal_identity,
    unseal,
)
from trio_sign.kms import (
    KeyPolicy,
    KeyStore,
    KmsRecipientDataKey,
    KmsRecipientError,
    KmsRecipientKms,
    LocalKms,
    make_kms_client,
    serve_kms_local,
)
from trio_sign.nitro import (
    DEFAULT_LOCAL_PCRS,
    AsyncNsm,
    LocalNsm,
    decode_attestation,
    encrypt_for_recipient,
)
from trio_sign.shares import BundleTrust, DevKeyFile, ShareStore, encode_bundle

from .enclave_helpers import make_accounts


@pytest.fixture(autouse=True)
def _no_aws_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLOCALTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-test-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _policy() -> dict[str, Any]:
    """Only an enclave with the pinned PCRs gets the data key, at genesis and at every boot;
    nobody gets it in clear."""
    pcrs = {
        "kms:RecipientAttestation:ImageSha384": DEFAULT_LOCAL_PCRS[0].hex(),
        "kms:RecipientAttestation:PCR1": DEFAULT_LOCAL_PCRS[1].hex(),
        "kms:RecipientAttestation:PCR2": DEFAULT_LOCAL_PCRS[2].hex(),
    }
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "admin", "Effect": "Allow", "Action": ["kms:Describe*"], "Resource": "*"},
            {
                "Sid": "enclave",
                "Effect": "Allow",
                "Action": ["kms:GenerateDataKey", "kms:Decrypt"],
                "Resource": "*",
                "Condition": {"StringEqualsIgnoreCase": pcrs},
            },
        ],
    }


@asynccontextmanager
async def kms_client(tmp_path: Path, nsm: LocalNsm) -> AsyncIterator[tuple[Any, str]]:
    store = KeyStore(tmp_path / "kms-keys.json")
    key = store.create(description="identity key")
    kms = LocalKms(store, root_pem=nsm.root_pem, policy=KeyPolicy(_policy()))
    try:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_kms_local, kms, "tcp://127.0.0.1:0")
            client = make_kms_client(url, region="us-east-1")
            yield client, key.key_id
            nursery.cancel_scope.cancel()
    finally:
        store.close()


@pytest.fixture
def nsm(nsm_dir: Path) -> LocalNsm:
    return LocalNsm.from_dir(nsm_dir)


async def test_genesis_then_unseal_at_boot(tmp_path: Path, nsm: LocalNsm, nsm_dir: Path) -> None:
    async with kms_client(tmp_path, nsm) as (client, key_id):
        key, sealed = await genesis(AsyncNsm(nsm), KmsRecipientDataKey(client, key_id))
        created = key.public_key
        # the sealed file is public data only: it names the key, not the seed
        path = tmp_path / "delta-identity.sealed.json"
        path.write_bytes(sealed.to_json())
        assert SealedIdentity.from_json(path.read_bytes()) == sealed
        assert sealed.public_key == created
        assert sealed.kms_key_id.endswith(key_id)
        assert sealed.encryption_context == identity_context(created)
        key.close()

        # a later boot, a new enclave process with the pinned PCRs: the same key comes back
        parent = KmsRecipientKms(client)
        again = await unseal(
            AsyncNsm(LocalNsm.from_dir(nsm_dir)),
            parent,
            SealedIdentity.from_json(path.read_bytes()),
            pinned=created,
        )
        assert again.public_key == created
        assert "secret=<secret>" in repr(again)

        # it signs delta bundles that a loader pinning it accepts, and nothing else passes
        store, accounts = make_accounts(3)
        store.close()
        records = [a.service for a in accounts.values()]
        dev = DevKeyFile.create(tmp_path / "dev.key")
        delta = encode_bundle(records, dev, signer=again, kind="delta")
        loaded = ShareStore.load_sealed(
            io.BytesIO(delta), dev, trust=BundleTrust.pinned([created], kind="delta")
        )
        assert loaded.signer == created
        loaded.close()
        with pytest.raises(ValueError, match="trio-sign/"):
            again.sign(os.urandom(64))  # not a protocol message: refused
        assert len(again.sign(b"trio-sign/dkg-round1/v1\x00" + bytes(40))) == 64
        again.close()

        # a debug-mode enclave (other PCRs) gets nothing: the key policy pins them
        with pytest.raises(KmsRecipientError, match="AccessDeniedException"):
            await unseal(
                AsyncNsm(LocalNsm.from_dir(nsm_dir, debug=True)), parent, sealed, pinned=created
            )
        dev.close()
        for r in records:
            r.zero()


async def test_a_key_other_than_the_pinned_one_is_refused(tmp_path: Path, nsm: LocalNsm) -> None:
    async with kms_client(tmp_path, nsm) as (client, key_id):
        key, sealed = await genesis(AsyncNsm(nsm), KmsRecipientDataKey(client, key_id))
        key.close()
        other_pin = os.urandom(32)
        with pytest.raises(IdentityKeyError) as info:
            await unseal(AsyncNsm(nsm), KmsRecipientKms(client), sealed, pinned=other_pin)
        assert info.value.reason == "identity_key_mismatch"


async def test_a_hostile_parent_cannot_substitute_its_own_identity_key(
    tmp_path: Path, nsm: LocalNsm
) -> None:
    """As with bundles, anyone can encrypt to the RSA key in the attestation document: a parent
    makes a seed and a data key of its own, seals them in a well-formed file and answers the
    enclave's attestation itself. The file decrypts; the key is refused because it is not the
    pinned one."""
    pinned = os.urandom(32)  # stands in for the genuine key's public half in enclave.toml
    own_data_key = bytearray(os.urandom(32))
    own_seed = bytearray(os.urandom(32))
    own_key, forged = seal_identity(
        own_seed, own_data_key, kms_key_id="arn:aws:kms:us-east-1:0:key/x", encrypted_data_key=b"x"
    )
    own_key.close()

    async def answer_it_myself(document: bytes, header: dict[str, Any]) -> bytes:
        public = serialization.load_der_public_key(decode_attestation(document).public_key or b"")
        assert isinstance(public, rsa.RSAPublicKey)
        return encrypt_for_recipient(public, own_data_key)

    with pytest.raises(IdentityKeyError) as info:
        await unseal(AsyncNsm(nsm), answer_it_myself, forged, pinned=pinned)
    assert info.value.reason == "identity_key_mismatch"
    # and with its public key edited to the pinned one, the file no longer authenticates
    edited = SealedIdentity(
        pinned, forged.kms_key_id, forged.encrypted_data_key, forged.nonce, forged.ciphertext
    )
    with pytest.raises(IdentityKeyError) as info:
        await unseal(AsyncNsm(nsm), answer_it_myself, edited, pinned=pinned)
    assert info.value.reason == "identity_sealed_bad"
    # development (no pin) takes whatever decrypts: the pin is what makes it production
    accepted = await unseal(AsyncNsm(nsm), answer_it_myself, forged, pinned=None)
    assert accepted.public_key == forged.public_key
    accepted.close()
    _sodium.memzero(own_seed)
    _sodium.memzero(own_data_key)


def test_sealed_identity_file_is_parsed_strictly() -> None:
    seed, data_key = bytearray(os.urandom(32)), bytearray(os.urandom(32))
    key, sealed = seal_identity(seed, data_key, kms_key_id="k", encrypted_data_key=b"blob")
    key.close()
    good = sealed.to_json()
    assert SealedIdentity.from_json(good) == sealed
    assert seed.hex() not in good.decode()
    changes: list[dict[str, Any]] = [
        {"nonce": None},
        {"extra": 1},
        {"version": 2},
        {"key_provider": "dev-key-file"},
        {"encryption_context": {"format": "trio-sign/sealed-identity-key"}},
        {"ciphertext": base64.b64encode(b"short").decode()},
        {"public_key": "00" * 31},
    ]
    for change in changes:
        obj = json.loads(good)
        obj.update(change)
        obj = {k: v for k, v in obj.items() if v is not None}
        with pytest.raises(IdentityKeyError) as info:
            SealedIdentity.from_json(json.dumps(obj).encode())
        assert info.value.reason == "identity_sealed_bad"


async def test_genesis_refuses_a_kms_answer_that_hands_the_parent_the_key(nsm: LocalNsm) -> None:
    """KmsRecipientDataKey is the parent's side: an answer with a Plaintext data key (a KMS
    that ignored Recipient) is refused, so the enclave never seals under a key the parent saw."""

    class LeakyKms:
        def generate_data_key(self, **kwargs: Any) -> dict[str, Any]:
            assert kwargs["Recipient"]["KeyEncryptionAlgorithm"] == "RSAES_OAEP_SHA_256"
            return {
                "KeyId": "arn:aws:kms:us-east-1:111122223333:key/k",
                "CiphertextBlob": b"blob",
                "Plaintext": bytes(32),
                "CiphertextForRecipient": b"envelope",
            }

    with pytest.raises(KmsRecipientError, match="Plaintext"):
        await genesis(AsyncNsm(nsm), KmsRecipientDataKey(LeakyKms(), "k"))
