"""docs/gateway.md matches the code: its example parses, and every key ``gateway.toml`` takes is
documented in the table of its section (and nothing else is)."""

from __future__ import annotations

import re
from pathlib import Path

from trio_sign.gateway import parse_gateway_config
from trio_sign.gateway._service import _KEYS

DOC = Path(__file__).resolve().parent.parent / "docs" / "gateway.md"


def _sections() -> dict[str, set[str]]:
    """Section name -> the keys in the first column of its table."""
    out: dict[str, set[str]] = {}
    current: str | None = None
    for line in DOC.read_text().splitlines():
        heading = re.match(r"### `\[+(\w+)\]+`", line)
        if heading:
            current = heading[1]
            out[current] = set()
        elif line.startswith("## "):
            current = None
        elif current is not None:
            cell = re.match(r"\| `(\w+)` \|", line)
            if cell:
                out[current].add(cell[1])
    return out


def test_every_key_is_documented_in_its_section() -> None:
    assert _sections() == {section: set(keys) for section, keys in _KEYS.items()}


def test_the_example_parses(tmp_path: Path) -> None:
    text = DOC.read_text()
    example = re.search(r"```toml\n(.*?)```", text, re.DOTALL)
    assert example is not None
    config = parse_gateway_config(example[1], base=tmp_path)
    assert config.api_listen == "tcp://127.0.0.1:8443"
    assert [n.id for n in config.nodes] == ["node-1"]
    assert config.tls_server_name == "localhost"
    assert config.api_allowed_hosts == ("127.0.0.1:8443", "localhost:8443")
