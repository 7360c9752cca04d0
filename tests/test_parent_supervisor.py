"""The parent supervisor end to end: it fetches the bundle, launches a real local enclave (in
fresh namespaces where allowed), serves preload through the development KMS, deletes its copy,
verifies the enclave's attestation against pinned PCRs, reports readiness, and alerts when
the enclave dies or preload fails."""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_sign.nitro import DEFAULT_LOCAL_PCRS, LocalNsm
from trio_sign.parent import ParentState
from trio_sign.parent._config import parse_parent_config
from trio_sign.parent._health import render_metrics
from trio_sign.parent._supervisor import ParentExit, serve_parent
from trio_sign.shares import DevKeyFile, encode_bundle, read_sealed_header

from .enclave_helpers import make_accounts
from .test_health import http, parse_exposition

SECRETS: list[bytes] = []


def _secret_forms(secret: bytes) -> list[bytes]:
    return [secret, secret.hex().encode(), base64.b64encode(secret), base64.b64encode(secret)[:40]]


def _setup(
    tmp_path: Path, *, tamper: bool = False, restart: bool = False, hook: str = ""
) -> tuple[Any, Path]:
    nsm_dir = tmp_path / "nsm"
    LocalNsm.from_dir(nsm_dir, create=True).close()
    store, accounts = make_accounts(5)
    store.close()
    key = DevKeyFile.create(tmp_path / "dev.key")
    data = bytearray(encode_bundle([a.service for a in accounts.values()], key))
    SECRETS.clear()
    SECRETS.extend(bytes(a.service.signing_share) for a in accounts.values())
    with io.BytesIO(bytes(data)) as f:
        header, _ = read_sealed_header(f)
    data_key = key.decrypt_data_key(
        base64.b64decode(header["encrypted_data_key"]), header["encryption_context"]
    )
    SECRETS.append(bytes(data_key))
    if tamper:
        data[-30] ^= 1
    bundle = tmp_path / "service_key_shares.json.enc"
    bundle.write_bytes(bytes(data))
    pcr = {i: DEFAULT_LOCAL_PCRS[i].hex() for i in (0, 1, 2)}
    text = f"""
[bundle]
source = "{bundle}"
work_dir = "{tmp_path / "run"}"
[kms]
mode = "dev-key"
dev_key = "{tmp_path / "dev.key"}"
[enclave]
backend = "local"
nsm_dir = "{nsm_dir}"
preload_timeout_s = 30
[attestation]
root = "{nsm_dir / "local-nsm-root.pem"}"
pcr0 = "{pcr[0]}"
pcr1 = "{pcr[1]}"
pcr2 = "{pcr[2]}"
interval_s = 5
[failure]
restart = {str(restart).lower()}
backoff_initial_s = 0.2
backoff_max_s = 0.5
{hook}
[health]
listen = "tcp://127.0.0.1:0"
[logs]
file = "{tmp_path / "enclave-logs.jsonl"}"
"""
    (tmp_path / "parent.toml").write_text(text)
    return parse_parent_config(text), bundle


def _port(urls: list[str]) -> int:
    return int(urls[0].rsplit(":", 1)[1])


def _enclave_pid(work_dir: Path) -> int:
    """The enclave the supervisor started for this test (found by its unique socket path)."""
    needle = f"{work_dir}/enclave-grpc.sock"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        mine = b"trio_sign.cli" in cmdline and any(needle.encode() in p for p in cmdline)
        if mine and cmdline[0] != b"unshare":
            return int(proc.name)
    raise AssertionError("enclave process not found")


async def test_boot_ready_then_enclave_death_alerts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config, bundle = _setup(tmp_path)
    caplog.set_level(logging.ERROR, logger="trio_sign.parent")
    with pytest.raises(BaseException) as info:  # noqa: PT011, PT012 - unwrapped below
        async with trio.open_nursery() as nursery:
            _state, urls = await nursery.start(functools.partial(serve_parent, config))
            port = _port(urls)
            with trio.fail_after(60):
                while True:
                    head, body = await http(port, "/readyz")
                    if head.status == 200:
                        break
                    await trio.sleep(0.1)
            report = json.loads(body)
            assert report["enclave_state"] == "serving"
            assert report["accounts"] == 5
            assert report["shares_sha256"] == hashlib.sha256(bundle.read_bytes()).hexdigest()
            assert report["attestation_verified"] is True
            # the parent's copy of the bundle is gone; only ciphertext ever touched the parent
            assert not (config.bundle.work_dir / "service_key_shares.json.enc").exists()
            # enclave logs reached the parent's sink
            lines = (tmp_path / "enclave-logs.jsonl").read_text().splitlines()
            assert any(json.loads(line).get("audit") == "boot" for line in lines)
            # no share and no data key in anything the parent holds or wrote
            haystacks = [p.read_bytes() for p in config.bundle.work_dir.rglob("*") if p.is_file()]
            haystacks.append((tmp_path / "enclave-logs.jsonl").read_bytes())
            haystacks.append(json.dumps(_state.report()).encode())
            haystacks.append(repr(_state).encode())
            for secret in SECRETS:
                for form in _secret_forms(secret):
                    assert not any(form in h for h in haystacks)

            os.kill(_enclave_pid(config.bundle.work_dir), signal.SIGKILL)
            with trio.fail_after(30):
                await trio.sleep_forever()
    failure = info.value
    while isinstance(failure, BaseExceptionGroup):
        failure = failure.exceptions[0]
    assert isinstance(failure, ParentExit), repr(info.value)
    # kill -9 leaves no last word: its own alert, never "an internal error in the enclave"
    assert failure.alert == "enclave_killed"
    assert "without a word" in str(failure) or "SIGKILL" in str(failure)
    assert [getattr(r, "alert", None) for r in caplog.records].count("enclave_killed") == 1


async def test_tampered_bundle_is_refused_and_alerted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config, _ = _setup(tmp_path, tamper=True)
    caplog.set_level(logging.ERROR, logger="trio_sign.parent")
    with pytest.raises(BaseException) as info:  # noqa: PT011 - unwrapped below
        with trio.fail_after(60):
            await serve_parent(config)
    failure = info.value
    while isinstance(failure, BaseExceptionGroup):
        failure = failure.exceptions[0]
    assert isinstance(failure, ParentExit), repr(info.value)
    assert failure.alert == "preload_failed"
    assert "tampered" in str(failure)
    assert any(getattr(r, "alert", None) == "preload_failed" for r in caplog.records)


async def test_alert_hook_runs_even_when_giving_up(tmp_path: Path) -> None:
    out = tmp_path / "alerts.txt"
    hook = (
        f'alert_command = ["/bin/sh", "-c", '
        f'"echo $TRIO_SIGN_ALERT: $TRIO_SIGN_ALERT_MESSAGE >> {out}"]'
    )
    config, _ = _setup(tmp_path, tamper=True, hook=hook)
    with pytest.raises(BaseException):  # noqa: B017, PT011 - ParentExit, possibly grouped
        with trio.fail_after(60):
            await serve_parent(config)
    text = out.read_text()
    assert text.startswith("preload_failed: ")
    assert "tampered" in text


async def test_restart_with_backoff_alerts_each_time(tmp_path: Path) -> None:
    """With [failure] restart = true a bad bundle is retried (with back-off), alerting each
    time, until an operator stops the parent."""
    out = tmp_path / "alerts.txt"
    hook = f'alert_command = ["/bin/sh", "-c", "echo $TRIO_SIGN_ALERT >> {out}"]'
    config, _ = _setup(tmp_path, tamper=True, restart=True, hook=hook)
    with trio.move_on_after(40):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_parent, config)
            while not out.exists() or len(out.read_text().splitlines()) < 2:  # noqa: ASYNC110
                await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    assert out.read_text().splitlines()[:2] == ["preload_failed", "preload_failed"]


async def test_orderly_stop_drains_the_enclave_then_returns(tmp_path: Path) -> None:
    """``stop`` (the first SIGTERM of ``trio-sign parent``): the serving enclave is asked to
    drain over the status channel, exits 0 by itself, and serve_parent returns: no alert, no
    restart. This is the only graceful path on Nitro, where the parent cannot signal."""
    config, _ = _setup(tmp_path, restart=True)
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            state, _urls = await nursery.start(functools.partial(serve_parent, config, stop=stop))
            while not state.ready or state.enclave_status_at is None:  # noqa: ASYNC110
                await trio.sleep(0.05)
            # the parent reads the enclave's GetStatus for /metrics (capacity, memory)
            assert state.enclave_sessions_max == 10_000
            assert state.enclave_sessions_open == 0
            limit = state.enclave_memory_limit_bytes
            assert limit is not None
            assert 0 < (state.enclave_memory_used_bytes or 0) <= limit
            samples = parse_exposition(render_metrics(state))
            assert samples["trio_sign_enclave_sessions_max"] == 10_000
            assert samples["trio_sign_enclave_memory_limit_bytes"] == limit
            stop.set()
        # the nursery closed without a cancel: serve_parent returned by itself
    assert state.enclave_exit_code == 0
    assert state.alerts.last is None
    logs = [json.loads(line) for line in (tmp_path / "enclave-logs.jsonl").read_text().splitlines()]
    messages = [line.get("msg") for line in logs]
    assert "the parent asked for a drain" in messages  # not SIGTERM: the status channel
    assert "enclave stopped; shares zeroed" in messages


async def test_stop_while_booting_terminates_at_once(tmp_path: Path) -> None:
    """Nothing is served yet, so there is nothing to drain: the enclave is terminated."""
    config, _ = _setup(tmp_path)
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            state, _urls = await nursery.start(functools.partial(serve_parent, config, stop=stop))
            stop.set()
    assert not state.ready
    assert state.alerts.last is None


def test_trio_sign_parent_first_sigterm_drains_then_exits_0(tmp_path: Path) -> None:
    """The command as systemd runs it: the first SIGTERM drains the enclave over the status
    channel and the parent exits 0 once it is gone."""
    _setup(tmp_path)
    exe = Path(sys.executable).with_name("trio-sign")
    err_path = tmp_path / "parent.stderr"
    with err_path.open("w") as err:
        proc = subprocess.Popen(
            [str(exe), "parent", "--config", str(tmp_path / "parent.toml")],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 60
        port = None
        while time.monotonic() < deadline:
            found = re.search(
                r"health server listening on http://127\.0\.0\.1:(\d+)", err_path.read_text()
            )
            if found:
                port = int(found.group(1))
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5):
                        break  # 200: serving and attested
                except urllib.error.HTTPError:
                    pass
            time.sleep(0.1)
        else:
            raise AssertionError(f"never ready: {err_path.read_text()[-2000:]}")
        # logrotate: move the file away, SIGHUP; the parent lives on and writes a new file
        logs_path = tmp_path / "enclave-logs.jsonl"
        logs_path.rename(tmp_path / "enclave-logs.jsonl.1")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert proc.poll() is None, "SIGHUP killed the parent"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as ready:
            assert ready.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, err_path.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopping: draining the enclave" in err_path.read_text()
    logs = (tmp_path / "enclave-logs.jsonl").read_text()  # the new file after the SIGHUP
    assert "the parent asked for a drain" in logs
    assert "the parent asked for a drain" not in (tmp_path / "enclave-logs.jsonl.1").read_text()


async def test_a_hard_stop_still_hears_the_enclave_out(tmp_path: Path) -> None:
    """Cancelling the parent terminates the enclave at once, but the status and log channels
    stay up until it is gone: its final state, exit code and last log lines arrive (they are
    what an operator reads afterwards), and it exits promptly instead of retrying a parent
    that has stopped listening."""
    config, _ = _setup(tmp_path)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            state, _urls = await nursery.start(serve_parent, config)
            while not state.ready:  # noqa: ASYNC110 - a real enclave process
                await trio.sleep(0.05)
            stopped_at = trio.current_time()
            nursery.cancel_scope.cancel()
    assert trio.current_time() - stopped_at < 10  # SIGTERM's drain, not the kill after 10 s
    # Only possible with the channels still up while the enclave was being terminated:
    assert state.enclave_state == "exited"
    assert state.enclave_exit_code == 0  # SIGTERM: drained, exit message delivered
    logs = (tmp_path / "enclave-logs.jsonl").read_text()
    assert "enclave stopped; shares zeroed" in logs


def test_parent_check_validates_config_and_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``trio-sign parent --config F --check``: what would run, and every file it would fail
    to read later, before the unit is restarted."""
    from trio_sign.cli import main

    _setup(tmp_path)
    path = tmp_path / "parent.toml"
    assert main(["parent", "--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "enclave      local (namespaces auto); preload timeout 30 s" in out
    assert "PCR0 " in out
    assert "debug refused" in out
    assert out.rstrip().endswith(": OK")

    (tmp_path / "dev.key").unlink()
    assert main(["parent", "--config", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert "[kms] dev_key" in err
    assert "No such file or directory" in err

    path.write_text(path.read_text().replace("[enclave]", "[enclave]\nnode_id = 'a b'"))
    assert main(["parent", "--config", str(path), "--check"]) == 2
    assert "node_id 'a b'" in capsys.readouterr().err


async def test_a_periodic_attestation_failure_runs_the_alert_hook(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The gate's alert (a later check failed: forwarding already stopped) is recorded for
    /readyz, logged once with its alert field, and runs [failure] alert_command in the
    background, never blocking the gate."""
    from trio_sign.parent._lifecycle import Alerts

    out = tmp_path / "alerts.txt"
    alerts = Alerts(("/bin/sh", "-c", f"echo $TRIO_SIGN_ALERT $TRIO_SIGN_ALERT_MESSAGE >> {out}"))
    caplog.set_level(logging.INFO)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(alerts.run)
            alerts.raise_alert("attestation_failed", "pcr_mismatch: PCR 0 differs")
            assert alerts.last == ("attestation_failed", "pcr_mismatch: PCR 0 differs")
            while not out.exists():  # noqa: ASYNC110 - a real hook process
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    assert out.read_text() == "attestation_failed pcr_mismatch: PCR 0 differs\n"
    flagged = [r for r in caplog.records if getattr(r, "alert", None) == "attestation_failed"]
    assert len(flagged) == 1
    assert alerts.counts["attestation_failed"] == 1


async def test_the_status_poller_never_fails_the_run(autojump_clock: trio.abc.Clock) -> None:
    """Reading GetStatus for /metrics is an observer: whatever goes wrong (here even an
    unexpected exception type), it keeps polling and leaves the last numbers as they were."""
    from trio_sign.parent._supervisor import _poll_enclave_status

    calls: list[float] = []

    async def broken_connect() -> trio.abc.Stream:
        calls.append(trio.current_time())
        raise RuntimeError("something nobody planned for")

    state = ParentState()
    with trio.move_on_after(35):
        await _poll_enclave_status(state, broken_connect, interval_s=10)
    assert calls == [0, 10, 20, 30]
    assert state.enclave_status_at is None
