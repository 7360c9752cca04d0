"""Argument parsing and dispatch for ``trio-sign``.

Exit codes: 0 success; 1 the command failed (one line on stderr says why); 2 bad usage;
130 interrupted. Commands with codes of their own (``trio-sign enclave``, ``trio-sign parent``)
document them.

Error handling: whatever a command lets escape, possibly inside Trio's exception groups, is
turned into that one line here: :class:`~trio_sign.TrioSignError` and ``OSError`` (a port in
use, a missing file) exit 1 (or the error's ``exit_code``: 2 for a usage error);
``KeyboardInterrupt`` (Ctrl-C) exits 130 after the command's own cleanup ran; a reader that
closed our stdout (``trio-sign ... | head -1``) ends the command quietly, as Python's note on
SIGPIPE recommends. Anything else is a bug: its traceback is kept.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import sys
from collections.abc import Sequence

from .. import __version__
from .._errors import TrioSignError
from .._logging import LOG_FORMATS, configure_logging, default_log_format
from . import (
    _approver,
    _attestation,
    _compact,
    _demo,
    _dev,
    _enclave,
    _gateway,
    _kms,
    _parent,
    _participant,
    _shares,
    _status,
)
from ._listen import ADDRESS_IN_USE

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

#: Each module adds its subcommand with ``add_parser(subparsers)``, in ``--help`` order.
_COMMANDS = (
    _shares,
    _enclave,
    _attestation,
    _kms,
    _parent,
    _status,
    _gateway,
    _demo,
    _dev,
    _approver,
    _compact,
    _participant,
)


def _add_logging_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--log-level`` and ``--log-format``. Below the top level their default is SUPPRESS,
    so that ``trio-sign parent --config x --log-level DEBUG`` sets them and leaving them out
    keeps what was given before the subcommand (or the top-level default)."""
    if "--log-level" not in parser._option_string_actions:
        parser.add_argument(
            "--log-level",
            type=str.upper,
            choices=LOG_LEVELS,
            default="INFO" if top else argparse.SUPPRESS,
            help="least severe log records shown (default INFO)",
        )
    if "--log-format" not in parser._option_string_actions:
        parser.add_argument(
            "--log-format",
            choices=LOG_FORMATS,
            default=None if top else argparse.SUPPRESS,
            help="log records on stderr as text lines or JSON lines (default: text on a "
            "terminal, json otherwise)",
        )


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    return [
        choice
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for choice in action.choices.values()
    ]


def _share_logging_options(parser: argparse.ArgumentParser) -> None:
    """Accept the logging options after every subcommand, however deeply nested."""
    for child in _subparsers(parser):
        _add_logging_options(child, top=False)
        _share_logging_options(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-sign",
        description="MPC co-signing service (FROST Ed25519, RFC 9591) for AWS Nitro Enclaves.",
        epilog="--log-level and --log-format are accepted before or after the subcommand. "
        "Exit codes: 0 success, 1 failure (one line on stderr says why), 2 bad usage, "
        "130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"trio-sign {__version__}")
    _add_logging_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMANDS:
        module.add_parser(sub)
    _share_logging_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, log_format=args.log_format or default_log_format())
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # a closed pipe must fail here, not in the interpreter's shutdown
        return code
    except BaseException as exc:
        exit_code = _report(exc)
        if exit_code is None:
            raise
        return exit_code
    finally:
        logging.shutdown()


def run() -> None:  # pragma: no cover - console-script shim
    sys.exit(main())


# -- errors ---------------------------------------------------------------------------------------


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, without Trio's ``Cancelled``."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    trio = sys.modules.get("trio")  # no Cancelled can exist if trio was never imported
    if trio is not None and isinstance(exc, trio.Cancelled):
        return []
    return [exc]


def _report(exc: BaseException) -> int | None:
    """Print the one line for ``exc`` and return the exit code; None: a bug, re-raise it."""
    leaves = _leaves(exc)
    if not leaves:
        return None
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        _error_line("interrupted", prefix="trio-sign: ")
        return EXIT_INTERRUPTED
    if any(isinstance(leaf, BrokenPipeError) for leaf in leaves) and _stdout_closed():
        _discard_stdout()
        return EXIT_OK
    if not all(isinstance(leaf, (TrioSignError, OSError)) for leaf in leaves):
        return None  # a bug somewhere: keep its traceback
    first = next((leaf for leaf in leaves if isinstance(leaf, TrioSignError)), leaves[0])
    _error_line(describe_error(first))
    code = getattr(first, "exit_code", EXIT_FAILED)  # e.g. UsageError, the parent's exits
    return code if isinstance(code, int) and 0 < code < 128 else EXIT_FAILED


def describe_error(exc: BaseException) -> str:
    """One line saying what went wrong (never a traceback, never more than one line)."""
    if isinstance(exc, OSError) and not isinstance(exc, TrioSignError):
        if exc.errno == errno.EADDRINUSE:
            text = f"cannot listen: {ADDRESS_IN_USE}"
        else:
            reason = exc.strerror or str(exc) or type(exc).__name__
            text = f"{exc.filename}: {reason}" if exc.filename is not None else reason
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _error_line(text: str, *, prefix: str = "trio-sign: error: ") -> None:
    try:
        sys.stderr.write(f"{prefix}{text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr itself is gone: nothing left to tell
        pass


def _stdout_closed() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has gone."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(event & select.POLLERR for _, event in poller.poll(0))


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of what is still
    buffered cannot fail again (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
