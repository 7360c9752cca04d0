"""Shared fixtures for enclave tests: a tiny share store and the counterpart signer."""

from __future__ import annotations

import io
from dataclasses import dataclass

from trio_sign.crypto import (
    SigningCommitment,
    SigningNonces,
    aggregate,
    commit,
    sign,
    trusted_dealer_keygen,
)
from trio_sign.shares import ShareRecord, ShareStore, write_plaintext


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


def sorted_commitments(*cs: SigningCommitment) -> list[SigningCommitment]:
    return sorted(cs, key=lambda c: int.from_bytes(c.identifier, "little"))
