"""The parent's attestation gate: forward nothing to an enclave it has not just verified.

`AttestationGate.check` asks the enclave's ``GetAttestation`` for a document bound to a fresh
32-byte random nonce and verifies it (:func:`trio_sign.nitro.verify_attestation`): the ES384
COSE signature, the chain to the pinned root (the AWS Nitro root; the local CA in local mode),
certificate validity, the nonce, freshness, PCR0/1/2 (and any other pinned index, e.g. PCR8)
and the debug-mode policy. `run_attestation_gate` repeats the check every ``interval_s``.

While the gate is not verified the ingress proxy forwards nothing: new connections are closed
right after the TLS handshake, and connections that were being forwarded when a check failed
are closed (`AttestationGate.wait_revoked`). A later check that passes opens the gate again.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Final

import trio
from google.protobuf.message import DecodeError

from proto_min import sign_service_pb2 as pb

from ..nitro import (
    AttestationError,
    BindingError,
    VerifiedAttestation,
    decode_binding,
    verify_attestation,
)
from ..rpc import GrpcProtocolError, RpcError, open_grpc_channel
from ..transport import TransportError

log = logging.getLogger("trio_sign.parent.attestation")

GET_ATTESTATION: Final = "/trio_sign.v1.SignService/GetAttestation"
#: Bytes of the random nonce sent with every check.
NONCE_BYTES: Final = 32
#: PCRs that must always be pinned: image, kernel+boot, application.
REQUIRED_PCRS: Final = frozenset({0, 1, 2})
#: ``AttestationGate.last_failure`` codes beyond :data:`trio_sign.nitro.REASONS`.
GATE_REASONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "unreachable": "the enclave could not be connected to, or GetAttestation failed",
        "timeout": "the check did not finish within check_timeout_s",
        "bad_response": "the GetAttestation response is not a valid message",
        "shares_mismatch": "the enclave bound another shares fingerprint than the pinned one",
    }
)

ConnectEnclave = Callable[[], Awaitable[trio.abc.Stream]]
OnAlert = Callable[[str, str], None]
Clock = Callable[[], datetime]


@dataclass(frozen=True)
class AttestationPolicy:
    """What an enclave must prove before the parent forwards traffic to it.

    Attributes:
        root_pem: the root to pin, PEM (the AWS Nitro Enclaves root in production, the local
            NSM's root in local mode).
        pcrs: index -> exact value; must include 0, 1 and 2 (add 8 for a signed EIF).
        allow_debug: accept a debug-mode enclave (PCR0/1/2 all zero). Never in production:
            a debug enclave's memory can be read by the parent.
        max_age_s: the document's timestamp must be within this many seconds of the check.
        check_timeout_s: bound on one whole check (connect, call, verify).
        shares_sha256: when set (hex), the ``shares`` digest of the enclave's binding
            (``user_data``, DESIGN §4) must be exactly this fingerprint of the sealed bundle:
            the enclave loaded the shares the parent served.
    """

    root_pem: bytes | str
    pcrs: Mapping[int, bytes]
    allow_debug: bool = False
    max_age_s: float = 60.0
    check_timeout_s: float = 10.0
    shares_sha256: str | None = None

    def __post_init__(self) -> None:
        missing = REQUIRED_PCRS - set(self.pcrs)
        if missing:
            raise ValueError(
                f"attestation policy: pin PCR{', PCR'.join(map(str, sorted(missing)))} "
                "(set the pinned PCR values in the parent config)"
            )
        for index, value in self.pcrs.items():
            if len(value) not in (32, 48, 64):
                raise ValueError(
                    f"attestation policy: pinned PCR{index} is {len(value)} bytes "
                    "(expected 48, hex-encoded SHA-384 in the parent config)"
                )
        if not self.allow_debug and not any(any(self.pcrs[i]) for i in REQUIRED_PCRS):
            raise ValueError(
                "attestation policy: the pinned PCR0/1/2 are all zero, a debug-mode enclave's; "
                "pin the EIF's measurements (or set allow_debug for development only)"
            )
        if self.shares_sha256 is not None and (
            len(self.shares_sha256) != 64 or not _is_hex(self.shares_sha256)
        ):
            raise ValueError("attestation policy: shares_sha256 must be 64 hex digits")
        if self.max_age_s <= 0 or self.check_timeout_s <= 0:
            raise ValueError("attestation policy: max_age_s and check_timeout_s must be > 0")
        object.__setattr__(
            self, "pcrs", MappingProxyType({i: bytes(v) for i, v in self.pcrs.items()})
        )


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


@dataclass(eq=False)
class AttestationGate:
    """The attestation state the ingress proxy consults before forwarding.

    Args:
        policy: what to require (see `AttestationPolicy`). May be replaced at run time (a
            config reload); the next check uses the new one.
        connect_enclave: opens a new stream to the enclave's gRPC port (vsock in production).
        on_alert: called as ``on_alert(reason, message)`` after every failed check (must not
            block; hand off to a channel if it needs to await). It is then the only report of
            the failure (without it, the gate logs an ERROR with ``alert`` itself).
        clock: the wall clock the documents are checked at; default UTC now.

    Attributes:
        verified: the last check passed; forwarding is allowed.
        last_attestation: the last document that passed, verified, or None.
        last_failure: the reason code of the last failed check (None after a pass).
        last_checked: when the last check finished (from ``clock``), or None.
        shares_sha256: hex of the ``shares`` digest the enclave bound (its bundle fingerprint)
            in the last passing document, or None.
        checks: how many checks finished.
    """

    policy: AttestationPolicy
    connect_enclave: ConnectEnclave
    on_alert: OnAlert | None = None
    clock: Clock = field(default=lambda: datetime.now(UTC))
    verified: bool = field(default=False, init=False)
    last_attestation: VerifiedAttestation | None = field(default=None, init=False)
    last_failure: str | None = field(default=None, init=False)
    last_checked: datetime | None = field(default=None, init=False)
    shares_sha256: str | None = field(default=None, init=False)
    checks: int = field(default=0, init=False)
    _revoked: trio.Event = field(default_factory=trio.Event, init=False, repr=False)
    _opened: trio.Event = field(default_factory=trio.Event, init=False, repr=False)

    async def wait_verified(self) -> None:
        """Return when the gate is open (a check passed), or at once if it is."""
        while not self.verified:
            await self._opened.wait()

    async def wait_revoked(self) -> None:
        """Return when the gate closes (a check fails), or at once if it is not verified."""
        if not self.verified:
            return
        await self._revoked.wait()

    async def check(self) -> bool:
        """Fetch a fresh document from the enclave, verify it, and update the gate.

        Returns:
            True if the enclave passed (the gate is open).

        Error handling: every failure (unreachable enclave, timeout, malformed response,
        refused document) closes the gate, is logged at ERROR with ``alert`` =
        ``"attestation_failed"`` and ``reason``, and is passed to ``on_alert``; nothing is
        raised (except what ``on_alert`` itself raises: a bug, left to fail the tree).

        Cancellation: a cancelled check leaves the gate as it was.
        """
        policy = self.policy
        nonce = secrets.token_bytes(NONCE_BYTES)
        result: VerifiedAttestation | tuple[str, str]
        with trio.move_on_after(policy.check_timeout_s) as scope:
            result = await self._fetch_and_verify(policy, nonce)
        if scope.cancelled_caught:
            result = ("timeout", f"no verified attestation within {policy.check_timeout_s} s")
        self.checks += 1
        self.last_checked = self.clock()
        if isinstance(result, VerifiedAttestation):
            self._pass(result)
            return True
        self._fail(*result)
        return False

    async def _fetch_and_verify(
        self, policy: AttestationPolicy, nonce: bytes
    ) -> VerifiedAttestation | tuple[str, str]:
        request = pb.GetAttestationRequest(nonce=nonce).SerializeToString()
        try:
            stream = await self.connect_enclave()
            async with open_grpc_channel(stream) as channel:
                try:
                    raw = await channel.unary_unary(GET_ATTESTATION, request)
                except RpcError as exc:
                    return ("unreachable", f"GetAttestation failed: {exc}")
        # The channel's nursery may wrap a broken connection in an ExceptionGroup (never
        # Cancelled: that is a BaseException and is not caught here).
        except (TransportError, GrpcProtocolError, OSError, trio.BrokenResourceError) as exc:
            return ("unreachable", f"{type(exc).__name__}: {exc}")
        except ExceptionGroup as group:
            return ("unreachable", f"connection to the enclave failed: {group!r}")
        try:
            document = pb.GetAttestationResponse.FromString(raw).document
        except DecodeError as exc:
            return ("bad_response", f"GetAttestationResponse does not decode: {exc}")
        try:
            verified = verify_attestation(
                document,
                root_pem=policy.root_pem,
                # A live check: certificates must be valid now, and the document must be
                # from now (max_age) and answer our nonce. Using "now" rather than the
                # document's own timestamp means a leaf-signed time is never trusted.
                at=self.clock(),
                expected_pcrs=policy.pcrs,
                expected_nonce=nonce,
                production=not policy.allow_debug,
                max_age=timedelta(seconds=policy.max_age_s),
            )
        except AttestationError as exc:
            return (exc.reason, exc.message)
        if policy.shares_sha256 is not None:
            # user_data is the binding map of DESIGN §4 (shares, deltas, config digests).
            try:
                bound = decode_binding(verified.user_data).shares.hex()
            except BindingError as exc:
                return ("shares_mismatch", f"the enclave bound no shares fingerprint: {exc}")
            if bound != policy.shares_sha256.lower():
                return (
                    "shares_mismatch",
                    f"the enclave bound {bound[:16]}, expected shares_sha256 "
                    f"{policy.shares_sha256[:16]}",
                )
        return verified

    def _pass(self, verified: VerifiedAttestation) -> None:
        was = self.verified
        self.verified = True
        self._opened.set()
        self._opened = trio.Event()
        self.last_attestation = verified
        self.last_failure = None
        try:
            self.shares_sha256 = decode_binding(verified.user_data).shares.hex()
        except BindingError:
            self.shares_sha256 = None
        log.log(
            logging.INFO if not was else logging.DEBUG,
            "enclave attestation verified; forwarding %s",
            "enabled" if not was else "continues",
            extra={
                "module_id": verified.module_id,
                "shares_sha256": self.shares_sha256,
                "debug_mode": verified.debug_mode,
                "document_timestamp_ms": verified.timestamp_ms,
            },
        )

    def _fail(self, reason: str, message: str) -> None:
        if self.verified:
            self.verified = False
            self._revoked.set()
            self._revoked = trio.Event()
        self.last_failure = reason
        if self.on_alert is not None:
            self.on_alert(reason, message)  # the owner's alert is the one log line
            return
        log.error(
            "enclave attestation failed (%s): forwarding stopped: %s",
            reason,
            message,
            extra={"alert": "attestation_failed", "reason": reason},
        )


async def run_attestation_gate(
    gate: AttestationGate,
    *,
    interval_s: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Check the enclave now and then every ``interval_s`` seconds, forever.

    ``task_status.started()`` is called once the first check has finished, whether it passed
    or not (``gate.verified`` says which; readiness is reported separately).

    Cancellation: stops between or during checks; the gate keeps its last state.
    """
    if interval_s <= 0:
        raise ValueError("interval_s must be > 0")
    await gate.check()
    task_status.started()
    while True:
        await trio.sleep(interval_s)
        await gate.check()
