"""The enclave's one link to its parent: the status and log channels, the lifecycle they
report, and the process's last words.

:class:`ParentLink` runs both channels in a task of their own, started (``nursery.start``)
in a nursery *outside* the services', so they outlive every service: when a service fails
and its nursery is torn down, the channels are still up to say why. Its lifecycle
(:class:`~trio_sign.enclave.EnclaveLifecycle`) is the one place the enclave's state lives;
every move is sent on the status channel as it happens. :meth:`ParentLink.close` ends it::

    state(failed, reason) | state(exiting)   exit(code)   the last log lines

bounded by ``final_report_timeout_s`` per step and shielded from the cancellation that is
tearing the process down; then the channels stop and the lifecycle is ``exited``.

Without addresses (a development enclave with no parent) the link keeps the lifecycle and
sends nothing.
"""

from __future__ import annotations

import functools
import logging
import random
from typing import Final

import trio

from ..transport import connect
from ._config import EnclaveConfig
from ._lifecycle import FINAL_STATES, EnclaveEvent, EnclaveLifecycle, EnclaveState
from ._logchannel import (
    ChannelLogHandler,
    attach_log_handler,
    detach_log_handler,
    run_log_channel,
)
from ._status import (
    DEFAULT_BACKOFF_INITIAL_S,
    DEFAULT_BACKOFF_MAX_S,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_METRICS_INTERVAL_S,
    KEEP,
    Connect,
    Keep,
    MetricsSource,
    StatusReporter,
    check_backoff,
    run_status_channel,
)

log = logging.getLogger("trio_sign.enclave")

#: Default bound on each of the last words' two steps (status, then logs).
DEFAULT_FINAL_REPORT_TIMEOUT_S: Final = 3.0


class ParentLink:
    """The status and log channels to the parent, and the lifecycle they report.

    Start :meth:`run` with ``nursery.start`` in a nursery that encloses the services; give
    the last words with :meth:`close` when the services are gone (always: :meth:`run` keeps
    the channels up, shielded, until then).

    Args:
        status_connect: opens a status connection (None: no status channel).
        log_connect: opens a log connection (None: no log channel, no log handler).
        metrics_source: returns the enclave's metrics snapshot (``Registry.snapshot``), sent
            every ``metrics_interval_s`` while the status channel is up. Settable later
            (:attr:`metrics_source`): the registry exists only once the service does.
        metrics_interval_s: seconds between snapshots (default 10).
        final_report_timeout_s: bound on delivering the final state and exit code, and again
            on flushing the last log lines.
        log_handler: the handler that buffers ``trio_sign`` log lines for the log channel
            (default: a new :class:`ChannelLogHandler`); attached while :meth:`run` runs.
        backoff_initial_s, backoff_max_s, connect_timeout_s, rng: the channels' reconnects
            (:func:`~trio_sign.enclave._status.run_reconnecting_channel`).

    Attributes:
        lifecycle: the enclave's :class:`EnclaveLifecycle` (read :attr:`state`).
        reporter: the status channel's :class:`StatusReporter`.
        log_handler: the log channel's handler, or None without a log channel.
        drain_requested: set when the parent asks for a drain on the status channel.
    """

    def __init__(
        self,
        status_connect: Connect | None,
        log_connect: Connect | None,
        *,
        metrics_source: MetricsSource | None = None,
        metrics_interval_s: float = DEFAULT_METRICS_INTERVAL_S,
        final_report_timeout_s: float = DEFAULT_FINAL_REPORT_TIMEOUT_S,
        log_handler: ChannelLogHandler | None = None,
        backoff_initial_s: float = DEFAULT_BACKOFF_INITIAL_S,
        backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        rng: random.Random | None = None,
    ) -> None:
        if not final_report_timeout_s > 0:
            raise ValueError("final_report_timeout_s must be positive")
        self.lifecycle = EnclaveLifecycle()
        self.reporter = StatusReporter(
            metrics_source=metrics_source, metrics_interval_s=metrics_interval_s
        )
        if log_connect is None:
            self.log_handler: ChannelLogHandler | None = None
        else:
            self.log_handler = log_handler if log_handler is not None else ChannelLogHandler()
        self.drain_requested = self.reporter.drain_requested
        self.final_report_timeout_s = final_report_timeout_s
        self._status_connect = status_connect
        self._log_connect = log_connect
        check_backoff(backoff_initial_s, backoff_max_s, connect_timeout_s)
        self._backoff = (backoff_initial_s, backoff_max_s, connect_timeout_s)
        self._rng = rng
        self._hurry = trio.Event()  # the last words: reconnect without long back-offs
        self._closed = trio.Event()
        self._delivered = False
        self._running = False

    @classmethod
    def from_config(
        cls, config: EnclaveConfig, *, metrics_source: MetricsSource | None = None
    ) -> ParentLink:
        """A link to ``config.status_address`` and ``config.log_address``."""
        return cls(
            functools.partial(connect, config.status_address),
            functools.partial(connect, config.log_address),
            metrics_source=metrics_source,
            final_report_timeout_s=config.final_report_timeout_s,
        )

    @property
    def state(self) -> EnclaveState:
        """The enclave's current lifecycle state."""
        return self.lifecycle.state

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has finished."""
        return self._closed.is_set()

    @property
    def metrics_source(self) -> MetricsSource | None:
        return self.reporter.metrics_source

    @metrics_source.setter
    def metrics_source(self, source: MetricsSource | None) -> None:
        self.reporter.metrics_source = source

    def advance(
        self,
        event: EnclaveEvent,
        *,
        accounts: int | Keep | None = KEEP,
        sha256: str | Keep | None = KEEP,
        preload_ms: int | Keep | None = KEEP,
    ) -> EnclaveState:
        """Move the lifecycle by ``event`` (``PRELOAD``, ``READY``, ``DRAIN`` or ``UNDRAIN``) and
        report the new state; never blocks. ``accounts``, ``sha256`` and ``preload_ms`` go with
        the state (``READY`` carries them) and are kept afterwards.

        Error handling: :class:`~trio_sign.enclave.LifecycleError` for a move the lifecycle
        does not allow (a bug); ``ValueError`` for ``STOP``, ``FAIL`` and ``EXIT``, which only
        :meth:`close` makes.
        """
        if event in (EnclaveEvent.STOP, EnclaveEvent.FAIL, EnclaveEvent.EXIT):
            raise ValueError(f"{event.value!r} is the link's to make: call close()")
        state = self.lifecycle.process(event)
        assert state.wire is not None
        self.reporter.set_state(state.wire, accounts=accounts, sha256=sha256, preload_ms=preload_ms)
        return state

    def set_memory_level(self, level: str) -> None:
        """The memory watermark's level, shown in the serving state's reason."""
        self.reporter.set_memory_level(level)

    async def run(
        self, *, task_status: trio.TaskStatus[ParentLink] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the channels until :meth:`close` has finished.

        Readiness: ``started(self)`` at once (boot never waits for the parent); the log
        handler is attached to the ``trio_sign`` logger before, detached on the way out.

        Cancellation: shielded. The channels must outlive the services whatever cancels them,
        so only :meth:`close` ends this; call it on every path (``finally``).

        Error handling: the channels retry their connections forever and raise only for bugs.
        """
        if self._running or self.closed:
            raise RuntimeError("ParentLink.run may run once")
        self._running = True
        handler = self.log_handler
        initial_s, max_s, connect_timeout_s = self._backoff
        if handler is not None:
            attach_log_handler(handler)
        try:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as nursery:
                    if self._status_connect is not None:
                        await nursery.start(
                            functools.partial(
                                run_status_channel,
                                self._status_connect,
                                self.reporter,
                                backoff_initial_s=initial_s,
                                backoff_max_s=max_s,
                                connect_timeout_s=connect_timeout_s,
                                rng=self._rng,
                                hurry=self._hurry,
                            )
                        )
                    if handler is not None and self._log_connect is not None:
                        await nursery.start(
                            functools.partial(
                                run_log_channel,
                                self._log_connect,
                                handler,
                                backoff_initial_s=initial_s,
                                backoff_max_s=max_s,
                                connect_timeout_s=connect_timeout_s,
                                rng=self._rng,
                                hurry=self._hurry,
                            )
                        )
                    task_status.started(self)
                    await self._closed.wait()
                    nursery.cancel_scope.cancel()
        finally:
            if handler is not None:
                detach_log_handler(handler)

    async def close(self, code: int, *, reason: str | None = None) -> bool:
        """The process's last words: the final state, ``exit(code)``, then the last log lines.

        ``code`` 0 ends the lifecycle with ``exiting``; any other code with ``failed`` and
        ``reason`` (the stable reason of :class:`~trio_sign.enclave.EnclaveExit`). Log what
        should reach the parent (why it failed) *before* calling this. The log lines are
        flushed only if the exit frame got through: if the parent did not take that, it is
        gone, and waiting for it twice would only delay the exit. Then the channels stop and
        the lifecycle is ``exited``. Idempotent: a second call returns the first's result.

        Returns True if the ``exit`` frame was written to the status channel.

        Cancellation: shielded; returns within ``2 * final_report_timeout_s``.

        Error handling: none raised for the parent being away (that just uses up the time).
        """
        if self.closed:
            return self._delivered
        try:
            state = self.lifecycle.state
            if state not in FINAL_STATES:
                event = EnclaveEvent.STOP if code == 0 else EnclaveEvent.FAIL
                state = self.lifecycle.process(event)
            assert state.wire is not None
            self.reporter.set_state(
                state.wire, reason=reason if state is EnclaveState.FAILED else None
            )
            self.reporter.request_exit(code)
            self._hurry.set()
            timeout = self.final_report_timeout_s
            if self._status_connect is not None and self._running:
                with trio.move_on_after(timeout, shield=True):
                    self._delivered = await self.reporter.wait_exit_delivered()
                if not self._delivered:
                    log.warning(
                        "final state %r and exit code %d not delivered within %s s",
                        state.value,
                        code,
                        timeout,
                    )
            handler = self.log_handler
            if self._delivered and handler is not None:
                with trio.move_on_after(timeout, shield=True):
                    await handler.wait_flushed()
            self.lifecycle.process(EnclaveEvent.EXIT)
        finally:
            self._closed.set()
        return self._delivered

    def __repr__(self) -> str:
        return f"<ParentLink {self.lifecycle.state.value}>"


__all__ = ["DEFAULT_FINAL_REPORT_TIMEOUT_S", "ParentLink"]
