"""docs/attested-channel.md and docs/gateway.md name the reason codes the code raises."""

from __future__ import annotations

import re
from pathlib import Path

from trio_sign.attested import CHANNEL_REASONS, CONNECTION_REASONS

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _table_codes(text: str, after: str) -> set[str]:
    """The codes in the first column of the first table after ``after``."""
    section = text.split(after, 1)[1]
    codes: set[str] = set()
    in_table = False
    for line in section.splitlines():
        if not line.startswith("|"):
            if in_table:
                break
            continue
        in_table = True
        cell = re.match(r"\| (`\w+`(?:, `\w+`)*) \|", line)
        if cell:
            codes |= set(re.findall(r"`(\w+)`", cell[1]))
    return codes


def test_the_reason_table_is_the_codes() -> None:
    text = (DOCS / "attested-channel.md").read_text()
    assert _table_codes(text, "### Reason codes") == set(CHANNEL_REASONS)


def test_the_gateway_page_names_every_refusal() -> None:
    """Connection failures are probe failures there, not refusals; a root that is not PEM is
    a configuration error at start (``bad_root`` cannot reach a node)."""
    text = (DOCS / "gateway.md").read_text()
    refusals = set(CHANNEL_REASONS) - {"tls_failed", "unreachable", "rpc_failed", "bad_root"}
    assert _table_codes(text, "What each refusal means") == refusals
    assert {"tls_failed", "unreachable", "rpc_failed"} <= set(CONNECTION_REASONS)
