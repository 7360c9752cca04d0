"""DESIGN §5 events onto the enclave: ``probe``, ``abort``, ``freeze``, ``unfreeze``, ``drain``.

The handler never raises for what the gateway sent: bad JSON, wrong types and unknown event types
are logged and ignored, so a gateway bug cannot take the enclave down.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Final, Protocol

from .._errors import TrioSignError
from ._events import MessageEvent

log = logging.getLogger("trio_sign.sse")

#: Longest id (nonce, session id, account id) accepted in an event, in characters.
MAX_EVENT_ID_LENGTH: Final = 1024


class SessionAborter(Protocol):
    """The part of the session pool the handler uses."""

    def abort(self, session_id: str) -> None:
        """Drop the session; raise a ``TrioSignError`` whose ``kind.value`` is ``"not_found"``
        if there is no such session (as :class:`trio_sign.enclave.PoolError` does)."""


class SseControlled(Protocol):
    """What the enclave exposes to the gateway's events; :class:`trio_sign.enclave.SignService`
    satisfies it."""

    frozen: set[str]
    last_sse_probe: str

    @property
    def pool(self) -> SessionAborter: ...

    def start_draining(self) -> None: ...


class SseEventHandler:
    """Apply gateway events to an :class:`SseControlled`; pass it as ``on_event``.

    Error handling: never raises for bad input; logs a warning (ids and sizes only) and ignores
    the event. Aborting an unknown or expired session is normal (the gateway may abort a session
    that never reached this node) and logged at debug.
    """

    def __init__(self, target: SseControlled) -> None:
        self._target = target

    def __call__(self, event: MessageEvent) -> None:
        handler = _HANDLERS.get(event.type)
        if handler is None:
            log.info("sse: ignoring unknown event type %r (id %r)", event.type, event.last_event_id)
            return
        field = _FIELDS[event.type]
        try:
            payload = json.loads(event.data)
        except ValueError:
            log.warning(
                "sse: %s event (id %r) is not JSON (%d characters); ignored",
                event.type,
                event.last_event_id,
                len(event.data),
            )
            return
        if not isinstance(payload, dict):
            log.warning(
                "sse: %s event (id %r) is not a JSON object; ignored",
                event.type,
                event.last_event_id,
            )
            return
        value = ""
        if field is not None:
            raw = payload.get(field)
            if not isinstance(raw, str) or not raw or len(raw) > MAX_EVENT_ID_LENGTH:
                log.warning(
                    "sse: %s event (id %r): %r must be a non-empty string of at most %d"
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
        log.debug("sse: probe (id %r, %d characters)", event.last_event_id, len(nonce))

    def _abort(self, session_id: str, event: MessageEvent) -> None:
        try:
            self._target.pool.abort(session_id)
        except TrioSignError as exc:
            kind = getattr(getattr(exc, "kind", None), "value", None)
            if kind == "not_found":
                log.debug("sse: abort of unknown session %r ignored", session_id)
                return
            log.warning("sse: abort of session %r refused: %s", session_id, exc)
            return
        log.info("sse: aborted session %r (event id %r)", session_id, event.last_event_id)

    def _freeze(self, account_id: str, event: MessageEvent) -> None:
        self._target.frozen.add(account_id)
        log.info("sse: froze account %r (event id %r)", account_id, event.last_event_id)

    def _unfreeze(self, account_id: str, event: MessageEvent) -> None:
        self._target.frozen.discard(account_id)
        log.info("sse: unfroze account %r (event id %r)", account_id, event.last_event_id)

    def _drain(self, _value: str, event: MessageEvent) -> None:
        log.warning("sse: drain requested by the gateway (event id %r)", event.last_event_id)
        self._target.start_draining()


_HANDLERS: Final[dict[str, Callable[[SseEventHandler, str, MessageEvent], None]]] = {
    "probe": SseEventHandler._probe,
    "abort": SseEventHandler._abort,
    "freeze": SseEventHandler._freeze,
    "unfreeze": SseEventHandler._unfreeze,
    "drain": SseEventHandler._drain,
}
_FIELDS: Final[dict[str, str | None]] = {
    "probe": "nonce",
    "abort": "session_id",
    "freeze": "account_id",
    "unfreeze": "account_id",
    "drain": None,
}
