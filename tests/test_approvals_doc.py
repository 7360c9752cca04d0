"""docs/approvals.md: the worked example is what the code computes (payload, digest, the
deterministic Ed25519 signature), and the documented refusal reasons are the code's."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from nacl.signing import SigningKey

from trio_sign.authz import REASONS, ApproverKey, approval_payload

DOC = Path(__file__).resolve().parent.parent / "docs" / "approvals.md"


def _example() -> dict[str, str]:
    text = DOC.read_text()
    block = text[text.index("<!-- approval-example") :]
    start = block.index("```text\n") + len("```text\n")
    block = block[start : block.index("\n```", start)]
    values: dict[str, str] = {}
    for line in block.splitlines():
        name, value = re.split(r"\s{2,}", line, maxsplit=1)
        values[name] = value.replace(" ", "")
    return values


def test_the_worked_example_is_computed_by_the_code() -> None:
    values = _example()
    message = b"transfer 1.5 ETH to 0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
    key = SigningKey(bytes.fromhex(values["seed (ed25519 private)"]))
    assert bytes(key.verify_key).hex() == values["public_key"]
    assert hashlib.sha256(message).hexdigest() == values["SHA-256(message)"]
    payload = approval_payload("acct-42", "sess-7f3a", message, 1767225600000)
    assert payload.hex() == values["payload (82 bytes)"]
    assert len(payload) == 82
    signature = key.sign(payload).signature
    assert signature.hex() == values["signature (ed25519)"]
    approver = ApproverKey.create("ops-1", "ed25519", bytes(key.verify_key))
    assert approver.check_signature(signature, payload) is None


def test_the_refusal_table_is_the_code_s() -> None:
    text = DOC.read_text()
    section = text[text.index("## The decision") : text.index("## The approval payload")]
    documented = re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M)
    assert set(documented) == set(REASONS) - {"unknown_policy"}  # refused at preload instead
    assert "unknown_policy" in text
