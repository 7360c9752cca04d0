"""The delta identity key over the boot channel (issue 16, docs/runbook.md §7): genesis in an
enclave through the parent (the local KMS's GenerateDataKey with Recipient, the local NSM), the
sealed file stored durably, then every boot's unseal through the real channel code on both
sides, and what is refused (another key, a changed file, a KMS that refuses the PCRs)."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trio_sign._atomic import atomic_file
from trio_sign.enclave import EnclaveExit
from trio_sign.enclave._identity import SealedIdentity
from trio_sign.enclave._preload import PreloadError, preload_shares
from trio_sign.kms import (
    KmsRecipientDataKey,
    KmsRecipientError,
    KmsRecipientKms,
)
from trio_sign.nitro import AsyncNsm, LocalNsm, MessageStream
from trio_sign.parent import DevRecipientKms, PreloadRefused, serve_preload
from trio_sign.parent._config import parse_parent_config, preflight
from trio_sign.parent._preload import serve_genesis
from trio_sign.shares import DevKeyFile, ShareRecord, encode_bundle

from .enclave_helpers import make_accounts
from .test_identity_key import kms_client as local_kms

N = 6


@pytest.fixture(autouse=True)
def _no_aws_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLOCALTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-test-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def nsm(nsm_dir: Path) -> LocalNsm:
    return LocalNsm.from_dir(nsm_dir)


@pytest.fixture
def records() -> list[ShareRecord]:
    store, accounts = make_accounts(N)
    store.close()
    return [a.service for a in accounts.values()]


Side = Callable[[MessageStream], Awaitable[Any]]


async def run_both(enclave: Side, parent: Side) -> tuple[Any, Any]:
    """Both sides of the boot channel over a memory stream; each side's result or error."""
    a, b = trio.testing.memory_stream_pair()
    results: dict[str, Any] = {}

    async def side(name: str, fn: Side, stream: trio.abc.Stream) -> None:
        try:
            results[name] = await fn(MessageStream(stream))
        except Exception as exc:
            results[name] = exc
        finally:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, "enclave", enclave, a)
        nursery.start_soon(side, "parent", parent, b)
    return results["enclave"], results["parent"]


def genesis_parent(kms: KmsRecipientDataKey, path: Path) -> Side:
    async def store(data: bytes) -> None:
        with atomic_file(path, mode=0o644) as f:
            f.write(data)

    return lambda channel: serve_genesis(channel, kms, store)


def enclave_boot(nsm: LocalNsm, **kw: Any) -> Side:
    return lambda channel: preload_shares(channel, AsyncNsm(nsm), **kw)


class BothKms:
    """The parent's RecipientKms for a test boot: the bundle under a development key, the
    identity under the local KMS (as a real node's are both under AWS KMS)."""

    def __init__(self, dev: DevRecipientKms, kms: KmsRecipientKms) -> None:
        self.dev, self.kms, self.calls = dev, kms, 0

    async def __call__(self, document: bytes, header: dict[str, Any]) -> bytes:
        self.calls += 1
        if header["key_provider"] == "aws-kms":
            return await self.kms(document, header)
        return await self.dev(document, header)


async def _genesis_file(nsm: LocalNsm, client: Any, key_id: str, path: Path) -> SealedIdentity:
    created, sealed = await run_both(
        enclave_boot(nsm), genesis_parent(KmsRecipientDataKey(client, key_id), path)
    )
    assert isinstance(created, EnclaveExit), created
    assert isinstance(sealed, SealedIdentity), sealed
    return sealed


async def test_genesis_over_the_channel_then_every_boot_unseals_the_pinned_key(
    tmp_path: Path, nsm: LocalNsm, records: list[ShareRecord]
) -> None:
    sealed_path = tmp_path / "identity" / "delta-identity.sealed.json"
    sealed_path.parent.mkdir()
    async with local_kms(tmp_path, nsm) as (client, key_id):
        # genesis: the enclave ends its boot with exit 0, reason genesis, after the parent
        # wrote the sealed file (public data only) durably
        ended, sealed = await run_both(
            enclave_boot(nsm), genesis_parent(KmsRecipientDataKey(client, key_id), sealed_path)
        )
        assert isinstance(ended, EnclaveExit)
        assert (int(ended.code), ended.reason) == (0, "genesis")
        assert isinstance(sealed, SealedIdentity)
        assert SealedIdentity.from_json(sealed_path.read_bytes()) == sealed
        assert sealed.kms_key_id.endswith(key_id)
        assert sorted(json.loads(sealed_path.read_bytes())) == sorted(
            [
                "format",
                "version",
                "public_key",
                "key_provider",
                "kms_key_id",
                "encrypted_data_key",
                "encryption_context",
                "nonce",
                "ciphertext",
            ]
        )
        pinned = sealed.public_key

        # every boot: the file after the bundle's envelope, a second attestation, the key
        # checked against the pin, then the bundle; the key opens the deltas' data keys
        dev = DevKeyFile.create(tmp_path / "dev.key")
        bundle = tmp_path / "bundle.enc"
        bundle.write_bytes(encode_bundle(records, dev))
        kms = BothKms(DevRecipientKms(dev, root_pem=nsm.root_pem), KmsRecipientKms(client))
        (store, report), result = await run_both(
            enclave_boot(nsm, identity_keys=(pinned,)),
            lambda channel: serve_preload(channel, bundle, kms, identity=sealed_path.read_bytes()),
        )
        assert result.ok
        assert result.accounts == N == report.accounts
        assert kms.calls == 2  # the bundle's data key, then the identity's
        assert report.identity_key is not None
        assert report.delta_wrap is not None
        assert report.identity_key.public_key == pinned
        assert "<secret>" in repr(report.identity_key)
        assert "<secret>" in repr(report.delta_wrap)
        context = {"purpose": "test"}
        data_key, blob = report.delta_wrap.generate_data_key(context)
        assert report.delta_wrap.decrypt_data_key(blob, context) == data_key
        report.delta_wrap.close()
        report.identity_key.close()
        store.close()

        # a boot whose parent sends no identity file: served, without the key
        (store, report), result = await run_both(
            enclave_boot(nsm, identity_keys=(pinned,)),
            lambda channel: serve_preload(channel, bundle, kms),
        )
        assert result.ok
        assert report.identity_key is None
        store.close()
        dev.close()


async def test_a_substituted_changed_or_unpinned_file_is_refused(
    tmp_path: Path, nsm: LocalNsm, records: list[ShareRecord]
) -> None:
    dev = DevKeyFile.create(tmp_path / "dev.key")
    bundle = tmp_path / "bundle.enc"
    bundle.write_bytes(encode_bundle(records, dev))
    async with local_kms(tmp_path, nsm) as (client, key_id):
        genuine = await _genesis_file(nsm, client, key_id, tmp_path / "genuine.json")
        other = await _genesis_file(nsm, client, key_id, tmp_path / "other.json")
        kms = BothKms(DevRecipientKms(dev, root_pem=nsm.root_pem), KmsRecipientKms(client))

        async def boot(sealed: bytes, pins: tuple[bytes, ...] | None) -> tuple[Any, Any]:
            return await run_both(
                enclave_boot(nsm, identity_keys=pins),
                lambda channel: serve_preload(channel, bundle, kms, identity=sealed),
            )

        # another genuine key (a substituted file): KMS releases it, the pin refuses it
        refused, parent = await boot(other.to_json(), (genuine.public_key,))
        assert isinstance(refused, PreloadError)
        assert refused.reason == "identity_key_mismatch"
        assert isinstance(parent, PreloadRefused)
        assert parent.reason == "identity_key_mismatch"

        # a changed file (one bit of the ciphertext): it no longer authenticates
        obj = json.loads(genuine.to_json())
        ciphertext = bytearray(base64.b64decode(obj["ciphertext"]))
        ciphertext[0] ^= 1
        obj["ciphertext"] = base64.b64encode(bytes(ciphertext)).decode()
        changed = json.dumps(obj).encode()
        refused, parent = await boot(changed, (genuine.public_key,))
        assert isinstance(refused, PreloadError)
        assert refused.reason == "identity_sealed_bad"
        assert isinstance(parent, PreloadRefused)
        assert parent.reason == "identity_sealed_bad"

        # production without a pin takes no identity key at all
        refused, parent = await boot(genuine.to_json(), ())
        assert isinstance(refused, PreloadError)
        assert refused.reason == "identity_key_unpinned"
        assert isinstance(parent, PreloadRefused)
        assert parent.reason == "identity_key_unpinned"

        # and the genuine file, pinned, boots
        (store, report), result = await boot(genuine.to_json(), (genuine.public_key,))
        assert result.ok
        assert report.identity_key.public_key == genuine.public_key
        report.delta_wrap.close()
        report.identity_key.close()
        store.close()
    dev.close()


async def test_a_kms_refusal_fails_the_preload_with_the_kms_reason(
    tmp_path: Path, nsm_dir: Path, nsm: LocalNsm, records: list[ShareRecord]
) -> None:
    """An enclave whose PCRs the key policy does not pin (here a debug-mode one) gets no
    identity key: KMS answers AccessDeniedException, the parent's preload fails with it, and
    the enclave does not serve."""
    dev = DevKeyFile.create(tmp_path / "dev.key")
    bundle = tmp_path / "bundle.enc"
    bundle.write_bytes(encode_bundle(records, dev))
    async with local_kms(tmp_path, nsm) as (client, key_id):
        sealed = await _genesis_file(nsm, client, key_id, tmp_path / "sealed.json")
        debug = LocalNsm.from_dir(nsm_dir, debug=True)
        kms = BothKms(DevRecipientKms(dev, root_pem=debug.root_pem), KmsRecipientKms(client))
        refused, parent = await run_both(
            enclave_boot(debug, identity_keys=(sealed.public_key,)),
            lambda channel: serve_preload(channel, bundle, kms, identity=sealed.to_json()),
        )
    assert isinstance(parent, KmsRecipientError)
    assert "AccessDeniedException" in str(parent)
    assert isinstance(refused, PreloadError)
    assert refused.reason == "protocol"
    dev.close()


async def test_genesis_fails_with_the_kms_reason_and_stores_nothing(
    tmp_path: Path, nsm_dir: Path, nsm: LocalNsm
) -> None:
    path = tmp_path / "sealed.json"
    async with local_kms(tmp_path, nsm) as (client, key_id):
        debug = LocalNsm.from_dir(nsm_dir, debug=True)
        ended, parent = await run_both(
            enclave_boot(debug), genesis_parent(KmsRecipientDataKey(client, key_id), path)
        )
    assert isinstance(parent, KmsRecipientError)
    assert "AccessDeniedException" in str(parent)
    assert isinstance(ended, PreloadError)
    assert not path.exists()


async def test_genesis_refuses_a_sealed_file_for_another_key(tmp_path: Path, nsm: LocalNsm) -> None:
    """A (broken) enclave answer naming another key than KMS sealed for is not stored."""
    from trio_sign.nitro import AttestationMessage, HelloMessage
    from trio_sign.nitro._channel import (
        GenesisAttestationMessage,
        GenesisDataKeyMessage,
        IdentityGenesisMessage,
        IdentitySealedMessage,
    )

    path = tmp_path / "sealed.json"
    async with local_kms(tmp_path, nsm) as (client, key_id):
        other = await _genesis_file(nsm, client, key_id, tmp_path / "other.json")

        async def broken_enclave(channel: MessageStream) -> None:
            await channel.send(HelloMessage(channel="preload"))
            await channel.send(AttestationMessage(document=await AsyncNsm(nsm).attestation()))
            await channel.receive_expected(IdentityGenesisMessage)
            document = await AsyncNsm(nsm).attestation(public_key=None)
            await channel.send(GenesisAttestationMessage(document=document, public_key=bytes(32)))
            await channel.receive_expected(GenesisDataKeyMessage)
            await channel.send(IdentitySealedMessage(sealed=other.to_json()))

        _, parent = await run_both(
            broken_enclave, genesis_parent(KmsRecipientDataKey(client, key_id), path)
        )
    assert isinstance(parent, Exception)
    assert not path.exists()


def test_parent_config_identity_and_its_preflight(tmp_path: Path) -> None:
    base = f"""
[bundle]
source = "{tmp_path / "bundle.enc"}"
work_dir = "{tmp_path / "run"}"
[kms]
mode = "local"
endpoint_url = "http://127.0.0.1:1"
[enclave]
backend = "local"
nsm_dir = "{tmp_path}"
"""
    (tmp_path / "bundle.enc").write_bytes(b"x")
    (tmp_path / "local-nsm-root.pem").write_bytes(b"")
    config = parse_parent_config(base + '[identity]\nsealed_file = "id.json"\n', base=tmp_path)
    assert config.identity is not None
    assert config.identity.sealed_file == tmp_path / "id.json"
    problems, _ = preflight(config)
    assert any("[identity] sealed_file" in p and "--genesis" in p for p in problems)
    (tmp_path / "id.json").write_text("{}")
    problems, _ = preflight(config)
    assert any("identity_sealed_bad" in p or "exactly the fields" in p for p in problems)
    # --genesis: kms_key_id needed, and never over an existing file
    problems, _ = preflight(config, genesis=True)
    assert any("kms_key_id" in p for p in problems)
    assert any("exists" in p for p in problems)
    config = parse_parent_config(
        base + '[identity]\nsealed_file = "new.json"\nkms_key_id = "k"\n', base=tmp_path
    )
    problems, _ = preflight(config, genesis=True)
    assert not [p for p in problems if "identity" in p or "genesis" in p]
    from trio_sign.parent._config import ConfigError

    with pytest.raises(ConfigError, match="sealed_file"):
        parse_parent_config(base + '[identity]\nsealed_file = "s3://b/k"\n', base=tmp_path)
    with pytest.raises(ConfigError, match="unknown key"):
        parse_parent_config(base + '[identity]\nsealed_file = "a"\nx = 1\n', base=tmp_path)


def test_the_local_launcher_connects_the_deltas_channel_and_the_enclave_takes_it(
    tmp_path: Path,
) -> None:
    """With [deltas], the local enclave is told where the parent's deltas socket is (it would
    dial vsock otherwise), and ``trio-sign enclave --deltas-address`` sets it."""
    import argparse

    from trio_sign.cli import _enclave
    from trio_sign.parent._launch import LocalLauncher
    from trio_sign.parent._supervisor import default_launcher

    base = f"""
[bundle]
source = "{tmp_path / "bundle.enc"}"
work_dir = "{tmp_path / "run"}"
[kms]
mode = "local"
endpoint_url = "http://127.0.0.1:1"
[enclave]
backend = "local"
nsm_dir = "{tmp_path}"
config = "{tmp_path / "enclave.toml"}"
"""
    without = default_launcher(parse_parent_config(base, base=tmp_path))
    assert isinstance(without, LocalLauncher)
    assert "--deltas-address" not in without.enclave_args
    deltas = f'[deltas]\nlocation = "file://{tmp_path / "deltas"}"\n'
    launcher = default_launcher(parse_parent_config(base + deltas, base=tmp_path))
    assert isinstance(launcher, LocalLauncher)
    args = list(launcher.enclave_args)
    where = args[args.index("--deltas-address") + 1]
    assert where == f"unix://{tmp_path / 'run'}/deltas.sock"

    parser = argparse.ArgumentParser()
    _enclave.add_parser(parser.add_subparsers())
    parsed = parser.parse_args(["enclave", *args])
    assert parsed.deltas_address == where
    assert parser.parse_args(["enclave"]).deltas_address == "vsock://3:7003"


async def test_the_production_tree_unseals_the_key_at_boot_stores_a_delta_and_zeroes_it(
    tmp_path: Path, nsm_dir: Path, nsm: LocalNsm
) -> None:
    """serve_enclave (no key given) against the real parent code over UNIX sockets: the
    parent's sealed file is unsealed at boot, so the deltas channel runs and the enclave's own
    delta, signed by that key, lands in the parent's store and signs; /readyz-style state shows
    the public key; after the drain the key is zeroed."""
    import dataclasses
    import functools

    from trio_sign.enclave import EnclaveConfig, serve_enclave
    from trio_sign.enclave._measured import development_config
    from trio_sign.parent import serve_log_connection, serve_status_connection
    from trio_sign.parent._deltas import Deltas, FileDeltaStore, serve_deltas
    from trio_sign.parent._health import ParentState
    from trio_sign.transport import open_listeners

    from .test_enclave_deltas import fresh_accounts, records_of, sign_with

    d = tmp_path / "sock"
    d.mkdir()
    dev = DevKeyFile.create(d / "dev.key")
    base = fresh_accounts("base", 2)
    bundle = d / "bundle.enc"
    bundle.write_bytes(encode_bundle(records_of(base), dev))
    files = FileDeltaStore(d / "deltas")
    files.recover()
    hub = Deltas(files, poll_interval_s=0.5)
    async with local_kms(tmp_path, nsm) as (client, key_id):
        sealed = await _genesis_file(nsm, client, key_id, d / "identity.json")
        kms = BothKms(DevRecipientKms(dev, root_pem=nsm.root_pem), KmsRecipientKms(client))

        async def boot(stream: trio.SocketStream) -> None:
            try:
                hub.new_run()
                result = await serve_preload(
                    MessageStream(stream), bundle, kms, deltas=hub, identity=sealed.to_json()
                )
                hub.mark_booted(result)
            finally:
                await stream.aclose()

        config = EnclaveConfig(
            grpc_listen=f"unix://{d}/grpc.sock",
            nsm="local",
            measured=dataclasses.replace(
                development_config(), delta_identity_key=sealed.public_key
            ),
            preload_address=f"unix://{d}/boot.sock",
            status_address=f"unix://{d}/status.sock",
            log_address=f"unix://{d}/logs.sock",
            deltas_address=f"unix://{d}/deltas.sock",
            preload_timeout_s=20.0,
            drain_grace_s=1.0,
        )
        async with trio.open_nursery() as nursery:
            for name, handler in (
                ("boot", boot),
                ("status", functools.partial(serve_status_connection, on=lambda m: None)),
                ("logs", functools.partial(serve_log_connection, on=lambda m: None)),
            ):
                listeners = await open_listeners(f"unix://{d}/{name}.sock")
                await nursery.start(trio.serve_listeners, handler, listeners)
            await nursery.start(serve_deltas, await open_listeners(f"unix://{d}/deltas.sock"), hub)
            handle = await nursery.start(functools.partial(serve_enclave, config, nsm=nsm))
            assert handle.delta_writer is not None  # the key came over the boot channel
            assert handle.deltas is not None
            key = handle.deltas.signer
            assert key is not None
            assert key.public_key == sealed.public_key
            mine = fresh_accounts("mine", 1)
            with trio.fail_after(10):
                sequence, _head = await handle.delta_writer.store(records_of(mine), "create", "m")
            assert sequence == 1
            assert files.list().sequences == (1,)
            sign_with(handle.service.pool, mine["mine-0"], "s-1", b"signed with a new account")
            await handle.drain()
            nursery.cancel_scope.cancel()
    # zeroed on the way out (the seed half of libsodium's secret key, and the rest)
    assert bytes(key._pair._sk) == bytes(len(key._pair._sk))
    state = ParentState(identity_public_key=sealed.public_key.hex())
    assert state.report()["identity_public_key"] == sealed.public_key.hex()
    assert "identity_public_key" not in ParentState().report()
    dev.close()


def test_parent_check_genesis_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``trio-sign parent --check --genesis``: the genesis's own preflight (exit 2 while a
    sealed file exists; 0 when none does and a KMS key is named; no bundle needed)."""
    from trio_sign.cli._main import build_parser

    toml = tmp_path / "parent.toml"
    toml.write_text(
        f"""
[bundle]
source = "{tmp_path / "no-bundle-yet.enc"}"
work_dir = "{tmp_path / "run"}"
[kms]
mode = "local"
endpoint_url = "http://127.0.0.1:1"
[enclave]
backend = "local"
nsm_dir = "{tmp_path}"
[identity]
sealed_file = "identity.json"
kms_key_id = "k"
"""
    )
    (tmp_path / "local-nsm-root.pem").write_bytes(b"")
    parser = build_parser()
    args = parser.parse_args(["parent", "--config", str(toml), "--check", "--genesis"])
    assert args.func(args) == 0
    assert "identity     " in capsys.readouterr().out
    (tmp_path / "identity.json").write_text("{}")
    assert args.func(args) == 2
    assert "genesis never replaces a key" in capsys.readouterr().err
