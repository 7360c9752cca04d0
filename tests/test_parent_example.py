"""``enclave_image/parent.toml.example`` is complete: it parses with the real parser and names
every key that parser accepts (set, or commented out with its default), so an operator who
starts from it never has to read the parser to find a setting (issue 12, defect 6)."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Set
from pathlib import Path

import pytest

from trio_sign.parent import _config

EXAMPLE = Path(__file__).resolve().parent.parent / "enclave_image" / "parent.toml.example"
_HEADER = re.compile(r"^\[(\w+)\]")
_KEY = re.compile(r"^(#\s*)?(\w+)\s*=")


def _filled(text: str) -> str:
    """The example with its PCR placeholders filled (unfilled, the parser refuses them)."""
    for i in (0, 1, 2):
        text = text.replace(f"REPLACE_PCR{i}", f"{i + 1:02x}" * 48)
    return text


def _accepted_keys(monkeypatch: pytest.MonkeyPatch, text: str) -> dict[str, Set[str]]:
    """Parse ``text``; return, per section, the keys the parser accepts there (it checks each
    table against its known keys with ``_unknown``)."""
    accepted: dict[str, Set[str]] = {}
    real = _config._unknown

    def recording(table: dict[str, object], section: str, known: set[str]) -> None:
        accepted[section] = frozenset(known)
        real(table, section, known)

    monkeypatch.setattr(_config, "_unknown", recording)
    _config.parse_parent_config(text)
    return accepted


def _named_keys(text: str) -> dict[str, set[str]]:
    """Per section, the keys the example names: set, or commented out as ``# key = value``."""
    named: dict[str, set[str]] = {"top level": set()}
    section = ""
    for line in text.splitlines():
        if match := _HEADER.match(line):
            section = match.group(1)
            named["top level"].add(section)
            named[section] = set()
        elif section and (match := _KEY.match(line)):
            named[section].add(match.group(2))
    return named


def test_example_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config.parse_parent_config(_filled(EXAMPLE.read_text()))
    assert config.enclave.backend == "nitro-cli"
    assert config.enclave.gateway_url == "https://gateway.internal:8443"
    assert config.enclave.node_id == "node-a"
    assert config.relay_allowlist == ("https://gateway.internal:8443/v1/enclaves/",)
    assert config.ingress is not None
    assert config.ingress.settings.max_pending == 4096
    assert config.ingress.settings.first_byte_timeout_s == 5.0


def test_example_refuses_unfilled_pcrs() -> None:
    with pytest.raises(_config.ConfigError, match="pcr0"):
        _config.parse_parent_config(EXAMPLE.read_text())


def test_example_names_every_accepted_key(monkeypatch: pytest.MonkeyPatch) -> None:
    text = EXAMPLE.read_text()
    accepted = _accepted_keys(monkeypatch, _filled(text))
    named = _named_keys(text)
    assert "top level" in accepted
    assert accepted["top level"] <= named["top level"], "sections missing from the example"
    for section in accepted["top level"]:
        assert section in accepted, f"[{section}] is not in the example, so not checked"
    missing = {
        section: sorted(keys - named.get(section, set()))
        for section, keys in accepted.items()
        if keys - named.get(section, set())
    }
    assert not missing, f"keys parent.toml accepts that the example does not name: {missing}"


def test_commented_keys_are_valid_toml_when_uncommented() -> None:
    for line in EXAMPLE.read_text().splitlines():
        match = _KEY.match(line)
        if match and match.group(1):
            uncommented = line[len(match.group(1)) :].split("  #")[0]
            tomllib.loads(uncommented)
