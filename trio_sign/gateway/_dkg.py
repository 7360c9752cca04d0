"""The gateway's side of account creation by DKG (DESIGN §13, docs/key-lifecycle.md §5-6).

:class:`DkgDriver` creates one account on one enclave node: the enclave is one participant
(``DkgRound1``/``DkgRound2``/``DkgRound3``), the others are :class:`DkgParticipant` objects.
Today they are :class:`LocalParticipant`: long-term Ed25519 keys this gateway holds
(``gateway.toml`` ``[participants.<id>] key_file``, the approver key format), whose new shares
the gateway keeps and signs with. A remote participant (DESIGN §15) implements the same small
protocol over its WebSocket, so the driver does not change when one is swapped in.

One DKG, as the driver runs it::

    dkg_id = "dkg-<random>"; identifiers: the enclave 1, the participants 2..n (config order)
    approvals = [create] approvals over dkg_params(...)      (GatewayApprover + the caller's)
    DkgRound1(...)                 -> the enclave's signed package (its signature checked
                                      when the enclave's identity key is pinned here)
    p.round1() for each participant -> signed packages
    DkgRound2(their packages)      -> the enclave's shares, encrypted to each participant
    p.round2(every other package)  -> each participant's shares, encrypted to each other
    p.round3(shares addressed to p)-> each participant's key package; they must agree
    journal "pending" (the participants' new shares and the round-3 ciphertexts), fsync
    DkgRound3(shares to the enclave), retried with the same dkg_id until an answer or NOT_FOUND
    the answer must be the participants' group key and the enclave's verifying share
    journal "created", fsync; the shares join the coordinator's stores: signable at once

The participants' shares are durable **before** ``DkgRound3`` is sent, so an account the
enclave stored always has its counterpart shares, whenever the gateway crashes. A gateway that
restarts with ``pending`` entries in its journal runs the crash rule for each (§6: retry
``DkgRound3`` with the same dkg_id and the journalled ciphertexts until an answer or
``NOT_FOUND``) before it reports them: :meth:`DkgDriver.recover`.

The journal (``[dkg] journal``, default ``dkg-journal.jsonl`` next to gateway.toml, mode 0600)
is JSON Lines, appended with ``fsync`` (and the directory's on creation)::

    {"v": 1, "event": "pending", "dkg_id", "account_id", "ciphersuite", "node",
     "min_signers", "max_signers", "policy",
     "shares": [{"participant": id, "record": <a share-file record, docs/share-file.md>}, ...],
     "round3": [{"sender": hex, "recipient": hex, "ciphertext": hex}, ...]}
    {"v": 1, "event": "created", "dkg_id", "delta_sequence", "deltas_head"}
    {"v": 1, "event": "failed", "dkg_id", "reason"}

Like the plaintext participant files, it holds signing shares in hex: it is a development and
reference format (a production gateway keeps no shares, DESIGN §15). A line cut short by a
crash (no newline) was never followed by a ``DkgRound3``, so it is dropped when the journal is
opened. Nothing here logs a share, and no repr shows one.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import trio

from proto_min import sign_service_pb2 as pb

from .._backoff import full_jitter_delay
from .._errors import FrostError, ShareFileError, TrioSignError
from ..crypto import _dkg, _kdf, _sodium
from ..crypto._group import Group, group_for
from ..enclave._dkg import (
    DKG_SUITES,
    MAX_ACCOUNT_ID_BYTES,
    MAX_DKG_SIGNERS,
    decrypt_share_into,
    dkg_params,
    encrypt_share,
    round1_payload,
    share_key_into,
    verify_ed25519,
)
from ..rpc import RpcError, StatusCode
from ..shares import ShareRecord, ShareStore, write_plaintext
from ..shares._records import record_from_json, record_to_json_text
from ._accounts import AccountRegistry, RegisteredAccount, RemoteHolder
from ._approvals import Approval, ApproverSigningKey, GatewayApprover
from ._node import EnclaveNode

log = logging.getLogger("trio_sign.gateway.dkg")

#: The enclave's identifier in every DKG this gateway runs; participants follow from 2.
ENCLAVE_IDENTIFIER: Final = 1
#: Its key id in ``DkgParticipant`` lists (docs/contracts.md).
ENCLAVE_KEY_ID: Final = "enclave"
JOURNAL_VERSION: Final = 1
DEFAULT_JOURNAL: Final = "dkg-journal.jsonl"
#: The stable reasons of :class:`DkgFailed`.
DKG_REASONS: Final = frozenset(
    {
        "bad_request",  # parameters refused (by the gateway or the enclave: INVALID_ARGUMENT)
        "not_authorized",  # the create policy refused the approvals (PERMISSION_DENIED)
        "account_exists",  # ALREADY_EXISTS, or a counterpart share for it is held already
        "no_healthy_node",  # no node to run it on, or it was unreachable
        "enclave_refused",  # any other refusal of a DKG rpc
        "bad_package",  # the enclave's package or shares failed a check here
        "key_mismatch",  # the enclave's answer is not the participants' group key or share
        "not_created",  # DkgRound3 NOT_FOUND: no account exists (the crash rule's end)
        "participant_failed",  # a remote participant did not take part (named)
    }
)
_HEAD_ZERO: Final = "00" * 32


class DkgFailed(TrioSignError):
    """An account was not created (or its creation is not known to have happened).

    Attributes:
        reason: one of :data:`DKG_REASONS`.
        status: the enclave's gRPC status, when it refused.
        dkg_id: the DKG, once one was opened.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        status: StatusCode | None = None,
        dkg_id: str | None = None,
    ) -> None:
        assert reason in DKG_REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.dkg_id = dkg_id


# -- the public parameters of one DKG ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ceremony:
    """One DKG's public parameters, as every participant and the approvers see them.

    ``participants`` are ``(identifier, key_id)`` pairs, ascending by identifier, the enclave's
    (key id ``"enclave"``) included.
    """

    dkg_id: str
    account_id: str
    suite: str
    min_signers: int
    max_signers: int
    policy: str
    participants: tuple[tuple[bytes, str], ...]
    enclave_identifier: bytes

    @property
    def group(self) -> Group:
        return group_for(self.suite)

    @property
    def params(self) -> bytes:
        """What the ``create`` approvals cover (key-lifecycle §5)."""
        return dkg_params(
            self.suite, self.min_signers, self.max_signers, self.policy, self.participants
        )

    @property
    def params_sha256(self) -> bytes:
        return hashlib.sha256(self.params).digest()

    def round1_payload(self, package: pb.DkgRound1Package) -> bytes:
        """What ``package``'s long-term key signed."""
        return round1_payload(
            self.dkg_id,
            self.account_id,
            self.params_sha256,
            bytes(package.identifier),
            [bytes(e) for e in package.commitment],
            bytes(package.proof_of_knowledge),
            bytes(package.encryption_key),
        )


@dataclass(frozen=True, slots=True)
class ParticipantOutput:
    """What a participant's round 3 gives the driver.

    Attributes:
        identifier, verifying_share: its own.
        group_public_key: the group key it computed (Taproot: tweaked as ZF's ``post_dkg``).
        verifying_shares: every participant's, as it computed them.
        record: its new share, for a participant whose share this gateway keeps (the driver
            journals it, then hands it to the coordinator; it zeroes it); None for a remote
            participant, which keeps its own.
    """

    identifier: bytes
    verifying_share: bytes
    group_public_key: bytes
    verifying_shares: Mapping[bytes, bytes] = field(repr=False)
    record: ShareRecord | None = field(default=None, repr=False)


class DkgParticipant(Protocol):
    """A participant other than the enclave, as :class:`DkgDriver` drives it.

    The three rounds take the contract's messages (key-lifecycle §5); one object serves many
    DKGs at once, keyed by ``Ceremony.dkg_id``. :meth:`forget` drops (zeroes) whatever a DKG
    left behind; the driver calls it after round 3 and on every failure.
    """

    participant_id: str
    key_id: str

    async def round1(self, c: Ceremony, identifier: bytes) -> pb.DkgRound1Package: ...

    async def round2(
        self, c: Ceremony, packages: Sequence[pb.DkgRound1Package]
    ) -> list[pb.DkgEncryptedShare]: ...

    async def round3(
        self, c: Ceremony, shares: Sequence[pb.DkgEncryptedShare]
    ) -> ParticipantOutput: ...

    def forget(self, dkg_id: str) -> None: ...


# -- a participant whose key this gateway holds ------------------------------------------------


class _LocalState:
    __slots__ = ("identifier", "keys", "r1", "r1_secret", "r2_secret", "x_public", "x_secret")

    def __init__(self, identifier: bytes) -> None:
        self.identifier = identifier
        self.x_secret = bytearray(32)
        self.x_public = _kdf.x25519_keypair(self.x_secret)
        self.r1_secret: _dkg.Round1Secret | None = None
        self.r2_secret: _dkg.Round2Secret | None = None
        self.r1: dict[bytes, _dkg.Round1Package] = {}
        self.keys: dict[bytes, bytes] = {}  # identifier -> its X25519 key for this DKG

    def zero(self) -> None:
        _sodium.memzero(self.x_secret)
        if self.r1_secret is not None:
            self.r1_secret.zero()
        if self.r2_secret is not None:
            self.r2_secret.zero()


class LocalParticipant:
    """A DKG participant whose long-term Ed25519 key this gateway holds (``[participants.<id>]
    key_file``): ZF's DKG (``trio_sign.crypto._dkg``) with the contract's envelopes. Its new
    shares come back in :attr:`ParticipantOutput.record` for the driver to keep.

    Args:
        participant_id: its name in gateway.toml.
        key_id: the id ``enclave.toml`` ``[dkg] participants`` pins its public key under.
        key: its signing key (Ed25519; owned from here: :meth:`close` zeroes it).
    """

    def __init__(self, participant_id: str, key_id: str, key: ApproverSigningKey) -> None:
        if key.type != "ed25519":
            raise ValueError(f"participant {participant_id}: a DKG key is Ed25519, not {key.type}")
        self.participant_id = participant_id
        self.key_id = key_id
        self.public_key = key.public_key
        self._key = key
        self._open: dict[str, _LocalState] = {}

    def __repr__(self) -> str:
        return (
            f"LocalParticipant({self.participant_id!r}, key_id={self.key_id!r}, "
            f"public_key={self.public_key.hex()}, open={len(self._open)})"
        )

    @property
    def open_dkgs(self) -> int:
        return len(self._open)

    async def round1(self, c: Ceremony, identifier: bytes) -> pb.DkgRound1Package:
        return self.round1_now(c, identifier)

    async def round2(
        self, c: Ceremony, packages: Sequence[pb.DkgRound1Package]
    ) -> list[pb.DkgEncryptedShare]:
        return self.round2_now(c, packages)

    async def round3(
        self, c: Ceremony, shares: Sequence[pb.DkgEncryptedShare]
    ) -> ParticipantOutput:
        return self.round3_now(c, shares)

    # The rounds without await (the participant library's sans-io session calls these).

    def round1_now(self, c: Ceremony, identifier: bytes) -> pb.DkgRound1Package:
        if c.dkg_id in self._open:
            raise DkgFailed(f"DKG {c.dkg_id} is open already", reason="bad_request")
        state = _LocalState(identifier)
        self._open[c.dkg_id] = state
        state.r1_secret, r1 = _dkg.part1(identifier, c.max_signers, c.min_signers, suite=c.suite)
        package = pb.DkgRound1Package(
            identifier=identifier,
            commitment=list(r1.commitment),
            proof_of_knowledge=r1.proof_of_knowledge,
            encryption_key=state.x_public,
            key_id=self.key_id,
        )
        package.signature = self._key.sign(c.round1_payload(package))
        return package

    def round2_now(
        self, c: Ceremony, packages: Sequence[pb.DkgRound1Package]
    ) -> list[pb.DkgEncryptedShare]:
        state = self._state(c)
        assert state.r1_secret is not None
        for p in packages:
            ident = bytes(p.identifier)
            if ident == state.identifier:
                continue
            state.r1[ident] = _dkg.Round1Package(
                tuple(bytes(e) for e in p.commitment), bytes(p.proof_of_knowledge)
            )
            state.keys[ident] = bytes(p.encryption_key)
        state.r2_secret, outgoing = _dkg.part2(state.r1_secret, state.r1)
        try:
            return [
                pb.DkgEncryptedShare(
                    sender=state.identifier,
                    recipient=recipient,
                    ciphertext=self._encrypt(c, state, recipient, share.signing_share),
                )
                for recipient, share in outgoing.items()
            ]
        finally:
            for share in outgoing.values():
                share.zero()

    def _encrypt(
        self, c: Ceremony, state: _LocalState, recipient: bytes, share: bytearray
    ) -> bytes:
        key = bytearray(32)
        try:
            share_key_into(
                key,
                dkg_id=c.dkg_id,
                sender=state.identifier,
                recipient=recipient,
                own_secret=state.x_secret,
                sender_public=state.x_public,
                recipient_public=state.keys[recipient],
                peer_public=state.keys[recipient],
            )
            return encrypt_share(
                key, share, dkg_id=c.dkg_id, sender=state.identifier, recipient=recipient
            )
        finally:
            _sodium.memzero(key)

    def round3_now(self, c: Ceremony, shares: Sequence[pb.DkgEncryptedShare]) -> ParticipantOutput:
        state = self._state(c)
        assert state.r2_secret is not None
        opened: dict[bytes, _dkg.Round2Package] = {}
        try:
            for s in shares:
                if bytes(s.recipient) != state.identifier:
                    continue
                sender = bytes(s.sender)
                if sender not in state.keys or sender in opened:
                    raise DkgFailed(
                        f"a round-2 share for {self.participant_id} names an unexpected sender",
                        reason="bad_package",
                        dkg_id=c.dkg_id,
                    )
                opened[sender] = _dkg.Round2Package(self._decrypt(c, state, sender, s))
            key, public = _dkg.part3(state.r2_secret, state.r1, opened)
        finally:
            for package in opened.values():
                package.zero()
        record = ShareRecord(
            c.account_id,
            key.identifier,
            key.signing_share,  # moved into the record: the driver zeroes it
            key.verifying_share,
            key.verifying_key,
            c.min_signers,
            c.max_signers,
            policy=c.policy,
            ciphersuite=c.suite,
        )
        return ParticipantOutput(
            key.identifier,
            key.verifying_share,
            public.verifying_key,
            dict(public.verifying_shares),
            record,
        )

    def _decrypt(self, c: Ceremony, state: _LocalState, sender: bytes, s: Any) -> bytearray:
        key = bytearray(32)
        plain = bytearray(32)
        try:
            share_key_into(
                key,
                dkg_id=c.dkg_id,
                sender=sender,
                recipient=state.identifier,
                own_secret=state.x_secret,
                sender_public=state.keys[sender],
                recipient_public=state.x_public,
                peer_public=state.keys[sender],
            )
            if not decrypt_share_into(
                plain,
                key,
                bytes(s.ciphertext),
                dkg_id=c.dkg_id,
                sender=sender,
                recipient=state.identifier,
            ):
                raise DkgFailed(
                    f"the round-2 share from identifier {sender.hex()} to "
                    f"{self.participant_id} fails authentication",
                    reason="bad_package",
                    dkg_id=c.dkg_id,
                )
            return plain
        except BaseException:
            _sodium.memzero(plain)
            raise
        finally:
            _sodium.memzero(key)

    def _state(self, c: Ceremony) -> _LocalState:
        state = self._open.get(c.dkg_id)
        if state is None:
            raise DkgFailed(
                f"participant {self.participant_id} has no open DKG {c.dkg_id}",
                reason="bad_request",
                dkg_id=c.dkg_id,
            )
        return state

    def forget(self, dkg_id: str) -> None:
        state = self._open.pop(dkg_id, None)
        if state is not None:
            state.zero()

    def close(self) -> None:
        """Zero every open DKG and the long-term key. Idempotent."""
        for dkg_id in list(self._open):
            self.forget(dkg_id)
        self._key.close()


def load_local_participants(entries: Mapping[str, tuple[str, Path]]) -> list[LocalParticipant]:
    """``participant id -> (key_id, key file)``: every key file loaded (approver key format,
    Ed25519, mode 0600). Blocking: run it in a thread.

    Raises:
        ApproverKeyFileError: a file refused (naming it; keys already loaded are closed).
        ValueError: a key that is not Ed25519.
    """
    out: list[LocalParticipant] = []
    try:
        for pid, (key_id, path) in entries.items():
            key = ApproverSigningKey.load(path, key_id=key_id)
            try:
                out.append(LocalParticipant(pid, key_id, key))
            except BaseException:
                key.close()
                raise
    except BaseException:
        for p in out:
            p.close()
        raise
    return out


# -- the shares the gateway keeps --------------------------------------------------------------


def _store_of(records: Sequence[ShareRecord]) -> ShareStore:
    """A store holding ``records``, fully verified (the plaintext loader's checks)."""
    buf = io.BytesIO()
    write_plaintext(buf, records)
    buf.seek(0)
    return ShareStore.load_plaintext(buf)


class DkgShares:
    """The shares the local participants got from DKGs: one :class:`ShareStore` per
    participant, which the :class:`~trio_sign.gateway.Coordinator` holds among its
    counterparts, and the journal that keeps them.

    Args:
        journal: the journal's path (created 0600 if absent).
        participant_ids: whose stores to keep (entries of others are refused at open).
    """

    def __init__(self, journal: Path, participant_ids: Iterable[str]) -> None:
        self.journal = journal
        self.stores: dict[str, ShareStore] = {pid: ShareStore(0) for pid in participant_ids}
        self.pending: dict[str, dict[str, Any]] = {}  # dkg_id -> its "pending" entry
        self.created = 0
        self._fd: int | None = None

    def __repr__(self) -> str:
        return (
            f"DkgShares({str(self.journal)!r}, participants={sorted(self.stores)!r}, "
            f"created={self.created}, pending={len(self.pending)})"
        )

    def open(self) -> None:
        """Read the journal (dropping a cut last line), load every created account's shares,
        keep the pending entries for :meth:`DkgDriver.recover`. Blocking.

        Error handling: :class:`ShareFileError` naming the journal's line for a bad entry.
        """
        path = self.journal
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            data = b""
            while chunk := os.read(fd, 1 << 20):
                data += chunk
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                log.warning(
                    "dkg journal: dropping a line cut short by a crash (no DkgRound3 followed it)",
                    extra={"journal": str(path), "bytes": len(data) - keep},
                )
                os.ftruncate(fd, keep)
                os.fsync(fd)
                data = data[:keep]
            entries: dict[str, dict[str, Any]] = {}
            outcome: dict[str, str] = {}
            for lineno, line in enumerate(data.splitlines(), 1):
                try:
                    obj = json.loads(line)
                    event, dkg_id = obj["event"], obj["dkg_id"]
                except (ValueError, KeyError, TypeError):
                    raise ShareFileError(
                        f"{path}: not a DKG journal entry", reason="bad_json", line=lineno
                    ) from None
                if event == "pending":
                    obj["_line"] = lineno
                    entries[dkg_id] = obj
                elif event in ("created", "failed") and dkg_id in entries:
                    outcome[dkg_id] = event
                else:
                    raise ShareFileError(
                        f"{path}: a {event!r} entry for an unknown DKG",
                        reason="bad_json",
                        line=lineno,
                    )
            for dkg_id, entry in entries.items():
                state = outcome.get(dkg_id)
                if state == "created":
                    self._learn(entry, line=entry["_line"])
                elif state is None:
                    self.pending[dkg_id] = entry
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _records(self, entry: Mapping[str, Any], line: int) -> dict[str, ShareRecord]:
        out: dict[str, ShareRecord] = {}
        try:
            for item in entry["shares"]:
                pid = item["participant"]
                if pid not in self.stores:
                    raise ShareFileError(
                        f"{self.journal}: a share of participant {pid!r}, which gateway.toml "
                        "does not name ([participants])",
                        reason="bad_json",
                        line=line,
                    )
                out[pid] = record_from_json(item["record"], line=line)
        except BaseException:
            for r in out.values():
                r.zero()
            raise
        return out

    def _learn(self, entry: Mapping[str, Any], *, line: int) -> None:
        records = self._records(entry, line)
        try:
            for pid, record in records.items():
                delta = _store_of([record])
                try:
                    self.stores[pid].apply_delta(delta, "create")
                finally:
                    delta.close()
        finally:
            for r in records.values():
                r.zero()
        self.created += 1

    def _append(self, obj: Mapping[str, Any]) -> None:
        if self._fd is None:
            raise ShareFileError("the DKG journal is not open", reason="closed")
        line = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        view = memoryview(line)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    def write_pending(
        self,
        c: Ceremony,
        node_id: str,
        shares: Mapping[str, ShareRecord],
        round3: Sequence[Any],
        *,
        group_public_key: bytes = b"",
        remote: Sequence[tuple[str, bytes, bytes]] = (),
    ) -> dict[str, Any]:
        """Journal the participants' new shares and the round-3 ciphertexts, fsynced, before
        ``DkgRound3`` is sent; returns the entry (:meth:`note_pending` it). Blocking: the
        ``write_*`` methods only append (a worker thread may run them); the ``note_*`` ones
        change what the stores hold, on the event loop, where the coordinator reads them."""
        entry = {
            "v": JOURNAL_VERSION,
            "event": "pending",
            "dkg_id": c.dkg_id,
            "account_id": c.account_id,
            "ciphersuite": c.suite,
            "node": node_id,
            "min_signers": c.min_signers,
            "max_signers": c.max_signers,
            "policy": c.policy,
            "shares": [
                {"participant": pid, "record": json.loads(record_to_json_text(r, ""))}
                for pid, r in shares.items()
            ],
            # remote participants keep their own shares: only their public part is here
            "group_public_key": group_public_key.hex(),
            "remote": [
                {"participant": pid, "identifier": i.hex(), "verifying_share": v.hex()}
                for pid, i, v in remote
            ],
            "round3": [
                {
                    "sender": bytes(s.sender).hex(),
                    "recipient": bytes(s.recipient).hex(),
                    "ciphertext": bytes(s.ciphertext).hex(),
                }
                for s in round3
            ],
        }
        self._append(entry)
        return entry

    def note_pending(self, entry: dict[str, Any]) -> None:
        self.pending[entry["dkg_id"]] = entry

    def write_created(self, entry: Mapping[str, Any], answer: pb.DkgRound3Response) -> None:
        """Journal that the enclave created the account, fsynced. Blocking."""
        dkg_id = entry["dkg_id"]
        self._append(
            {
                "v": JOURNAL_VERSION,
                "event": "created",
                "dkg_id": dkg_id,
                "delta_sequence": answer.delta_sequence,
                "deltas_head": answer.deltas_head,
            }
        )

    def note_created(self, entry: Mapping[str, Any]) -> None:
        """Add the participants' shares of a created account to their stores: the
        coordinator signs with them from now on."""
        self.pending.pop(entry["dkg_id"], None)
        self._learn(entry, line=0)

    def write_failed(self, dkg_id: str, reason: str) -> None:
        """Journal that no account was created (the pending shares are dropped). Blocking."""
        self._append({"v": JOURNAL_VERSION, "event": "failed", "dkg_id": dkg_id, "reason": reason})

    def note_failed(self, dkg_id: str) -> None:
        self.pending.pop(dkg_id, None)

    def holds(self, account_id: str) -> bool:
        return any(account_id in s for s in self.stores.values()) or any(
            e["account_id"] == account_id for e in self.pending.values()
        )

    def close(self) -> None:
        """Close the journal and zero every store. Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for store in self.stores.values():
            store.close()
        self.pending.clear()


# -- the driver --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreatedAccount:
    """An account the enclave reported created (its delta is durable) and whose counterpart
    shares this gateway keeps.

    Attributes:
        verifying_shares: every participant's (identifier -> share); empty when the answer
            came from the enclave's stored delta and no participant output was at hand.
        recovered: the answer came from a retried ``DkgRound3`` (the crash rule).
        enclave_ms: time inside the three DKG rpcs; total_ms: the whole creation.
    """

    account_id: str
    ciphersuite: str
    dkg_id: str
    node_id: str
    group_public_key: bytes
    min_signers: int
    max_signers: int
    policy: str
    enclave_identifier: bytes
    enclave_verifying_share: bytes
    verifying_shares: Mapping[bytes, bytes]
    delta_sequence: int
    deltas_head: str
    participants: tuple[str, ...]
    recovered: bool = False
    enclave_ms: float = 0.0
    total_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The ``POST /v1/accounts`` answer."""
        out: dict[str, Any] = {
            "account_id": self.account_id,
            "ciphersuite": self.ciphersuite,
            "group_public_key_hex": self.group_public_key.hex(),
            "min_signers": self.min_signers,
            "max_signers": self.max_signers,
            "policy": self.policy,
            "dkg_id": self.dkg_id,
            "node": self.node_id,
            "enclave": {
                "identifier_hex": self.enclave_identifier.hex(),
                "verifying_share_hex": self.enclave_verifying_share.hex(),
            },
            "participants": list(self.participants),
            "verifying_shares": {k.hex(): v.hex() for k, v in self.verifying_shares.items()},
            "delta_sequence": self.delta_sequence,
            "deltas_head": self.deltas_head,
        }
        if self.ciphersuite == DKG_SUITES[2]:
            out["output_key_hex"] = self.group_public_key[1:].hex()  # x-only, no merkle root
        return out


@dataclass(frozen=True, slots=True)
class DkgSettings:
    """The driver's limits (seconds; named settings, STYLE §7).

    Attributes:
        round_timeout_s: each DKG rpc attempt (round 3 includes the enclave's durable store).
        round3_retry_base_s, round3_retry_max_s: the back-off between retried ``DkgRound3``s.
        round3_give_up_s: how long the crash rule keeps retrying an unreachable node before
            the creation is reported unknown (the entry stays pending: a restart retries).
        max_concurrent: DKGs in flight at once (each holds an enclave pool slot).
        recover_interval_s: how often :meth:`DkgDriver.run` settles the journal's pending
            entries that no request is working on (a request cancelled or given up after
            round 3 was sent).
    """

    round_timeout_s: float = 30.0
    round3_retry_base_s: float = 0.2
    round3_retry_max_s: float = 5.0
    round3_give_up_s: float = 600.0
    max_concurrent: int = 8
    recover_interval_s: float = 30.0


_RETRY_ROUND3: Final = frozenset({StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED})


class DkgDriver:
    """Creates accounts by DKG on the coordinator's nodes with this gateway's participants.

    Args:
        nodes: the enclave nodes (running); a DKG runs on a healthy one.
        participants: the participants other than the enclave (local keys, or remote ones).
        shares: where the local participants' new shares are kept (opened).
        approver: this gateway's approvals under the ``create`` policy, or None.
        enclave_identity_key: the enclaves' delta identity public key (``[bundles]
            delta_identity_key``) to check the enclave's round-1 signature with, or None
            (the attested channel already ends in the enclave; logged once).
        settings: limits.
        on_created: called with each account created (the coordinator forgets any cached
            miss for it).
        registry: the public account registry; an account created with remote participants
            (:class:`~trio_sign.gateway._remote_dkg.RemoteDkgParticipant`) is recorded there,
            fsynced, before the journal says ``created``.
        blocking: runs the journal's blocking writes (fsync): a worker thread by default;
            tests on the virtual clock run them inline (a thread lets the clock jump).
    """

    def __init__(
        self,
        nodes: Sequence[EnclaveNode],
        participants: Sequence[DkgParticipant],
        shares: DkgShares,
        *,
        approver: GatewayApprover | None = None,
        enclave_identity_key: bytes | None = None,
        settings: DkgSettings = DkgSettings(),
        on_created: Callable[[str], None] | None = None,
        blocking: Callable[..., Awaitable[Any]] = trio.to_thread.run_sync,
        registry: AccountRegistry | None = None,
    ) -> None:
        if not participants:
            raise ValueError("a DKG needs at least one participant besides the enclave")
        self.nodes = list(nodes)
        self.participants = list(participants)
        self.shares = shares
        self.approver = approver
        self.enclave_identity_key = enclave_identity_key
        self.settings = settings
        self._on_created = on_created
        self._blocking = blocking
        self.registry = registry
        self._limiter = trio.CapacityLimiter(settings.max_concurrent)
        self._rng = random.Random()
        self._active: set[str] = set()  # dkg_ids a request or recovery is working on
        self.created = 0
        self.recovered = 0
        self.enclave_ms: list[float] = []
        self.total_ms: list[float] = []

    def __repr__(self) -> str:
        return (
            f"DkgDriver(nodes={[n.node_id for n in self.nodes]!r}, participants="
            f"{[p.participant_id for p in self.participants]!r}, created={self.created})"
        )

    # -- the ceremony ------------------------------------------------------------------------

    def ceremony(
        self,
        account_id: str,
        suite: str,
        *,
        min_signers: int | None = None,
        max_signers: int | None = None,
        policy: str = "default",
        dkg_id: str | None = None,
    ) -> tuple[Ceremony, list[DkgParticipant]]:
        """The parameters of a new DKG and the participants taking part (the enclave first at
        identifier 1, then the first ``max_signers - 1`` participants)."""
        if suite not in DKG_SUITES:
            raise DkgFailed(
                f"ciphersuite must be one of {', '.join(DKG_SUITES)}", reason="bad_request"
            )
        if not account_id or len(account_id.encode()) > MAX_ACCOUNT_ID_BYTES:
            raise DkgFailed(
                f"account_id must be 1..{MAX_ACCOUNT_ID_BYTES} bytes", reason="bad_request"
            )
        pool = [p for p in self.participants if _available(p)]
        available = len(pool) + 1
        n = available if max_signers is None else max_signers
        t = min(2, n) if min_signers is None else min_signers
        if not 2 <= t <= n <= min(available, MAX_DKG_SIGNERS):
            raise DkgFailed(
                f"need 2 <= min_signers <= max_signers <= {available} (the enclave and this "
                f"gateway's {available - 1} participant(s)); got {t} of {n}",
                reason="bad_request",
            )
        if not policy or policy == "create":
            raise DkgFailed(
                "policy must name a signing policy (not 'create')", reason="bad_request"
            )
        group = group_for(suite)
        chosen = pool[: n - 1]
        members = [(group.identifier_to_bytes(ENCLAVE_IDENTIFIER), ENCLAVE_KEY_ID)]
        members += [
            (group.identifier_to_bytes(ENCLAVE_IDENTIFIER + 1 + i), p.key_id)
            for i, p in enumerate(chosen)
        ]
        c = Ceremony(
            dkg_id or f"dkg-{secrets.token_hex(16)}",
            account_id,
            suite,
            t,
            n,
            policy,
            tuple(members),
            members[0][0],
        )
        return c, list(chosen)

    def _choose_node(self) -> EnclaveNode:
        live = [n for n in self.nodes if not n.evicted]
        healthy = [n for n in live if n.healthy] or live
        if not healthy:
            raise DkgFailed("no enclave node is available (all evicted)", reason="no_healthy_node")
        return min(healthy, key=lambda n: n.in_flight)

    async def create_account(
        self,
        account_id: str,
        suite: str,
        *,
        min_signers: int | None = None,
        max_signers: int | None = None,
        policy: str = "default",
        approvals: Sequence[Approval] = (),
        dkg_id: str | None = None,
    ) -> CreatedAccount:
        """Create ``account_id`` by DKG (the module docstring's steps).

        ``approvals`` are the caller's (over ``a`` = the account, ``s`` = ``dkg_id``,
        ``message`` = the DKG parameters); this gateway's own are added for the keys the
        caller did not bring.

        Cancellation: before ``DkgRound3`` is sent nothing is kept (the enclave's DKG expires
        and zeroes itself); after, the journal's pending entry is resolved by
        :meth:`recover` (at the next start, or by calling it).

        Error handling: :class:`DkgFailed` with its reason. ``no_healthy_node`` after round 3
        was sent means the outcome is unknown: the entry stays pending and :meth:`recover`
        settles it.
        """
        if self.shares.holds(account_id) or (
            self.registry is not None and account_id in self.registry
        ):
            raise DkgFailed(
                f"account {account_id!r} exists here already (its counterpart shares are held)",
                reason="account_exists",
            )
        c, chosen = self.ceremony(
            account_id,
            suite,
            min_signers=min_signers,
            max_signers=max_signers,
            policy=policy,
            dkg_id=dkg_id,
        )
        async with self._limiter:
            node = self._choose_node()
            node.in_flight += 1
            self._active.add(c.dkg_id)
            try:
                return await self._run(node, c, chosen, approvals)
            finally:
                self._active.discard(c.dkg_id)
                node.in_flight -= 1
                for p in chosen:
                    p.forget(c.dkg_id)

    async def _run(
        self,
        node: EnclaveNode,
        c: Ceremony,
        chosen: list[DkgParticipant],
        brought: Sequence[Approval],
    ) -> CreatedAccount:
        started = time.perf_counter()
        enclave_s = 0.0
        approvals = list(brought)
        if self.approver is not None:
            approvals += self.approver.approve(
                c.account_id, c.dkg_id, c.params, skip={a.key_id for a in brought}
            )
        request = pb.DkgRound1Request(
            dkg_id=c.dkg_id,
            account_id=c.account_id,
            ciphersuite=c.suite,
            min_signers=c.min_signers,
            max_signers=c.max_signers,
            participants=[pb.DkgParticipant(identifier=i, key_id=k) for i, k in c.participants],
            identifier=c.enclave_identifier,
            policy=c.policy,
            approvals=[a.to_proto() for a in approvals],
        )
        t = time.perf_counter()
        r1 = await self._call(node, "DkgRound1", request, pb.DkgRound1Response, c)
        enclave_s += time.perf_counter() - t
        enclave_package = r1.package
        self._check_enclave_package(c, enclave_package)
        ids = [i for i, _ in c.participants[1:]]
        packages = [await p.round1(c, ident) for p, ident in zip(chosen, ids, strict=True)]
        t = time.perf_counter()
        r2 = await self._call(
            node,
            "DkgRound2",
            pb.DkgRound2Request(dkg_id=c.dkg_id, packages=packages),
            pb.DkgRound2Response,
            c,
        )
        enclave_s += time.perf_counter() - t
        everyone = [enclave_package, *packages]
        sent: list[pb.DkgEncryptedShare] = list(r2.shares)
        for p in chosen:
            try:
                sent += await p.round2(c, everyone)
            except FrostError as exc:
                # A proof of knowledge or element refused: the enclave's package (our own are
                # made here).
                raise DkgFailed(
                    f"the enclave's round-1 package was refused: {exc}",
                    reason="bad_package",
                    dkg_id=c.dkg_id,
                ) from exc
        outputs: list[ParticipantOutput] = []
        records: dict[str, ShareRecord] = {}
        try:
            for p, ident in zip(chosen, ids, strict=True):
                try:
                    out = await p.round3(c, [s for s in sent if bytes(s.recipient) == ident])
                except FrostError as exc:
                    raise DkgFailed(
                        f"participant {p.participant_id}'s round 3 failed: {exc}",
                        reason="bad_package",
                        dkg_id=c.dkg_id,
                    ) from exc
                outputs.append(out)
                if out.record is not None:
                    records[p.participant_id] = out.record
            self._check_agreement(c, outputs)
            to_enclave = [s for s in sent if bytes(s.recipient) == c.enclave_identifier]
            remote = [
                (p.participant_id, out.identifier, out.verifying_share)
                for p, out in zip(chosen, outputs, strict=True)
                if out.record is None
            ]
            entry = await self._blocking(
                functools.partial(
                    self.shares.write_pending,
                    c,
                    node.node_id,
                    records,
                    to_enclave,
                    group_public_key=outputs[0].group_public_key,
                    remote=remote,
                )
            )
            self.shares.note_pending(entry)
        finally:
            for r in records.values():
                r.zero()
        t = time.perf_counter()
        try:
            answer, recovered = await self._round3(node, c.dkg_id, to_enclave, c.account_id)
            enclave_s += time.perf_counter() - t
            return await self._settle(
                entry,
                node,
                answer,
                outputs[0],
                recovered=recovered,
                enclave_s=enclave_s,
                started=started,
            )
        except DkgFailed as exc:
            await self._resolve_failed(c.dkg_id, exc)
            raise

    async def _resolve_failed(self, dkg_id: str, exc: DkgFailed) -> None:
        """After round 3 was sent: anything but an unreachable node is a final answer (no
        account, or one this gateway's shares do not fit); the pending entry is closed."""
        if exc.reason != "no_healthy_node":
            await self._blocking(self.shares.write_failed, dkg_id, exc.reason)
            self.shares.note_failed(dkg_id)

    def _check_enclave_package(self, c: Ceremony, package: pb.DkgRound1Package) -> None:
        if bytes(package.identifier) != c.enclave_identifier or package.key_id != ENCLAVE_KEY_ID:
            raise DkgFailed(
                "the enclave answered DkgRound1 with another participant's package",
                reason="bad_package",
                dkg_id=c.dkg_id,
            )
        key = self.enclave_identity_key
        if key is not None and not verify_ed25519(
            key, c.round1_payload(package), bytes(package.signature)
        ):
            raise DkgFailed(
                "the enclave's round-1 package is not signed by the pinned delta identity key "
                "([dkg] enclave_identity_key)",
                reason="bad_package",
                dkg_id=c.dkg_id,
            )

    @staticmethod
    def _check_agreement(c: Ceremony, outputs: Sequence[ParticipantOutput]) -> None:
        first = outputs[0]
        for out in outputs[1:]:
            if out.group_public_key != first.group_public_key or dict(out.verifying_shares) != dict(
                first.verifying_shares
            ):
                raise DkgFailed(
                    "this gateway's participants disagree on the DKG's public output",
                    reason="key_mismatch",
                    dkg_id=c.dkg_id,
                )

    async def _call(
        self,
        node: EnclaveNode,
        method: str,
        request: Any,
        response_type: Any,
        c: Ceremony,
    ) -> Any:
        try:
            return await node._call(method, request, response_type, self.settings.round_timeout_s)
        except RpcError as exc:
            raise _refusal(exc, node, method, c.dkg_id) from exc

    async def _round3(
        self,
        node: EnclaveNode,
        dkg_id: str,
        shares: Sequence[pb.DkgEncryptedShare],
        account_id: str,
    ) -> tuple[pb.DkgRound3Response, bool]:
        """``DkgRound3`` under the crash rule: retried with the same dkg_id while the answer
        is UNAVAILABLE or DEADLINE_EXCEEDED (or the node unreachable) until an answer or
        ``NOT_FOUND``; ``(answer, retried)``. After a reboot the enclave may answer
        UNAVAILABLE for a delta it cannot map to its account: then ``GetAccount`` settles it."""
        request = pb.DkgRound3Request(dkg_id=dkg_id, shares=shares)
        deadline = trio.current_time() + self.settings.round3_give_up_s
        failures = 0
        while True:
            try:
                answer = await node._call(
                    "DkgRound3", request, pb.DkgRound3Response, self.settings.round_timeout_s
                )
                return answer, failures > 0
            except RpcError as exc:
                if exc.status not in _RETRY_ROUND3:
                    if exc.status == StatusCode.NOT_FOUND:
                        raise DkgFailed(
                            f"node {node.node_id}: no account was created by DKG {dkg_id} "
                            f"(DkgRound3 NOT_FOUND: {exc.details})",
                            reason="not_created",
                            status=exc.status,
                            dkg_id=dkg_id,
                        ) from exc
                    raise _refusal(exc, node, "DkgRound3", dkg_id) from exc
                last = exc
            failures += 1
            if failures >= 2:
                found = await self._account_on(node, account_id)
                if found is not None:
                    return found, True
            if trio.current_time() >= deadline:
                raise DkgFailed(
                    f"node {node.node_id}: DkgRound3 of {dkg_id} unanswered after "
                    f"{self.settings.round3_give_up_s:g} s ({last}); it stays pending in the "
                    "journal and is retried at the next start",
                    reason="no_healthy_node",
                    status=last.status,
                    dkg_id=dkg_id,
                )
            log.info(
                "DkgRound3 unanswered; retrying with the same dkg_id (crash rule)",
                extra={"node": node.node_id, "dkg_id": dkg_id, "status": last.status.name},
            )
            await trio.sleep(
                full_jitter_delay(
                    self._rng,
                    base=self.settings.round3_retry_base_s,
                    maximum=self.settings.round3_retry_max_s,
                    failures=failures,
                )
            )

    async def _account_on(self, node: EnclaveNode, account_id: str) -> pb.DkgRound3Response | None:
        """The account as ``GetAccount`` shows it, in a round-3 answer's shape, or None."""
        try:
            info = await node.get_account(account_id)
        except RpcError:
            return None
        return pb.DkgRound3Response(
            account_id=account_id,
            ciphersuite=info.ciphersuite,
            group_public_key=info.group_public_key,
            identifier=info.identifier,
            verifying_share=info.verifying_share,
        )

    async def _settle(
        self,
        entry: Mapping[str, Any],
        node: EnclaveNode,
        answer: pb.DkgRound3Response,
        output: ParticipantOutput | None,
        *,
        recovered: bool,
        enclave_s: float,
        started: float,
    ) -> CreatedAccount:
        """Check the enclave's answer against the journalled shares, journal it, learn the
        shares; the created account."""
        dkg_id, account_id = entry["dkg_id"], entry["account_id"]
        group_key, expected_share = _expected(entry, output, bytes(answer.identifier))
        if (
            answer.account_id != account_id
            or answer.ciphersuite != entry["ciphersuite"]
            or bytes(answer.group_public_key) != group_key
            or (expected_share is not None and bytes(answer.verifying_share) != expected_share)
        ):
            # The enclave stored an account that is not the one our shares belong to: it
            # cannot sign with them. Kept pending (not learned), loudly.
            log.error(
                "DKG answer does not match this gateway's shares",
                extra={"alert": "dkg_key_mismatch", "node": node.node_id, "dkg_id": dkg_id},
            )
            raise DkgFailed(
                f"node {node.node_id}: DKG {dkg_id}'s account is not the participants' group "
                "key or enclave share",
                reason="key_mismatch",
                dkg_id=dkg_id,
            )
        account = _registered(entry, group_key)
        if account is not None:
            if self.registry is None:
                raise DkgFailed(
                    f"DKG {dkg_id} has remote participants but this gateway keeps no account "
                    "registry ([accounts] registry)",
                    reason="bad_request",
                    dkg_id=dkg_id,
                )
            # Before "created": a crash in between replays round 3 and writes it again.
            await self._blocking(self.registry.write, account)
            self.registry.note(account)
        await self._blocking(self.shares.write_created, entry, answer)
        self.shares.note_created(entry)
        if self._on_created is not None:
            self._on_created(account_id)
        total_ms = (time.perf_counter() - started) * 1000
        self.created += 1
        self.recovered += int(recovered)
        self.enclave_ms.append(enclave_s * 1000)
        self.total_ms.append(total_ms)
        log.info(
            "account created by DKG",
            extra={
                "node": node.node_id,
                "dkg_id": dkg_id,
                "ciphersuite": entry["ciphersuite"],
                "delta_sequence": answer.delta_sequence,
                "recovered": recovered,
            },
        )
        verifying = dict(output.verifying_shares) if output is not None else {}
        return CreatedAccount(
            account_id=account_id,
            ciphersuite=entry["ciphersuite"],
            dkg_id=dkg_id,
            node_id=node.node_id,
            group_public_key=group_key,
            min_signers=entry["min_signers"],
            max_signers=entry["max_signers"],
            policy=entry["policy"],
            enclave_identifier=bytes(answer.identifier),
            enclave_verifying_share=bytes(answer.verifying_share),
            verifying_shares=verifying,
            delta_sequence=answer.delta_sequence,
            deltas_head=answer.deltas_head or _HEAD_ZERO,
            participants=tuple(s["participant"] for s in entry["shares"])
            + tuple(r["participant"] for r in entry.get("remote", ())),
            recovered=recovered,
            enclave_ms=enclave_s * 1000,
            total_ms=total_ms,
        )

    # -- the crash rule at start -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Settle the journal's pending entries (:meth:`recover`) now and then every
        ``recover_interval_s`` until cancelled: a gateway that restarted after a crash, or a
        request that was cancelled or gave up after ``DkgRound3`` was sent, gets its answer
        without a restart.

        Cancellation: an entry being retried stays pending (the next start settles it).
        """
        task_status.started()
        while True:
            await self.recover()
            await trio.sleep(self.settings.recover_interval_s)

    async def recover(self) -> list[CreatedAccount | DkgFailed]:
        """Settle every pending journal entry no request is working on (a gateway stopped
        between journalling its shares and the ``DkgRound3`` answer): retry ``DkgRound3`` with
        the same dkg_id and the journalled ciphertexts until an answer (the account is
        created: its shares are learned) or ``NOT_FOUND`` (no account exists: the entry is
        marked failed). An entry whose node stays unreachable stays pending.

        Returns one outcome per entry, in journal order.
        """
        outcomes: list[CreatedAccount | DkgFailed] = []
        for dkg_id, entry in list(self.shares.pending.items()):
            if dkg_id in self._active:
                continue
            self._active.add(dkg_id)
            try:
                outcomes.append(await self._recover_one(dkg_id, entry))
            finally:
                self._active.discard(dkg_id)
        return outcomes

    async def _recover_one(
        self, dkg_id: str, entry: Mapping[str, Any]
    ) -> CreatedAccount | DkgFailed:
        try:
            by_id = {n.node_id: n for n in self.nodes}
            node = by_id.get(entry["node"]) or self._choose_node()
            shares = [
                pb.DkgEncryptedShare(
                    sender=bytes.fromhex(s["sender"]),
                    recipient=bytes.fromhex(s["recipient"]),
                    ciphertext=bytes.fromhex(s["ciphertext"]),
                )
                for s in entry["round3"]
            ]
            started = time.perf_counter()
            answer, _ = await self._round3(node, dkg_id, shares, entry["account_id"])
            return await self._settle(
                entry, node, answer, None, recovered=True, enclave_s=0.0, started=started
            )
        except DkgFailed as exc:
            await self._resolve_failed(dkg_id, exc)
            log.warning(
                "pending DKG not created: %s",
                exc.reason,
                extra={"dkg_id": dkg_id, "reason": exc.reason},
            )
            return exc


def _expected(
    entry: Mapping[str, Any], output: ParticipantOutput | None, enclave_identifier: bytes
) -> tuple[bytes, bytes | None]:
    """The group key of the journalled shares and, when the participants' output is at hand,
    the enclave's verifying share it implies."""
    if entry["shares"]:
        group_key = bytes.fromhex(entry["shares"][0]["record"]["group_public_key"])
    else:
        group_key = bytes.fromhex(entry["group_public_key"])
    if output is None:
        return group_key, None
    return group_key, output.verifying_shares.get(enclave_identifier)


def _available(p: DkgParticipant) -> bool:
    """A participant can take part now (a remote one: connected with DKG)."""
    check = getattr(p, "available", None)
    return True if check is None else bool(check())


def _registered(entry: Mapping[str, Any], group_key: bytes) -> RegisteredAccount | None:
    """The registry entry of a journalled DKG with remote participants, else None."""
    remote = entry.get("remote") or []
    if not remote:
        return None
    return RegisteredAccount(
        entry["account_id"],
        entry["ciphersuite"],
        group_key,
        entry["min_signers"],
        entry["max_signers"],
        tuple(
            RemoteHolder(
                r["participant"],
                bytes.fromhex(r["identifier"]),
                bytes.fromhex(r["verifying_share"]),
            )
            for r in remote
        ),
        entry["policy"],
        "dkg",
    )


def _refusal(exc: RpcError, node: EnclaveNode, method: str, dkg_id: str) -> DkgFailed:
    if exc.status == StatusCode.INVALID_ARGUMENT and method != "DkgRound1":
        # Our participants' packages or shares refused (named in the details).
        return DkgFailed(
            f"node {node.node_id} refused {method}: {exc}",
            reason="bad_package",
            status=exc.status,
            dkg_id=dkg_id,
        )
    reason = {
        StatusCode.PERMISSION_DENIED: "not_authorized",
        StatusCode.ALREADY_EXISTS: "account_exists",
        StatusCode.INVALID_ARGUMENT: "bad_request",
        StatusCode.UNAVAILABLE: "no_healthy_node",
        StatusCode.DEADLINE_EXCEEDED: "no_healthy_node",
    }.get(exc.status, "enclave_refused")
    return DkgFailed(
        f"node {node.node_id} refused {method}: {exc}",
        reason=reason,
        status=exc.status,
        dkg_id=dkg_id,
    )
