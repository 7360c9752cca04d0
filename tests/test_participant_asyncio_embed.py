"""The library embedded in a plain asyncio service (no anyio in the application's code, no
pytest plugin): the example docs/participants.md points to, run for real against the gateway's
endpoint on loopback.

The "service" is what an operations signer looks like: a queue of pending approvals that a
person works through (here a coroutine that approves everything but one account), and the
participant client as one more asyncio task beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import trio

from tests.participant_helpers import SUITES, GatewayThread, Shares, deal, sign_with_hub
from trio_sign.gateway._approvals import ApproverSigningKey
from trio_sign.gateway._participants import (
    HubSettings,
    ParticipantError,
    ParticipantHub,
    ParticipantKey,
)
from trio_sign.participant import CallbackPolicy, ClientSettings, ParticipantClient, SignRequest

# --- the application ----------------------------------------------------------------------------


@dataclass
class PendingApproval:
    request: SignRequest
    answer: asyncio.Future[bool] = field(default_factory=asyncio.Future)


class ApprovalInbox:
    """What a real service would show on a screen: requests waiting for a person."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[PendingApproval] = asyncio.Queue(maxsize=100)

    async def ask(self, request: SignRequest) -> bool:
        item = PendingApproval(request)
        await self.queue.put(item)
        return await item.answer


async def operator(inbox: ApprovalInbox) -> None:
    """A person: approves every request except for the account 'acct-frozen'."""
    while True:
        item = await inbox.queue.get()
        item.answer.set_result(item.request.account_id != "acct-frozen")


async def service(url: str, auth: ApproverSigningKey, shares: Shares, done: asyncio.Event) -> None:
    inbox = ApprovalInbox()
    client = ParticipantClient(
        ClientSettings(url),
        participant_id="ops-1",
        key_id="ops-1-auth",
        auth_key=auth,
        approver=auth,
        approver_key_id="ops-1",
        shares=shares,
        policy=CallbackPolicy(inbox.ask),
    )
    tasks = [asyncio.create_task(client.run()), asyncio.create_task(operator(inbox))]
    try:
        await done.wait()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


# --- the test -----------------------------------------------------------------------------------


def test_a_plain_asyncio_service_signs_through_the_gateway() -> None:
    auth = ApproverSigningKey.generate("ed25519")
    accounts = [deal("acct-live", SUITES[0]), deal("acct-frozen", SUITES[2])]
    hub = ParticipantHub(
        {"ops-1": ParticipantKey("ops-1", "ops-1-auth", auth.public_key)},
        HubSettings(gateway_id="gw"),
    )
    gw = GatewayThread(hub)
    gw.start()
    outcomes: dict[str, object] = {}
    try:

        async def main() -> None:
            done = asyncio.Event()
            shares = Shares(a.records[1] for a in accounts)
            running = asyncio.create_task(service(gw.url, auth, shares, done))

            async def coordinator() -> None:
                with trio.fail_after(30):
                    await hub.wait_connected("ops-1")
                for account in accounts:
                    try:
                        sig, _ = await sign_with_hub(hub, "ops-1", account, b"transfer")
                        outcomes[account.account_id] = sig
                    except ParticipantError as exc:
                        outcomes[account.account_id] = exc.decline_reason

            await asyncio.to_thread(gw.call_blocking, coordinator)
            done.set()
            await running

        asyncio.run(main())
    finally:
        gw.stop()
        auth.close()
    assert isinstance(outcomes["acct-live"], bytes)
    assert outcomes["acct-frozen"] == "rejected"
