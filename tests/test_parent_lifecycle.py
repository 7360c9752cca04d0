"""The parent supervisor with fakes in virtual time: every phase's failure, timeout and alert
code, the enclave's death in every phase, restarts and stops, without launching an enclave.

The fake enclave speaks the real status channel over the real UNIX sockets the supervisor
listens on; only the process (launcher), the preload exchange and the bundle copy are fakes.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_sign.nitro import (
    DrainMessage,
    ExitMessage,
    HelloMessage,
    MessageStream,
    PreloadResultMessage,
    StateMessage,
)
from trio_sign.parent._config import parse_parent_config
from trio_sign.parent._health import ParentState
from trio_sign.parent._launch import LaunchError
from trio_sign.parent._lifecycle import (
    ALERTS,
    TRANSITIONS,
    EnclaveExited,
    IllegalTransition,
    Lifecycle,
    ParentExit,
    ParentPhase,
)
from trio_sign.parent._logs import LogForwarder
from trio_sign.parent._supervisor import ParentSupervisor

if TYPE_CHECKING:
    from trio_sign.parent._deltas import FileDeltaStore

SHA = "ab" * 32


def make_config(tmp_path: Path, *, restart: bool = False, extra: str = "") -> Any:
    nsm = tmp_path / "nsm"
    nsm.mkdir(exist_ok=True)
    (nsm / "local-nsm-root.pem").write_text("not used: the preload is a fake\n")
    (tmp_path / "bundle.enc").write_bytes(b"ciphertext")
    (tmp_path / "dev.key").write_text("not used\n")
    text = f"""
[bundle]
source = "{tmp_path / "bundle.enc"}"
work_dir = "{tmp_path / "run"}"
fetch_timeout_s = 100
[kms]
mode = "dev-key"
dev_key = "{tmp_path / "dev.key"}"
[enclave]
backend = "local"
nsm_dir = "{nsm}"
launch_timeout_s = 50
preload_timeout_s = 200
start_timeout_s = 40
drain_timeout_s = 15
[failure]
restart = {str(restart).lower()}
backoff_initial_s = 5
backoff_max_s = 5
[health]
listen = "tcp://127.0.0.1:0"
{extra}
"""
    return parse_parent_config(text)


# -- the fakes ---------------------------------------------------------------------------------


@dataclass
class FakeEnclave:
    """A launched enclave whose process ends when the script (or terminate) says so."""

    done: trio.Event = field(default_factory=trio.Event)
    code: int | None = None
    terminated: bool = False
    description: str = "fake enclave"

    def exit(self, code: int | None) -> None:
        if not self.done.is_set():
            self.code = code
            self.done.set()

    async def wait(self) -> int | None:
        await self.done.wait()
        return self.code

    async def terminate(self, grace_s: float) -> None:
        self.terminated = True
        self.exit(-15)


Script = Callable[["Enclave"], Awaitable[None]]


@dataclass
class Enclave:
    """What a script drives: the fake process and its real status channel."""

    process: FakeEnclave
    run_dir: Path
    status: MessageStream | None = None
    preload: trio.SocketStream | None = None

    async def run(self, script: Script) -> None:
        try:
            await script(self)
        finally:
            with trio.CancelScope(shield=True):
                if self.status is not None:
                    await self.status.aclose()
                if self.preload is not None:
                    await trio.aclose_forcefully(self.preload)

    async def connect_status(self) -> MessageStream:
        stream = await trio.open_unix_socket(str(self.run_dir / "status.sock"))
        self.status = MessageStream(stream)
        await self.status.send(HelloMessage("status"))
        return self.status

    async def say(self, state: str, **kwargs: Any) -> None:
        assert self.status is not None
        await self.status.send(StateMessage(state, **kwargs))

    async def connect_preload(self) -> None:
        self.preload = await trio.open_unix_socket(str(self.run_dir / "preload.sock"))
        await self.preload.send_all(b"x")

    async def last_words(self, code: int) -> None:
        assert self.status is not None
        await self.status.send(ExitMessage(code))
        self.process.exit(code)


@dataclass
class FakeLauncher:
    nursery: trio.Nursery
    run_dir: Path
    scripts: list[Script]
    launched: list[FakeEnclave] = field(default_factory=list)
    error: Exception | None = None
    hang: bool = False

    async def start(self) -> FakeEnclave:
        if self.hang:
            await trio.sleep_forever()
        if self.error is not None:
            raise self.error
        process = FakeEnclave()
        script = self.scripts[min(len(self.launched), len(self.scripts) - 1)]
        self.launched.append(process)
        self.nursery.start_soon(Enclave(process, self.run_dir).run, script)
        return process


@dataclass
class FakePreloader:
    """Accepts the enclave's boot connection and answers after ``delay_s`` (or never)."""

    delay_s: float = 1.0
    error: Exception | None = None
    calls: int = 0

    async def __call__(self, stream: trio.abc.Stream, bundle: Path) -> PreloadResultMessage:
        self.calls += 1
        assert bundle.read_bytes() == b"ciphertext"  # noqa: ASYNC240 - a tiny test file
        await stream.receive_some(1)
        await trio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return PreloadResultMessage(ok=True, accounts=3, sha256=SHA, preload_ms=1000)


async def copy_fetch(source: str, work_dir: Path) -> Path:
    """Synchronous on purpose: a thread would let the autojump clock run past its timeout."""
    target = work_dir / "bundle.enc"
    work_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    target.write_bytes(Path(source).read_bytes())  # noqa: ASYNC240
    return target


# -- scripts -----------------------------------------------------------------------------------


async def healthy(enclave: Enclave) -> None:
    """Boots, preloads, serves; drains and exits 0 when asked."""
    status = await enclave.connect_status()
    await enclave.say("booting")
    await enclave.say("preloading")
    await enclave.connect_preload()
    await trio.sleep(2)
    await enclave.say("serving", accounts=3, sha256=SHA, preload_ms=1000)
    with trio.CancelScope() as scope:
        enclave.process.done  # noqa: B018 - the scope ends with the process
        async with trio.open_nursery() as nursery:

            async def until_gone() -> None:
                await enclave.process.wait()
                scope.cancel()

            nursery.start_soon(until_gone)
            await status.receive_expected(DrainMessage)
            await enclave.say("draining")
            await trio.sleep(3)
            await enclave.last_words(0)


def killed_after(seconds: float) -> Script:
    async def script(enclave: Enclave) -> None:
        await enclave.connect_status()
        await enclave.say("preloading")
        await enclave.connect_preload()
        await trio.sleep(2)
        await enclave.say("serving", accounts=3, sha256=SHA)
        await trio.sleep(seconds)
        enclave.process.exit(-9)  # kill -9: no last word

    return script


async def dies_during_preload(enclave: Enclave) -> None:
    await enclave.connect_status()
    await enclave.say("preloading")
    await enclave.connect_preload()
    enclave.process.exit(1)  # gone at once, without a word (the preload is still waiting)


async def refuses_bundle(enclave: Enclave) -> None:
    await enclave.connect_status()
    await enclave.say("preloading")
    await enclave.connect_preload()
    await enclave.say("failed", reason="bundle_tampered")
    await enclave.last_words(3)


async def never_says_serving(enclave: Enclave) -> None:
    await enclave.connect_status()
    await enclave.say("preloading")
    await enclave.connect_preload()
    await trio.sleep_forever()


async def fails_after_preload(enclave: Enclave) -> None:
    await enclave.connect_status()
    await enclave.say("preloading")
    await enclave.connect_preload()
    await trio.sleep(2)
    await enclave.say("failed", reason="listener_failed")
    await trio.sleep_forever()  # the supervisor must act on the word, not wait for the exit


async def never_connects(enclave: Enclave) -> None:
    await trio.sleep_forever()


# -- the harness -------------------------------------------------------------------------------


@dataclass
class Harness:
    supervisor: ParentSupervisor
    launcher: FakeLauncher
    preloader: FakePreloader
    state: ParentState

    @property
    def lifecycle(self) -> Lifecycle:
        return self.state.lifecycle


def harness(
    nursery: trio.Nursery,
    tmp_path: Path,
    scripts: list[Script],
    *,
    restart: bool = False,
    fetch: Any = copy_fetch,
    preloader: FakePreloader | None = None,
) -> Harness:
    config = make_config(tmp_path, restart=restart)
    state = ParentState(wall_clock=trio.current_time, lifecycle=Lifecycle(clock=trio.current_time))
    launcher = FakeLauncher(nursery, config.bundle.work_dir, scripts)
    preloader = preloader if preloader is not None else FakePreloader()
    supervisor = ParentSupervisor(
        config,
        launcher=launcher,
        preloader=preloader,
        fetch=fetch,
        state=state,
        forwarder=LogForwarder(stats=state.logs),
    )
    return Harness(supervisor, launcher, preloader, state)


async def gives_up(h: Harness) -> tuple[ParentExit, float]:
    """Run the supervisor to its end; return what it gave up with, and when."""
    with pytest.raises(ParentExit) as info:
        await h.supervisor.run()
    return info.value, trio.current_time()


# -- every phase's failure ---------------------------------------------------------------------


async def test_a_healthy_run_walks_every_phase_and_a_stop_drains(
    tmp_path: Path, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    stop = trio.Event()
    frozen_in: list[ParentPhase] = []
    async with trio.open_nursery() as nursery:
        h = harness(nursery, tmp_path, [healthy])
        # what the run keeps leaves the full collections' walk once it serves (trio_sign._gc)
        monkeypatch.setattr(
            "trio_sign.parent._supervisor.freeze_long_lived",
            lambda: frozen_in.append(h.lifecycle.phase),
        )
        await nursery.start(h.supervisor.run, stop)
        await h.lifecycle.wait_for(lambda lc: lc.phase is ParentPhase.SERVING)
        assert h.state.enclave_state == "serving"
        assert h.state.report()["accounts"] == 3
        stop.set()
    assert h.lifecycle.history == [
        ParentPhase.STARTING,
        ParentPhase.FETCHING,
        ParentPhase.LAUNCHING,
        ParentPhase.PRELOADING,
        ParentPhase.ATTESTING,
        ParentPhase.SERVING,
        ParentPhase.DRAINING,
        ParentPhase.STOPPED,
    ]
    assert h.state.enclave_exit_code == 0
    assert h.state.alerts.last is None
    assert not (tmp_path / "run" / "bundle.enc").exists()  # the copy went after preload
    assert frozen_in == [ParentPhase.SERVING]


@pytest.mark.parametrize(
    ("setup", "alert", "seconds", "words"),
    [
        ("fetch_error", "bundle_unavailable", 0, "No such file"),
        ("fetch_hangs", "bundle_unavailable", 100, "fetch_timeout_s"),
        ("launch_error", "launch_failed", 0, "nitro-cli run-enclave failed"),
        ("launch_hangs", "launch_failed", 50, "launch_timeout_s"),
        ("preload_error", "preload_failed", 1, "KMS refused"),
        ("preload_hangs", "preload_timeout", 230, "preload_timeout_s"),
        ("never_connects", "preload_timeout", 230, "preload_timeout_s"),
        ("dies_during_preload", "enclave_killed", 0.5, "without a word"),
        ("refuses_bundle", "preload_failed", 0, "bundle_tampered"),
        ("never_says_serving", "start_timeout", 41, "start_timeout_s"),
        ("fails_after_preload", "enclave_failed", 2, "listener_failed"),
        ("killed_while_serving", "enclave_killed", 62.5, "killed by SIGKILL"),
    ],
)
async def test_each_phase_fails_with_its_own_alert_and_timeout(
    tmp_path: Path,
    autojump_clock: trio.abc.Clock,
    setup: str,
    alert: str,
    seconds: float,
    words: str,
) -> None:
    """What ends the run is named by the phase that knows (never "preload_timeout" for a
    death, never "internal" for a KMS refusal), at the moment it happens: a dead enclave is
    noticed at once in every phase, not at the end of some unrelated timeout."""
    scripts: dict[str, Script] = {
        "dies_during_preload": dies_during_preload,
        "refuses_bundle": refuses_bundle,
        "never_says_serving": never_says_serving,
        "fails_after_preload": fails_after_preload,
        "never_connects": never_connects,
        "killed_while_serving": killed_after(60),
    }
    fetch: Any = copy_fetch
    preloader = FakePreloader()
    if setup == "fetch_error":

        async def fetch(source: str, work_dir: Path) -> Path:
            raise FileNotFoundError(2, "No such file or directory", source)

    elif setup == "fetch_hangs":

        async def fetch(source: str, work_dir: Path) -> Path:
            await trio.sleep_forever()
            raise AssertionError

    elif setup == "preload_error":
        from trio_sign.kms import KmsRecipientError

        preloader = FakePreloader(error=KmsRecipientError("KMS refused: AccessDeniedException"))
    elif setup == "preload_hangs":
        preloader = FakePreloader(delay_s=10_000)
    async with trio.open_nursery() as nursery:
        h = harness(
            nursery,
            tmp_path,
            [scripts.get(setup, healthy)],
            fetch=fetch,
            preloader=preloader,
        )
        if setup == "launch_error":
            h.launcher.error = LaunchError("nitro-cli run-enclave failed (4): E39 out of memory")
        h.launcher.hang = setup == "launch_hangs"
        failure, at = await gives_up(h)
        nursery.cancel_scope.cancel()
    assert failure.alert == alert, str(failure)
    assert words in str(failure)
    assert at == pytest.approx(seconds, abs=0.01)
    assert failure.exit_code == 1
    assert h.lifecycle.phase is ParentPhase.FAILED
    assert h.state.alerts.counts == {alert: 1}
    assert all(p.terminated or p.done.is_set() for p in h.launcher.launched)
    assert not list((tmp_path / "run").glob("bundle*")), "the bundle copy outlived the run"


async def test_death_is_seen_within_a_second_and_restarting_says_so(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """kill -9 with restart on: /readyz says the enclave exited and the parent is restarting
    for the whole back-off (not "serving"), the alert is enclave_killed, then a new enclave."""
    async with trio.open_nursery() as nursery:
        h = harness(nursery, tmp_path, [killed_after(10), healthy], restart=True)
        await nursery.start(h.supervisor.run)
        await h.lifecycle.wait_for(lambda lc: lc.phase is ParentPhase.SERVING)
        killed_at = trio.current_time() + 10
        await h.lifecycle.wait_for(lambda lc: lc.enclave.state == "exited")
        assert trio.current_time() - killed_at <= 1.0
        await h.lifecycle.wait_for(lambda lc: lc.phase is ParentPhase.RESTARTING)
        report = h.state.report()
        assert report["phase"] == "restarting"
        assert report["enclave_state"] == "exited"
        assert report["ready"] is False
        assert report["last_alert_code"] == "enclave_killed"
        assert trio.current_time() - killed_at <= 1.0
        await trio.sleep(4)  # inside the 5 s back-off: still not serving
        assert h.state.report()["enclave_state"] == "exited"
        await h.lifecycle.wait_for(lambda lc: lc.phase is ParentPhase.SERVING)
        assert h.lifecycle.restarts == 1
        assert len(h.launcher.launched) == 2
        nursery.cancel_scope.cancel()


async def test_a_stop_while_booting_terminates_without_an_alert(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        h = harness(nursery, tmp_path, [never_says_serving])
        nursery.start_soon(functools.partial(h.supervisor.run, stop))
        await h.lifecycle.wait_for(lambda lc: lc.phase is ParentPhase.PRELOADING)
        await trio.sleep(3)
        stop.set()
        await h.lifecycle.wait_for(lambda lc: lc.final)
        nursery.cancel_scope.cancel()
    assert h.lifecycle.phase is ParentPhase.STOPPED
    assert h.launcher.launched[0].terminated
    assert h.state.alerts.last is None


async def test_a_bad_config_file_stops_before_anything_starts(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """What preflight finds is exit 2 (systemd does not restart), even with restart on."""
    async with trio.open_nursery() as nursery:
        h = harness(nursery, tmp_path, [healthy], restart=True)
        (tmp_path / "dev.key").unlink()
        failure, _ = await gives_up(h)
        nursery.cancel_scope.cancel()
    assert failure.alert == "config"
    assert failure.exit_code == 2
    assert "[kms] dev_key" in str(failure)
    assert h.launcher.launched == []


# -- the machine itself ------------------------------------------------------------------------


def test_every_phase_is_reachable_and_only_stopped_and_failed_are_final() -> None:
    seen = {ParentPhase.STARTING}
    frontier = [ParentPhase.STARTING]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(ParentPhase)
    assert {p for p, nexts in TRANSITIONS.items() if not nexts} == {
        ParentPhase.STOPPED,
        ParentPhase.FAILED,
    }


@given(st.lists(st.sampled_from(list(ParentPhase)), max_size=40))
def test_illegal_transitions_raise_and_change_nothing(moves: list[ParentPhase]) -> None:
    lifecycle = Lifecycle(clock=lambda: 0.0)
    for to in moves:
        before = lifecycle.phase
        if to in TRANSITIONS[before]:
            lifecycle.advance(to)
            assert lifecycle.phase is to
        else:
            with pytest.raises(IllegalTransition):
                lifecycle.advance(to)
            assert lifecycle.phase is before
    assert lifecycle.history[-1] is lifecycle.phase


def test_alert_codes_are_documented_and_checked() -> None:
    assert {"enclave_killed", "enclave_exited", "preload_timeout", "config"} <= set(ALERTS)
    with pytest.raises(ValueError, match="unknown alert code"):
        ParentExit("x", alert="no_such_alert")


# -- the log file: logrotate and a full disk ---------------------------------------------------


def test_sighup_reopens_the_log_file_and_a_full_disk_is_one_alert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent's log file follows logrotate (``reopen_logs``, which SIGHUP calls), and a
    write that fails (ENOSPC) is the ``log_write_failed`` alert, once per streak, with the
    lines counted as dropped."""
    import contextlib
    import errno
    import json
    import os

    from trio_sign.nitro import LogMessage

    log_file = tmp_path / "enclave.jsonl"
    config = make_config(tmp_path, extra=f'[logs]\nfile = "{log_file}"')
    supervisor = ParentSupervisor(config)
    with contextlib.ExitStack() as files:
        forwarder = supervisor._open_forwarder(files)
        supervisor.forwarder = forwarder
        forwarder.on_message(LogMessage(json.dumps({"msg": "before rotation"})))
        log_file.rename(tmp_path / "enclave.jsonl.1")
        supervisor.reopen_logs()
        forwarder.on_message(LogMessage(json.dumps({"msg": "after rotation"})))
        assert "before rotation" in (tmp_path / "enclave.jsonl.1").read_text()
        assert "after rotation" in log_file.read_text()

        def full(fd: int, data: bytes | memoryview) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        sink = forwarder._sinks[0]
        monkeypatch.setattr(sink, "_write", full)
        for i in range(3):
            forwarder.on_message(LogMessage(json.dumps({"msg": f"lost {i}"})))
    alerts = supervisor.state.alerts
    assert alerts.counts == {"log_write_failed": 1}
    assert alerts.last is not None
    assert "No space left on device" in alerts.last[1]
    assert supervisor.state.logs.write_errors >= 1
    assert supervisor.state.logs.sink_dropped == 3


# -- deltas (issue 16) -------------------------------------------------------------------------


def _a_delta(tmp_path: Path, account: str) -> bytes:
    from trio_sign.shares import DevKeyFile, encode_bundle

    from .share_helpers import make_record

    key_path = tmp_path / "delta-dev.key"
    key = DevKeyFile.load(key_path) if key_path.exists() else DevKeyFile.create(key_path)
    return encode_bundle([make_record(account)], key, kind="delta")


def _deltas_supervisor(
    nursery: trio.Nursery,
    tmp_path: Path,
    script: Script,
    offload: Callable[..., Awaitable[Any]],
) -> tuple[ParentSupervisor, ParentState, FileDeltaStore]:
    """A supervisor whose run has ``[deltas]`` on a file store in ``tmp_path/deltas`` (its
    crash leftovers recovered) and one enclave that runs ``script``; the store is returned."""
    from trio_sign.parent._deltas import Deltas, FileDeltaStore

    directory = tmp_path / "deltas"
    store = FileDeltaStore(directory, host_tag="0123456789ab")
    store.recover()
    config = make_config(tmp_path, extra=f'[deltas]\nlocation = "file://{directory}"\n')
    state = ParentState(wall_clock=trio.current_time, lifecycle=Lifecycle(clock=trio.current_time))
    supervisor = ParentSupervisor(
        config,
        launcher=FakeLauncher(nursery, config.bundle.work_dir, [script]),
        preloader=FakePreloader(),
        fetch=copy_fetch,
        state=state,
        forwarder=LogForwarder(stats=state.logs),
        deltas=Deltas(store, on_alert=state.alerts.raise_alert, offload=offload),
    )
    return supervisor, state, store


async def test_a_serving_run_takes_the_enclaves_deltas_and_pushes_the_stores(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """With [deltas], the supervisor listens for the deltas channel from the start of the run;
    once the preload is done the watcher pushes what the enclave lacks, and the enclave's own
    delta is stored durably and acknowledged. /readyz and /metrics show both positions."""
    from trio_sign.nitro._channel import (
        DeltaChunkMessage,
        DeltaEndMessage,
        DeltaLoadedMessage,
        DeltaPushMessage,
        DeltaStoredMessage,
        DeltaStoreMessage,
    )
    from trio_sign.parent._health import render_metrics

    mine = _a_delta(tmp_path, "acct-mine")
    heard: dict[str, Any] = {"pushed": []}
    done = trio.Event()

    async def script(enclave: Enclave) -> None:
        status = await enclave.connect_status()
        await enclave.say("preloading")
        channel = MessageStream(await trio.open_unix_socket(str(enclave.run_dir / "deltas.sock")))
        try:
            await channel.send(HelloMessage("deltas"))
            await enclave.connect_preload()
            await trio.sleep(2)
            await enclave.say("serving", accounts=3, sha256=SHA, preload_ms=1000)
            for _ in (1, 2):
                push = await channel.receive_expected(DeltaPushMessage)
                while not isinstance(await channel.receive(), DeltaEndMessage):
                    pass
                heard["pushed"].append(push.sequence)
                await channel.send(
                    DeltaLoadedMessage(sequence=push.sequence, head="ee" * 32, accounts=4)
                )
            await channel.send(DeltaStoreMessage(sequence=3, total_bytes=len(mine)))
            await channel.send(DeltaChunkMessage(data=mine))
            await channel.send(DeltaEndMessage())
            heard["reply"] = await channel.receive()
            done.set()
            await status.receive_expected(DrainMessage)
            await enclave.last_words(0)
        finally:
            with trio.CancelScope(shield=True):
                await channel.aclose()

    async def inline(fn: Any, *args: Any) -> Any:
        return fn(*args)

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        supervisor, state, store = _deltas_supervisor(nursery, tmp_path, script, inline)
        for sequence in (1, 2):
            store.put(sequence, _a_delta(tmp_path, f"acct-other-{sequence}"))
        await nursery.start(supervisor.run, stop)
        await state.lifecycle.wait_for(lambda lc: lc.phase is ParentPhase.SERVING)
        with trio.fail_after(60):  # a deadline only now: the boot's threads would race it
            await done.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert heard["pushed"] == [1, 2]
        assert isinstance(heard["reply"], DeltaStoredMessage)
        assert heard["reply"].sequence == 3
        assert store.get(3) == mine
        report = state.report()
        assert (report["deltas_stored"], report["deltas_loaded"]) == (3, 2)
        assert "trio_sign_parent_deltas_pushed_total 2" in render_metrics(state)
        stop.set()
    assert state.alerts.last is None


async def test_a_delta_sent_just_before_the_enclave_dies_is_still_stored(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """The enclave sends its delta and dies at once; the parent's store is slow (2 s). The run
    ends on the exit, which stops the deltas channel: it waits for that connection to finish
    what it was handed first, so the delta is stored (it was lost when the run ended 0.5 s
    after the exit)."""
    from trio_sign.nitro._channel import DeltaChunkMessage, DeltaEndMessage, DeltaStoreMessage

    mine = _a_delta(tmp_path, "acct-mine")

    async def script(enclave: Enclave) -> None:
        await enclave.connect_status()
        await enclave.say("preloading")
        channel = MessageStream(await trio.open_unix_socket(str(enclave.run_dir / "deltas.sock")))
        try:
            await channel.send(HelloMessage("deltas"))
            await enclave.connect_preload()
            await enclave.say("serving", accounts=3, sha256=SHA, preload_ms=1000)
            await trio.sleep(1)  # serving for a while: its deltas connection is up
            await channel.send(DeltaStoreMessage(sequence=1, total_bytes=len(mine)))
            await channel.send(DeltaChunkMessage(data=mine))
            await channel.send(DeltaEndMessage())
            await enclave.last_words(70)  # dies: its sockets close with it
        finally:
            with trio.CancelScope(shield=True):
                await channel.aclose()

    async def slow(fn: Any, *args: Any) -> Any:
        await trio.sleep(2)  # a store that takes a while (S3, a busy disk)
        return fn(*args)

    async with trio.open_nursery() as nursery:
        supervisor, _state, store = _deltas_supervisor(nursery, tmp_path, script, slow)
        with pytest.raises(EnclaveExited, match="code 70"):  # the exit ends the run
            await supervisor.run(trio.Event())
        nursery.cancel_scope.cancel()
    assert store.get(1) == mine


async def test_the_deltas_store_is_opened_from_the_config(tmp_path: Path) -> None:
    """``[deltas] location`` is opened at the start of run(): the directory is created and a
    crash's leftovers are removed."""
    from trio_sign.parent._deltas import FileDeltaStore

    directory = tmp_path / "deltas"
    config = make_config(tmp_path, extra=f'[deltas]\nlocation = "file://{directory}"\n')
    supervisor = ParentSupervisor(config)
    deltas = await supervisor._open_deltas()
    assert isinstance(deltas.store, FileDeltaStore)
    assert directory.is_dir()
    assert supervisor.state.deltas is deltas.stats
    assert deltas.poll_interval_s == 1.0
