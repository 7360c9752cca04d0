"""``trio-sign status --url http://HOST:PORT``: a running node, summed up for a person.

It reads the parent's health listener (``[health] listen`` in parent.toml): ``GET /readyz``
(the readiness report, 200 or 503) and ``GET /metrics`` (Prometheus text), and prints a few
lines: state, ready, accounts, attestation, sessions and signatures, the last alert, versions.

Exit codes: 0 the node is ready; 1 it is not, or cannot be reached (one line on stderr says
why); 2 bad usage (a URL that is not ``http://HOST:PORT``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlsplit

#: Largest response read from the health listener, in bytes (a /metrics page is a few KiB).
MAX_RESPONSE_BYTES: Final = 4 * 1024 * 1024
DEFAULT_TIMEOUT_S: Final = 5.0

_SAMPLE: Final = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$"
)
_LABEL: Final = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')

Samples = dict[str, list[tuple[dict[str, str], float]]]


class StatusError(Exception):
    """The node could not be read; the message is the one line printed."""


def add_parser(sub: Any) -> None:
    status = sub.add_parser(
        "status",
        help="summarise a running node from its health URL (exit 0 if ready)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument(
        "--url",
        required=True,
        metavar="http://HOST:PORT",
        help="the parent's health listener ([health] listen in parent.toml)",
    )
    status.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"per request (default {DEFAULT_TIMEOUT_S:g})",
    )
    status.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    base = str(args.url).rstrip("/")
    try:
        parts = urlsplit(base)
        port = parts.port
    except ValueError:
        port = None
        parts = urlsplit("")
    if parts.scheme != "http" or not parts.hostname or port is None or parts.path:
        print(f"trio-sign: error: --url must be http://HOST:PORT, not {base!r}", file=sys.stderr)
        return 2
    if not args.timeout > 0:
        print("trio-sign: error: --timeout must be positive", file=sys.stderr)
        return 2
    try:
        report = _readyz(base, args.timeout)
        metrics = parse_prometheus_text(_get(base + "/metrics", args.timeout)[1])
    except StatusError as exc:
        print(f"trio-sign: error: {base}: {exc}", file=sys.stderr)
        return 1
    print(summarise(report, metrics))
    return 0 if report.get("ready") is True else 1


def _get(url: str, timeout: float) -> tuple[int, str]:
    """(status, body) of a GET; a 5xx with a body is an answer too (``/readyz`` says 503)."""
    # No proxies from the environment: the health listener is on the node, usually loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return int(response.status), _read(response)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, _read(exc)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise StatusError(f"cannot reach the health listener ({reason})") from None


def _read(response: Any) -> str:
    body = response.read(MAX_RESPONSE_BYTES + 1)
    if len(body) > MAX_RESPONSE_BYTES:
        raise StatusError(f"response over {MAX_RESPONSE_BYTES} bytes")
    return bytes(body).decode("utf-8", "replace")


def _readyz(base: str, timeout: float) -> dict[str, Any]:
    status, body = _get(base + "/readyz", timeout)
    try:
        report = json.loads(body)
    except ValueError:
        report = None
    if not isinstance(report, dict) or status not in (200, 503):
        raise StatusError(f"/readyz answered {status} without a readiness report")
    return report


def parse_prometheus_text(text: str) -> Samples:
    """Samples by metric name: ``{name: [(labels, value), ...]}``; comments and lines that do
    not parse are skipped (this is a summary, not a validator)."""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        labels = {
            k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
            for k, v in _LABEL.findall(match["labels"] or "")
        }
        out.setdefault(match["name"], []).append((labels, value))
    return out


def _total(metrics: Samples, name: str, **match: str) -> float | None:
    samples = metrics.get(name)
    if samples is None:
        return None
    return sum(v for labels, v in samples if all(labels.get(k) == m for k, m in match.items()))


def _count(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def summarise(report: Mapping[str, Any], metrics: Samples) -> str:
    """The lines ``trio-sign status`` prints for a readiness report and a metrics page."""
    state = report.get("enclave_state") or "unknown"
    phase = report.get("phase")
    reason = report.get("enclave_reason")
    state_line = str(state) + (f" (parent phase {phase})" if phase else "")
    if reason:
        state_line += f": {reason}"
    accounts = report.get("accounts")
    sha = report.get("shares_sha256")
    accounts_line = "none loaded" if accounts is None else f"{accounts}"
    if sha:
        accounts_line += f" (shares sha256 {str(sha)[:16]}...)"
    if report.get("attestation_verified"):
        attestation = f"verified at {report.get('attestation_checked_at')}"
        if report.get("attestation_fresh") is False:
            attestation += " (stale)"
    elif report.get("attestation_failure"):
        attestation = f"FAILED: {report['attestation_failure']}"
    else:
        attestation = "not verified yet"
    open_ = _total(metrics, "trio_sign_pool_sessions_open")
    if open_ is None:
        open_ = _total(metrics, "trio_sign_enclave_sessions_open")
    most = _total(metrics, "trio_sign_pool_sessions_max")
    if most is None:
        most = _total(metrics, "trio_sign_enclave_sessions_max")
    sessions = f"{_count(open_)} open of {_count(most)}"
    if "trio_sign_signatures_total" in metrics:
        sessions += "; signatures: " + ", ".join(
            f"{_count(_total(metrics, 'trio_sign_signatures_total', outcome=o))} {o}"
            for o in ("signed", "refused", "cancelled", "failed")
        )
    alert = report.get("last_alert")
    alert_line = "none" if not alert else f"{alert} (at {report.get('last_alert_at')})"
    versions = ", ".join(
        f"{labels.get('component', '?')} {labels.get('version', '?')}"
        for labels, _ in metrics.get("trio_sign_build_info", [])
    )
    rows = [
        ("state", state_line),
        ("ready", "yes" if report.get("ready") is True else "NO"),
        ("accounts", accounts_line),
        ("attestation", attestation),
        ("sessions", sessions),
        ("last alert", alert_line),
    ]
    if versions:
        rows.append(("version", versions))
    return "\n".join(f"{name + ':':<13}{value}" for name, value in rows)
