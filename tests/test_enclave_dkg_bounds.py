"""The DKG and repair handlers bound their work before doing it (DESIGN §16): a request whose
lists have the wrong number of entries, or an entry of the wrong size, is refused before any
entry is hashed, decoded, signature-checked or used to derive a key.

Each test counts the calls of the expensive step (monkeypatched in ``trio_sign.enclave._dkg``)
and sends a request that is refused on a count or a size, through the service's handlers
in-process (no gRPC receive cap, so a 10,000-entry list reaches the handler).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from proto_min import sign_service_pb2 as pb
from trio_sign.enclave import _dkg

from .test_enclave_dkg import ED25519, SECP256K1, ceremony, enclave, round1, round2
from .test_enclave_refresh import create_account, lifecycle_enclave
from .test_enclave_repair import plan, step1, to_enclave

MANY = 10_000


class Calls:
    """Counts the calls of the ``_dkg`` functions it wraps."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch
        self.counts: dict[str, int] = {}

    def count(self, *names: str) -> None:
        for name in names:
            self.counts[name] = 0
            self._monkeypatch.setattr(_dkg, name, self._counted(name, getattr(_dkg, name)))

    def _counted(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.counts[name] += 1
            return real(*args, **kwargs)

        return wrapper

    def reset(self) -> None:
        self.counts = dict.fromkeys(self.counts, 0)

    def none(self) -> None:
        assert self.counts == dict.fromkeys(self.counts, 0)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    return Calls(monkeypatch)


async def test_round2_with_the_wrong_count_is_refused_unhashed(calls: Calls) -> None:
    async with enclave(over_grpc=False) as node:
        c = ceremony(SECP256K1)
        run = await round1(node, c)
        many = pb.DkgRound2Request(dkg_id=c.dkg_id, packages=[pb.DkgRound1Package()] * MANY)
        calls.count("_digest", "verify_ed25519", "share_key_into")
        details = await node.refused("INVALID_ARGUMENT", "DkgRound2", many)
        assert f"got {MANY}" in details
        calls.none()
        # a retry after round 2 ran: still refused as other packages, unhashed
        await round2(node, run)
        calls.reset()
        assert "already ran round 2" in await node.refused("FAILED_PRECONDITION", "DkgRound2", many)
        calls.none()


async def test_round2_checks_every_size_before_any_signature(calls: Calls) -> None:
    async with enclave(over_grpc=False) as node:
        c = ceremony(ED25519, n=4)
        run = await round1(node, c)
        packages = run.packages_for_enclave()
        packages[0].signature = bytes(64)  # does not verify: found only by a signature check
        packages[-1].encryption_key = b"\x01" * 31  # the wrong size: found by a length check
        calls.count("verify_ed25519", "_digest")
        details = await node.refused(
            "INVALID_ARGUMENT", "DkgRound2", pb.DkgRound2Request(dkg_id=c.dkg_id, packages=packages)
        )
        assert "32-byte encryption_key" in details
        calls.none()
        assert node.registry.sessions[c.dkg_id].state is _dkg.DkgState.ROUND1_SENT


async def test_round3_checks_every_size_before_any_key(calls: Calls) -> None:
    async with enclave(over_grpc=False) as node:
        c = ceremony(ED25519, n=4)
        run = await round1(node, c)
        await round2(node, run)
        for local in run.locals:
            local.round3(run.enclave_shares + run.local_shares)
        shares = run.shares_for_enclave()
        shares[-1].ciphertext = bytes(_dkg.CIPHERTEXT_BYTES - 1)
        calls.count("share_key_into", "decrypt_share_into")
        details = await node.refused(
            "INVALID_ARGUMENT", "DkgRound3", pb.DkgRound3Request(dkg_id=c.dkg_id, shares=shares)
        )
        assert "ciphertext must be" in details
        calls.none()


async def test_round2_names_a_long_stranger_identifier_by_its_size() -> None:
    async with enclave(over_grpc=False) as node:
        c = ceremony(ED25519)
        run = await round1(node, c)
        packages = run.packages_for_enclave()
        packages[0].identifier = b"\x01" * 100_000
        details = await node.refused(
            "INVALID_ARGUMENT", "DkgRound2", pb.DkgRound2Request(dkg_id=c.dkg_id, packages=packages)
        )
        assert "identifier of 100000 bytes is not another participant" in details
        assert len(details) < 200


async def test_repair_step1_with_the_wrong_number_of_keys_is_refused_undecoded(
    calls: Calls,
) -> None:
    async with lifecycle_enclave(over_grpc=False) as node:
        a = await create_account(node, ED25519, t=2, n=4)
        r = plan(a)
        request = r.step1_request()
        del request.keys[-1]
        calls.count("repair_params", "verify_ed25519", "_digest")
        details = await node.refused("INVALID_ARGUMENT", "RepairStep1", request)
        assert "keys must hold the" in details
        calls.none()


async def test_repair_step2_with_the_wrong_count_is_refused_unhashed(calls: Calls) -> None:
    async with lifecycle_enclave(over_grpc=False) as node:
        a = await create_account(node, SECP256K1, t=2, n=4)
        r = plan(a)
        s1 = await step1(node, r)
        many = pb.RepairStep2Request(repair_id=r.repair_id, deltas=[pb.DkgEncryptedShare()] * MANY)
        calls.count("_digest", "share_key_into", "decrypt_share_into")
        details = await node.refused("INVALID_ARGUMENT", "RepairStep2", many)
        assert f"got {MANY}" in details
        calls.none()
        # the repair is intact: the right deltas still answer, and a retry with the wrong
        # count after that is refused as other deltas, unhashed
        request = pb.RepairStep2Request(repair_id=r.repair_id, deltas=to_enclave(s1))
        await node.call("RepairStep2", request)
        calls.reset()
        assert "already ran step 2" in await node.refused(
            "FAILED_PRECONDITION", "RepairStep2", many
        )
        calls.none()


async def test_round3_and_repair_name_a_long_stranger_identifier_by_its_size() -> None:
    """The shares of round 3 and the keys of repair step 1 go through the same check as the
    packages of round 2: an identifier that is not expected is named by its size."""
    async with enclave(over_grpc=False) as node:
        c = ceremony(ED25519)
        run = await round1(node, c)
        await round2(node, run)
        for local in run.locals:
            local.round3(run.enclave_shares + run.local_shares)
        shares = run.shares_for_enclave()
        shares[0].sender = b"\x01" * 100_000
        details = await node.refused(
            "INVALID_ARGUMENT", "DkgRound3", pb.DkgRound3Request(dkg_id=c.dkg_id, shares=shares)
        )
        assert "sender of 100000 bytes is not another participant" in details
        assert len(details) < 200
    async with lifecycle_enclave(over_grpc=False) as node:
        a = await create_account(node, ED25519, t=2, n=4)
        request = plan(a).step1_request()
        request.keys[0].identifier = b"\x01" * 100_000
        details = await node.refused("INVALID_ARGUMENT", "RepairStep1", request)
        assert "identifier of 100000 bytes is not another helper" in details
        assert len(details) < 200
