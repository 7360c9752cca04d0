"""The boto3 paths against the local KMS over loopback: the data-key provider (``shares seal
--kms-endpoint``, ``shares reencrypt``), the parent's ``KmsRecipientKms``, and the full attested
key release (enclave preload <-> parent <-> boto3 <-> local KMS) with no data key on the
parent's side."""

from __future__ import annotations

import argparse
import base64
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trio_sign._errors import KeyWrapError
from trio_sign.cli import _kms as cli_kms
from trio_sign.cli import main
from trio_sign.enclave._preload import preload_shares
from trio_sign.kms import (
    KMS_PROVIDER,
    KmsDataKeyProvider,
    KmsRecipientError,
    KmsRecipientKms,
    LocalKms,
    make_kms_client,
    same_key,
)
from trio_sign.nitro import AsyncNsm, LocalNsm, MessageStream
from trio_sign.parent import serve_preload
from trio_sign.shares import (
    DataKeyProvider,
    ShareRecord,
    ShareStore,
    encode_bundle,
    read_sealed_header,
)
from trio_sign.testing import generate_share_files

from .enclave_helpers import make_accounts
from .test_kms_local import (
    ClientError,
    Running,
    _no_aws_config,  # noqa: F401  (autouse fixture: dummy credentials, no ~/.aws)
    _pcr_policy,
    error_code,
    local_kms,
)


@pytest.fixture(scope="module")
def nsm() -> LocalNsm:
    return LocalNsm()


async def _accounts_loaded(path: Path, provider: DataKeyProvider) -> int:
    """Load a sealed bundle with ``provider`` (in a thread, as the CLI does); its size."""
    with path.open("rb") as f:
        store = await trio.to_thread.run_sync(ShareStore.load_sealed, f, provider)
    try:
        return len(store)
    finally:
        store.close()


async def _new_key(kms: Running) -> str:
    key_id: str = (await kms.call("create_key"))["KeyMetadata"]["KeyId"]
    return key_id


# -- the data-key provider and the CLI --------------------------------------------------------


async def test_an_alias_is_resolved_to_the_key_arn_at_sealing(
    tmp_path: Path, nsm: LocalNsm
) -> None:
    """Operators name keys by alias. The header records the key ARN the alias named at
    sealing (so the parent's check of KMS's answer compares ARNs, and re-pointing the alias
    later cannot change which key opens an existing bundle); a provider given the alias still
    opens it; an alias for another key is refused by KMS itself."""
    shares = tmp_path / "shares"
    generate_share_files(shares, 4, counterparts=False)
    sealed = tmp_path / "bundle.enc"
    async with local_kms(tmp_path / "keys.json", nsm) as kms:
        key, other = await _new_key(kms), await _new_key(kms)
        await kms.call("create_alias", AliasName="alias/trio-sign", TargetKeyId=key)
        await kms.call("create_alias", AliasName="alias/other", TargetKeyId=other)
        with pytest.raises(ClientError) as exc:
            await kms.call("create_alias", AliasName="alias/trio-sign", TargetKeyId=other)
        assert error_code(exc) == "AlreadyExistsException"
        described = await kms.call("describe_key", KeyId="alias/trio-sign")
        assert described["KeyMetadata"]["KeyId"] == key

        endpoint = ["--kms-endpoint", kms.url, "--kms-region", "us-east-1"]
        args = ["shares", "seal", "--in", str(shares / "service_key_shares.json")]
        args += ["--out", str(sealed), "--kms-key-id", "alias/trio-sign", *endpoint]
        assert await trio.to_thread.run_sync(main, args) == 0
        with sealed.open("rb") as f:
            header, _ = read_sealed_header(f)
        assert header["kms_key_id"] == f"arn:aws:kms:us-east-1:111122223333:key/{key}"

        for ref in ("alias/trio-sign", "arn:aws:kms:us-east-1:111122223333:alias/trio-sign", key):
            assert await _accounts_loaded(sealed, KmsDataKeyProvider(kms.client, ref)) == 4
        with sealed.open("rb") as f, pytest.raises(KeyWrapError, match="IncorrectKeyException"):
            await trio.to_thread.run_sync(
                ShareStore.load_sealed, f, KmsDataKeyProvider(kms.client, "alias/other")
            )
        with sealed.open("rb") as f, pytest.raises(KeyWrapError, match="sealed under key"):
            await trio.to_thread.run_sync(
                ShareStore.load_sealed, f, KmsDataKeyProvider(kms.client, other)
            )


def test_a_kms_answer_for_another_key_is_refused_at_sealing() -> None:
    """GenerateDataKey must say which key wrapped the data key, and it must be the one asked
    for (a misrouted endpoint or a wrong alias must not produce a bundle nobody expects)."""

    class Kms:
        def __init__(self, answer_key: str | None) -> None:
            self.answer_key = answer_key

        def generate_data_key(self, **kw: Any) -> dict[str, Any]:
            answer: dict[str, Any] = {"Plaintext": bytes(32), "CiphertextBlob": b"blob"}
            if self.answer_key is not None:
                answer["KeyId"] = self.answer_key
            return answer

    mine = "0b6f6a52-1c1e-4c55-9a37-5f2e8a0c0001"
    arn = f"arn:aws:kms:us-east-1:111122223333:key/{mine}"
    other = "arn:aws:kms:us-east-1:111122223333:key/0b6f6a52-1c1e-4c55-9a37-5f2e8a0c0002"
    provider = KmsDataKeyProvider(Kms(arn), mine)
    provider.generate_data_key({"format": "x"})
    assert provider.key_id == arn
    with pytest.raises(KeyWrapError, match="answered for key"):
        KmsDataKeyProvider(Kms(other), mine).generate_data_key({"format": "x"})
    with pytest.raises(KeyWrapError, match="did not say which key"):
        KmsDataKeyProvider(Kms(None), mine).generate_data_key({"format": "x"})
    aliased = KmsDataKeyProvider(Kms(other), "alias/anything")
    aliased.generate_data_key({"format": "x"})
    assert aliased.key_id == other


async def test_seal_inspect_load_reencrypt(
    tmp_path: Path, nsm: LocalNsm, capsys: pytest.CaptureFixture[str]
) -> None:
    shares = tmp_path / "shares"
    generate_share_files(shares, 12, counterparts=False)
    plain = shares / "service_key_shares.json"
    sealed = tmp_path / "bundle.enc"
    moved = tmp_path / "bundle2.enc"
    async with local_kms(tmp_path / "keys.json", nsm) as kms:
        old_key, new_key = await _new_key(kms), await _new_key(kms)
        endpoint = ["--kms-endpoint", kms.url, "--kms-region", "us-east-1"]
        args = ["shares", "seal", "--in", str(plain), "--out", str(sealed), *endpoint]
        assert await trio.to_thread.run_sync(main, [*args, "--kms-key-id", old_key]) == 0
        with sealed.open("rb") as f:
            header, _ = read_sealed_header(f)
        assert header["key_provider"] == KMS_PROVIDER == "aws-kms"
        # the header records the key ARN KMS answered with, whatever form was given
        assert header["kms_key_id"] == f"arn:aws:kms:us-east-1:111122223333:key/{old_key}"

        old = KmsDataKeyProvider(kms.client, old_key)
        with sealed.open("rb") as f:
            store = await trio.to_thread.run_sync(ShareStore.load_sealed, f, old)
        assert len(store) == 12
        store.close()

        args = ["shares", "reencrypt", "--in", str(sealed), "--out", str(moved), *endpoint]
        assert await trio.to_thread.run_sync(main, [*args, "--new-kms-key-id", new_key]) == 0
        assert f"under arn:aws:kms:us-east-1:111122223333:key/{new_key}" in capsys.readouterr().out
        with moved.open("rb") as f:
            header2, _ = read_sealed_header(f)
        assert same_key(header2["kms_key_id"], new_key)
        assert header2["kms_key_id"].startswith("arn:aws:kms:")
        assert header2["encryption_context"] == header["encryption_context"]
        assert header2["accounts"] == 12

        # the new file opens with the new key only
        assert await _accounts_loaded(moved, KmsDataKeyProvider(kms.client, new_key)) == 12
        with moved.open("rb") as f, pytest.raises(KeyWrapError, match="sealed under key"):
            await trio.to_thread.run_sync(ShareStore.load_sealed, f, old)
        # and KMS itself cannot open the new wrapped key under the old key
        blob = base64.b64decode(header2["encrypted_data_key"])
        with pytest.raises(ClientError) as exc:
            await kms.call(
                "decrypt",
                CiphertextBlob=blob,
                KeyId=old_key,
                EncryptionContext=header2["encryption_context"],
            )
        assert error_code(exc) == "IncorrectKeyException"

        # usage errors
        bad = ["shares", "seal", "--in", str(plain), "--out", str(tmp_path / "x.enc")]
        with pytest.raises(SystemExit):
            main([*bad, "--dev-key", str(tmp_path / "k"), "--kms-key-id", old_key])
        assert main([*bad, "--dev-key", str(tmp_path / "k"), "--kms-endpoint", kms.url]) == 1
        assert await trio.to_thread.run_sync(
            main, [*bad, *endpoint, "--kms-key-id", "00000000-0000-4000-8000-000000000000"]
        ) == 1  # fmt: skip
        assert "NotFoundException" in capsys.readouterr().err


async def test_provider_errors(tmp_path: Path, nsm: LocalNsm) -> None:
    async with local_kms(tmp_path / "keys.json", nsm) as kms:
        key_id = await _new_key(kms)
        provider = KmsDataKeyProvider(kms.client, key_id)
        assert isinstance(provider, DataKeyProvider)
        assert provider.provider == "aws-kms"
        assert "key_id" in repr(provider)
        key, blob = await trio.to_thread.run_sync(provider.generate_data_key, {"format": "x"})
        assert isinstance(key, bytearray)
        assert len(key) == 32
        got = await trio.to_thread.run_sync(provider.decrypt_data_key, blob, {"format": "x"})
        assert got == key
        with pytest.raises(KeyWrapError, match="InvalidCiphertextException"):
            await trio.to_thread.run_sync(provider.decrypt_data_key, blob, {"format": "y"})
    # the server is gone: a transport failure is a KeyWrapError too (short timeouts, bounded
    # retries)
    unreachable = make_kms_client(
        kms.url, max_attempts=1, aws_access_key_id="a", aws_secret_access_key="b"
    )
    with pytest.raises(KeyWrapError, match="KMS GenerateDataKey"):
        await trio.to_thread.run_sync(
            KmsDataKeyProvider(unreachable, key_id).generate_data_key, {"format": "x"}
        )


# -- KmsRecipientKms ----------------------------------------------------------------------------


class FakeKms:
    """A KMS client that answers Decrypt with a canned response (a true external edge)."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response
        self.calls: list[dict[str, Any]] = []

    def decrypt(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        return dict(self.response)


HEADER: dict[str, Any] = {
    "key_provider": "aws-kms",
    "kms_key_id": "1234abcd-12ab-34cd-56ef-1234567890ab",
    "encrypted_data_key": base64.b64encode(b"wrapped").decode(),
    "encryption_context": {"format": "trio-sign/sealed-key-shares"},
}
ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


async def test_recipient_kms_request_and_checks() -> None:
    good = FakeKms({"KeyId": ARN, "CiphertextForRecipient": b"\x30\x80envelope"})
    assert await KmsRecipientKms(good)(b"doc", HEADER) == b"\x30\x80envelope"
    assert good.calls == [
        {
            "CiphertextBlob": b"wrapped",
            "KeyId": HEADER["kms_key_id"],
            "EncryptionContext": HEADER["encryption_context"],
            "Recipient": {
                "AttestationDocument": b"doc",
                "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
            },
        }
    ]
    secret = b"S" * 32
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"KeyId": ARN, "Plaintext": secret, "CiphertextForRecipient": b"x"}, "Plaintext"),
        ({"KeyId": ARN, "Plaintext": secret}, "Plaintext"),
        ({"KeyId": ARN}, "no CiphertextForRecipient"),
        ({"KeyId": ARN.replace("1234abcd", "ffffabcd"), "CiphertextForRecipient": b"x"}, "key"),
        ({"CiphertextForRecipient": b"x"}, "key"),
    ]
    for response, match in refusals:
        with pytest.raises(KmsRecipientError, match=match) as exc:
            await KmsRecipientKms(FakeKms(response))(b"doc", HEADER)
        assert secret.hex() not in str(exc.value)
        assert "SSSS" not in str(exc.value)
    # an empty Plaintext (as KMS may send alongside CiphertextForRecipient) is fine
    empty = FakeKms({"KeyId": ARN, "Plaintext": b"", "CiphertextForRecipient": b"x"})
    assert await KmsRecipientKms(empty)(b"doc", HEADER) == b"x"
    with pytest.raises(KmsRecipientError, match="dev-key-file"):
        await KmsRecipientKms(good)(b"doc", {**HEADER, "key_provider": "dev-key-file"})


def test_same_key() -> None:
    kid = "1234abcd-12ab-34cd-56ef-1234567890ab"
    assert same_key(kid, ARN)
    assert same_key(ARN, kid)
    assert same_key(ARN, ARN)
    assert not same_key(ARN, ARN.replace("us-east-1", "eu-west-1"))
    assert not same_key(kid, "ffff" + kid[4:])


# -- the full attested key release ------------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.getMessage()} {record.__dict__!r}")


async def test_attested_key_release_through_boto3(tmp_path: Path) -> None:
    """Seal through the local KMS; the enclave's preload gets its data key via the parent's
    boto3 ``Decrypt`` with ``Recipient``; nothing on the parent's side ever holds it."""
    nsm_dir = tmp_path / "nsm"
    enclave_nsm = LocalNsm.from_dir(nsm_dir, create=True)
    store, accounts = make_accounts(8)
    store.close()
    records: list[ShareRecord] = [a.service for a in accounts.values()]

    capture = _Capture()
    loggers = [logging.getLogger(n) for n in ("trio_sign", "botocore", "urllib3", "hypercorn")]
    saved = [(lg, lg.level) for lg in loggers]
    try:
        async with local_kms(tmp_path / "keys.json", enclave_nsm, _pcr_policy()) as kms:
            key_id = await _new_key(kms)
            sealer = KmsDataKeyProvider(kms.client, key_id)
            bundle = tmp_path / "bundle.enc"
            data = await trio.to_thread.run_sync(
                lambda: encode_bundle(records, sealer, chunk_size=1024)
            )
            bundle.write_bytes(data)
            with bundle.open("rb") as f:
                header, _ = read_sealed_header(f)
            # The test, standing in for the KMS side (in process, past the key policy that
            # refuses a plain Decrypt), learns the data key to search for it.
            kms_side = LocalKms(kms.kms.store, root_pem=enclave_nsm.root_pem)
            answer = kms_side.decrypt(
                {
                    "CiphertextBlob": header["encrypted_data_key"],
                    "EncryptionContext": header["encryption_context"],
                }
            )
            data_key = base64.b64decode(answer["Plaintext"])
            assert len(data_key) == 32

            # From here on only the parent side talks to KMS: capture every log line.
            for lg in loggers:
                lg.addHandler(capture)
                lg.setLevel(logging.DEBUG)

            # The parent's own client, with a hook keeping every raw KMS response body.
            parent_client = make_kms_client(
                kms.url, aws_access_key_id="AKIDPARENT", aws_secret_access_key="parent-secret"
            )
            raw_bodies: list[bytes] = []
            parsed: list[Any] = []

            def keep(http_response: Any, parsed: Any = None, **_: Any) -> None:
                raw_bodies.append(http_response.content)

            parent_client.meta.events.register("after-call.kms.Decrypt", keep)
            recipient_kms = KmsRecipientKms(parent_client)

            async def parent_kms(document: bytes, hdr: dict[str, Any]) -> bytes:
                envelope = await recipient_kms(document, hdr)
                parsed.append(envelope)
                return envelope

            a, b = trio.testing.memory_stream_pair()
            results: dict[str, Any] = {}

            async def enclave_side() -> None:
                async with a:
                    results["enclave"] = await preload_shares(
                        MessageStream(a), AsyncNsm(enclave_nsm)
                    )

            async def parent_side() -> None:
                async with b:
                    results["parent"] = await serve_preload(MessageStream(b), bundle, parent_kms)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(enclave_side)
                nursery.start_soon(parent_side)
            loaded, report = results["enclave"]
            parent_result = results["parent"]
            assert len(loaded) == len(records) == report.accounts
            for rec in records:
                assert bytes(loaded[rec.account_id].signing_share) == bytes(rec.signing_share)
            loaded.close()
            assert parent_result.ok

            # A debug-mode enclave gets nothing: the key policy pins the PCRs.
            debug_nsm = LocalNsm.from_dir(nsm_dir, debug=True)
            a2, b2 = trio.testing.memory_stream_pair()
            outcome: dict[str, Any] = {}

            async def debug_enclave() -> None:
                async with a2:
                    try:
                        await preload_shares(MessageStream(a2), AsyncNsm(debug_nsm))
                    except Exception as exc:
                        outcome["enclave"] = exc

            async def debug_parent() -> None:
                async with b2:
                    try:
                        await serve_preload(MessageStream(b2), bundle, recipient_kms)
                    except KmsRecipientError as exc:
                        outcome["parent"] = exc

            async with trio.open_nursery() as nursery:
                nursery.start_soon(debug_enclave)
                nursery.start_soon(debug_parent)
            assert "AccessDeniedException" in str(outcome["parent"])
    finally:
        for lg, level in saved:
            lg.removeHandler(capture)
            lg.setLevel(level)

    # Everything the parent side saw: raw HTTP bodies, what boto3 parsed, what it passed on,
    # its result, and every log line (botocore at DEBUG logs whole response bodies).
    forms = [data_key, base64.b64encode(data_key), data_key.hex().encode()]
    haystacks = [*raw_bodies, *parsed, repr(parent_result).encode()]
    haystacks += [line.encode() for line in capture.lines]
    assert raw_bodies
    assert any(b"CiphertextForRecipient" in body for body in raw_bodies)
    # the search is meaningful: botocore's DEBUG log of the response bodies was captured
    assert any(
        "Response body" in line and "CiphertextForRecipient" in line for line in capture.lines
    )
    for hay in haystacks:
        for form in forms:
            assert form not in hay
    assert not any(b'"Plaintext"' in body for body in raw_bodies)


# -- the kms-local command --------------------------------------------------------------------

_RUN_KMS_LOCAL = (
    "import argparse, sys\n"
    "from trio_sign.cli import _kms\n"
    "from trio_sign._logging import configure_logging\n"
    "p = argparse.ArgumentParser(); _kms.add_parser(p.add_subparsers())\n"
    "configure_logging('INFO'); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
)


def test_kms_local_command(tmp_path: Path) -> None:
    """``trio-sign kms-local`` as a process: --create-key, the endpoint line, boto3, SIGTERM."""
    nsm = LocalNsm.from_dir(tmp_path / "nsm", create=True)
    policy = tmp_path / "policy.json"
    policy.write_text('{"Statement": [{"Effect": "Allow", "Action": "kms:*"}]}')
    argv = [
        "kms-local", "--listen", "tcp://127.0.0.1:0", "--keys", str(tmp_path / "keys.json"),
        "--nsm-root", str(tmp_path / "nsm" / "local-nsm-root.pem"), "--policy", str(policy),
        "--create-key",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUN_KMS_LOCAL, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        key_id = lines[0].split()[1]
        endpoint = lines[2].split()[1]
        assert lines[2].startswith("endpoint http://127.0.0.1:")
        client = make_kms_client(endpoint, aws_access_key_id="a", aws_secret_access_key="b")
        meta = client.describe_key(KeyId=key_id)["KeyMetadata"]
        assert meta["KeyId"] == key_id
        assert nsm.root_pem  # the root the server pinned
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "key_id" not in err or "material" not in err

    # a bad policy is a one-line error before anything listens
    policy.write_text('{"Statement": [{"Effect": "Allow", "Action": "kms:*", "NotAction": "x"}]}')
    bad = subprocess.run(
        [sys.executable, "-c", _RUN_KMS_LOCAL, *argv], capture_output=True, text=True, timeout=30
    )
    assert bad.returncode != 0
    assert "NotAction" in bad.stderr


def test_parser_registers() -> None:
    parser = argparse.ArgumentParser()
    cli_kms.add_parser(parser.add_subparsers())
    args = parser.parse_args(["kms-local", "--keys", "k.json", "--nsm-root", "r.pem"])
    assert args.listen == "tcp://127.0.0.1:4599"
    assert args.func is cli_kms.cmd_kms_local


async def test_recipient_kms_cancellation() -> None:
    """Cancelling the parent mid-call abandons the blocked boto3 thread at once (its own
    timeouts bound it) and returns nothing."""
    release = threading.Event()

    class BlockedKms(FakeKms):
        def decrypt(self, **kwargs: Any) -> dict[str, Any]:
            release.wait(30)
            return super().decrypt(**kwargs)

    kms = KmsRecipientKms(BlockedKms({"KeyId": ARN, "CiphertextForRecipient": b"x"}))
    result: list[bytes] = []
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    result.append(await kms(b"doc", HEADER))

                nursery.start_soon(call)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
        assert scope.cancelled_caught
        assert result == []
    finally:
        release.set()
