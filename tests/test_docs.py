"""Keep the docs honest.

* Every ``trio-sign ...`` command quoted in a fenced code block of ``docs/runbook.md``,
  ``docs/operations.md``, ``docs/parent.md`` and ``README.md`` parses with the real argument
  parser (``build_parser``), so a renamed flag or subcommand breaks the build, not the operator
  at 3 a.m.; the options of the top level and of ``dev up`` are all documented.
* The alert tables of ``parent.md``, ``operations.md`` and the runbook name exactly the
  parent's alert codes (``ALERTS``).
* Every relative link between the Markdown files (``docs/*.md`` and ``README.md``) resolves to
  an existing file, and a ``#fragment`` to a heading of that file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trio_sign.cli._main import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
COMMAND_DOCS = ("runbook.md", "operations.md", "parent.md")
README = ROOT / "README.md"
LINKED_DOCS = [*sorted(DOCS.glob("*.md")), README]

_FENCE = re.compile(r"^(\s*)```")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _code_lines(text: str) -> list[str]:
    """Logical lines inside fenced code blocks: backslash continuations joined."""
    out: list[str] = []
    inside = False
    pending = ""
    for raw in text.splitlines():
        if _FENCE.match(raw):
            inside = not inside
            pending = ""
            continue
        if not inside:
            continue
        line = raw.strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def _commands(text: str, program: str) -> list[str]:
    """Each shell segment of a code line that runs ``program`` (after ``|``, ``&&``, ``;``)."""
    found = []
    for line in _code_lines(text):
        line = line.removeprefix("$ ")
        for segment in re.split(r"\s(?:\|\||\||&&|;)\s", line):
            segment = segment.strip()
            segment = re.sub(r"^sudo (?:-u \S+ )?", "", segment)
            if segment.startswith(program + " ") or segment == program:
                found.append(segment)
    return found


def _argv(command: str) -> list[str]:
    """shlex-split a command, dropping a trailing comment and output redirections."""
    words = shlex.split(command, comments=True)
    argv = []
    skip = False
    for word in words:
        if skip:
            skip = False
            continue
        if word in (">", ">>", "<", "2>", "2>&1"):
            skip = word != "2>&1"
            continue
        if word.startswith((">", "<")):
            continue
        argv.append(word)
    return argv


def _trio_sign_commands() -> list[tuple[str, str]]:
    return [
        (name, command)
        for name in COMMAND_DOCS
        if (DOCS / name).exists()
        for command in _commands((DOCS / name).read_text(), "trio-sign")
    ] + [("README.md", command) for command in _commands(README.read_text(), "trio-sign")]


def test_docs_quote_commands() -> None:
    commands = _trio_sign_commands()
    assert (DOCS / "runbook.md").exists()
    by_doc = {name: sum(1 for doc, _ in commands if doc == name) for name in COMMAND_DOCS}
    assert by_doc["runbook.md"] >= 8, by_doc
    assert by_doc["parent.md"] >= 6, by_doc  # local mode, step by step
    # every subcommand an operator uses appears somewhere
    joined = "\n".join(command for _, command in commands)
    for needed in (
        "trio-sign shares seal",
        "trio-sign shares inspect",
        "trio-sign shares reencrypt",
        "trio-sign attestation verify",
        "trio-sign dev up",
        "trio-sign dev local-nsm",
        "trio-sign kms-local",
        "trio-sign parent --config",
        "trio-sign status",
    ):
        assert needed in joined, needed


@pytest.mark.parametrize(
    ("doc", "command"), _trio_sign_commands(), ids=lambda v: v if len(v) < 60 else v[:60]
)
def test_quoted_command_parses(doc: str, command: str) -> None:
    argv = _argv(command)
    assert argv[0] == "trio-sign"
    assert not any(re.fullmatch(r"<[^>]+>|\$\w+|\$\{\w+\}|\.\.\.", w) for w in argv), (
        f"{doc}: use concrete example values, not placeholders: {command}"
    )
    parser = build_parser()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv[1:])
    except SystemExit as exc:  # pragma: no cover - the failure path
        pytest.fail(f"{doc}: `{command}` does not parse: {stderr.getvalue().strip()} ({exc})")
    assert callable(getattr(args, "func", None)), f"{doc}: `{command}` names no command"


def _ops_commands() -> list[tuple[str, str]]:
    return [
        (name, command)
        for name in COMMAND_DOCS
        if (DOCS / name).exists()
        for command in _commands((DOCS / name).read_text(), "python -m trio_sign.ops")
    ]


@pytest.mark.parametrize(
    ("doc", "command"), _ops_commands(), ids=lambda v: v if len(v) < 60 else v[:60]
)
def test_quoted_ops_subcommand_exists(doc: str, command: str) -> None:
    """``python -m trio_sign.ops SUBCOMMAND`` names a subcommand the tool has (``--help``)."""
    if importlib.util.find_spec("trio_sign.ops") is None:
        pytest.skip("trio_sign.ops is not in this tree yet")
    argv = _argv(command)
    subcommand = argv[3]
    result = subprocess.run(
        [sys.executable, "-m", "trio_sign.ops", subcommand, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{doc}: {subcommand}: {result.stderr.strip()[-300:]}"
    for flag in (w.split("=", 1)[0] for w in argv[4:] if w.startswith("--")):
        assert flag in result.stdout, f"{doc}: `{command}`: {subcommand} has no {flag}"


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    inside = False
    for line in path.read_text().splitlines():
        if _FENCE.match(line):
            inside = not inside
            continue
        if not inside and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            slug = _slug(m.group(1))
            n = 0
            while (candidate := slug if n == 0 else f"{slug}-{n}") in anchors:
                n += 1
            anchors.add(candidate)
    return anchors


def _links(path: Path) -> list[str]:
    links = []
    inside = False
    for line in path.read_text().splitlines():
        if _FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            links += _LINK.findall(re.sub(r"`[^`]*`", "", line))
    return links


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    for target in _links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        assert resolved.exists(), f"{doc.name}: link {target!r} points at nothing"
        if fragment and resolved.suffix == ".md":
            assert fragment in _anchors(resolved), (
                f"{doc.name}: link {target!r}: no heading #{fragment} in {resolved.name}"
            )


def test_slug_rules() -> None:
    assert _slug("What the parent can and cannot do") == "what-the-parent-can-and-cannot-do"
    assert _slug("4a. Automatic rotation (same key id)") == "4a-automatic-rotation-same-key-id"
    assert _slug("The `parent.toml` keys") == "the-parenttoml-keys"


def _toml_blocks(text: str) -> list[str]:
    """Fenced ```toml blocks, dedented (they may sit inside a list item)."""
    return [
        textwrap.dedent(block)
        for block in re.findall(r"^[ ]*```toml\n(.*?)^[ ]*```", text, flags=re.M | re.S)
    ]


@pytest.mark.parametrize("doc", COMMAND_DOCS)
def test_quoted_parent_toml_parses(doc: str, tmp_path: Path) -> None:
    """A ``parent.toml`` quoted in a ```toml block is accepted by the real config parser."""
    from trio_sign.parent._config import parse_parent_config  # not re-exported (yet)

    blocks = _toml_blocks((DOCS / doc).read_text())
    if doc == "operations.md":
        assert blocks, "operations.md should quote a production parent.toml"
    for block in blocks:
        config = parse_parent_config(block, base=tmp_path)
        assert config.enclave.backend in ("nitro-cli", "local")


def test_runbook_has_the_procedures_the_seed_asks_for() -> None:
    headings = _anchors(DOCS / "runbook.md")
    for needed in (
        "1-first-boot-of-a-node",
        "2-eif-upgrade",
        "3-share-re-encryption",
        "4-kms-key-rotation",
        "5-an-alert-fired",
        "6-rollback-at-a-glance",
    ):
        assert needed in headings, needed


def _table_rows(text: str, heading: str) -> list[list[str]]:
    """Cells of the first Markdown table after ``heading``."""
    section = text.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # header and separator


def test_exit_code_tables_match_the_code() -> None:
    from trio_sign.enclave import ExitCode

    expected = {(str(int(code)), code.name) for code in ExitCode}
    for doc, heading in (("contracts.md", "## Status states"), ("operations.md", "## Enclave")):
        rows = _table_rows((DOCS / doc).read_text(), heading)
        assert {(row[0], row[1]) for row in rows} == expected, doc


def test_ports_and_states_match_the_code() -> None:
    from trio_sign.nitro._channel import STATES
    from trio_sign.parent._supervisor import LOG_PORT, PRELOAD_PORT, SSE_PORT, STATUS_PORT

    architecture = (DOCS / "architecture.md").read_text()
    contracts = (DOCS / "contracts.md").read_text()
    for port in (PRELOAD_PORT, STATUS_PORT, LOG_PORT, SSE_PORT, 50051):
        assert f"**{port}**" in architecture, port
        assert str(port) in contracts, port
    for state in STATES:
        assert f"`{state}`" in contracts, state


def test_enclave_image_commands_and_units_exist() -> None:
    """``enclave_image/build`` flags and the systemd units the docs name are the real ones."""
    build = ROOT / "enclave_image" / "build"
    if not build.exists():
        pytest.skip("enclave_image/build is not in this tree yet")
    script = build.read_text()
    for name in COMMAND_DOCS:
        text = (DOCS / name).read_text()
        for command in _commands(text, "enclave_image/build"):
            for flag in (w for w in _argv(command)[1:] if w.startswith("--")):
                assert f"{flag})" in script, f"{name}: enclave_image/build has no {flag}"
        for unit in set(re.findall(r"\b(trio-sign[\w-]*\.service)\b", text)):
            assert (ROOT / "enclave_image" / "systemd" / unit).exists(), f"{name}: {unit}"


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option not in ("--help", "--version")
    }


def test_new_options_are_documented() -> None:
    """The top-level options and every ``dev up`` option appear in README.md or docs/."""
    text = README.read_text() + "".join(path.read_text() for path in sorted(DOCS.glob("*.md")))
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    dev = next(a for a in sub.choices["dev"]._actions if isinstance(a, argparse._SubParsersAction))
    wanted = _options(parser) | {f"dev up {o}" for o in _options(dev.choices["up"])}
    for option in sorted(wanted):
        flag = option.removeprefix("dev up ")
        assert flag in text, f"{option} is not documented in README.md or docs/"
    assert {"--log-format", "--log-level"} <= _options(parser)


def _alert_codes(doc: str, heading: str) -> list[str]:
    """The alert code each row of the first table after ``heading`` is about (its first cell's
    first backquoted word)."""
    section = (DOCS / doc).read_text().split(heading, 1)[1]
    codes = []
    rows = 0
    for line in section.splitlines():
        if line.startswith("|"):
            rows += 1
            if rows > 2:  # header and separator
                first_cell = line.strip("|").split("|")[0]
                match = re.search(r"`([a-z_]+)`", first_cell)
                assert match is not None, f"{doc}: a row without an alert code: {line[:80]}"
                codes.append(match.group(1))
        elif rows:
            break
    return codes


@pytest.mark.parametrize(
    ("doc", "heading"),
    [
        ("parent.md", "## Failure handling and alerts"),
        ("operations.md", "## Alerts"),
        ("runbook.md", "## 5. An alert fired"),
    ],
)
def test_alert_tables_match_the_code(doc: str, heading: str) -> None:
    from trio_sign.parent._lifecycle import ALERTS

    codes = _alert_codes(doc, heading)
    assert set(codes) == set(ALERTS), doc
    if doc != "runbook.md":  # the runbook has a row per alert and reason
        assert len(codes) == len(ALERTS), doc


def test_readyz_fields_and_phases_match_the_code() -> None:
    from trio_sign.parent._health import ParentState
    from trio_sign.parent._lifecycle import ParentPhase

    text = (DOCS / "operations.md").read_text()
    paragraph = text.split("its JSON body", 1)[1].split("\n\n", 1)[0]
    phases = paragraph.split("`phase` (", 1)[1].split(")", 1)[0]
    assert set(re.findall(r"`([a-z_]+)`", phases)) == {phase.value for phase in ParentPhase}
    fields = set(re.findall(r"`([a-z_0-9]+)`", paragraph.replace(phases, "")))
    assert fields == set(ParentState().report()), paragraph
