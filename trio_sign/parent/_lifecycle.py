"""The parent's lifecycle as an explicit state machine, its view of the enclave, and alerts.

The parent is in exactly one :class:`ParentPhase`; :meth:`Lifecycle.advance` moves it along
the transition table (h11's model: an illegal move is our bug and raises
:class:`IllegalTransition`, loudly, in tests and in production alike)::

    starting → fetching → launching → preloading → attesting → serving → draining → stopped
                   ↑          │            │            │          │          │
                   └─ restarting ←─────────┴────────────┴──────────┘          │
                          (or failed, when [failure] restart is off)          ↓
                                                                          stopped

What the enclave says about itself (its status channel) and what the launcher sees (its exit)
arrive as events on the same object (:meth:`Lifecycle.on_status_message`,
:meth:`Lifecycle.enclave_exited`), which wakes whoever waits on them: nothing polls.
``/readyz``, ``/metrics`` and the alerts read this object, never a copy of it.

Every way a run ends is a typed :class:`ParentExit` carrying its alert code (and the exit
status the parent's process ends with, if it gives up): the phase that fails raises it where it
knows why. :class:`Alerts` is the one place an alert goes out: an ERROR record with the stable
``alert`` field, the last alert in ``/readyz``, a count per code in ``/metrics``, and the
operator's command hook.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import trio

from .._errors import TrioSignError
from ..nitro import ChannelMessage, ExitMessage, MetricsMessage, StateMessage

log = logging.getLogger("trio_sign.parent")


# -- alert codes and the errors that carry them ------------------------------------------------

#: Every alert the parent raises: its stable code (the ``alert`` field, the hook's
#: ``TRIO_SIGN_ALERT``, the ``/metrics`` label) and what it means for the operator.
ALERTS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "config": "parent.toml or a file it names is wrong; nothing was launched (exit 2)",
        "listen_failed": "a listener could not be opened (address in use, permissions)",
        "bundle_unavailable": "the sealed bundle could not be copied (missing, S3, timeout)",
        "launch_failed": "the enclave could not be started (nitro-cli, resources, timeout)",
        "preload_failed": "the enclave refused the bundle or KMS refused the data key",
        "preload_timeout": "preload did not finish within [enclave] preload_timeout_s",
        "start_timeout": "after preload, the enclave did not say serving in start_timeout_s",
        "enclave_failed": "the enclave reported the failed state (its reason is in the message)",
        "enclave_exited": "the enclave process exited (its exit code is in the message)",
        "enclave_killed": "the enclave process was killed by a signal (OOM killer, kill -9)",
        "attestation_failed": "a periodic attestation check failed; forwarding stopped",
        "log_write_failed": "the parent could not write the enclave's log lines to its file",
        "delta_store_failed": "the delta store could not be read or written (disk, S3)",
        "delta_gap": "a delta is missing from the store; the deltas after it are not served",
        "delta_refused": "the enclave refused a delta the parent pushed (its reason is in the "
        "message)",
        "internal": "a bug in the parent; the log has the traceback",
    }
)


class ParentExit(TrioSignError):
    """An enclave run ended for a reason the operator must hear about: ``alert`` is its code in
    :data:`ALERTS`; ``exit_code`` the parent's exit status if it gives up on it (2 for
    configuration problems, which systemd must not restart on; 1 otherwise)."""

    alert_code: str = "internal"
    exit_code: int = 1

    def __init__(self, message: str, *, alert: str | None = None) -> None:
        super().__init__(message)
        self.alert = alert if alert is not None else self.alert_code
        if self.alert not in ALERTS:
            raise ValueError(f"unknown alert code {self.alert!r}")


class ConfigProblem(ParentExit):
    alert_code = "config"
    exit_code = 2


class ListenFailed(ParentExit):
    alert_code = "listen_failed"


class BundleUnavailable(ParentExit):
    alert_code = "bundle_unavailable"


class LaunchFailed(ParentExit):
    alert_code = "launch_failed"


class PreloadFailed(ParentExit):
    alert_code = "preload_failed"


class PreloadTimeout(ParentExit):
    alert_code = "preload_timeout"


class StartTimeout(ParentExit):
    alert_code = "start_timeout"


class EnclaveFailed(ParentExit):
    alert_code = "enclave_failed"


class EnclaveExited(ParentExit):
    """The enclave process went away on its own. ``enclave_killed`` if a signal ended it, or
    if it died without its last word (the ``exit`` message every orderly end sends): kill -9,
    the OOM killer, a hard crash; on Nitro, a terminated or rebooted enclave."""

    alert_code = "enclave_exited"

    def __init__(self, code: int | None, *, reason: str | None = None, said: bool = True) -> None:
        self.code = code
        signalled = code is not None and (code < 0 or code in (128 + 9, 128 + 15))
        if said or signalled:
            message = describe_exit(code)
        else:
            status = "no exit status" if code is None else f"status {code}"
            message = (
                f"the enclave died without a word ({status}): killed (kill -9, the OOM killer) "
                "or crashed hard"
            )
        super().__init__(
            message + (f" ({reason})" if reason else ""),
            alert="enclave_killed" if signalled or not said else "enclave_exited",
        )


#: What the enclave's exit statuses mean (trio_sign.enclave.ExitCode, documented there).
_ENCLAVE_EXIT_NAMES: Final = {
    0: "stopped after a drain",
    1: "an internal error in the enclave",
    2: "a usage or configuration error",
    3: "preload refused",
    4: "preload timed out",
    5: "the bundle does not fit its memory",
    6: "the NSM could not be used",
    7: "a service failed at run time",
}


def describe_exit(code: int | None) -> str:
    """A one-line account of how the enclave ended, for alerts and /readyz."""
    if code is None:
        return "the enclave is gone (no exit status: it was terminated or rebooted)"
    signum = -code if code < 0 else code - 128 if code in (128 + 9, 128 + 15) else None
    if signum is not None:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"the enclave was killed by {name}"
    meaning = _ENCLAVE_EXIT_NAMES.get(code, "an unknown exit status")
    return f"the enclave exited with code {code}: {meaning}"


# -- the parent's phases -----------------------------------------------------------------------


class ParentPhase(enum.Enum):
    STARTING = "starting"
    FETCHING = "fetching"
    LAUNCHING = "launching"
    PRELOADING = "preloading"
    ATTESTING = "attesting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"
    RESTARTING = "restarting"


_P = ParentPhase
_RUN_ENDS: Final = frozenset({_P.RESTARTING, _P.FAILED, _P.STOPPED})
#: Where each phase may go next. A run's every phase may end it (restart, give up, or stop);
#: only ``serving`` drains; ``failed`` and ``stopped`` are final.
TRANSITIONS: Final[Mapping[ParentPhase, frozenset[ParentPhase]]] = MappingProxyType(
    {
        _P.STARTING: frozenset({_P.FETCHING, _P.FAILED, _P.STOPPED}),
        _P.FETCHING: _RUN_ENDS | {_P.LAUNCHING},
        _P.LAUNCHING: _RUN_ENDS | {_P.PRELOADING},
        _P.PRELOADING: _RUN_ENDS | {_P.ATTESTING},
        _P.ATTESTING: _RUN_ENDS | {_P.SERVING},
        _P.SERVING: _RUN_ENDS | {_P.DRAINING},
        _P.DRAINING: frozenset({_P.STOPPED, _P.FAILED}),
        _P.RESTARTING: frozenset({_P.FETCHING, _P.STOPPED, _P.FAILED}),
        _P.STOPPED: frozenset(),
        _P.FAILED: frozenset(),
    }
)


class IllegalTransition(RuntimeError):
    """A phase change the table does not allow: a bug in the supervisor."""


#: What the enclave may report on its status channel (trio_sign.nitro's ``STATES``), plus the
#: parent's own ``unknown`` (nothing heard yet this run) and ``exited`` (the process is gone).
ENCLAVE_STATES: Final = (
    "unknown",
    "booting",
    "preloading",
    "serving",
    "draining",
    "failed",
    "exiting",
    "exited",
)


@dataclass(slots=True)
class EnclaveView:
    """What the parent knows of the current enclave: its words (reporting only: the parent
    trusts them for nothing else) and what the launcher saw."""

    state: str = "unknown"
    reason: str | None = None
    exit_code: int | None = None
    exit_description: str | None = None
    accounts: int | None = None
    shares_sha256: str | None = None
    preload_ms: int | None = None


class Lifecycle:
    """The parent's phase and its view of the enclave; every change wakes :meth:`wait_for`.

    Args:
        clock: Unix time, for ``phase_since`` (injected in tests).
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.phase = ParentPhase.STARTING
        self.phase_since = clock()
        self.history: list[ParentPhase] = [ParentPhase.STARTING]
        self.runs = 0
        self.restarts = 0
        self.enclave = EnclaveView()
        self.enclave_metrics: Mapping[str, Any] | None = None
        self._changed = trio.Event()

    # -- the parent's own phase --------------------------------------------------------------

    def advance(self, to: ParentPhase) -> None:
        """Move to ``to``; raises :class:`IllegalTransition` if the table does not allow it."""
        if to not in TRANSITIONS[self.phase]:
            raise IllegalTransition(f"parent phase {self.phase.value} -> {to.value}")
        if to is ParentPhase.FETCHING:
            self.runs += 1
            self.enclave = EnclaveView()  # a new run: nothing heard from this enclave yet
            self.enclave_metrics = None
        elif to is ParentPhase.RESTARTING:
            self.restarts += 1
        log.info("parent phase %s -> %s", self.phase.value, to.value, extra={"phase": to.value})
        self.phase = to
        self.phase_since = self._clock()
        self.history.append(to)
        self._wake()

    @property
    def final(self) -> bool:
        return not TRANSITIONS[self.phase]

    # -- the enclave's events ----------------------------------------------------------------

    def on_status_message(self, message: ChannelMessage) -> None:
        """Pass as ``on`` to :func:`~trio_sign.parent.serve_status_connection`."""
        if isinstance(message, StateMessage):
            self.enclave_reported(
                message.state,
                reason=message.reason,
                accounts=message.accounts,
                shares_sha256=message.sha256,
                preload_ms=message.preload_ms,
            )
        elif isinstance(message, ExitMessage):
            self.enclave_exited(message.code)
        elif isinstance(message, MetricsMessage):
            self.enclave_metrics = message.snapshot  # rendered (and checked) by /metrics

    def enclave_reported(
        self,
        state: str,
        *,
        reason: str | None = None,
        accounts: int | None = None,
        shares_sha256: str | None = None,
        preload_ms: int | None = None,
    ) -> None:
        """The enclave's status channel said ``state``. Preload facts are kept from earlier
        states when not given again. Once the process is known to be gone, late words do not
        bring it back."""
        view = self.enclave
        if view.state == "exited":
            return
        view.state = state
        view.reason = reason
        if accounts is not None:
            view.accounts = accounts
        if shares_sha256 is not None:
            view.shares_sha256 = shares_sha256
        if preload_ms is not None:
            view.preload_ms = preload_ms
        self._wake()

    def enclave_exited(self, code: int | None) -> None:
        """The enclave process is gone (the launcher saw it, or its own last ``exit`` word)."""
        view = self.enclave
        if view.state == "exited" and view.exit_code is not None:
            return  # the first word about it stands (the exit message before the reap)
        view.state = "exited"
        view.exit_code = code
        view.exit_description = describe_exit(code)
        self._wake()

    async def wait_for(self, predicate: Callable[[Lifecycle], bool]) -> None:
        """Return once ``predicate(self)`` holds (checked now and after every change)."""
        while not predicate(self):
            await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


# -- alerts ------------------------------------------------------------------------------------


class Alerts:
    """Where every alert goes out, once: an ERROR record with the stable ``alert`` field, the
    last alert (``/readyz``), a count per code (``/metrics``), and the operator's command hook
    (``TRIO_SIGN_ALERT``/``TRIO_SIGN_ALERT_MESSAGE`` in its environment, at most
    ``hook_timeout_s``).

    Hooks run in the background in the nursery given to :meth:`run` (alerts must never block
    the code that raises them); :meth:`raise_and_wait` runs it in the foreground, shielded, for
    the alert the parent gives up on.
    """

    def __init__(
        self,
        command: tuple[str, ...] = (),
        *,
        clock: Callable[[], float] = time.time,
        hook_timeout_s: float = 30.0,
    ) -> None:
        self.command = command
        self.hook_timeout_s = hook_timeout_s
        self._clock = clock
        self.counts: Counter[str] = Counter()
        self.last: tuple[str, str] | None = None
        self.last_at: float | None = None
        self.hooks_failed = 0
        self._send: trio.MemorySendChannel[tuple[str, str]] | None = None

    def raise_alert(self, code: str, message: str) -> None:
        """Record and log the alert; start its hook in the background (dropped, and counted
        as a failed hook, if the hook runner is not up or 16 hooks are already waiting)."""
        self._record(code, message)
        if not self.command:
            return
        if self._send is None:
            self.hooks_failed += 1
            return
        try:
            self._send.send_nowait((code, message))
        except trio.WouldBlock:
            self.hooks_failed += 1
            log.error("alert hook queue full; hook not run", extra={"alert_hook": code})

    async def raise_and_wait(self, code: str, message: str) -> None:
        """Record and log the alert, then run its hook to the end (shielded: it runs even when
        the parent is being cancelled, because it is about to exit)."""
        self._record(code, message)
        if self.command:
            with trio.CancelScope(shield=True):
                await self._run_hook(code, message)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run queued hooks one at a time until cancelled."""
        send, receive = trio.open_memory_channel[tuple[str, str]](16)
        self._send = send
        task_status.started()
        try:
            async for code, message in receive:
                await self._run_hook(code, message)
        finally:
            self._send = None

    def _record(self, code: str, message: str) -> None:
        if code not in ALERTS:
            raise ValueError(f"unknown alert code {code!r}")
        self.counts[code] += 1
        self.last = (code, message)
        self.last_at = self._clock()
        log.error("alert %s: %s", code, message, extra={"alert": code})

    async def _run_hook(self, code: str, message: str) -> None:
        env = {**os.environ, "TRIO_SIGN_ALERT": code, "TRIO_SIGN_ALERT_MESSAGE": message}
        with trio.move_on_after(self.hook_timeout_s) as scope:
            try:
                result = await trio.run_process(
                    list(self.command),
                    env=env,
                    check=False,
                    capture_stdout=True,
                    capture_stderr=True,
                )
            except OSError as exc:
                self.hooks_failed += 1
                log.error("alert command could not run", extra={"error": str(exc)})
                return
            if result.returncode != 0:
                self.hooks_failed += 1
                log.error("alert command failed", extra={"exit_code": result.returncode})
        if scope.cancelled_caught:
            self.hooks_failed += 1
            log.error("alert command timed out", extra={"timeout_s": self.hook_timeout_s})
