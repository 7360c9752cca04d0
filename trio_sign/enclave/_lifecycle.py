"""The enclave process's lifecycle: states, events and the one table that links them.

Modelled on h11's ``_state.py``: the states and the events are enums, every legal move is one
entry of :data:`TRANSITIONS`, and anything else raises :class:`LifecycleError` (a bug in the
enclave's code, which must fail loudly in tests rather than report a state that is not true)::

    booting ──PRELOAD──▶ preloading ──READY──▶ serving ──DRAIN──▶ draining
       │                     │                    │ ◀──UNDRAIN───────┤
       │                     │                    │                  │
       └──────── STOP (exiting) / FAIL (failed), from any of these ──┘
                                     │
    exiting ──EXIT──▶ exited ◀──EXIT── failed

``exited`` is the process's own last state: the status channel carries the ``exit`` frame
instead of a state for it, so :attr:`EnclaveState.wire` is None there. Every other state's
value is exactly the string the status channel and the parent's ``/readyz`` use
(:data:`trio_sign.nitro._channel.STATES`).

No I/O and no Trio: :class:`EnclaveLifecycle` is a plain object the enclave's tree drives and
reads (through :class:`~trio_sign.enclave.ParentLink`, which sends each state to the parent).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from .._errors import InternalError


class EnclaveState(enum.Enum):
    """Where the enclave process is in its life. The values are the status channel's states."""

    BOOTING = "booting"
    PRELOADING = "preloading"
    SERVING = "serving"
    DRAINING = "draining"
    EXITING = "exiting"
    FAILED = "failed"
    EXITED = "exited"

    @property
    def wire(self) -> str | None:
        """The state as sent on the status channel; None for ``exited`` (an ``exit`` frame)."""
        return None if self is EnclaveState.EXITED else self.value


class EnclaveEvent(enum.Enum):
    """What happens to the enclave; each moves the lifecycle along :data:`TRANSITIONS`."""

    PRELOAD = "preload"  # the shares start loading (attested preload, or the dev file)
    READY = "ready"  # the shares are loaded and the gRPC server listens
    DRAIN = "drain"  # SIGTERM, the parent's drain, or the gateway's SSE drain
    UNDRAIN = "undrain"  # the gateway's SSE undrain ends a drain it asked for
    STOP = "stop"  # the tree ended without a failure (after a drain, or cancelled)
    FAIL = "fail"  # the tree ended with a failure (exit code and reason known)
    EXIT = "exit"  # the last words were given (or their time ran out)


_S = EnclaveState
_E = EnclaveEvent

#: Every legal move: ``(state, event) -> next state``. Nothing else is allowed.
TRANSITIONS: Final[Mapping[tuple[EnclaveState, EnclaveEvent], EnclaveState]] = MappingProxyType(
    {
        (_S.BOOTING, _E.PRELOAD): _S.PRELOADING,
        (_S.BOOTING, _E.STOP): _S.EXITING,
        (_S.BOOTING, _E.FAIL): _S.FAILED,
        (_S.PRELOADING, _E.READY): _S.SERVING,
        (_S.PRELOADING, _E.STOP): _S.EXITING,
        (_S.PRELOADING, _E.FAIL): _S.FAILED,
        (_S.SERVING, _E.DRAIN): _S.DRAINING,
        (_S.SERVING, _E.STOP): _S.EXITING,
        (_S.SERVING, _E.FAIL): _S.FAILED,
        (_S.DRAINING, _E.UNDRAIN): _S.SERVING,
        (_S.DRAINING, _E.STOP): _S.EXITING,
        (_S.DRAINING, _E.FAIL): _S.FAILED,
        (_S.EXITING, _E.EXIT): _S.EXITED,
        (_S.FAILED, _E.EXIT): _S.EXITED,
    }
)

#: States in which the process is still running its services (or about to).
LIVE_STATES: Final = frozenset({_S.BOOTING, _S.PRELOADING, _S.SERVING, _S.DRAINING})
#: States that only the last words follow.
FINAL_STATES: Final = frozenset({_S.EXITING, _S.FAILED})


class LifecycleError(InternalError):
    """An event the current state does not allow: a bug in the enclave's code.

    Attributes:
        state: the state the lifecycle was in (unchanged).
        event: the event that was refused.
    """

    def __init__(self, state: EnclaveState, event: EnclaveEvent) -> None:
        allowed = sorted(e.value for (s, e) in TRANSITIONS if s is state)
        super().__init__(
            f"enclave lifecycle: {event.value!r} is not allowed in state {state.value!r}"
            f" (allowed: {', '.join(allowed) or 'nothing'})"
        )
        self.state = state
        self.event = event


class EnclaveLifecycle:
    """The enclave's current :class:`EnclaveState`, moved only by :meth:`process`.

    Attributes:
        state: the current state (starts at ``booting``).
        history: every state so far, in order (a handful; the process lives once).
    """

    __slots__ = ("history", "state")

    def __init__(self) -> None:
        self.state = EnclaveState.BOOTING
        self.history: list[EnclaveState] = [self.state]

    def can(self, event: EnclaveEvent) -> bool:
        """True if :meth:`process` would accept ``event`` now."""
        return (self.state, event) in TRANSITIONS

    def process(self, event: EnclaveEvent) -> EnclaveState:
        """Apply ``event``; return the new state.

        Error handling: :class:`LifecycleError` if the table has no entry for the current state
        and ``event``; the state does not change then.
        """
        try:
            new = TRANSITIONS[self.state, event]
        except KeyError:
            raise LifecycleError(self.state, event) from None
        self.state = new
        self.history.append(new)
        return new

    def __repr__(self) -> str:
        return f"<EnclaveLifecycle {self.state.value}>"


__all__ = [
    "FINAL_STATES",
    "LIVE_STATES",
    "TRANSITIONS",
    "EnclaveEvent",
    "EnclaveLifecycle",
    "EnclaveState",
    "LifecycleError",
]
