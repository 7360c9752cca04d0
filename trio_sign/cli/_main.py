"""Argument parsing and dispatch for ``trio-sign``.

Exit codes: 0 success; 1 the command failed (one line on stderr says why); 2 bad usage;
130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from .._errors import TrioSignError
from .._logging import configure_logging
from . import _attestation, _demo, _dev, _enclave, _gateway, _kms, _parent, _shares

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-sign",
        description="MPC co-signing service (FROST Ed25519, RFC 9591) for AWS Nitro Enclaves.",
    )
    parser.add_argument("--version", action="version", version=f"trio-sign {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _shares.add_parser(sub)
    _enclave.add_parser(sub)
    _attestation.add_parser(sub)
    _kms.add_parser(sub)
    _parent.add_parser(sub)
    _gateway.add_parser(sub)
    _demo.add_parser(sub)
    _dev.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        code: int = args.func(args)
        return code
    except TrioSignError as exc:
        print(f"trio-sign: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(
            f"trio-sign: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
            file=sys.stderr,
        )
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("trio-sign: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        logging.shutdown()


def run() -> None:  # pragma: no cover - console-script shim
    sys.exit(main())
