"""The gateway's FROST coordination: one signature from the enclave and the local
counterpart participant(s), in the account's ciphersuite (DESIGN §14).

A signature is one *session* on one enclave node:

1. pick a node (`Coordinator` routing below) and a fresh random ``session_id``;
2. ``GetAccount`` (cached per account): the enclave's identifier, verifying share, group key
   and ``ciphersuite``, which must be the counterpart shares' own (a mismatch is refused as
   ``ciphersuite_mismatch``); the suite's :class:`~trio_sign.crypto.Scheme` does the rest;
3. ``Commit`` on the enclave and ``scheme.commit`` locally for every counterpart share;
4. sort the commitment list by identifier (the suite's order); ``Sign`` on the enclave (with
   ``taproot_merkle_root`` when the caller gave one), ``scheme.sign`` locally (with the same
   root);
5. ``scheme.aggregate`` with the verifying shares (the enclave's from ``GetAccount``, the
   counterparts' from their share files): every share is checked against its verifying share
   and a faulty one is named; then the final signature is checked with the suite's independent
   verifier (``scheme.verify``: libsodium for Ed25519, libsecp256k1's BIP-340 verification
   against the tweaked x-only output key for Taproot, RFC 9591 for plain secp256k1) before
   it is returned.

A Taproot merkle root (``taproot_merkle_root``: ``None`` for no tweak, ``b""`` or 32 bytes for
the BIP-341 tweak, as ZF ``sign_with_tweak``) applies only to ``FROST-secp256k1-SHA256-TR-v1``
accounts; for any other account it is refused before any call (``bad_merkle_root``). The
signature then verifies under ``Signature.verifying_key``, the x-only output key.

Approvals (DESIGN §11): the enclave signs only when ``Sign`` carries approvals that satisfy
the account's policy. Every ``Sign`` carries the caller's approvals (``sign_message(...,
approvals=, session_id=)``: an approval names its session, so a caller who brings approvals
also names the session they approve) and, with a `GatewayApprover`, this gateway's own, one per
key it holds that the caller did not bring. A refusal (PERMISSION_DENIED) is ``not_authorized``
with the enclave's reason; the session is aborted, so a corrected request may reuse its id.

Any failure once ``Commit`` was sent aborts the session on the enclave (best effort, shielded,
bounded by the node's ``abort_timeout_s``) so its pool slot and nonces are freed at once
instead of at the session TTL.

Retries (DESIGN §4): a ``Sign`` that failed UNAVAILABLE or DEADLINE_EXCEEDED is retried
byte-identically on the same session (the enclave answers the same share, or consumes the
nonces exactly once if the first attempt never arrived). Other transient failures
(UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED at ``Commit``, NOT_FOUND at ``Sign``: the
session expired or the enclave restarted) abort the session and start a new one, preferably on
another node, up to ``max_sessions_per_signature``. Refusals that a new session would not fix
(INVALID_ARGUMENT, FAILED_PRECONDITION such as a frozen account, a bad share) are raised.

Routing: Scheme A preloads every account into every enclave of a deployment, so any node can
sign for any account. The coordinator picks, among the nodes not evicted by the prober, a
healthy one with the fewest sessions in flight (failing-but-not-yet-evicted nodes only if no
healthy one is left). Sharding accounts across enclave groups is future work: it would replace
`Coordinator._choose_node` with a lookup from account to node group.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from .._errors import FrostError, InvalidSignatureShareError, ShareFileError, TrioSignError
from ..crypto import Scheme, scheme_by_name
from ..rpc import RpcError, StatusCode
from ..shares import AccountShare, ShareStore
from ._accounts import AccountRegistry, RegisteredAccount, RemoteHolder
from ._approvals import Approval, GatewayApprover
from ._node import EnclaveNode
from ._participants import (
    ParticipantCommitment,
    ParticipantError,
    ParticipantHub,
    ParticipantShare,
    check_signature_share,
    commitment_entries,
)

log = logging.getLogger("trio_sign.gateway.coordinator")

#: The stable reasons of `GatewayError`.
GATEWAY_REASONS = frozenset(
    {
        "no_healthy_node",
        "enclave_refused",
        "bad_share",
        "verify_failed",
        "unknown_account",
        "key_mismatch",
        "too_few_signers",
        "not_authorized",
        "ciphersuite_mismatch",
        "bad_merkle_root",
        "participant_failed",
    }
)
#: The length of a BIP-341 merkle root (a TapBranch hash); an empty root is allowed too.
MERKLE_ROOT_BYTES: Final = 32

_SIGN_RETRY = frozenset({StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED})
_NEW_SESSION_AT_COMMIT = frozenset(
    {StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED, StatusCode.RESOURCE_EXHAUSTED}
)
_NEW_SESSION_AT_SIGN = frozenset(
    {StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED, StatusCode.NOT_FOUND}
)


class GatewayError(TrioSignError):
    """A signature could not be produced.

    Attributes:
        reason: a stable code: ``no_healthy_node`` (every node evicted or unreachable),
            ``enclave_refused`` (a gRPC refusal, see ``status``), ``bad_share`` (a signature
            share or commitment failed verification; ``identifier`` names whose),
            ``verify_failed`` (the aggregate did not verify, with no share to blame),
            ``unknown_account`` (no counterpart share, or the enclave does not know it),
            ``key_mismatch`` (the enclave's group key for the account differs from the
            counterparts'), ``too_few_signers`` (fewer participants than ``min_signers``),
            ``not_authorized`` (the enclave refused ``Sign`` with PERMISSION_DENIED: the
            approvals do not satisfy the account's policy; the message says what is missing),
            ``ciphersuite_mismatch`` (the enclave's ``GetAccount.ciphersuite`` differs from the
            counterpart shares', the participant files disagree, or a suite is unknown),
            ``bad_merkle_root`` (a Taproot merkle root for an account of another suite, or
            one that is neither empty nor 32 bytes), ``participant_failed`` (too few of the
            account's remote participants answered: not connected, declined, timed out,
            disconnected; the message names each and why).
        status: the gRPC status for ``enclave_refused`` (and the last one seen for
            ``no_healthy_node``), else None.
        identifier: the 32-byte identifier of the faulty signer for ``bad_share``, else None.
        node_id: the node involved, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        status: StatusCode | None = None,
        identifier: bytes | None = None,
        node_id: str | None = None,
        participant_id: str | None = None,
    ) -> None:
        assert reason in GATEWAY_REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.identifier = identifier
        self.node_id = node_id
        self.participant_id = participant_id


@dataclass(frozen=True, slots=True)
class CoordinatorSettings:
    """Limits of the coordinator.

    Attributes:
        max_concurrent_signatures: signatures in progress at once; more wait for a slot.
        max_sessions_per_signature: sessions (each a fresh Commit) tried for one signature
            before giving up.
        sign_retries: byte-identical ``Sign`` retries on the same session after UNAVAILABLE
            or DEADLINE_EXCEEDED.
        account_cache_size: accounts whose enclave verifying share is cached.
        participant_timeout_s: each remote participant's round one, and its round two; a
            participant that does not answer in time fails only its session (the next
            responsive one is used when the account has more).
    """

    max_concurrent_signatures: int = 256
    max_sessions_per_signature: int = 3
    sign_retries: int = 2
    account_cache_size: int = 100_000
    #: Each remote participant's round one and round two (each a deadline on the wire too).
    participant_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Signature:
    """A verified signature from `Coordinator.sign`.

    Attributes:
        account_id: the account.
        ciphersuite: the account's suite (DESIGN §14).
        signature: the final signature (64 bytes Ed25519 or BIP-340, 65 bytes plain
            secp256k1: the compressed ``R`` and ``z``).
        group_public_key: the account's group key as its shares hold it.
        verifying_key: the key the signature verifies under: the group key, or for Taproot
            the 32-byte x-only output key (tweaked with ``taproot_merkle_root`` if given, as
            BIP-341; the even-Y x-only group key if not).
        taproot_merkle_root: the merkle root signed with, or None.
    """

    account_id: str
    ciphersuite: str
    signature: bytes
    group_public_key: bytes
    verifying_key: bytes
    taproot_merkle_root: bytes | None = None


@dataclass(frozen=True, slots=True)
class _EnclaveAccount:
    identifier: bytes
    verifying_share: bytes
    group_public_key: bytes
    ciphersuite: str


@dataclass(frozen=True, slots=True)
class _Job:
    """One signature's inputs, fixed across the sessions tried for it."""

    account_id: str
    message: bytes
    scheme: Scheme
    shares: list[AccountShare]
    merkle_root: bytes | None
    remote: RegisteredAccount | None = None

    @property
    def group_public_key(self) -> bytes:
        if self.remote is not None:
            return self.remote.group_public_key
        return self.shares[0].group_public_key


class _NewSession(Exception):  # internal control flow: never escapes sign_message
    def __init__(self, error: RpcError, node: EnclaveNode) -> None:
        super().__init__(str(error))
        self.error = error
        self.node = node


def load_participant_files(paths: Iterable[str | os.PathLike[str]]) -> list[ShareStore]:
    """Load counterpart participants' plaintext share files (``participant-N_key_shares.json``
    from ``trio-sign shares generate``), fully verified. Blocking: run it in a thread.

    Raises:
        ShareFileError: a file is refused (with line and reason); stores already loaded are
            closed (zeroed).
    """
    stores: list[ShareStore] = []
    try:
        for path in paths:
            with Path(path).open("rb") as f:
                stores.append(ShareStore.load_plaintext(f))
    except BaseException:
        for store in stores:
            store.close()
        raise
    return stores


class Coordinator:
    """Drives FROST sessions between enclave nodes and local counterpart shares.

    Args:
        nodes: the enclave nodes (each running: ``nursery.start(node.run)``); all hold every
            account (Scheme A). Their health comes from `run_prober`.
        counterparts: the local participants' share stores (one per participant file); every
            store holding the account signs with the enclave.
        settings: limits.
        approver: the approver keys this gateway holds and its automatic policy; None: only
            the approvals callers bring are sent.

    The coordinator does not own the stores or the approver: close them after it is done.

    Attributes:
        approvals_sent: approvals attached to ``Sign`` requests that signed, by key id (the
            caller's and this gateway's).
    """

    def __init__(
        self,
        nodes: Sequence[EnclaveNode],
        counterparts: Sequence[ShareStore],
        *,
        settings: CoordinatorSettings = CoordinatorSettings(),
        approver: GatewayApprover | None = None,
        participants: ParticipantHub | None = None,
        registry: AccountRegistry | None = None,
    ) -> None:
        if not nodes:
            raise ValueError("a Coordinator needs at least one enclave node")
        if (participants is None) != (registry is None):
            raise ValueError("remote participants need both the hub and the account registry")
        self.nodes = list(nodes)
        self.counterparts = list(counterparts)
        self.participants = participants
        self.registry = registry
        self.settings = settings
        self.limiter = trio.CapacityLimiter(settings.max_concurrent_signatures)
        self._accounts: OrderedDict[str, _EnclaveAccount] = OrderedDict()
        self.approver = approver
        self.signatures = 0
        self.aborted_sessions = 0
        self.approvals_sent: dict[str, int] = {}
        #: remote participants' failures by participant id (no secrets)
        self.participant_failures: dict[str, int] = {}

    # -- public --------------------------------------------------------------------------------

    @property
    def cached_accounts(self) -> int:
        """Accounts whose enclave verifying share is cached (at most ``account_cache_size``)."""
        return len(self._accounts)

    def add_counterparts(self, stores: Iterable[ShareStore]) -> None:
        """Sign with ``stores`` too from now on (the coordinator does not own them). A store
        may keep growing while the gateway runs (accounts created by DKG, ``DkgShares``):
        every signature looks its account up afresh."""
        self.counterparts.extend(stores)

    def learned(self, account_id: str) -> None:
        """New counterpart shares for ``account_id`` (a DKG created it): drop any cached
        enclave view of it, so the next signature reads ``GetAccount`` afresh."""
        self._accounts.pop(account_id, None)

    async def sign_message(
        self,
        account_id: str,
        message: bytes,
        *,
        approvals: Sequence[Approval] = (),
        session_id: str | None = None,
        taproot_merkle_root: bytes | None = None,
    ) -> bytes:
        """The account's signature of ``message``, verified: `sign` without the details."""
        signed = await self.sign(
            account_id,
            message,
            approvals=approvals,
            session_id=session_id,
            taproot_merkle_root=taproot_merkle_root,
        )
        return signed.signature

    async def sign(
        self,
        account_id: str,
        message: bytes,
        *,
        approvals: Sequence[Approval] = (),
        session_id: str | None = None,
        taproot_merkle_root: bytes | None = None,
    ) -> Signature:
        """Produce the account's signature of ``message`` in its ciphersuite, verified by the
        suite's independent verifier.

        Args:
            approvals: approvals the caller brings (for ``session_id``); the approver's are
                added for the key ids not among them.
            session_id: the session to use (the one ``approvals`` name); None: a fresh random
                one per session tried. A given session is tried once (its approvals are valid
                for it alone), on one node.
            taproot_merkle_root: for a ``FROST-secp256k1-SHA256-TR-v1`` account, the BIP-341
                merkle root to tweak the key with (``b""`` or 32 bytes); None: no tweak.

        Error handling: raises `GatewayError` with a stable ``reason`` (see there). Transient
        enclave failures are retried as described in the module docstring. ``ValueError`` for
        ``approvals`` without ``session_id``, or two approvals by one key.

        Cancellation: safe; an open session is aborted on the enclave (shielded, bounded).
        """
        if approvals and session_id is None:
            raise ValueError("approvals name their session: give the session_id they approve")
        if len({a.key_id for a in approvals}) != len(approvals):
            raise ValueError("two approvals by the same key id (one key counts once)")
        remote = self.registry.get(account_id) if self.registry is not None else None
        if remote is not None:
            shares: list[AccountShare] = []
            scheme = self._scheme_of(account_id, remote.ciphersuite)
            group_key = remote.group_public_key
        else:
            shares = self._local_shares(account_id)
            scheme = self._scheme(account_id, shares)
            group_key = shares[0].group_public_key
        self._check_merkle_root(account_id, scheme, taproot_merkle_root)
        job = _Job(account_id, message, scheme, shares, taproot_merkle_root, remote)
        sessions = self.settings.max_sessions_per_signature if session_id is None else 1
        async with self.limiter:
            tried: set[str] = set()
            last: _NewSession | None = None
            for _attempt in range(sessions):
                node = self._choose_node(avoid=tried)
                if node is None:
                    break
                tried.add(node.node_id)
                session = secrets.token_hex(16) if session_id is None else session_id
                try:
                    if remote is not None:
                        signature = await self._remote_session(node, job, session, approvals)
                    else:
                        signature = await self._session(node, job, session, approvals)
                except _NewSession as retry:
                    last = retry
                    log.info(
                        "session failed; trying a new one",
                        extra={
                            "node": retry.node.node_id,
                            "account_id": account_id,
                            "status": retry.error.status.name,
                        },
                    )
                    continue
                self.signatures += 1
                return Signature(
                    account_id=account_id,
                    ciphersuite=scheme.name,
                    signature=signature,
                    group_public_key=group_key,
                    verifying_key=scheme.verifying_key(group_key, taproot_merkle_root),
                    taproot_merkle_root=taproot_merkle_root,
                )
        if last is None:
            raise GatewayError(
                "no enclave node is available (all evicted); see the prober's node_evicted alerts",
                reason="no_healthy_node",
            )
        raise GatewayError(
            f"no enclave node could sign after {sessions} session(s); last: node "
            f"{last.node.node_id}: {last.error}",
            reason="no_healthy_node",
            status=last.error.status,
            node_id=last.node.node_id,
        )

    # -- the parts -----------------------------------------------------------------------------

    def _local_shares(self, account_id: str) -> list[AccountShare]:
        try:
            shares = [s for s in (store.get(account_id) for store in self.counterparts) if s]
        except ShareFileError as exc:
            raise GatewayError(
                f"account {account_id!r}: counterpart share refused: {exc}", reason="bad_share"
            ) from exc
        if not shares:
            raise GatewayError(
                f"account {account_id!r} has no counterpart share in the participant files",
                reason="unknown_account",
            )
        suites = {s.ciphersuite for s in shares}
        if len(suites) != 1:
            raise GatewayError(
                f"account {account_id!r}: the participant files disagree on the ciphersuite "
                f"({', '.join(sorted(suites))})",
                reason="ciphersuite_mismatch",
            )
        group_keys = {s.group_public_key for s in shares}
        if len(group_keys) != 1:
            raise GatewayError(
                f"account {account_id!r}: the participant files disagree on the group key",
                reason="key_mismatch",
            )
        if len({s.identifier for s in shares}) != len(shares):
            raise GatewayError(
                f"account {account_id!r}: two participant files hold the same identifier",
                reason="key_mismatch",
            )
        if len(shares) + 1 < shares[0].min_signers:
            raise GatewayError(
                f"account {account_id!r} needs {shares[0].min_signers} signers; the enclave "
                f"and {len(shares)} counterpart(s) are too few: add participant files",
                reason="too_few_signers",
            )
        return shares

    @staticmethod
    def _scheme(account_id: str, shares: list[AccountShare]) -> Scheme:
        """The account's suite, as its counterpart shares name it (`_local_shares` checked
        that they name the same one)."""
        try:
            return scheme_by_name(shares[0].ciphersuite)
        except FrostError as exc:
            raise GatewayError(
                f"account {account_id!r}: {exc}", reason="ciphersuite_mismatch"
            ) from exc

    @staticmethod
    def _scheme_of(account_id: str, suite: str) -> Scheme:
        try:
            return scheme_by_name(suite)
        except FrostError as exc:
            raise GatewayError(
                f"account {account_id!r}: {exc}", reason="ciphersuite_mismatch"
            ) from exc

    @staticmethod
    def _check_merkle_root(account_id: str, scheme: Scheme, merkle_root: bytes | None) -> None:
        if merkle_root is None:
            return
        if not scheme.taproot:
            raise GatewayError(
                f"account {account_id!r} is a {scheme.name} account: a taproot merkle root "
                "applies only to FROST-secp256k1-SHA256-TR-v1 accounts",
                reason="bad_merkle_root",
            )
        if len(merkle_root) not in (0, MERKLE_ROOT_BYTES):
            raise GatewayError(
                f"a taproot merkle root is empty or {MERKLE_ROOT_BYTES} bytes, "
                f"not {len(merkle_root)}",
                reason="bad_merkle_root",
            )

    def _choose_node(self, *, avoid: set[str]) -> EnclaveNode | None:
        live = [n for n in self.nodes if not n.evicted]
        if not live:
            return None
        fresh = [n for n in live if n.node_id not in avoid] or live
        healthy = [n for n in fresh if n.healthy] or fresh
        return min(healthy, key=lambda n: n.in_flight)

    async def _enclave_account(self, node: EnclaveNode, account_id: str) -> _EnclaveAccount:
        cached = self._accounts.get(account_id)
        if cached is not None:
            self._accounts.move_to_end(account_id)
            return cached
        try:
            info = await node.get_account(account_id)
        except RpcError as exc:
            raise self._refused(exc, node, "GetAccount", account_id) from exc
        account = _EnclaveAccount(
            bytes(info.identifier),
            bytes(info.verifying_share),
            bytes(info.group_public_key),
            info.ciphersuite,
        )
        self._accounts[account_id] = account
        if len(self._accounts) > self.settings.account_cache_size:
            self._accounts.popitem(last=False)
        return account

    def _refused(
        self, exc: RpcError, node: EnclaveNode, what: str, account_id: str
    ) -> GatewayError | _NewSession:
        if what in ("Commit", "GetAccount") and exc.status in _NEW_SESSION_AT_COMMIT:
            return _NewSession(exc, node)
        if what == "Sign" and exc.status in _NEW_SESSION_AT_SIGN:
            return _NewSession(exc, node)
        if what == "Sign" and exc.status == StatusCode.PERMISSION_DENIED:
            return GatewayError(
                f"enclave node {node.node_id} refused Sign for account {account_id!r}: {exc}",
                reason="not_authorized",
                status=exc.status,
                node_id=node.node_id,
            )
        if exc.status == StatusCode.NOT_FOUND and what in ("Commit", "GetAccount"):
            return GatewayError(
                f"account {account_id!r} is unknown to enclave node {node.node_id}",
                reason="unknown_account",
                status=exc.status,
                node_id=node.node_id,
            )
        return GatewayError(
            f"enclave node {node.node_id} refused {what}: {exc}",
            reason="enclave_refused",
            status=exc.status,
            node_id=node.node_id,
        )

    def _approvals(
        self, account_id: str, session_id: str, message: bytes, brought: Sequence[Approval]
    ) -> list[Approval]:
        """The caller's approvals, then this gateway's for the keys the caller did not bring."""
        if self.approver is None:
            return list(brought)
        own = self.approver.approve(
            account_id, session_id, message, skip={a.key_id for a in brought}
        )
        return [*brought, *own]

    async def _session(
        self,
        node: EnclaveNode,
        job: _Job,
        session_id: str,
        brought: Sequence[Approval],
    ) -> bytes:
        account_id, message, scheme = job.account_id, job.message, job.scheme
        enclave = await self._checked_enclave_account(node, job)
        approvals = self._approvals(account_id, session_id, message, brought)
        nonces: list[Any] = []
        must_abort = False
        node.in_flight += 1
        try:
            must_abort = True  # from here the enclave may hold a session: abort on failure
            own = await self._commit_on_enclave(node, job, session_id, enclave)
            nonces = [scheme.commit(s.identifier, s.signing_share) for s in job.shares]
            commitments = sorted(
                [own, *(n.commitment for n in nonces)],
                key=lambda c: scheme.identifier_from_bytes(c.identifier),
            )
            local = self._sign_locally(nonces, job, commitments, enclave, node)
            enclave_share = await self._sign_on_enclave(
                node, session_id, job, commitments, approvals
            )
            signature = self._aggregate(job, commitments, enclave, enclave_share, local, node)
            must_abort = False  # signed: the enclave already freed the slot
            for a in approvals:
                self.approvals_sent[a.key_id] = self.approvals_sent.get(a.key_id, 0) + 1
            return signature
        finally:
            node.in_flight -= 1
            for n in nonces:
                n.zero()
            if must_abort:
                await self._abort(node, session_id)

    async def _checked_enclave_account(self, node: EnclaveNode, job: _Job) -> _EnclaveAccount:
        """``GetAccount`` (cached), checked against the suite and group key the counterpart
        shares or the registry name."""
        account_id, scheme, group_key = job.account_id, job.scheme, job.group_public_key
        source = "the participant files" if job.remote is None else "the account registry"
        enclave = await self._enclave_account(node, account_id)
        if enclave.ciphersuite != scheme.name or enclave.group_public_key != group_key:
            # Refused below; forget the cache entry so that once the node (or the participant
            # files) serve the account's share, the next signature reads it afresh.
            self._accounts.pop(account_id, None)
        if enclave.ciphersuite != scheme.name:
            raise GatewayError(
                f"account {account_id!r}: enclave node {node.node_id} holds a "
                f"{enclave.ciphersuite or '(unnamed)'} share, {source} a {scheme.name} one",
                reason="ciphersuite_mismatch",
                node_id=node.node_id,
            )
        if enclave.group_public_key != group_key:
            raise GatewayError(
                f"account {account_id!r}: enclave node {node.node_id} holds a share of another "
                f"group key than {source}",
                reason="key_mismatch",
                node_id=node.node_id,
            )
        return enclave

    async def _commit_on_enclave(
        self, node: EnclaveNode, job: _Job, session_id: str, enclave: _EnclaveAccount
    ) -> Any:
        try:
            reply = await node.commit(job.account_id, session_id)
        except RpcError as exc:
            raise self._refused(exc, node, "Commit", job.account_id) from exc
        own = job.scheme.commitment(
            bytes(reply.identifier), bytes(reply.hiding), bytes(reply.binding)
        )
        if own.identifier != enclave.identifier:
            # The node's share for this account is not the one cached (another bundle?):
            # forget the cache entry so the next signature re-reads it.
            self._accounts.pop(job.account_id, None)
            raise GatewayError(
                f"enclave node {node.node_id} committed as identifier "
                f"{own.identifier.hex()}, not {enclave.identifier.hex()} from GetAccount",
                reason="bad_share",
                identifier=own.identifier,
                node_id=node.node_id,
            )
        return own

    # -- remote participants ---------------------------------------------------------------

    async def _remote_session(
        self,
        node: EnclaveNode,
        job: _Job,
        session_id: str,
        brought: Sequence[Approval],
    ) -> bytes:
        """One session with remote participants (DESIGN §15): round one on the enclave and on
        every connected holder of the account at once, the first ``min_signers - 1``
        commitments kept (the others cancelled); round two with those participants (each
        signature share checked against its verifying share, a faulty one named); then the
        enclave's ``Sign`` with the caller's, this gateway's and the participants' approvals;
        aggregate and verify."""
        assert job.remote is not None
        assert self.participants is not None
        account, hub, scheme = job.remote, self.participants, job.scheme
        timeout_s = self.settings.participant_timeout_s
        need = account.min_signers - 1
        connected = set(hub.connected())
        candidates = sorted(
            (h for h in account.holders if h.participant_id in connected),
            key=lambda h: hub.in_flight(h.participant_id),
        )
        if len(candidates) < need:
            missing = [h.participant_id for h in account.holders if h not in candidates]
            for pid in missing:
                self._participant_failed(pid)
            raise GatewayError(
                f"account {job.account_id!r} needs {need} remote participant(s); "
                f"not connected: {', '.join(missing)}",
                reason="participant_failed",
                participant_id=missing[0] if missing else None,
            )
        enclave = await self._checked_enclave_account(node, job)
        chosen: list[ParticipantCommitment] = []
        must_abort = False
        node.in_flight += 1
        try:
            must_abort = True
            own, chosen = await self._round_one(node, job, session_id, enclave, candidates, need)
            commitments = sorted(
                [own, *(c.suite_commitment() for c in chosen)],
                key=lambda c: scheme.identifier_from_bytes(c.identifier),
            )
            answers = await self._round_two(job, chosen, commitments, enclave, timeout_s)
            chosen = []  # round two ended every request (answered, or cancelled by the hub)
            approvals = list(brought)
            have = {a.key_id for a in approvals}
            for answer in answers.values():
                if answer.approval.key_id not in have:
                    approvals.append(answer.approval)
                    have.add(answer.approval.key_id)
            if self.approver is not None:
                approvals += self.approver.approve(
                    job.account_id, session_id, job.message, skip=have
                )
            enclave_share = await self._sign_on_enclave(
                node, session_id, job, commitments, approvals
            )
            local = {x.identifier: x.signature_share for x in answers.values()}
            signature = self._aggregate(job, commitments, enclave, enclave_share, local, node)
            must_abort = False
            for a in approvals:
                self.approvals_sent[a.key_id] = self.approvals_sent.get(a.key_id, 0) + 1
            return signature
        finally:
            node.in_flight -= 1
            for c in chosen:
                hub.cancel(c)
            if must_abort:
                await self._abort(node, session_id)

    async def _round_one(
        self,
        node: EnclaveNode,
        job: _Job,
        session_id: str,
        enclave: _EnclaveAccount,
        candidates: Sequence[RemoteHolder],
        need: int,
    ) -> tuple[Any, list[ParticipantCommitment]]:
        """``Commit`` on the enclave and round one with every candidate at once; the first
        ``need`` participants to commit are kept, the rest cancelled (so a slow or vanished
        participant costs nothing when another holder answers)."""
        assert self.participants is not None
        hub, timeout_s = self.participants, self.settings.participant_timeout_s
        got: list[ParticipantCommitment] = []
        errors: list[ParticipantError] = []
        own: list[Any] = []
        done = trio.Event()

        async def ask(holder: RemoteHolder) -> None:
            try:
                c = await hub.sign(
                    holder.participant_id,
                    account_id=job.account_id,
                    session_id=session_id,
                    ciphersuite=job.scheme.name,
                    message=job.message,
                    timeout_s=timeout_s,
                    taproot_merkle_root=job.merkle_root,
                )
            except ParticipantError as exc:
                errors.append(exc)
                if len(errors) > len(candidates) - need:
                    done.set()  # too few can still answer
                return
            if c.commitment.identifier != holder.identifier or len(got) >= need:
                hub.cancel(c)
                if c.commitment.identifier != holder.identifier:
                    errors.append(
                        ParticipantError(
                            f"committed as identifier {c.commitment.identifier.hex()}, not "
                            f"{holder.identifier.hex()} (the account registry's)",
                            participant_id=holder.participant_id,
                            reason="malformed",
                            request_id=c.request_id,
                        )
                    )
                    if len(errors) > len(candidates) - need:
                        done.set()
                return
            got.append(c)
            if len(got) >= need:
                done.set()

        failed: list[Exception] = []

        async def enclave_commit() -> None:
            try:
                own.append(await self._commit_on_enclave(node, job, session_id, enclave))
            except (GatewayError, _NewSession) as exc:  # raised below, outside the nursery
                failed.append(exc)
                done.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(enclave_commit)
                async with trio.open_nursery() as asking:
                    for holder in candidates:
                        asking.start_soon(ask, holder)
                    await done.wait()
                    asking.cancel_scope.cancel()
            if failed:
                raise failed[0]
        except BaseException:
            for c in got:
                hub.cancel(c)
            raise
        if len(got) < need:
            for c in got:
                hub.cancel(c)
            for e in errors:
                self._participant_failed(e.participant_id)
            first = errors[0] if errors else None
            raise GatewayError(
                f"account {job.account_id!r}: {len(got)} of the {need} remote participant(s) "
                "needed committed: " + "; ".join(str(e) for e in errors),
                reason="participant_failed",
                participant_id=first.participant_id if first else None,
            ) from first
        return own[0], got

    async def _round_two(
        self,
        job: _Job,
        chosen: Sequence[ParticipantCommitment],
        commitments: list[Any],
        enclave: _EnclaveAccount,
        timeout_s: float,
    ) -> dict[str, ParticipantShare]:
        """Round two with each chosen participant at once; every share checked against the
        registry's verifying share (a faulty participant named: ``bad_share``)."""
        assert self.participants is not None
        assert job.remote is not None
        hub = self.participants
        entries = commitment_entries(commitments)
        verifying = {h.participant_id: h.verifying_share for h in job.remote.holders}
        answers: dict[str, ParticipantShare] = {}
        errors: list[ParticipantError] = []

        async def ask(c: ParticipantCommitment) -> None:
            try:
                share = await hub.round2(c, entries, enclave.identifier, timeout_s=timeout_s)
                check_signature_share(
                    job.scheme,
                    share,
                    verifying_share=verifying[c.participant_id],
                    commitments=commitments,
                    group_public_key=job.group_public_key,
                    message=job.message,
                    merkle_root=job.merkle_root,
                )
            except ParticipantError as exc:
                errors.append(exc)
                return
            answers[c.participant_id] = share

        async with trio.open_nursery() as nursery:
            for c in chosen:
                nursery.start_soon(ask, c)
        if errors:
            for e in errors:
                self._participant_failed(e.participant_id)
            first = errors[0]
            bad = next((e for e in errors if e.reason == "bad_share"), None)
            if bad is not None:
                ident = next(
                    c.commitment.identifier
                    for c in chosen
                    if c.participant_id == bad.participant_id
                )
                raise GatewayError(
                    str(bad),
                    reason="bad_share",
                    identifier=ident,
                    participant_id=bad.participant_id,
                ) from bad
            raise GatewayError(
                f"account {job.account_id!r}: round two failed: "
                + "; ".join(str(e) for e in errors),
                reason="participant_failed",
                participant_id=first.participant_id,
            ) from first
        return answers

    def _participant_failed(self, participant_id: str) -> None:
        self.participant_failures[participant_id] = (
            self.participant_failures.get(participant_id, 0) + 1
        )

    def _sign_locally(
        self,
        nonces: list[Any],
        job: _Job,
        commitments: list[Any],
        enclave: _EnclaveAccount,
        node: EnclaveNode,
    ) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        for n, s in zip(nonces, job.shares, strict=True):
            try:
                out[s.identifier] = job.scheme.sign(
                    n,
                    signing_share=s.signing_share,
                    group_public_key=s.group_public_key,
                    message=job.message,
                    commitments=commitments,
                    min_signers=s.min_signers,
                    max_signers=s.max_signers,
                    merkle_root=job.merkle_root,
                )
            except FrostError as exc:
                # Our own commitments are well formed: the enclave's is what was refused.
                raise GatewayError(
                    f"enclave node {node.node_id}'s commitment was refused: {exc}",
                    reason="bad_share",
                    identifier=enclave.identifier,
                    node_id=node.node_id,
                ) from exc
        return out

    async def _sign_on_enclave(
        self,
        node: EnclaveNode,
        session_id: str,
        job: _Job,
        commitments: list[Any],
        approvals: Sequence[Approval] = (),
    ) -> bytes:
        wire = [a.to_proto() for a in approvals]
        for attempt in range(self.settings.sign_retries + 1):
            try:
                reply = await node.sign(
                    session_id,
                    job.message,
                    commitments,
                    wire,
                    taproot_merkle_root=job.merkle_root,
                )
            except RpcError as exc:
                if exc.status in _SIGN_RETRY and attempt < self.settings.sign_retries:
                    log.info(
                        "Sign failed; retrying it on the same session",
                        extra={"node": node.node_id, "status": exc.status.name},
                    )
                    continue
                raise self._refused(exc, node, "Sign", job.account_id) from exc
            return bytes(reply.signature_share)
        raise AssertionError("unreachable")  # pragma: no cover

    def _aggregate(
        self,
        job: _Job,
        commitments: list[Any],
        enclave: _EnclaveAccount,
        enclave_share: bytes,
        local: dict[bytes, bytes],
        node: EnclaveNode,
    ) -> bytes:
        scheme, group_key = job.scheme, job.group_public_key
        verifying = {s.identifier: s.verifying_share for s in job.shares}
        if job.remote is not None:
            verifying.update({h.identifier: h.verifying_share for h in job.remote.holders})
        verifying[enclave.identifier] = enclave.verifying_share
        try:
            signature = scheme.aggregate(
                commitments=commitments,
                message=job.message,
                group_public_key=group_key,
                signature_shares={**local, enclave.identifier: enclave_share},
                verifying_shares=verifying,
                merkle_root=job.merkle_root,
            )
        except InvalidSignatureShareError as exc:
            holders = (
                {h.identifier: h.participant_id for h in job.remote.holders} if job.remote else {}
            )
            whose = (
                f"enclave node {node.node_id}"
                if exc.identifier == enclave.identifier
                else f"participant {holders[exc.identifier]!r}"
                if exc.identifier in holders
                else "a participant file"
            )
            raise GatewayError(
                f"the signature share of identifier {exc.identifier.hex()} ({whose}) is invalid",
                reason="bad_share",
                identifier=exc.identifier,
                node_id=node.node_id,
            ) from exc
        except FrostError as exc:
            raise GatewayError(
                f"the aggregate signature was refused: {exc}",
                reason="verify_failed",
                node_id=node.node_id,
            ) from exc
        if not scheme.verify(group_key, job.message, signature, job.merkle_root):
            raise GatewayError(
                f"the aggregate signature does not verify ({scheme.name}'s independent "
                "verifier, under the group key or its Taproot output key)",
                reason="verify_failed",
                node_id=node.node_id,
            )
        return signature

    async def _abort(self, node: EnclaveNode, session_id: str) -> None:
        self.aborted_sessions += 1
        with trio.move_on_after(node.settings.abort_timeout_s, shield=True):
            try:
                await node.abort(session_id)
            except RpcError as exc:
                # NOT_FOUND: the Commit never arrived or the session already expired.
                log.debug(
                    "abort not done",
                    extra={"node": node.node_id, "status": exc.status.name},
                )
