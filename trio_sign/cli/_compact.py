"""``trio-sign compact``: have one node compact its base and deltas into a new base sealed under
a KMS key pinned in its ``enclave.toml`` (docs/compaction.md; the runbook's KMS rotation and
re-encryption, docs/runbook.md §3 and §4b).

It signs the approvals itself, from approver key files (``trio-sign approver keygen``), under
the reserved ``compact`` policy: ``a`` = ``""``, ``s`` = the request id, ``message`` = the KMS
key ARN's UTF-8 bytes; then calls ``Compact`` on the node named in a gateway configuration,
connecting exactly as that gateway does (the attested channel: TLS ending in the enclave, its
attestation checked against the node's pins before anything is sent; plain h2c only with the
configuration's ``[dev] skip_attestation``). Nobody holds a data key or a plaintext share: the
enclave asks KMS for the data key through its parent, and the approvers sign only the key ARN.

Prints the answer as JSON (``sha256``: the new base, the gateways' next pin; ``accounts``;
``deltas``; ``object``: where the parent stored it). Exit codes: 0 stored; 1 refused or failed
(one line on stderr with the status and reason); 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import secrets
from pathlib import Path
from typing import Any, Final

#: How long the call may take by default (sealing a million accounts takes minutes).
DEFAULT_TIMEOUT_S: Final = 1800.0


def add_parser(sub: Any) -> None:
    compact = sub.add_parser(
        "compact",
        help="compact a node's base and deltas into a new base under a pinned KMS key",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compact.add_argument(
        "--gateway-config",
        type=Path,
        required=True,
        metavar="FILE",
        help="a gateway.toml naming the node, its address and its pins ([[node]], [tls])",
    )
    compact.add_argument("--node", required=True, metavar="ID", help="the node's id")
    compact.add_argument(
        "--kms-key-id",
        required=True,
        metavar="ARN",
        help="the KMS key ARN to seal under (in the node's [bundles] compaction_kms_keys)",
    )
    compact.add_argument(
        "--approver-key",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="an approver key file of the compact policy (repeat for k of n)",
    )
    compact.add_argument(
        "--request-id",
        metavar="ID",
        help="binds the approvals to this request (default: a fresh random id)",
    )
    compact.add_argument(
        "--expires-in", default="10m", metavar="DURATION", help="approvals' validity (10m)"
    )
    compact.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"for connecting and the call (default {DEFAULT_TIMEOUT_S:g})",
    )
    compact.set_defaults(func=cmd_compact)


def compact_request(
    kms_key_id: str, request_id: str, key_files: list[Path], *, expires_in_ms: int
) -> Any:
    """The ``CompactRequest`` with one approval per key file (docs/compaction.md)."""
    from proto_min import sign_service_pb2 as pb

    from ..enclave._compact import compaction_approval_message
    from ._approver import make_approval

    approvals = []
    for key_file in key_files:
        approval = make_approval(
            key_file,
            account="",
            session=request_id,
            message=compaction_approval_message(kms_key_id),
            expires_in_ms=expires_in_ms,
        )
        approvals.append(
            pb.Approval(
                key_id=approval["key_id"],
                signature=bytes.fromhex(approval["signature_hex"]),
                expires_at_unix_ms=approval["expires_at_unix_ms"],
            )
        )
    return pb.CompactRequest(kms_key_id=kms_key_id, request_id=request_id, approvals=approvals)


def cmd_compact(args: argparse.Namespace) -> int:
    import sys

    import trio

    from proto_min import sign_service_pb2 as pb

    from ..gateway._service import GatewayConfigError, make_nodes, parse_gateway_config
    from ..rpc import RpcError
    from ._approver import parse_duration_ms
    from ._listen import UsageError

    if not args.approver_key:
        raise UsageError("--approver-key: give the key files of the compact policy's approvers")
    try:
        expires_in = parse_duration_ms(args.expires_in)
    except ValueError as exc:
        raise UsageError(f"--expires-in: {exc}") from None
    request_id = args.request_id or f"compact-{secrets.token_hex(8)}"
    try:
        path: Path = args.gateway_config
        config = parse_gateway_config(path.read_text(), base=path.parent)
        nodes = {n.node_id: n for n in make_nodes(config)}
    except (OSError, GatewayConfigError) as exc:
        raise UsageError(f"--gateway-config: {exc}") from None
    node = nodes.get(args.node)
    if node is None:
        raise UsageError(f"--node {args.node!r} is not in {path} (known: {', '.join(nodes)})")
    request = compact_request(
        args.kms_key_id, request_id, list(args.approver_key), expires_in_ms=expires_in
    )

    async def run() -> Any:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            try:
                return await node._call("Compact", request, pb.CompactResponse, args.timeout)
            finally:
                nursery.cancel_scope.cancel()

    try:
        answer = trio.run(run)
    except RpcError as exc:
        print(f"trio-sign compact: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "request_id": request_id,
                "sha256": answer.sha256,
                "accounts": answer.accounts,
                "deltas": answer.deltas,
                "object": answer.object,
            },
            indent=2,
        )
    )
    return 0
