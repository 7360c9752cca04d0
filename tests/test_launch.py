"""Launch backends: nitro-cli (against a fake nitro-cli printing its documented JSON) and the
local process launcher (a real enclave, in fresh namespaces where the kernel allows)."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
import trio

from trio_sign.enclave._measured import DEVELOPMENT_CONFIG
from trio_sign.parent import LaunchError, LocalLauncher, NitroCliLauncher, namespaces_available

from .enclave_helpers import make_accounts, parent

FAKE_NITRO_CLI = r"""#!PYTHON
import json, sys, pathlib
state = pathlib.Path(__file__).with_name("state.json")
data = json.loads(state.read_text()) if state.exists() else {}
cmd = sys.argv[1]
args = dict(zip(sys.argv[2::2], sys.argv[3::2]))
if data.get("mode") == "garbage":
    print("this is not json"); sys.exit(0)
if data.get("mode") == "fail" and cmd == "run-enclave":
    print("[ E26 ] Insufficient memory requested", file=sys.stderr); sys.exit(26)
if cmd == "run-enclave":
    data["running"] = True
    data["args"] = sys.argv[2:]
    state.write_text(json.dumps(data))
    cid = int(args["--enclave-cid"]) + data.get("cid_skew", 0)
    print(json.dumps({"EnclaveName": "trio-sign", "EnclaveID": "i-abc-enc123",
                      "ProcessID": 4242, "EnclaveCID": cid,
                      "NumberOfCPUs": int(args["--cpu-count"]), "CPUIDs": [1, 3],
                      "MemoryMiB": int(args["--memory"])}))
elif cmd == "describe-enclaves":
    if data.get("describe_fail", 0) > 0:
        data["describe_fail"] -= 1
        state.write_text(json.dumps(data))
        print("[ E39 ] Enclave process connection failure", file=sys.stderr); sys.exit(39)
    running = data.get("running", False)
    mine = [{"EnclaveID": "i-abc-enc123", "State": "RUNNING", "EnclaveCID": 16}]
    print(json.dumps(data.get("others", []) + (mine if running else [])))
elif cmd == "terminate-enclave":
    data.setdefault("terminated", []).append(args["--enclave-id"])
    data["others"] = [e for e in data.get("others", []) if e["EnclaveID"] != args["--enclave-id"]]
    data["running"] = False
    state.write_text(json.dumps(data))
    print(json.dumps({"EnclaveID": args["--enclave-id"], "Terminated": True}))
"""


def _fake_cli(tmp_path: Path, **state: object) -> Path:
    script = tmp_path / "nitro-cli"
    script.write_text(FAKE_NITRO_CLI.replace("PYTHON", sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "state.json").write_text(json.dumps(state))
    return script


def _launcher(cli: Path, **kw: object) -> NitroCliLauncher:
    return NitroCliLauncher(
        eif_path=Path("/opt/trio-sign/enclave.eif"),
        cpu_count=2,
        memory_mib=4096,
        cid=16,
        nitro_cli=str(cli),
        poll_interval_s=0.05,
        **kw,  # type: ignore[arg-type]
    )


async def test_nitro_cli_run_describe_terminate(tmp_path: Path) -> None:
    cli = _fake_cli(tmp_path)
    enclave = await _launcher(cli).start()
    assert enclave.enclave_id == "i-abc-enc123"
    assert enclave.cid == 16
    args = json.loads((tmp_path / "state.json").read_text())["args"]
    assert args == [
        "--eif-path",
        "/opt/trio-sign/enclave.eif",
        "--cpu-count",
        "2",
        "--memory",
        "4096",
        "--enclave-cid",
        "16",
    ]
    async with trio.open_nursery() as nursery:
        gone = trio.Event()

        async def watch() -> None:
            await enclave.wait()
            gone.set()

        nursery.start_soon(watch)
        await trio.sleep(0.2)
        assert not gone.is_set()  # still RUNNING
        await enclave.terminate(grace_s=1.0)
        with trio.fail_after(5):
            await gone.wait()


def _fails_left(tmp_path: Path) -> int:
    """The fake's remaining describe failures (the fake may be rewriting the file: retry)."""
    while True:
        try:
            return int(json.loads((tmp_path / "state.json").read_text())["describe_fail"])
        except json.JSONDecodeError:
            continue


async def test_nitro_cli_describe_hiccups_do_not_end_the_watch(tmp_path: Path) -> None:
    """describe-enclaves failing now and then must not read as the enclave's death (the
    supervisor would terminate a healthy enclave); failing every time, in a row, does."""
    cli = _fake_cli(tmp_path)
    enclave = await _launcher(cli).start()
    state = json.loads((tmp_path / "state.json").read_text())
    state["describe_fail"] = 4  # one short of describe_failures_max
    (tmp_path / "state.json").write_text(json.dumps(state))
    ended: list[object] = []
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            ended.append(await enclave.wait())

        nursery.start_soon(watch)
        with trio.fail_after(20):  # four failures, then answers again (real processes)
            while _fails_left(tmp_path):  # noqa: ASYNC110
                await trio.sleep(0.05)
            await trio.sleep(0.3)  # and a few more successful polls
        assert ended == []  # still watching a RUNNING enclave
        nursery.cancel_scope.cancel()
    state["describe_fail"] = 5
    (tmp_path / "state.json").write_text(json.dumps(state))
    with trio.fail_after(20), pytest.raises(LaunchError, match="describe-enclaves failed"):
        await enclave.wait()
    await enclave.terminate(grace_s=1.0)


async def test_nitro_cli_failures_are_clear(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="did not print JSON"):
        await _launcher(_fake_cli(tmp_path, mode="garbage")).start()
    with pytest.raises(LaunchError, match=r"run-enclave failed \(26\): .*Insufficient memory"):
        await _launcher(_fake_cli(tmp_path, mode="fail")).start()
    with pytest.raises(LaunchError, match="expected 16"):
        await _launcher(_fake_cli(tmp_path, cid_skew=1)).start()
    with pytest.raises(LaunchError, match="cannot run"):
        await _launcher(tmp_path / "no-such-nitro-cli").start()


async def test_nitro_cli_terminates_the_enclave_a_dead_parent_left(tmp_path: Path) -> None:
    """A new parent first ends an enclave still running at its CID (its predecessor died and
    the enclave holds the shares); enclaves at other CIDs are not its business."""
    orphan = {"EnclaveID": "i-old-enc999", "State": "RUNNING", "EnclaveCID": 16}
    foreign = {"EnclaveID": "i-foreign-enc1", "State": "RUNNING", "EnclaveCID": 20}
    cli = _fake_cli(tmp_path, others=[orphan, foreign])
    enclave = await _launcher(cli).start()
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["terminated"] == ["i-old-enc999"]
    assert [e["EnclaveID"] for e in state["others"]] == ["i-foreign-enc1"]
    assert enclave.enclave_id == "i-abc-enc123"


PARENT_THAT_DIES = """
import sys, trio
from trio_sign.parent import LocalLauncher

async def main():
    launcher = LocalLauncher(
        [], use_namespaces=sys.argv[1],
        program=[sys.executable, "-c", "import time; time.sleep(120)"],
    )
    enclave = await launcher.start()
    print(enclave.pid, flush=True)
    await trio.sleep(120)

trio.run(main)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("namespaces", ["auto", "never"])
def test_the_local_enclave_dies_with_its_parent(tmp_path: Path, namespaces: str) -> None:
    """kill -9 of the parent takes its enclave with it: no orphan holding the shares (a new
    parent would loop on "another process is listening")."""
    import os
    import signal
    import subprocess
    import time

    if namespaces == "auto" and namespaces_available() is not None:
        pytest.skip(f"no fresh namespaces here: {namespaces_available()}")
    parent_process = subprocess.Popen(
        [sys.executable, "-c", PARENT_THAT_DIES, namespaces],
        stdout=subprocess.PIPE,
        text=True,
    )
    enclave_pid = 0
    try:
        assert parent_process.stdout is not None
        enclave_pid = int(parent_process.stdout.readline())
        deadline = time.monotonic() + 10
        while namespaces == "auto" and time.monotonic() < deadline:
            # the enclave inside unshare is a grandchild; wait until it exists
            if _alive(enclave_pid):
                break
            time.sleep(0.05)
        assert _alive(enclave_pid)
        parent_process.kill()
        parent_process.wait()
        deadline = time.monotonic() + 10
        while _alive(enclave_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(enclave_pid), "the enclave outlived its parent"
    finally:
        if parent_process.poll() is None:
            parent_process.kill()
            parent_process.wait()
        if enclave_pid and _alive(enclave_pid):
            os.kill(enclave_pid, signal.SIGKILL)
        if parent_process.stdout is not None:
            parent_process.stdout.close()


@pytest.mark.parametrize("namespaces", ["auto", "never"])
async def test_local_launcher_runs_a_real_enclave(
    tmp_path: Path, nsm_dir: Path, namespaces: str
) -> None:
    if namespaces == "auto" and namespaces_available() is not None:
        pytest.skip(f"no fresh namespaces here: {namespaces_available()}")
    store, accounts = make_accounts(4)
    store.close()
    async with parent(tmp_path, [a.service for a in accounts.values()], nsm_dir) as fake:
        cfg = fake.config()
        enclave_toml = tmp_path / "enclave.toml"  # the measured configuration (issue 13)
        enclave_toml.write_bytes(DEVELOPMENT_CONFIG)
        launcher = LocalLauncher(
            [
                "--config",
                str(enclave_toml),
                "--nsm",
                f"local:{nsm_dir}",
                "--grpc-listen",
                cfg.grpc_listen,
                "--public-listen",
                f"unix://{tmp_path}/enclave-public.sock",
                "--preload-address",
                cfg.preload_address,
                "--status-address",
                cfg.status_address,
                "--log-address",
                cfg.log_address,
                "--drain-grace",
                "1",
            ],
            use_namespaces=namespaces,
            log_path=tmp_path / "enclave.log",
        )
        enclave = await launcher.start()
        assert enclave.in_namespaces == (namespaces == "auto")
        try:
            with trio.fail_after(30):
                while not any(s.state == "serving" for s in fake.states):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert str(enclave.pid) in enclave.description
        finally:
            await enclave.terminate(grace_s=5.0)
        assert await enclave.wait() == 0
    assert fake.states[-1].state == "exiting"
    assert fake.exits == [0]
