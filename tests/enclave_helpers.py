"""Shared fixtures for enclave tests: a tiny share store and the counterpart signer."""

from __future__ import annotations

import functools
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.signing
import trio

from trio_sign.crypto import (
    SigningCommitment,
    SigningNonces,
    aggregate,
    commit,
    sign,
    trusted_dealer_keygen,
)
from trio_sign.enclave import EnclaveConfig
from trio_sign.nitro import (
    ChannelMessage,
    EventsConfigMessage,
    ExitMessage,
    LogMessage,
    MessageStream,
    StateMessage,
)
from trio_sign.parent import (
    DevRecipientKms,
    StatusLink,
    serve_log_connection,
    serve_preload,
    serve_status_connection,
)
from trio_sign.shares import DevKeyFile, ShareRecord, ShareStore, encode_bundle, write_plaintext
from trio_sign.transport import open_listeners


@dataclass
class Account:
    account_id: str
    group_public_key: bytes
    service: ShareRecord
    peer: ShareRecord


def make_accounts(
    n: int, *, service_id: int = 1, peer_id: int = 2
) -> tuple[ShareStore, dict[str, Account]]:
    """A 2-of-3 dealer per account; the service's shares go into a ShareStore."""
    accounts: dict[str, Account] = {}
    records = []
    for i in range(n):
        dealer = trusted_dealer_keygen(2, 3)
        aid = f"acct-{i}"
        recs = {
            s.identifier[0]: ShareRecord(
                aid,
                s.identifier,
                bytearray(s.signing_share),
                s.verifying_share,
                dealer.group_public_key,
                2,
                3,
            )
            for s in dealer.shares
        }
        accounts[aid] = Account(aid, dealer.group_public_key, recs[service_id], recs[peer_id])
        records.append(recs[service_id])
    buf = io.BytesIO()
    write_plaintext(buf, records)
    buf.seek(0)
    return ShareStore.load_plaintext(buf), accounts


class Peer:
    """The counterpart participant, signing locally."""

    def __init__(self, account: Account) -> None:
        self.account = account
        self.nonces: SigningNonces = commit(account.peer.identifier, account.peer.signing_share)

    @property
    def commitment(self) -> SigningCommitment:
        return self.nonces.commitment

    def sign(self, message: bytes, commitments: list[SigningCommitment]) -> bytes:
        return sign(
            self.nonces,
            signing_share=self.account.peer.signing_share,
            group_public_key=self.account.group_public_key,
            message=message,
            commitments=commitments,
        )

    def aggregate(
        self, message: bytes, commitments: list[SigningCommitment], shares: dict[bytes, bytes]
    ) -> bytes:
        return aggregate(
            commitments=commitments,
            message=message,
            group_public_key=self.account.group_public_key,
            signature_shares=shares,
            verifying_shares={
                self.account.service.identifier: self.account.service.verifying_share,
                self.account.peer.identifier: self.account.peer.verifying_share,
            },
        )

    def complete_and_verify(
        self,
        message: bytes,
        commitments: list[SigningCommitment],
        service_identifier: bytes,
        service_share: bytes,
    ) -> bytes:
        """Add this participant's share to the service's, aggregate, and check the result as a
        plain Ed25519 signature under the group key (libsodium). Returns the signature."""
        sig = self.aggregate(
            message,
            commitments,
            {
                service_identifier: service_share,
                self.account.peer.identifier: self.sign(message, commitments),
            },
        )
        nacl.signing.VerifyKey(self.account.group_public_key).verify(message, sig)
        return sig


def sorted_commitments(*cs: Any) -> list[Any]:
    """Ed25519 commitments (of any commitment class) sorted by identifier, as RFC 9591 wants."""
    return sorted(cs, key=lambda c: int.from_bytes(c.identifier, "little"))


@dataclass
class FakeParent:
    dir: Path
    bundle: Path
    kms: Any
    states: list[StateMessage] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    preload_errors: list[BaseException] = field(default_factory=list)
    boot_silent: bool = False
    events: EventsConfigMessage | None = None
    status_link: StatusLink = field(default_factory=StatusLink)

    def on_status(self, message: ChannelMessage) -> None:
        if isinstance(message, StateMessage):
            self.states.append(message)
        elif isinstance(message, ExitMessage):
            self.exits.append(message.code)

    def on_log(self, message: ChannelMessage) -> None:
        if isinstance(message, LogMessage):
            self.logs.append(json.loads(message.line))

    async def boot(self, stream: trio.SocketStream) -> None:
        if self.boot_silent:
            await trio.sleep_forever()
        try:
            await serve_preload(MessageStream(stream), self.bundle, self.kms, events=self.events)
        except Exception as exc:
            self.preload_errors.append(exc)
        finally:
            await stream.aclose()

    def config(self, **kw: Any) -> EnclaveConfig:
        return EnclaveConfig(
            grpc_listen=f"unix://{self.dir}/grpc.sock",
            nsm="local",
            preload_address=f"unix://{self.dir}/boot.sock",
            status_address=f"unix://{self.dir}/status.sock",
            log_address=f"unix://{self.dir}/logs.sock",
            preload_timeout_s=kw.pop("preload_timeout_s", 20.0),
            drain_grace_s=1.0,
            **kw,
        )


@asynccontextmanager
async def parent(
    tmp_path: Path,
    records: list[ShareRecord],
    nsm_dir: Path,
    *,
    tamper: bool = False,
    boot_silent: bool = False,
) -> AsyncIterator[FakeParent]:
    d = Path(tmp_path) / "sock"
    d.mkdir()
    key = DevKeyFile.create(d / "dev.key")
    data = bytearray(encode_bundle(records, key, chunk_size=1024))
    if tamper:
        data[-40] ^= 1
    bundle = d / "bundle.enc"
    bundle.write_bytes(bytes(data))
    root_pem = (nsm_dir / "local-nsm-root.pem").read_bytes()
    fake = FakeParent(d, bundle, DevRecipientKms(key, root_pem=root_pem), boot_silent=boot_silent)
    async with trio.open_nursery() as nursery:
        for name, handler in (
            ("boot", fake.boot),
            (
                "status",
                functools.partial(
                    serve_status_connection, on=fake.on_status, link=fake.status_link
                ),
            ),
            ("logs", functools.partial(serve_log_connection, on=fake.on_log)),
        ):
            listeners = await open_listeners(f"unix://{d}/{name}.sock")
            await nursery.start(trio.serve_listeners, handler, listeners)
        yield fake
        nursery.cancel_scope.cancel()
