"""The gateway's health prober: gRPC Ping plus the SSE probe echoed in GetStatus.

Every ``interval_s``, for each node, concurrently:

* ``Ping`` with a random payload, which must come back unchanged (the enclave answers only
  while serving);
* if an SSE hook is given: ``GetStatus`` must report ``state == "serving"`` and echo, in
  ``last_sse_probe``, the nonce published on the node's SSE stream in the *previous* round
  (so the subscription has one interval to deliver it); then a fresh nonce is published.

A round where either check fails (or does not finish within the interval) is a failed round
for that node, recorded when it is observed (the answer, or the interval's end for a node that
does not answer). A node whose failures have lasted ``evict_after_s`` since the first of them
is *evicted*: `Coordinator` stops using it, and an ERROR record with ``alert="node_evicted"``
is logged. The first passing round re-admits it (INFO, ``alert="node_readmitted"``). Checks
happen once per interval, so with ``evict_after_s`` a multiple of ``interval_s`` eviction
happens exactly ``evict_after_s`` after the first observed failure (otherwise at the first
check after that). A node whose attested channel is refused (DESIGN §10) is evicted at once,
without waiting (`record_refusal`); every round reconnects it, so it is re-admitted as soon as
a new connection passes the check and the round's probes pass. After a node recovers, the SSE
nonce published while it was down was not echoed: re-admission takes one more round than the
Ping alone would.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import trio

from ..rpc import RpcError

log = logging.getLogger("trio_sign.gateway.prober")

#: The SSE server's hook: publish a ``probe`` event ``{"nonce": nonce}`` on the node's stream.
SendProbe = Callable[[str, str], Awaitable[None]]


class ProbedNode(Protocol):
    """What the prober needs from a node (`EnclaveNode` has it; tests use a fake)."""

    node_id: str
    healthy: bool
    last_ok: float | None
    failing_since: float | None
    evicted: bool

    async def ping(self, payload: bytes = b"") -> Any: ...

    async def get_status(self) -> Any: ...


async def probe_node(node: ProbedNode, expected_nonce: str | None) -> str | None:
    """One node's checks for one round; return why it failed, or None if it passed.

    ``expected_nonce`` is the SSE probe nonce that ``GetStatus`` must echo (None: no SSE check
    this round).
    """
    payload = secrets.token_bytes(8)
    try:
        pong = await node.ping(payload)
        if bytes(pong.payload) != payload:
            return "ping_mismatch"
        if expected_nonce is None:
            return None
        status = await node.get_status()
    except RpcError as exc:
        return f"rpc_{exc.status.name.lower()}"
    if status.state != "serving":
        return f"state_{status.state or 'unknown'}"
    if status.last_sse_probe != expected_nonce:
        return "sse_probe_not_echoed"
    return None


def record_result(node: ProbedNode, failure: str | None, now: float, evict_after_s: float) -> None:
    """Update the node's health state after a round (pure; the prober's decision rule)."""
    if failure is None:
        node.healthy = True
        node.last_ok = now
        node.failing_since = None
        if node.evicted:
            node.evicted = False
            log.info(
                "node re-admitted: probes pass again",
                extra={"alert": "node_readmitted", "node": node.node_id},
            )
        return
    if node.healthy or node.failing_since is None:
        node.failing_since = now
        log.warning(
            "node probe failed (%s)", failure, extra={"node": node.node_id, "reason": failure}
        )
    node.healthy = False
    if not node.evicted and now - node.failing_since >= evict_after_s:
        node.evicted = True
        log.error(
            "node evicted: probes failing for %.0f s (%s)",
            now - node.failing_since,
            failure,
            extra={"alert": "node_evicted", "node": node.node_id, "reason": failure},
        )


def record_refusal(node: ProbedNode, now: float) -> None:
    """A node whose attested channel was refused is evicted at once (pure; the node logs the
    alert). No grace period: it answered, and what it answered is not the pinned enclave (or
    not this connection's), which waiting will not fix. The first round whose checks pass
    again, over a new connection whose attestation passes, re-admits it (`record_result`)."""
    if node.healthy or node.failing_since is None:
        node.failing_since = now
    node.healthy = False
    node.evicted = True


async def run_prober(
    nodes: Sequence[ProbedNode],
    *,
    interval_s: float,
    evict_after_s: float,
    send_probe: SendProbe | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Probe every node each ``interval_s`` until cancelled (see the module docstring).

    ``task_status.started()`` is called after the first round, so every node's state is
    known when ``nursery.start`` returns.

    Error handling: node failures are the prober's input, never its end. A failing
    ``send_probe`` (the SSE server has no subscriber for the node, say) counts against that
    node: its nonce will not be echoed.

    Cancellation: stops between or during rounds; node state is left as last recorded.
    """
    if interval_s <= 0 or evict_after_s < 0:
        raise ValueError("interval_s must be > 0 and evict_after_s >= 0")
    expected: dict[str, str | None] = {node.node_id: None for node in nodes}
    publish_failing: set[str] = set()

    async def one(node: ProbedNode, round_deadline: float) -> None:
        # A node's checks are bounded by the round, so a hanging node cannot delay the
        # others' next round; its failure is recorded when it is observed.
        failure: str | None = "timeout"
        with trio.move_on_at(round_deadline):
            failure = await probe_node(node, expected[node.node_id])
        record_result(node, failure, trio.current_time(), evict_after_s)
        if send_probe is None:
            return
        nonce = secrets.token_hex(16)
        expected[node.node_id] = nonce
        with trio.move_on_at(round_deadline):
            try:
                await send_probe(node.node_id, nonce)
            except Exception as exc:
                # Once per failing run, not every round: the failed checks that follow say
                # the rest.
                level = logging.DEBUG if node.node_id in publish_failing else logging.WARNING
                publish_failing.add(node.node_id)
                log.log(
                    level,
                    "cannot publish the SSE probe",
                    extra={"node": node.node_id, "error": type(exc).__name__},
                )
            else:
                publish_failing.discard(node.node_id)

    started = False
    next_round = trio.current_time()
    while True:
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(one, node, next_round + interval_s)
        if not started:
            task_status.started()
            started = True
        next_round += interval_s
        await trio.sleep_until(next_round)
