"""The local KMS over real loopback HTTP, driven by boto3, with every request and response
checked against botocore's own KMS service model."""

from __future__ import annotations

import base64
import importlib
import json
import os
import stat
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_sign.kms import (
    KeyPolicy,
    KeyStore,
    KeyStoreError,
    LocalKms,
    PolicyError,
    _server,
    make_kms_client,
    serve_kms_local,
)
from trio_sign.nitro import DEFAULT_LOCAL_PCRS, EphemeralRecipientKey, LocalNsm

# botocore has no type information: reach it through importlib, typed as Any.
_botocore_session: Any = importlib.import_module("botocore.session")
ClientError: type[Exception] = importlib.import_module("botocore.exceptions").ClientError
KMS_MODEL: Any = _botocore_session.get_session().get_service_model("kms")


@pytest.fixture(autouse=True)
def _no_aws_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials; nothing is read from ~/.aws or the instance metadata service."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLOCALTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-test-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@dataclass
class Exchange:
    operation: str
    request: dict[str, Any]
    status: int
    response: dict[str, Any]


class RecordingKms(LocalKms):
    """The local KMS, keeping every wire request and response for the shape checks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exchanges: list[Exchange] = []

    def handle(self, operation: str, body: bytes) -> tuple[int, dict[str, Any]]:
        status, response = super().handle(operation, body)
        self.exchanges.append(Exchange(operation, json.loads(body), status, response))
        return status, response


@dataclass
class Running:
    url: str
    kms: RecordingKms
    client: Any
    call: Callable[..., Any] = field(init=False)

    def __post_init__(self) -> None:
        async def call(method: str, **kwargs: Any) -> Any:
            fn = getattr(self.client, method)
            return await trio.to_thread.run_sync(lambda: fn(**kwargs))

        self.call = call


@asynccontextmanager
async def local_kms(
    keys: Path, nsm: LocalNsm, policy: dict[str, Any] | None = None
) -> AsyncIterator[Running]:
    store = KeyStore(keys)
    kms = RecordingKms(
        store, root_pem=nsm.root_pem, policy=None if policy is None else KeyPolicy(policy)
    )
    try:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_kms_local, kms, "tcp://127.0.0.1:0")
            client = make_kms_client(
                url,
                region="us-east-1",
                aws_access_key_id="AKIDLOCALTEST",
                aws_secret_access_key="local-test-secret",
            )
            yield Running(url, kms, client)
            nursery.cancel_scope.cancel()
    finally:
        store.close()


@pytest.fixture(scope="module")
def nsm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nsm")
    LocalNsm.from_dir(path, create=True)
    return path


@pytest.fixture(scope="module")
def nsm(nsm_dir: Path) -> LocalNsm:
    return LocalNsm.from_dir(nsm_dir)


def error_code(exc: pytest.ExceptionInfo[Exception]) -> str:
    response: Any = getattr(exc.value, "response", {})
    code: str = response["Error"]["Code"]
    return code


# -- botocore's service model -----------------------------------------------------------------


def check_wire(shape: Any, value: Any, path: str) -> None:
    """``value`` (wire JSON) conforms to botocore ``shape``: members exist, types match."""
    kind = shape.type_name
    if kind == "structure":
        assert isinstance(value, dict), path
        for name, member in value.items():
            assert name in shape.members, f"{path}.{name} is not in {shape.name}"
            check_wire(shape.members[name], member, f"{path}.{name}")
        for name in shape.required_members:
            assert name in value, f"{path}.{name} is required by {shape.name}"
    elif kind == "map":
        assert isinstance(value, dict), path
        for k, v in value.items():
            check_wire(shape.key, k, f"{path}[key]")
            check_wire(shape.value, v, f"{path}[{k}]")
    elif kind == "list":
        assert isinstance(value, list), path
        for i, item in enumerate(value):
            check_wire(shape.member, item, f"{path}[{i}]")
    elif kind == "string":
        assert isinstance(value, str), path
        if shape.enum:
            assert value in shape.enum, f"{path}={value!r} not in {shape.enum}"
    elif kind == "blob":
        assert isinstance(value, str), path
        base64.b64decode(value, validate=True)
    elif kind in ("integer", "long"):
        assert type(value) is int, path
    elif kind == "boolean":
        assert type(value) is bool, path
    elif kind == "timestamp":
        assert isinstance(value, int | float), path
        assert not isinstance(value, bool), path
    else:  # pragma: no cover - a shape type the local KMS never sends
        raise AssertionError(f"{path}: unexpected shape type {kind}")


def check_exchanges(exchanges: list[Exchange]) -> set[str]:
    seen = set()
    for ex in exchanges:
        op = KMS_MODEL.operation_model(ex.operation)
        check_wire(op.input_shape, ex.request, f"{ex.operation} request")
        if ex.status == 200 and op.output_shape is None:  # CreateAlias: no output members
            assert ex.response == {}, ex.operation
        elif ex.status == 200:
            check_wire(op.output_shape, ex.response, f"{ex.operation} response")
        else:
            assert set(ex.response) == {"__type", "message"}
        seen.add(ex.operation)
    return seen


@pytest.fixture
def recorded_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every request member the server reads, with the Python type it expects."""
    reads: list[tuple[str, str]] = []
    original = _server._field

    def spy(body: Any, name: str, kind: type, required: bool) -> Any:
        reads.append((name, kind.__name__))
        return original(body, name, kind, required)

    monkeypatch.setattr(_server, "_field", spy)
    return reads


_PY_TO_SHAPE = {
    "str": {"string", "blob"},
    "dict": {"map", "structure"},
    "int": {"integer"},
    "bool": {"boolean"},
}


# -- tests ------------------------------------------------------------------------------------


async def test_round_trips(tmp_path: Path, nsm: LocalNsm) -> None:
    async with local_kms(tmp_path / "keys.json", nsm) as kms:
        meta = (await kms.call("create_key", Description="bundle key"))["KeyMetadata"]
        key_id, arn = meta["KeyId"], meta["Arn"]
        assert arn == f"arn:aws:kms:us-east-1:111122223333:key/{key_id}"
        assert meta["KeySpec"] == "SYMMETRIC_DEFAULT"
        assert meta["Enabled"] is True
        for ref in (key_id, arn):
            described = await kms.call("describe_key", KeyId=ref)
            assert described["KeyMetadata"]["Arn"] == arn

        ctx = {"format": "trio-sign/sealed-key-shares", "bundle": "b1"}
        dk = await kms.call(
            "generate_data_key", KeyId=key_id, KeySpec="AES_256", EncryptionContext=ctx
        )
        assert len(dk["Plaintext"]) == 32
        assert dk["KeyId"] == arn
        for kwargs in ({}, {"KeyId": key_id}, {"KeyId": arn}):
            out = await kms.call(
                "decrypt", CiphertextBlob=dk["CiphertextBlob"], EncryptionContext=ctx, **kwargs
            )
            assert out["Plaintext"] == dk["Plaintext"]
            assert out["KeyId"] == arn
            assert "CiphertextForRecipient" not in out

        dk16 = await kms.call("generate_data_key", KeyId=arn, NumberOfBytes=16)
        assert len(dk16["Plaintext"]) == 16

        enc = await kms.call("encrypt", KeyId=key_id, Plaintext=b"hello kms")
        out = await kms.call("decrypt", CiphertextBlob=enc["CiphertextBlob"])
        assert out["Plaintext"] == b"hello kms"
        assert enc["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"

    # keys persist (mode 0600) and a new server decrypts old blobs
    keys = tmp_path / "keys.json"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    async with local_kms(keys, nsm) as kms:
        out = await kms.call("decrypt", CiphertextBlob=dk["CiphertextBlob"], EncryptionContext=ctx)
        assert out["Plaintext"] == dk["Plaintext"]


async def test_refusals(tmp_path: Path, nsm: LocalNsm) -> None:
    async with local_kms(tmp_path / "keys.json", nsm) as kms:
        key_id = (await kms.call("create_key"))["KeyMetadata"]["KeyId"]
        other = (await kms.call("create_key"))["KeyMetadata"]["KeyId"]
        ctx = {"format": "x", "a": "1"}
        blob = (
            await kms.call("encrypt", KeyId=key_id, Plaintext=b"k" * 32, EncryptionContext=ctx)
        )["CiphertextBlob"]
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("decrypt", {"CiphertextBlob": blob, "EncryptionContext": {"format": "x", "a": "2"}},
             "InvalidCiphertextException"),
            ("decrypt", {"CiphertextBlob": blob}, "InvalidCiphertextException"),
            ("decrypt", {"CiphertextBlob": blob[:-1] + bytes([blob[-1] ^ 1]),
                         "EncryptionContext": ctx}, "InvalidCiphertextException"),
            ("decrypt", {"CiphertextBlob": b"garbage", "EncryptionContext": ctx},
             "InvalidCiphertextException"),
            ("decrypt", {"CiphertextBlob": blob, "EncryptionContext": ctx, "KeyId": other},
             "IncorrectKeyException"),
            ("describe_key", {"KeyId": "00000000-0000-4000-8000-000000000000"},
             "NotFoundException"),
            ("describe_key", {"KeyId": "arn:aws:kms:eu-west-1:111122223333:key/" + key_id},
             "NotFoundException"),
            ("generate_data_key", {"KeyId": key_id}, "ValidationException"),
            ("generate_data_key", {"KeyId": key_id, "KeySpec": "AES_256", "NumberOfBytes": 32},
             "ValidationException"),
            ("create_key", {"KeySpec": "RSA_2048"}, "UnsupportedOperationException"),
        ]  # fmt: skip
        for method, kwargs, code in cases:
            with pytest.raises(ClientError) as exc:
                await kms.call(method, **kwargs)
            assert error_code(exc) == code, (method, kwargs)


def _raw_post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


async def _declared_oversize(
    url: str, headers: dict[str, str], length: int
) -> tuple[int, dict[str, Any]]:
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        await stream.send_all(
            (
                f"POST / HTTP/1.1\r\nHost: {host}\r\n{head}Content-Length: {length}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
        )
        raw = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                raw += chunk
    status_line, _, rest = raw.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(body)


async def test_http_envelope(tmp_path: Path, nsm: LocalNsm) -> None:
    """An Authorization header is required (not verified); bodies are bounded."""
    async with local_kms(tmp_path / "keys.json", nsm) as kms:
        base = {
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": "TrentService.CreateKey",
        }
        status, body = await trio.to_thread.run_sync(_raw_post, kms.url, b"{}", base)
        assert (status, body["__type"]) == (400, "MissingAuthenticationTokenException")
        signed = {**base, "Authorization": "AWS4-HMAC-SHA256 Credential=anything"}
        status, body = await trio.to_thread.run_sync(_raw_post, kms.url, b"{}", signed)
        assert status == 200
        assert "KeyMetadata" in body
        # Declare an oversized body and send none: the server must refuse on the declared
        # length alone (sending the body too would race the server's early close).
        status, body = await _declared_oversize(kms.url, signed, _server.MAX_REQUEST_BYTES + 1)
        assert (status, body["__type"]) == (413, "ValidationException")
        status, body = await trio.to_thread.run_sync(
            _raw_post,
            kms.url,
            b"{}",
            {**signed, "X-Amz-Target": "TrentService.ScheduleKeyDeletion"},
        )
        assert (status, body["__type"]) == (400, "UnknownOperationException")
        status, body = await trio.to_thread.run_sync(_raw_post, kms.url, b"[1]", signed)
        assert (status, body["__type"]) == (400, "SerializationException")


async def test_recipient_decrypt(tmp_path: Path, nsm: LocalNsm) -> None:
    async with local_kms(tmp_path / "keys.json", nsm) as kms:
        key_id = (await kms.call("create_key"))["KeyMetadata"]["KeyId"]
        ctx = {"format": "trio-sign/sealed-key-shares"}
        dk = await kms.call(
            "generate_data_key", KeyId=key_id, KeySpec="AES_256", EncryptionContext=ctx
        )
        recipient_key = EphemeralRecipientKey.generate()
        doc = nsm.attestation(public_key=recipient_key.public_key_der)
        recipient = {"AttestationDocument": doc, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}
        out = await kms.call(
            "decrypt", CiphertextBlob=dk["CiphertextBlob"], EncryptionContext=ctx, KeyId=key_id,
            Recipient=recipient,
        )  # fmt: skip
        assert "Plaintext" not in out
        wire = kms.kms.exchanges[-1].response
        assert "Plaintext" not in wire
        assert base64.b64decode(wire["CiphertextForRecipient"]) == out["CiphertextForRecipient"]
        assert out["CiphertextForRecipient"][:2] == b"\x30\x80"  # BER, as KMS sends it
        opened = recipient_key.decrypt_recipient_ciphertext(out["CiphertextForRecipient"])
        assert bytes(opened) == dk["Plaintext"]

        # GenerateDataKey with Recipient: the blob, and the key only for the enclave
        key2 = EphemeralRecipientKey.generate()
        recipient2 = {
            "AttestationDocument": nsm.attestation(public_key=key2.public_key_der),
            "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
        }
        gen = await kms.call(
            "generate_data_key", KeyId=key_id, KeySpec="AES_256", EncryptionContext=ctx,
            Recipient=recipient2,
        )  # fmt: skip
        assert "Plaintext" not in gen
        data_key = key2.decrypt_recipient_ciphertext(gen["CiphertextForRecipient"])
        again = await kms.call(
            "decrypt", CiphertextBlob=gen["CiphertextBlob"], EncryptionContext=ctx
        )
        assert again["Plaintext"] == bytes(data_key)

        # the recipient's algorithm and key are checked
        for bad, code in [
            ({**recipient, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_1"}, "ValidationException"),
            ({**recipient, "AttestationDocument": nsm.attestation()}, "ValidationException"),
            ({**recipient, "AttestationDocument": b"\x84" + doc[1:-5]}, "ValidationException"),
        ]:
            with pytest.raises(ClientError) as exc:
                await kms.call(
                    "decrypt", CiphertextBlob=dk["CiphertextBlob"], EncryptionContext=ctx,
                    Recipient=bad,
                )  # fmt: skip
            assert error_code(exc) == code


def _pcr_policy() -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "sealer",
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws:iam::111122223333:role/sealer"},
                "Action": ["kms:Encrypt", "kms:GenerateDataKey", "kms:Describe*"],
                "Resource": "*",
            },
            {
                "Sid": "enclave",
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws:iam::111122223333:role/parent"},
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": {
                    "StringEqualsIgnoreCase": {
                        "kms:RecipientAttestation:ImageSha384": DEFAULT_LOCAL_PCRS[0].hex().upper(),
                        "kms:RecipientAttestation:PCR1": DEFAULT_LOCAL_PCRS[1].hex(),
                    }
                },
            },
        ],
    }


async def test_policy_pcr_conditions(tmp_path: Path, nsm: LocalNsm, nsm_dir: Path) -> None:
    async with local_kms(tmp_path / "keys.json", nsm, _pcr_policy()) as kms:
        key_id = (await kms.call("create_key"))["KeyMetadata"]["KeyId"]
        dk = await kms.call("generate_data_key", KeyId=key_id, KeySpec="AES_256")

        async def decrypt_for(doc_nsm: LocalNsm) -> Any:
            key = EphemeralRecipientKey.generate()
            doc = doc_nsm.attestation(public_key=key.public_key_der)
            return await kms.call(
                "decrypt",
                CiphertextBlob=dk["CiphertextBlob"],
                Recipient={
                    "AttestationDocument": doc,
                    "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
                },
            )

        assert "CiphertextForRecipient" in await decrypt_for(nsm)
        debug = LocalNsm.from_dir(nsm_dir, debug=True)
        other_image = LocalNsm.from_dir(nsm_dir, pcrs={**DEFAULT_LOCAL_PCRS, 0: b"\x01" * 48})
        for doc_nsm in (debug, other_image):
            with pytest.raises(ClientError) as exc:
                await decrypt_for(doc_nsm)
            assert error_code(exc) == "AccessDeniedException"
        # the Decrypt statement is conditioned on attestation: no plain Decrypt for anyone
        with pytest.raises(ClientError) as exc:
            await kms.call("decrypt", CiphertextBlob=dk["CiphertextBlob"])
        assert error_code(exc) == "AccessDeniedException"
        # a document from another root is refused before the policy is consulted
        with pytest.raises(ClientError) as exc:
            await decrypt_for(LocalNsm())
        assert error_code(exc) == "ValidationException"
        assert "chain_untrusted" in str(exc.value)


def test_policy_parsing() -> None:
    policy = KeyPolicy(_pcr_policy())
    pcr0 = DEFAULT_LOCAL_PCRS[0].hex()
    good = {
        "kms:recipientattestation:imagesha384": pcr0,
        "kms:recipientattestation:pcr1": DEFAULT_LOCAL_PCRS[1].hex(),
    }
    assert policy.allows("kms:Decrypt", good)
    assert not policy.allows("kms:Decrypt", {"kms:recipientattestation:imagesha384": pcr0})
    assert policy.allows("kms:DescribeKey", {})
    deny = KeyPolicy(
        {"Statement": [
            {"Effect": "Allow", "Action": "kms:*"},
            {"Effect": "Deny", "Action": "kms:Decrypt",
             "Condition": {"StringEquals": {"kms:EncryptionContext:tenant": "blocked"}}},
        ]}
    )  # fmt: skip
    assert deny.allows("kms:Decrypt", {"kms:encryptioncontext:tenant": "ok"})
    assert not deny.allows("kms:Decrypt", {"kms:encryptioncontext:tenant": "blocked"})
    for bad in [
        {"Statement": [{"Effect": "Allow", "Action": "kms:*", "NotAction": "kms:Decrypt"}]},
        {"Statement": [{"Effect": "Allow", "Action": "kms:*",
                        "Condition": {"StringLike": {"kms:RecipientAttestation:PCR0": "*"}}}]},
        {"Statement": [{"Effect": "Allow", "Action": "kms:*",
                        "Condition": {"StringEquals": {"kms:RecipientAttestation:PCR32": "00"}}}]},
        {"Statement": [{"Effect": "Maybe", "Action": "kms:*"}]},
        {"Statement": []},
        [],
    ]:  # fmt: skip
        with pytest.raises(PolicyError):
            KeyPolicy(bad)
    with pytest.raises(PolicyError):
        KeyPolicy.from_json("{not json")


def test_key_store_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    store = KeyStore(path)
    key = store.create(description="d")
    material = bytes(key.material)
    store.close()
    assert not any(key.material)
    assert "material" not in repr(key) or "<secret>" in repr(key)
    again = KeyStore(path)
    loaded = again.resolve(key.arn)
    assert loaded is not None
    assert bytes(loaded.material) == material
    # aliases: persisted, resolved by name and by alias ARN, validated on load
    again.create_alias("alias/trio-sign/prod", key.key_id)
    with pytest.raises(KeyError):
        again.create_alias("alias/trio-sign/prod", key.key_id)
    for bad in ("trio-sign", "alias/aws/kms", "alias/", "alias/has space"):
        with pytest.raises(ValueError, match="not a valid alias name"):
            again.create_alias(bad, key.key_id)
    with pytest.raises(ValueError, match="does not exist"):
        again.create_alias("alias/x", "00000000-0000-4000-8000-000000000000")
    again.close()
    third = KeyStore(path)
    for ref in ("alias/trio-sign/prod", "arn:aws:kms:us-east-1:111122223333:alias/trio-sign/prod"):
        found = third.resolve(ref)
        assert found is not None
        assert found.key_id == key.key_id
    assert third.resolve("alias/nope") is None
    assert third.resolve("arn:aws:kms:us-east-1:111122223333:user/x") is None
    third.close()
    doc = json.loads(path.read_text())
    doc["aliases"] = {"alias/dangling": "00000000-0000-4000-8000-000000000000"}
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyStoreError, match="aliases must map"):
        KeyStore(path)
    path.chmod(0o644)
    with pytest.raises(KeyStoreError, match="chmod 600"):
        KeyStore(path)
    path.chmod(0o600)
    path.write_text('{"format": "something-else"}')
    with pytest.raises(KeyStoreError, match="not a trio-sign/kms-local-keys"):
        KeyStore(path)


async def test_wire_matches_botocore_model(
    tmp_path: Path, nsm: LocalNsm, recorded_reads: list[tuple[str, str]]
) -> None:
    """Every request the server received and every response it sent conforms to botocore's
    KMS model, and every member the server reads exists there with a compatible type."""
    async with local_kms(tmp_path / "keys.json", nsm, _pcr_policy()) as kms:
        meta = (await kms.call("create_key", Description="shape check"))["KeyMetadata"]
        await kms.call("describe_key", KeyId=meta["Arn"])
        await kms.call("create_alias", AliasName="alias/shape", TargetKeyId=meta["KeyId"])
        ctx = {"format": "f"}
        dk = await kms.call(
            "generate_data_key", KeyId=meta["KeyId"], KeySpec="AES_256", EncryptionContext=ctx
        )
        await kms.call("encrypt", KeyId=meta["KeyId"], Plaintext=b"x", EncryptionContext=ctx)
        key = EphemeralRecipientKey.generate()
        recipient = {
            "AttestationDocument": nsm.attestation(public_key=key.public_key_der),
            "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
        }
        await kms.call(
            "decrypt", CiphertextBlob=dk["CiphertextBlob"], EncryptionContext=ctx,
            KeyId=meta["Arn"], Recipient=recipient,
        )  # fmt: skip
        with pytest.raises(ClientError):
            await kms.call("decrypt", CiphertextBlob=dk["CiphertextBlob"], EncryptionContext=ctx)
        seen = check_exchanges(kms.kms.exchanges)
    assert seen == {
        "CreateKey",
        "DescribeKey",
        "CreateAlias",
        "GenerateDataKey",
        "Encrypt",
        "Decrypt",
    }

    recipient_shape = KMS_MODEL.shape_for("RecipientInfo")
    members: dict[str, Any] = dict(recipient_shape.members)
    for op in seen:
        members.update(KMS_MODEL.operation_model(op).input_shape.members)
    assert recorded_reads
    for name, py_type in set(recorded_reads):
        assert name in members, f"the server reads {name}, which KMS does not define"
        assert members[name].type_name in _PY_TO_SHAPE[py_type], (name, py_type)
    assert recipient_shape.members["KeyEncryptionAlgorithm"].enum == [_server.RECIPIENT_ALGORITHM]


def test_core_disabled_key_and_internal_error(
    tmp_path: Path, nsm: LocalNsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sync core directly: a disabled key, and an unexpected failure (500, still serving)."""
    path = tmp_path / "keys.json"
    store = KeyStore(path)
    key = store.create()
    kms = LocalKms(store, root_pem=nsm.root_pem)
    status, enc = kms.handle(
        "Encrypt", json.dumps({"KeyId": key.key_id, "Plaintext": "AAAA"}).encode()
    )
    assert status == 200
    key.enabled = False
    for op, body in [
        ("Encrypt", {"KeyId": key.key_id, "Plaintext": "AAAA"}),
        ("Decrypt", {"CiphertextBlob": enc["CiphertextBlob"]}),
    ]:
        status, err = kms.handle(op, json.dumps(body).encode())
        assert (status, err["__type"]) == (400, "DisabledException")

    def broken(**_: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(store, "create", broken)
    status, err = kms.handle("CreateKey", b"{}")
    assert (status, err) == (500, {"__type": "KMSInternalException", "message": "internal error"})
    status, _ = kms.handle("DescribeKey", json.dumps({"KeyId": key.arn}).encode())
    assert status == 200
    store.close()


# -- asymmetric signing: Ed25519 keys for bundle signatures (DESIGN §12) ---------------------


def _signing_policy() -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ceremony",
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws:iam::111122223333:role/ceremony"},
                "Action": ["kms:Sign", "kms:GetPublicKey"],
                "Resource": "*",
            },
            {
                "Sid": "sealer",
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws:iam::111122223333:role/sealer"},
                "Action": ["kms:GenerateDataKey", "kms:Encrypt", "kms:Decrypt"],
                "Resource": "*",
            },
        ],
    }


async def test_ed25519_sign_and_get_public_key_match_botocore(
    tmp_path: Path, nsm: LocalNsm, recorded_reads: list[tuple[str, str]]
) -> None:
    """CreateKey ECC_NIST_EDWARDS25519, GetPublicKey and Sign (ED25519_SHA_512, RAW) through
    boto3: every request and response conforms to botocore's KMS model, the signature is plain
    RFC 8032 Ed25519 over the message, and the server reads only members KMS defines."""
    import nacl.signing
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    async with local_kms(tmp_path / "keys.json", nsm, _signing_policy()) as kms:
        meta = (
            await kms.call(
                "create_key",
                KeySpec="ECC_NIST_EDWARDS25519",
                KeyUsage="SIGN_VERIFY",
                Description="ceremony key",
            )
        )["KeyMetadata"]
        assert meta["KeySpec"] == "ECC_NIST_EDWARDS25519"
        assert meta["KeyUsage"] == "SIGN_VERIFY"
        assert meta["SigningAlgorithms"] == ["ED25519_SHA_512"]
        await kms.call("create_alias", AliasName="alias/ceremony", TargetKeyId=meta["KeyId"])
        for ref in (meta["KeyId"], meta["Arn"], "alias/ceremony"):
            public = await kms.call("get_public_key", KeyId=ref)
            assert public["KeyId"] == meta["Arn"]
        assert public["KeySpec"] == "ECC_NIST_EDWARDS25519"
        assert public["SigningAlgorithms"] == ["ED25519_SHA_512"]
        key = serialization.load_der_public_key(public["PublicKey"])
        assert isinstance(key, Ed25519PublicKey)
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        digest = os.urandom(32)
        signed = await kms.call(
            "sign",
            KeyId="alias/ceremony",
            Message=digest,
            MessageType="RAW",
            SigningAlgorithm="ED25519_SHA_512",
        )
        assert signed["KeyId"] == meta["Arn"]
        assert signed["SigningAlgorithm"] == "ED25519_SHA_512"
        nacl.signing.VerifyKey(raw).verify(digest, signed["Signature"])  # RFC 8032, pure
        # a key survives a restart, and signs the same (Ed25519 is deterministic)
        symmetric = (await kms.call("create_key"))["KeyMetadata"]
        refusals = {
            "ED25519_PH_SHA_512": ("InvalidKeyUsageException", {"MessageType": "DIGEST"}),
            "ED25519_SHA_512": ("ValidationException", {"MessageType": "DIGEST"}),
        }
        for algorithm, (code, extra) in refusals.items():
            with pytest.raises(ClientError) as info:
                await kms.call(
                    "sign",
                    KeyId=meta["KeyId"],
                    Message=digest,
                    SigningAlgorithm=algorithm,
                    **extra,
                )
            assert error_code(info) == code
        with pytest.raises(ClientError) as info:
            await kms.call(
                "sign", KeyId=symmetric["KeyId"], Message=digest, SigningAlgorithm="ED25519_SHA_512"
            )
        assert error_code(info) == "InvalidKeyUsageException"
        with pytest.raises(ClientError) as info:
            await kms.call("get_public_key", KeyId=symmetric["KeyId"])
        assert error_code(info) == "UnsupportedOperationException"
        for op, kwargs in (
            ("encrypt", {"Plaintext": b"x"}),
            ("generate_data_key", {"KeySpec": "AES_256"}),
        ):
            with pytest.raises(ClientError) as info:
                await kms.call(op, KeyId=meta["KeyId"], **kwargs)
            assert error_code(info) == "InvalidKeyUsageException"
        with pytest.raises(ClientError) as info:
            await kms.call(
                "create_key", KeySpec="ECC_NIST_EDWARDS25519", KeyUsage="ENCRYPT_DECRYPT"
            )
        assert error_code(info) == "ValidationException"
        with pytest.raises(ClientError) as info:
            await kms.call("create_key", KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")
        assert error_code(info) == "UnsupportedOperationException"
        with pytest.raises(ClientError) as info:
            await kms.call(
                "sign", KeyId=meta["KeyId"], Message=bytes(4097), SigningAlgorithm="ED25519_SHA_512"
            )
        assert error_code(info) == "ValidationException"
        seen = check_exchanges(kms.kms.exchanges)
    assert {"CreateKey", "GetPublicKey", "Sign"} <= seen
    members: dict[str, Any] = {}
    for op in seen:
        members.update(KMS_MODEL.operation_model(op).input_shape.members)
    for name, py_type in set(recorded_reads):
        assert name in members, f"the server reads {name}, which KMS does not define"
        assert members[name].type_name in _PY_TO_SHAPE[py_type], (name, py_type)
    assert "ED25519_SHA_512" in KMS_MODEL.shape_for("SigningAlgorithmSpec").enum
    async with local_kms(tmp_path / "keys.json", nsm, _signing_policy()) as kms:
        again = await kms.call(
            "sign", KeyId=meta["Arn"], Message=digest, SigningAlgorithm="ED25519_SHA_512"
        )
        assert again["Signature"] == signed["Signature"]


async def test_sign_is_governed_by_the_key_policy(tmp_path: Path, nsm: LocalNsm) -> None:
    policy = _signing_policy()
    policy["Statement"][0]["Action"] = ["kms:GetPublicKey"]
    async with local_kms(tmp_path / "keys.json", nsm, policy) as kms:
        meta = (await kms.call("create_key", KeySpec="ECC_NIST_EDWARDS25519"))["KeyMetadata"]
        assert meta["KeyUsage"] == "SIGN_VERIFY"  # the default for the spec, as in KMS
        await kms.call("get_public_key", KeyId=meta["KeyId"])
        with pytest.raises(ClientError) as info:
            await kms.call(
                "sign", KeyId=meta["KeyId"], Message=b"m", SigningAlgorithm="ED25519_SHA_512"
            )
        assert error_code(info) == "AccessDeniedException"


async def test_kms_bundle_signer_seals_a_bundle_the_enclave_accepts(
    tmp_path: Path, nsm: LocalNsm
) -> None:
    """shares seal --signing-kms-key-id's path: KmsBundleSigner over boto3 signs a bundle's
    fingerprint; the loader pinning the KMS key's public half accepts it, and the signature
    record names that key."""
    import io

    from trio_sign.kms import KmsBundleSigner
    from trio_sign.shares import (
        BundleTrust,
        DevKeyFile,
        ShareStore,
        SigningError,
        encode_bundle,
        inspect_sealed,
    )

    from .enclave_helpers import make_accounts

    store, accounts = make_accounts(5)
    store.close()
    records = [a.service for a in accounts.values()]
    dev = DevKeyFile.create(tmp_path / "dev.key")
    async with local_kms(tmp_path / "keys.json", nsm, _signing_policy()) as kms:
        meta = (await kms.call("create_key", KeySpec="ECC_NIST_EDWARDS25519"))["KeyMetadata"]
        signer = await trio.to_thread.run_sync(KmsBundleSigner, kms.client, meta["KeyId"])
        assert signer.key_id == meta["Arn"]
        bundle = await trio.to_thread.run_sync(lambda: encode_bundle(records, dev, signer=signer))
        symmetric = (await kms.call("create_key"))["KeyMetadata"]
        with pytest.raises(SigningError, match="UnsupportedOperationException"):
            await trio.to_thread.run_sync(KmsBundleSigner, kms.client, symmetric["KeyId"])
    _, end = inspect_sealed(io.BytesIO(bundle))
    assert end.signature is not None
    assert end.signature.public_key == signer.public_key
    loaded = ShareStore.load_sealed(
        io.BytesIO(bundle), dev, trust=BundleTrust.pinned([signer.public_key])
    )
    assert loaded.signer == signer.public_key
    loaded.close()
    dev.close()
    for r in records:
        r.zero()
