"""``trio-sign participant --config participant.toml``: a remote participant (DESIGN §15,
docs/participants.md).

Runs the participant library until SIGINT or SIGTERM (exit 0): connects to the gateway,
authenticates, and answers signing requests under the ``[policy]`` of the file, from the
shares in the sealed store. ``--seal-shares FILE`` makes that store from a plaintext share
file (docs/share-file.md: a ``participant-N_key_shares.json`` of ``trio-sign shares
generate``) and exits; ``--check`` opens everything a start would and exits (2 on a problem).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

import trio


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "participant",
        help="run a remote participant: answer the gateway's signing requests (DESIGN §15)",
        description="Connect to the gateway's participant endpoint, authenticate, and answer "
        "signing requests under [policy] from the sealed share store (docs/participants.md).",
    )
    p.add_argument("--config", type=Path, required=True, metavar="participant.toml")
    action = p.add_mutually_exclusive_group()
    action.add_argument(
        "--seal-shares",
        type=Path,
        metavar="FILE",
        help="seal this plaintext share file into [store] path (refused if it exists), then exit",
    )
    action.add_argument(
        "--check",
        action="store_true",
        help="load the keys and open the store as a start would, print a summary, exit",
    )
    p.set_defaults(func=cmd_participant)


def cmd_participant(args: argparse.Namespace) -> int:
    from .._errors import TrioSignError
    from ..participant._config import (
        ParticipantConfigError,
        key_source,
        open_participant,
        parse_config,
    )
    from ..participant._store import SealedShareStore

    try:
        config = parse_config(args.config.read_text(), base=args.config.parent)
        source = key_source(config)
    except (OSError, ParticipantConfigError) as exc:
        print(f"trio-sign: error: {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.seal_shares is not None:
        from ..shares import read_plaintext

        with open(args.seal_shares, "rb") as f:
            records = list(read_plaintext(f))
        store = SealedShareStore.create(config.store_path, config.participant_id, records, source)
        print(f"sealed {len(store)} account(s) into {config.store_path}")
        store.close()
        return 0
    try:
        opened = open_participant(config, source)
    except TrioSignError as exc:
        if not args.check:
            raise  # a start that cannot open its keys or store: exit 1 with the reason
        print(f"trio-sign: error: {args.config}: {exc}", file=sys.stderr)
        return 2
    try:
        if args.check:
            print(
                f"participant {config.participant_id}: {len(opened.store)} account(s), "
                f"gateway {config.gateway_url}, auth key {config.auth_key_id}, "
                f"approver key {config.approver_key_id}"
            )
            return 0

        async def run() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(opened.client.run)
                    print(
                        f"participant {config.participant_id} -> {config.gateway_url} "
                        f"({len(opened.store)} accounts)",
                        flush=True,
                    )
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        break

        trio.run(run)
        return 0
    finally:
        opened.close()
