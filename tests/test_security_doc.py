"""docs/security.md backs every "cannot" with a test: each test it names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_security_md_names_exists() -> None:
    text = (ROOT / "docs" / "security.md").read_text()
    refs = re.findall(r"`(tests/test_\w+\.py)(?:::(test_\w+))?`", text)
    refs += [
        (path, name)
        for path, name in re.findall(r"`(tests/test_\w+\.py)::test_\w+`, `::(test_\w+)`", text)
    ]
    named = set()
    last_file = None
    for match in re.finditer(r"`(?:(tests/test_\w+\.py))?::(test_\w+)`", text):
        if match.group(1):
            last_file = match.group(1)
        assert last_file is not None, match.group(0)
        named.add((last_file, match.group(2)))
    files = {path for path, _ in refs}
    assert len(named) >= 15, "security.md should back its claims with tests"
    for path in files:
        assert (ROOT / path).is_file(), path
    for path, name in named:
        tree = ast.parse((ROOT / path).read_text())
        functions = {
            node.name
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        assert name in functions, f"{path}::{name} named in security.md does not exist"
