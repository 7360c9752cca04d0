"""DESIGN §5 events onto the enclave: ``probe``, ``abort``, ``freeze``, ``unfreeze``, ``drain``,
``undrain``.

The handler never raises for what the gateway sent: bad JSON, wrong types and unknown event types
are logged and ignored, so a gateway bug cannot take the enclave down. Nothing an event carries
grows without bound: ``freeze`` adds only accounts the enclave holds (or, for a target that
cannot tell, at most ``max_frozen_accounts``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Final, Protocol, runtime_checkable

from .._errors import TrioSignError
from ..rpc import LogThrottle
from ._events import MessageEvent

log = logging.getLogger("trio_sign.sse")

#: Longest id (nonce, session id, account id) accepted in an event, in characters.
MAX_EVENT_ID_LENGTH: Final = 1024
#: Most account ids frozen at once on a target that cannot say which accounts exist (one
#: without ``has_account``); further ``freeze`` events are ignored with a warning. The
#: enclave's service can say, so its frozen set is bounded by its store instead.
MAX_FROZEN_ACCOUNTS: Final = 100_000
#: At most one warning per this many seconds about ``freeze`` events ignored at the cap.
FROZEN_CAP_WARNING_INTERVAL_S: Final = 60.0


class SessionAborter(Protocol):
    """The part of the session pool the handler uses."""

    def abort(self, session_id: str) -> None:
        """Drop the session; raise a ``TrioSignError`` whose ``kind.value`` is ``"not_found"``
        if there is no such session, or ``"invalid_argument"`` if there could be none (a
        session id over the pool's length limit), as :class:`trio_sign.enclave.PoolError`
        does."""


class SseControlled(Protocol):
    """What the enclave exposes to the gateway's events; :class:`trio_sign.enclave.SignService`
    satisfies it."""

    frozen: set[str]
    last_sse_probe: str

    @property
    def pool(self) -> SessionAborter: ...

    def start_draining(self, *, reversible: bool = False) -> None:
        """Stop taking new sessions; ``reversible`` (the gateway's ``drain``) may be undone by
        :meth:`stop_draining`, a drain for good (the process is stopping) may not."""

    def stop_draining(self) -> bool:
        """Take new sessions again after a reversible drain; False if the drain is for good."""


@runtime_checkable
class AccountDirectory(Protocol):
    """Optional on an :class:`SseControlled` target: which accounts exist. When the target has
    it (:class:`trio_sign.enclave.SignService` does), ``freeze`` of any other id is ignored."""

    def has_account(self, account_id: str) -> bool: ...


class SseEventHandler:
    """Apply gateway events to an :class:`SseControlled`; pass it as ``on_event``.

    Args:
        target: what the events act on.
        max_frozen_accounts: the cap on ``target.frozen`` when the target is not an
            :class:`AccountDirectory` (default :data:`MAX_FROZEN_ACCOUNTS`).
        clock: seconds, for spacing the warnings about the cap (``time.monotonic``).

    Error handling: never raises for bad input; logs a warning (ids and sizes only) and ignores
    the event. Aborting an unknown or expired session is normal (the gateway may abort a session
    that never reached this node) and logged at debug, as is freezing an account this enclave
    does not hold (its store is fixed once loaded, so such an account can never sign here).
    Freezes ignored at the cap are logged at warning at most once per
    :data:`FROZEN_CAP_WARNING_INTERVAL_S`, and counted in ``freezes_ignored_at_cap``.
    """

    def __init__(
        self,
        target: SseControlled,
        *,
        max_frozen_accounts: int = MAX_FROZEN_ACCOUNTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_frozen_accounts < 1:
            raise ValueError("max_frozen_accounts must be >= 1")
        self._target = target
        self._has_account = target.has_account if isinstance(target, AccountDirectory) else None
        self._max_frozen = max_frozen_accounts
        self._cap_log = LogThrottle(FROZEN_CAP_WARNING_INTERVAL_S, clock)
        self.freezes_ignored_at_cap = 0

    def __call__(self, event: MessageEvent) -> None:
        handler = _HANDLERS.get(event.type)
        if handler is None:
            log.info(
                "sse: ignoring unknown event type %r (id %.80r)", event.type, event.last_event_id
            )
            return
        field = _FIELDS[event.type]
        try:
            payload = json.loads(event.data)
        except ValueError:
            log.warning(
                "sse: %s event (id %.80r) is not JSON (%d characters); ignored",
                event.type,
                event.last_event_id,
                len(event.data),
            )
            return
        if not isinstance(payload, dict):
            log.warning(
                "sse: %s event (id %.80r) is not a JSON object; ignored",
                event.type,
                event.last_event_id,
            )
            return
        value = ""
        if field is not None:
            raw = payload.get(field)
            if not isinstance(raw, str) or not raw or len(raw) > MAX_EVENT_ID_LENGTH:
                log.warning(
                    "sse: %s event (id %.80r): %r must be a non-empty string of at most %d"
                    " characters; ignored",
                    event.type,
                    event.last_event_id,
                    field,
                    MAX_EVENT_ID_LENGTH,
                )
                return
            value = raw
        handler(self, value, event)

    def _probe(self, nonce: str, event: MessageEvent) -> None:
        self._target.last_sse_probe = nonce
        log.debug(
            "sse: probe (event id %.80r, nonce of %d characters)", event.last_event_id, len(nonce)
        )

    def _abort(self, session_id: str, event: MessageEvent) -> None:
        try:
            self._target.pool.abort(session_id)
        except TrioSignError as exc:
            kind = getattr(getattr(exc, "kind", None), "value", None)
            if kind in ("not_found", "invalid_argument"):
                # A session id the pool could never have opened (too long) is as unknown as
                # an expired one: not worth a warning per event.
                log.debug("sse: abort of unknown session %r ignored (%s)", session_id, kind)
                return
            log.warning("sse: abort of session %r refused: %s", session_id, exc)
            return
        log.info("sse: aborted session %r (event id %.80r)", session_id, event.last_event_id)

    def _freeze(self, account_id: str, event: MessageEvent) -> None:
        frozen = self._target.frozen
        if account_id in frozen:
            log.debug(
                "sse: account %r already frozen (event id %.80r)", account_id, event.last_event_id
            )
            return
        if self._has_account is not None:
            if not self._has_account(account_id):
                log.debug(
                    "sse: freeze of unknown account %r ignored (event id %.80r)",
                    account_id,
                    event.last_event_id,
                )
                return
        elif len(frozen) >= self._max_frozen:
            self._ignored_at_cap(account_id, event)
            return
        frozen.add(account_id)
        log.info("sse: froze account %r (event id %.80r)", account_id, event.last_event_id)

    def _ignored_at_cap(self, account_id: str, event: MessageEvent) -> None:
        self.freezes_ignored_at_cap += 1
        if self._cap_log.allow() is None:
            log.debug("sse: freeze of account %r ignored at the cap", account_id)
            return
        log.warning(
            "sse: %d accounts frozen (max_frozen_accounts); ignoring freeze events for other "
            "accounts (%d so far, latest id %.80r)",
            self._max_frozen,
            self.freezes_ignored_at_cap,
            event.last_event_id,
        )

    def _unfreeze(self, account_id: str, event: MessageEvent) -> None:
        self._target.frozen.discard(account_id)
        log.info("sse: unfroze account %r (event id %.80r)", account_id, event.last_event_id)

    def _drain(self, _value: str, event: MessageEvent) -> None:
        log.warning("sse: drain requested by the gateway (event id %.80r)", event.last_event_id)
        self._target.start_draining(reversible=True)

    def _undrain(self, _value: str, event: MessageEvent) -> None:
        if self._target.stop_draining():
            log.warning(
                "sse: undrain requested by the gateway: taking new sessions (event id %.80r)",
                event.last_event_id,
            )
        else:
            log.warning(
                "sse: undrain ignored: this enclave is stopping (event id %.80r)",
                event.last_event_id,
            )


_HANDLERS: Final[dict[str, Callable[[SseEventHandler, str, MessageEvent], None]]] = {
    "probe": SseEventHandler._probe,
    "abort": SseEventHandler._abort,
    "freeze": SseEventHandler._freeze,
    "unfreeze": SseEventHandler._unfreeze,
    "drain": SseEventHandler._drain,
    "undrain": SseEventHandler._undrain,
}
_FIELDS: Final[dict[str, str | None]] = {
    "probe": "nonce",
    "abort": "session_id",
    "freeze": "account_id",
    "unfreeze": "account_id",
    "drain": None,
    "undrain": None,
}
