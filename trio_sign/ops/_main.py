"""The ``python -m trio_sign.ops`` command line.

Exit codes: 0 success, 1 bad input (one line on stderr says what), 2 bad usage (argparse).
Output goes to stdout (JSON policies, the allocator YAML), so it can be redirected to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .._errors import TrioSignError
from ._memory import (
    DEFAULT_CPU_COUNT,
    DEFAULT_MAX_SESSIONS,
    allocator_yaml,
    bundle_accounts,
    enclave_memory_mib,
)
from ._policies import (
    load_pcrs,
    local_kms_policy,
    render_key_policy,
    render_parent_iam_policy,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trio_sign.ops",
        description="Deployment helpers: policies from the EIF's PCRs, enclave memory sizing.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    key = sub.add_parser(
        "render-key-policy",
        help="the KMS key policy of the bundle key (JSON on stdout)",
        description="Decrypt for the parent role only with the EIF's attestation (PCR0/1/2/8); "
        "key administration for the admin role (no Decrypt); GenerateDataKey for the "
        "sealing role; no kms:* and no root-account delegation.",
    )
    key.add_argument("--pcrs", type=Path, required=True, metavar="trio-sign.pcrs.json")
    key.add_argument("--account", required=True, help="the AWS account id (12 digits)")
    key.add_argument("--parent-role", required=True, metavar="ARN", help="the parent's role")
    key.add_argument("--admin-role", required=True, metavar="ARN", help="key administrators")
    key.add_argument(
        "--sealing-role",
        metavar="ARN",
        help="the ceremony role that seals bundles (kms:GenerateDataKey); omit to add none",
    )
    key.add_argument(
        "--previous-pcrs",
        type=Path,
        action="append",
        default=[],
        metavar="OLD.pcrs.json",
        help="PCRs of an EIF still running during a rollout (repeatable); each is allowed as "
        "a whole, in its own statement",
    )
    key.add_argument(
        "--for-local-kms",
        action="store_true",
        help="development: only the parent role's statements, in the subset trio-sign "
        "kms-local evaluates (its --policy file)",
    )

    iam = sub.add_parser(
        "render-parent-iam-policy",
        help="the IAM policy of the parent instance's role (JSON on stdout)",
    )
    iam.add_argument("--pcrs", type=Path, required=True, metavar="trio-sign.pcrs.json")
    iam.add_argument("--account", required=True)
    iam.add_argument("--key-region", "--region", dest="region", required=True)
    iam.add_argument("--key-id", required=True, help="the bundle key's id (UUID)")
    iam.add_argument("--bundle", required=True, metavar="s3://BUCKET/KEY")
    iam.add_argument("--log-group", help="CloudWatch log group ([logs] cloudwatch_group)")
    iam.add_argument("--partition", default="aws", choices=["aws", "aws-cn", "aws-us-gov"])
    iam.add_argument("--previous-pcrs", type=Path, action="append", default=[])

    mem = sub.add_parser(
        "enclave-memory",
        help="enclave memory for a bundle, and the allocator YAML",
        description="max(512 MiB, 2 x (60 MiB + 400 B x accounts + 1 KiB x max_sessions)), "
        "rounded up to 256 MiB. Prints the allocator.yaml (memory_mib, cpu_count).",
    )
    source = mem.add_mutually_exclusive_group(required=True)
    source.add_argument("--accounts", type=int, metavar="N")
    source.add_argument(
        "--bundle", type=Path, metavar="FILE.enc", help="read N from the sealed header"
    )
    mem.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS, metavar="M")
    mem.add_argument("--cpu-count", type=int, default=DEFAULT_CPU_COUNT)
    mem.add_argument(
        "--mib-only", action="store_true", help="print only the number of MiB (for scripts)"
    )
    return parser


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrioSignError(f"cannot read {path}: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "render-key-policy":
            document = render_key_policy(
                load_pcrs(_read(args.pcrs)),
                account=args.account,
                parent_role_arn=args.parent_role,
                admin_role_arn=args.admin_role,
                sealing_role_arn=args.sealing_role,
                previous=[load_pcrs(_read(p)) for p in args.previous_pcrs],
            )
            if args.for_local_kms:
                document = local_kms_policy(document, args.parent_role)
            out = json.dumps(document, indent=2) + "\n"
        elif args.command == "render-parent-iam-policy":
            document = render_parent_iam_policy(
                load_pcrs(_read(args.pcrs)),
                account=args.account,
                region=args.region,
                key_id=args.key_id,
                bundle=args.bundle,
                log_group=args.log_group,
                partition=args.partition,
                previous=[load_pcrs(_read(p)) for p in args.previous_pcrs],
            )
            out = json.dumps(document, indent=2) + "\n"
        else:
            accounts = args.accounts if args.bundle is None else bundle_accounts(args.bundle)
            mib = enclave_memory_mib(accounts, max_sessions=args.max_sessions)
            if args.mib_only:
                out = f"{mib}\n"
            else:
                out = allocator_yaml(
                    mib,
                    cpu_count=args.cpu_count,
                    accounts=accounts,
                    max_sessions=args.max_sessions,
                )
    except TrioSignError as exc:
        sys.stderr.write(f"trio_sign.ops: {exc}\n")
        return 1
    sys.stdout.write(out)
    return 0
