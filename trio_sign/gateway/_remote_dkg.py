"""A DKG participant on the other end of a WebSocket (DESIGN §15, docs/participants.md
"DKG"): :class:`RemoteDkgParticipant` implements :class:`~trio_sign.gateway.DkgParticipant`
with the hub's ``dkg_*`` calls, so :class:`~trio_sign.gateway.DkgDriver` runs the same rounds
whether a participant's key is held here or by a participant process. Its new share stays
with the participant (sealed durably in its store before it answers round 3); the driver
records only its public part (the account registry).

Error handling: a participant's failure (not connected, declined, timed out, disconnected, a
malformed answer) is :class:`~trio_sign.gateway.DkgFailed` ``participant_failed``, naming it.
"""

from __future__ import annotations

from collections.abc import Sequence

from proto_min import sign_service_pb2 as pb

from ..participant._session import package_field, package_pb, share_field, share_pb
from ._dkg import Ceremony, DkgFailed, ParticipantOutput
from ._participants import ParticipantError, ParticipantHub, RemoteDkg


class RemoteDkgParticipant:
    """Participant ``participant_id`` of the hub, in DKGs under ``key_id`` (the id the
    enclaves' ``[dkg] participants`` pin its Ed25519 key under: its authentication key).

    Args:
        hub: the participant endpoint.
        timeout_s: each round's answer (the participant's policy may ask a person in round 1).
        dkg_timeout_s: the whole DKG's deadline on the wire.
    """

    remote = True

    def __init__(
        self,
        hub: ParticipantHub,
        participant_id: str,
        key_id: str,
        *,
        timeout_s: float = 30.0,
        dkg_timeout_s: float = 120.0,
    ) -> None:
        self.hub = hub
        self.participant_id = participant_id
        self.key_id = key_id
        self.timeout_s = timeout_s
        self.dkg_timeout_s = dkg_timeout_s
        self._open: dict[str, tuple[RemoteDkg, bytes]] = {}

    def __repr__(self) -> str:
        return (
            f"RemoteDkgParticipant({self.participant_id!r}, key_id={self.key_id!r}, "
            f"open={len(self._open)})"
        )

    def available(self) -> bool:
        """Connected now with a connection that carries DKG (contract version 2)."""
        return self.hub.speaks_dkg(self.participant_id)

    def _failed(self, c: Ceremony, exc: ParticipantError) -> DkgFailed:
        return DkgFailed(
            f"participant {self.participant_id!r}: {exc}",
            reason="participant_failed",
            dkg_id=c.dkg_id,
        )

    async def round1(self, c: Ceremony, identifier: bytes) -> pb.DkgRound1Package:
        try:
            handle, package = await self.hub.dkg_round1(
                self.participant_id,
                dkg_id=c.dkg_id,
                account_id=c.account_id,
                ciphersuite=c.suite,
                min_signers=c.min_signers,
                max_signers=c.max_signers,
                policy=c.policy,
                participants=c.participants,
                enclave_identifier=c.enclave_identifier,
                identifier=identifier,
                timeout_s=self.timeout_s,
                dkg_timeout_s=self.dkg_timeout_s,
            )
        except ParticipantError as exc:
            raise self._failed(c, exc) from exc
        self._open[c.dkg_id] = (handle, identifier)
        if package.identifier != identifier or package.key_id != self.key_id:
            raise DkgFailed(
                f"participant {self.participant_id!r} answered with another identifier's or "
                "key's package",
                reason="bad_package",
                dkg_id=c.dkg_id,
            )
        return package_pb(package)

    def _handle(self, c: Ceremony) -> tuple[RemoteDkg, bytes]:
        entry = self._open.get(c.dkg_id)
        if entry is None:
            raise DkgFailed(
                f"participant {self.participant_id} has no open DKG {c.dkg_id}",
                reason="bad_request",
                dkg_id=c.dkg_id,
            )
        return entry

    async def round2(
        self, c: Ceremony, packages: Sequence[pb.DkgRound1Package]
    ) -> list[pb.DkgEncryptedShare]:
        handle, _ = self._handle(c)
        try:
            shares = await self.hub.dkg_round2(
                handle, [package_field(p) for p in packages], timeout_s=self.timeout_s
            )
        except ParticipantError as exc:
            raise self._failed(c, exc) from exc
        return [share_pb(s) for s in shares]

    async def round3(
        self, c: Ceremony, shares: Sequence[pb.DkgEncryptedShare]
    ) -> ParticipantOutput:
        handle, identifier = self._handle(c)
        try:
            done = await self.hub.dkg_round3(
                handle, [share_field(s) for s in shares], timeout_s=self.timeout_s
            )
        except ParticipantError as exc:
            raise self._failed(c, exc) from exc
        finally:
            self._open.pop(c.dkg_id, None)  # round 3 ends the request either way
        if done.identifier != identifier:
            raise DkgFailed(
                f"participant {self.participant_id!r} reported another identifier's output",
                reason="bad_package",
                dkg_id=c.dkg_id,
            )
        return ParticipantOutput(
            done.identifier,
            done.verifying_share,
            done.group_public_key,
            {v.identifier: v.verifying_share for v in done.verifying_shares},
            None,
        )

    def forget(self, dkg_id: str) -> None:
        entry = self._open.pop(dkg_id, None)
        if entry is not None:
            self.hub.dkg_cancel(entry[0])


__all__ = ["RemoteDkgParticipant"]
