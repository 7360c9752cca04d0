"""``trio-sign parent --config parent.toml``: the host-side supervisor.

Exit codes: 0 stopped by SIGTERM/SIGINT (the first one drains the enclave, a second stops at
once), or ``--check`` found nothing wrong; 1 it gave up (the alert code and reason are on
stderr and in the log); 2 bad usage or configuration, found by ``--check`` or at start (the
unit does not restart on 2). SIGHUP reopens the log file (for logrotate).

``--genesis`` (docs/runbook.md §7): boot the enclave once to create the delta identity key
inside it, write its sealed file to ``[identity] sealed_file`` (never over an existing one),
print the public key to pin in ``enclave.toml`` (``[bundles] delta_identity_key``) and exit 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from .._gc import configure_gc_for_serving
from .._profile import install_profile_toggle


def add_parser(sub: Any) -> None:
    parent = sub.add_parser(
        "parent",
        help="run the host-side supervisor (bundle, KMS, enclave, proxies, health)",
        description="Fetch the sealed bundle, launch the enclave, serve its attested preload "
        "through KMS, then run the mTLS ingress proxy, SSE relay, log forwarding and health. "
        "See trio_sign/parent/_config.py for parent.toml.",
    )
    parent.add_argument("--config", type=Path, required=True, metavar="parent.toml")
    parent.add_argument(
        "--check",
        action="store_true",
        help="check parent.toml and the files it names, print what would run, and exit "
        "(0 good, 2 not): run it after every edit, before restarting the unit",
    )
    parent.add_argument(
        "--genesis",
        action="store_true",
        help="create the delta identity key in one enclave boot, write [identity] sealed_file "
        "and print the public key to pin, then exit (docs/runbook.md §7)",
    )
    parent.set_defaults(func=cmd_parent)


def _describe_config(config: Any) -> list[str]:
    e = config.enclave
    lines = [
        f"bundle       {config.bundle.source} (work_dir {config.bundle.work_dir})",
        f"kms          {config.kms.mode}"
        + (f" at {config.kms.endpoint_url}" if config.kms.endpoint_url else ""),
        f"enclave      {e.backend}"
        + (
            f" {e.eif_path}, {e.cpu_count} CPUs, {e.memory_mib} MiB, CID {e.cid}"
            if e.backend == "nitro-cli"
            else f" (namespaces {e.namespaces})"
        )
        + f"; preload timeout {e.preload_timeout_s:g} s, drain timeout {e.drain_timeout_s:g} s",
        "events       "
        + (
            f"{e.gateway_url} as node {e.node_id}"
            if e.gateway_url
            else "none (no SSE subscription)"
        ),
        "ingress      " + (config.ingress.listen if config.ingress else "none"),
    ]
    a = config.attestation
    if a is not None:
        pins = ", ".join(f"PCR{i} {v.hex()[:16]}…" for i, v in sorted(a.pcrs.items()))
        root = str(a.root) if a.root is not None else "the AWS Nitro root"
        lines.append(
            f"attestation  {pins}; root {root}; debug {'ALLOWED' if a.allow_debug else 'refused'}"
        )
    lines.append("relay        " + (", ".join(config.relay_allowlist) or "nothing allowed"))
    f = config.failure
    lines.append(
        "failure      "
        + (
            f"restart (back-off {f.backoff_initial_s:g}..{f.backoff_max_s:g} s)"
            if f.restart
            else "no restart"
        )
        + (f"; alert command {f.alert_command[0]}" if f.alert_command else "")
    )
    lines.append(f"health       {config.health_listen}")
    if config.identity is not None:
        lines.append(f"identity     {config.identity.sealed_file}")
    return lines


def cmd_parent(args: argparse.Namespace) -> int:
    from ..parent._config import ConfigError, load_parent_config, preflight
    from ..parent._lifecycle import ParentExit
    from ..parent._supervisor import ParentSupervisor

    try:
        config = load_parent_config(args.config)
    except ConfigError as exc:
        print(f"trio-sign: error: {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        for line in _describe_config(config):
            print(line)
        problems, warnings = preflight(config, genesis=args.genesis)
        for warning in warnings:
            print(f"trio-sign: warning: {args.config}: {warning}", file=sys.stderr)
        for problem in problems:
            print(f"trio-sign: error: {args.config}: {problem}", file=sys.stderr)
        if not problems:
            print(f"{args.config}: OK")
        return 2 if problems else 0
    from ..rpc import raise_open_file_limit

    raise_open_file_limit()  # the ingress holds two descriptors per forwarded connection
    supervisor = ParentSupervisor(config, genesis=args.genesis)

    async def run() -> None:
        stop = trio.Event()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:

                async def supervise() -> None:
                    await supervisor.run(stop)
                    nursery.cancel_scope.cancel()  # done: stop listening for signals

                nursery.start_soon(supervise)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        supervisor.reopen_logs()  # logrotate moved the file
                        continue
                    if not stop.is_set():
                        print(
                            "trio-sign: stopping: draining the enclave "
                            f"(up to {config.enclave.drain_timeout_s:g} s; "
                            "signal again to stop at once)",
                            file=sys.stderr,
                            flush=True,
                        )
                        stop.set()
                        continue
                    nursery.cancel_scope.cancel()
                    break

    configure_gc_for_serving()  # as the enclave: rare, short full collections
    instruments = install_profile_toggle("parent")  # development: TRIO_SIGN_PROFILE_DIR
    try:
        trio.run(run, instruments=instruments)
    except (ParentExit, BaseExceptionGroup) as exc:
        failure = exc
        while isinstance(failure, BaseExceptionGroup):
            failure = failure.exceptions[0]
        if not isinstance(failure, ParentExit):
            raise
        where = f"{args.config}: " if failure.exit_code == 2 else ""
        print(f"trio-sign: parent gave up ({failure.alert}): {where}{failure}", file=sys.stderr)
        return failure.exit_code
    if args.genesis:
        sealed = supervisor.genesis_sealed
        if sealed is None:
            print("trio-sign: genesis did not complete (stopped)", file=sys.stderr)
            return 1
        assert config.identity is not None
        print(f"delta identity key {sealed.public_key.hex()}")
        print(f"sealed file        {config.identity.sealed_file}")
        print(f'pin it in enclave.toml: [bundles] delta_identity_key = "{sealed.public_key.hex()}"')
    return 0
