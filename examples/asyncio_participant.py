"""A remote participant embedded in a plain asyncio service (docs/participants.md, DESIGN §15).

The service is what an operations signer looks like: an *approval inbox* of requests waiting
for a person, an operator working through it, and the participant library as one more asyncio
task beside them. It reads the same ``participant.toml`` as ``trio-sign participant`` (keys,
sealed store, gateway URL), but asks its inbox instead of the automatic ``[policy]``: every
signing request, and every DKG that would create an account with this participant's share.

    python examples/asyncio_participant.py --config participant.toml [--deny ACCOUNT ...]

Here the "person" is :func:`operator`, which approves everything except the accounts named by
``--deny``; a real service would put :class:`PendingApproval` items on a screen or a phone.
SIGINT/SIGTERM stop it: the client's connection closes and every nonce it held is zeroed;
the keys and shares are zeroed as the service exits. No anyio and no Trio in this file: the
library runs on whatever loop it is awaited from (anyio underneath).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trio_sign.participant import CallbackPolicy, Decision, DkgRound1, SignRequest
from trio_sign.participant._config import (
    OpenParticipant,
    key_source,
    open_participant,
    parse_config,
)


@dataclass
class PendingApproval:
    """One request waiting for a person: a signature, or an account creation (DKG)."""

    kind: str  # "sign" or "create"
    account_id: str
    detail: str
    answer: asyncio.Future[bool] = field(default_factory=asyncio.Future)


class ApprovalInbox:
    """Requests waiting for a person (bounded: a flood waits, it does not grow memory)."""

    def __init__(self, size: int = 100) -> None:
        self.queue: asyncio.Queue[PendingApproval] = asyncio.Queue(maxsize=size)
        self.decided: list[tuple[str, str, bool]] = []

    async def _ask(self, item: PendingApproval) -> bool:
        await self.queue.put(item)
        return await item.answer

    async def ask_sign(self, request: SignRequest) -> bool | Decision:
        return await self._ask(
            PendingApproval("sign", request.account_id, f"{len(request.message)}-byte message")
        )

    async def ask_create(self, request: DkgRound1) -> bool | Decision:
        return await self._ask(
            PendingApproval(
                "create",
                request.account_id,
                f"{request.min_signers}-of-{request.max_signers} {request.ciphersuite}",
            )
        )

    def policy(self) -> CallbackPolicy:
        return CallbackPolicy(self.ask_sign, dkg_callback=self.ask_create)


async def operator(inbox: ApprovalInbox, deny: Sequence[str] = ()) -> None:
    """The person: approves everything but the accounts in ``deny``."""
    while True:
        item = await inbox.queue.get()
        ok = item.account_id not in deny
        inbox.decided.append((item.kind, item.account_id, ok))
        item.answer.set_result(ok)


async def run_service(
    config_path: Path, stop: asyncio.Event, *, deny: Sequence[str] = (), inbox: ApprovalInbox
) -> None:
    """Open the participant (keys, sealed store) in a thread, run the client and the
    operator until ``stop`` is set, then close everything (keys and shares zeroed)."""

    def open_all() -> OpenParticipant:  # file I/O and Argon2id: not on the event loop
        config = parse_config(config_path.read_text(), base=config_path.parent)
        return open_participant(config, key_source(config))

    opened = await asyncio.to_thread(open_all)
    opened.client.policy = inbox.policy()
    tasks = [
        asyncio.create_task(opened.client.run()),
        asyncio.create_task(operator(inbox, deny)),
    ]
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        opened.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, metavar="participant.toml")
    parser.add_argument("--deny", action="append", default=[], metavar="ACCOUNT")
    args = parser.parse_args(argv)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_service(args.config, stop, deny=args.deny, inbox=ApprovalInbox())

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
