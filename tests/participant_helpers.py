"""Helpers for the participant tests: dealt accounts in every suite, keys, a hub on loopback,
and the coordinator's part of a session (the test plays the enclave with local shares)."""

from __future__ import annotations

import functools
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import trio

from trio_sign.crypto import SCHEMES, Scheme, scheme_by_name
from trio_sign.gateway._approvals import ApproverSigningKey
from trio_sign.gateway._participants import (
    ParticipantCommitment,
    ParticipantHub,
    ParticipantKey,
    ParticipantShare,
    check_signature_share,
    commitment_entries,
)
from trio_sign.participant import _messages as m
from trio_sign.shares import ShareRecord

SUITES = [s.name for s in SCHEMES]


@dataclass
class Account:
    """One 2-of-3 account: ``records[i]`` is identifier i+1's share."""

    account_id: str
    scheme: Scheme
    records: list[ShareRecord]

    @property
    def group_public_key(self) -> bytes:
        return self.records[0].group_public_key


def deal(account_id: str, suite: str, min_signers: int = 2, max_signers: int = 3) -> Account:
    scheme = scheme_by_name(suite)
    out = scheme.trusted_dealer_keygen(min_signers, max_signers)
    records = [
        ShareRecord(
            account_id,
            share.identifier,
            bytearray(share.signing_share),
            share.verifying_share,
            out.group_public_key,
            min_signers,
            max_signers,
            ciphersuite=suite,
        )
        for share in out.shares
    ]
    for share in out.shares:
        share.signing_share[:] = bytes(len(share.signing_share))
    return Account(account_id, scheme, records)


def deal_all(prefix: str = "acct", per_suite: int = 1) -> list[Account]:
    return [deal(f"{prefix}-{i}-{suite}", suite) for suite in SUITES for i in range(per_suite)]


class Shares:
    """A plain in-memory ShareSource."""

    def __init__(self, records: Iterable[ShareRecord]) -> None:
        self.records = {r.account_id: r for r in records}

    def share(self, account_id: str) -> ShareRecord | None:
        return self.records.get(account_id)


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def participant_keys(pid: str = "ops-1") -> tuple[ApproverSigningKey, ParticipantKey]:
    key = ApproverSigningKey.generate("ed25519")
    return key, ParticipantKey(pid, f"{pid}-auth", key.public_key)


async def sign_with_hub(
    hub: ParticipantHub,
    participant_id: str,
    account: Account,
    message: bytes,
    *,
    session_id: str = "session-1",
    merkle_root: bytes | None = None,
    enclave_index: int = 0,
    participant_index: int = 1,
    timeout_s: float = 10.0,
) -> tuple[bytes, ParticipantShare]:
    """The coordinator's part: round one with the participant and the 'enclave' (a local
    share), round two, the participant's share checked, aggregate, verify."""
    scheme = account.scheme
    enclave = account.records[enclave_index]
    ours = scheme.commit(enclave.identifier, enclave.signing_share)
    try:
        theirs = await hub.sign(
            participant_id,
            account_id=account.account_id,
            session_id=session_id,
            ciphersuite=scheme.name,
            message=message,
            timeout_s=timeout_s,
            taproot_merkle_root=merkle_root,
        )
        share, commitments = await round2(
            hub, theirs, account, ours, enclave, message, merkle_root, timeout_s
        )
        part = account.records[participant_index]
        check_signature_share(
            scheme,
            share,
            verifying_share=part.verifying_share,
            commitments=commitments,
            group_public_key=account.group_public_key,
            message=message,
            merkle_root=merkle_root,
        )
        own_share = scheme.sign(
            ours,
            signing_share=enclave.signing_share,
            group_public_key=account.group_public_key,
            message=message,
            commitments=commitments,
            merkle_root=merkle_root,
        )
        signature = scheme.aggregate(
            commitments=commitments,
            message=message,
            group_public_key=account.group_public_key,
            signature_shares={
                enclave.identifier: own_share,
                share.identifier: share.signature_share,
            },
            merkle_root=merkle_root,
        )
        assert scheme.verify(account.group_public_key, message, signature, merkle_root)
        return signature, share
    finally:
        ours.zero()


async def round2(
    hub: ParticipantHub,
    theirs: ParticipantCommitment,
    account: Account,
    ours: Any,
    enclave: ShareRecord,
    message: bytes,
    merkle_root: bytes | None,
    timeout_s: float,
) -> tuple[ParticipantShare, list[Any]]:
    scheme = account.scheme
    commitments = sorted(
        [ours.commitment, theirs.suite_commitment()],
        key=lambda x: scheme.identifier_from_bytes(x.identifier),
    )
    entries = entries_of(commitments)
    share = await hub.round2(theirs, entries, enclave.identifier, timeout_s=timeout_s)
    return share, commitments


def entries_of(commitments: Sequence[Any]) -> list[m.CommitmentEntry]:
    return commitment_entries(commitments)


T = TypeVar("T")


class GatewayThread:
    """A ParticipantHub served on 127.0.0.1 by trio in a thread of its own."""

    def __init__(self, hub: ParticipantHub) -> None:
        self.hub = hub
        self.port = 0
        self.ssl_context: ssl.SSLContext | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self._scope = scope
                async with trio.open_nursery() as nursery:
                    self.port = await nursery.start(
                        functools.partial(
                            self.hub.serve, "127.0.0.1", 0, ssl_context=self.ssl_context
                        )
                    )
                    self._ready.set()

        try:
            trio.run(main)
        except BaseException as exc:  # reported by stop()
            self._error = exc
            self._ready.set()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10), "the gateway thread did not start"
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._scope is not None and self._token is not None:
            # From a thread of its own: this one may be running the test's own trio loop,
            # where trio's blocking from_thread calls are refused.
            scope, token = self._scope, self._token
            helper = threading.Thread(
                target=lambda: trio.from_thread.run_sync(scope.cancel, trio_token=token)
            )
            helper.start()
            helper.join(10)
        self._thread.join(10)
        assert not self._thread.is_alive()
        if self._error is not None:
            raise self._error

    def call_blocking(self, fn: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T:
        return trio.from_thread.run(functools.partial(fn, *args, **kw), trio_token=self._token)

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T:
        """Run ``fn`` in the gateway's trio loop, from either backend."""
        return await anyio.to_thread.run_sync(
            functools.partial(self.call_blocking, fn, *args, **kw)
        )

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/participants"
