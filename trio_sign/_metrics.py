"""Metrics, sans-io: counters, gauges and histograms in a registry, its snapshot, and the
Prometheus text exposition (version 0.0.4) of a snapshot.

Nothing here does I/O or awaits. A process keeps one :class:`Registry` per component (the
enclave's lives on its ``SignService``, the gateway's on its API); :meth:`Registry.snapshot`
turns it into a small JSON-serialisable dict, which can cross a process boundary (the enclave
sends its snapshot to the parent over the status channel) and is rendered where it is served
with :func:`render_snapshot`.

Conventions (checked when a family is made): counters end in ``_total``; units are base units
in the name (``_seconds``, ``_bytes``); histograms expose ``_bucket`` (with ``le``), ``_sum`` and
``_count``. Every family has fixed label names, and at most ``max_series`` label combinations:
beyond that, new combinations are counted in one overflow series whose every label is
``"other"`` (with a warning, once per family), so a bug or a hostile input can never grow a
snapshot without bound. Never use an account id, a session id or anything a client chooses as
a label value.

The snapshot format (``"format": "trio_sign.metrics/1"``)::

    {"format": "trio_sign.metrics/1",
     "families": [
        {"name": "trio_sign_sessions_total", "type": "counter", "help": "...",
         "labels": ["outcome", "code"],
         "samples": [[["opened", "OK"], 12], ...]},
        {"name": "trio_sign_request_duration_seconds", "type": "histogram", "help": "...",
         "labels": ["method"], "buckets": [0.001, 0.01, ...],
         "samples": [[["Commit"], [3, 12, ...], 0.0123, 12]]}]}

A counter or gauge sample is ``[label values, value]``; a histogram sample is ``[label values,
cumulative counts per bucket, sum, count]`` (the ``+Inf`` bucket is ``count``).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Literal

from ._errors import TrioSignError

log = logging.getLogger("trio_sign.metrics")

SNAPSHOT_FORMAT: Final = "trio_sign.metrics/1"
#: Label combinations a family keeps before new ones go to the overflow series.
DEFAULT_MAX_SERIES: Final = 64
#: The label value of the overflow series.
OVERFLOW_LABEL_VALUE: Final = "other"
#: Longest label value kept; longer ones are cut (label values are never free text).
MAX_LABEL_VALUE_CHARS: Final = 128
#: Request latency buckets, in seconds: a signing round is about a millisecond unloaded.
DEFAULT_LATENCY_BUCKETS_S: Final = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

Kind = Literal["counter", "gauge", "histogram"]

_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_HISTOGRAM_SUFFIXES: Final = ("_bucket", "_sum", "_count", "_total")


class MetricsSnapshotError(TrioSignError, ValueError):
    """A snapshot is not in the format :func:`render_snapshot` reads (a version mismatch or a
    bug on the sending side); the message says which family and what is wrong."""


# -- families ----------------------------------------------------------------------------------


class _Family:
    kind: Kind

    def __init__(
        self, name: str, help_text: str, label_names: Sequence[str], max_series: int
    ) -> None:
        _check_family(name, self.kind, label_names)
        if max_series < 1:
            raise ValueError("max_series must be >= 1")
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)
        self.max_series = max_series
        self._overflowed = False

    def _key(
        self, labels: Mapping[str, str], known: Mapping[tuple[str, ...], object]
    ) -> tuple[str, ...]:
        if len(labels) != len(self.label_names) or set(labels) != set(self.label_names):
            raise ValueError(
                f"{self.name} takes the labels {list(self.label_names)}, got {sorted(labels)}"
            )
        key = tuple(str(labels[n])[:MAX_LABEL_VALUE_CHARS] for n in self.label_names)
        if key in known or len(known) < self.max_series:
            return key
        if not self._overflowed:
            self._overflowed = True
            log.warning(
                "metric %s has %d label combinations (max_series); counting new ones as %r",
                self.name,
                self.max_series,
                OVERFLOW_LABEL_VALUE,
            )
        return (OVERFLOW_LABEL_VALUE,) * len(self.label_names)

    def _snapshot(self) -> dict[str, Any]:
        raise NotImplementedError


class CounterChild:
    """One series of a :class:`Counter`."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (not negative)."""
        if not amount >= 0:
            raise ValueError("a counter only goes up")
        self.value += amount

    def set_total(self, total: float) -> None:
        """Mirror a count kept elsewhere (``ServerStats``, ``HubStats``): set the value to
        ``total``, which must not be below it."""
        if not total >= self.value or math.isinf(total):
            raise ValueError(f"a counter only goes up ({self.value} -> {total})")
        self.value = float(total)


class Counter(_Family):
    """A count that only goes up; the name ends in ``_total``."""

    kind: Kind = "counter"

    def __init__(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str] = (),
        *,
        max_series: int = DEFAULT_MAX_SERIES,
    ) -> None:
        super().__init__(name, help_text, label_names, max_series)
        self._series: dict[tuple[str, ...], CounterChild] = {}
        if not self.label_names:
            self._series[()] = CounterChild()

    def labels(self, **labels: str) -> CounterChild:
        """The series for these label values (made on first use; bind it once on hot paths)."""
        key = self._key(labels, self._series)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = CounterChild()
        return child

    def inc(self, amount: float = 1.0) -> None:
        """Add to the only series of a family without labels."""
        self.labels().inc(amount)

    def _snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.kind,
            "help": self.help,
            "labels": list(self.label_names),
            "samples": [[list(k), _plain(c.value)] for k, c in self._series.items()],
        }


class GaugeChild:
    """One series of a :class:`Gauge`."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        if not math.isfinite(value):
            raise ValueError("a gauge's value must be finite")
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        self.set(self.value + amount)

    def dec(self, amount: float = 1.0) -> None:
        self.set(self.value - amount)


class Gauge(_Family):
    """A value that goes up and down (occupancy, a level, ``_info`` families)."""

    kind: Kind = "gauge"

    def __init__(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str] = (),
        *,
        max_series: int = DEFAULT_MAX_SERIES,
    ) -> None:
        super().__init__(name, help_text, label_names, max_series)
        self._series: dict[tuple[str, ...], GaugeChild] = {}
        if not self.label_names:
            self._series[()] = GaugeChild()

    def labels(self, **labels: str) -> GaugeChild:
        key = self._key(labels, self._series)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = GaugeChild()
        return child

    def set(self, value: float) -> None:
        """Set the only series of a family without labels."""
        self.labels().set(value)

    def _snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.kind,
            "help": self.help,
            "labels": list(self.label_names),
            "samples": [[list(k), _plain(c.value)] for k, c in self._series.items()],
        }


class HistogramChild:
    """One series of a :class:`Histogram`: per-bucket counts (not cumulative), sum, count."""

    __slots__ = ("_bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one observation (seconds, bytes: never negative, never NaN)."""
        if not value >= 0 or math.isinf(value):
            raise ValueError("a histogram observation must be finite and >= 0")
        for index, bound in enumerate(self._bounds):
            if value <= bound:
                self.counts[index] += 1
                break
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[int]:
        out, running = [], 0
        for c in self.counts:
            running += c
            out.append(running)
        return out


class Histogram(_Family):
    """Observations in fixed buckets (``le`` upper bounds; ``+Inf`` is implied)."""

    kind: Kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str] = (),
        *,
        buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS_S,
        max_series: int = DEFAULT_MAX_SERIES,
    ) -> None:
        super().__init__(name, help_text, label_names, max_series)
        bounds = tuple(float(b) for b in buckets)
        if (
            not bounds
            or not all(math.isfinite(b) for b in bounds)
            or any(a >= b for a, b in itertools.pairwise(bounds))
        ):
            raise ValueError(f"{name}: buckets must be finite and strictly increasing")
        if "le" in self.label_names:
            raise ValueError(f"{name}: 'le' is the bucket label, not one of yours")
        self.buckets = bounds
        self._series: dict[tuple[str, ...], HistogramChild] = {}
        if not self.label_names:
            self._series[()] = HistogramChild(bounds)

    def labels(self, **labels: str) -> HistogramChild:
        key = self._key(labels, self._series)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = HistogramChild(self.buckets)
        return child

    def observe(self, value: float) -> None:
        """Observe into the only series of a family without labels."""
        self.labels().observe(value)

    def _snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.kind,
            "help": self.help,
            "labels": list(self.label_names),
            "buckets": [_plain(b) for b in self.buckets],
            "samples": [
                [list(k), c.cumulative(), _plain(c.sum), c.count] for k, c in self._series.items()
            ],
        }


# -- the registry ------------------------------------------------------------------------------


class Registry:
    """The metric families of one component, in the order they were made.

    Args:
        max_series: the default ``max_series`` of the families made here.

    Collectors (:meth:`on_collect`) run at the start of every :meth:`snapshot`: use them to
    copy numbers kept elsewhere (a pool's occupancy, a server's refusal counters) into gauges
    and counters, so the hot paths that keep them pay nothing for metrics.
    """

    def __init__(self, *, max_series: int = DEFAULT_MAX_SERIES) -> None:
        self.max_series = max_series
        self._families: dict[str, _Family] = {}
        self._collectors: list[Callable[[], None]] = []

    def _add(self, family: _Family) -> None:
        if family.name in self._families:
            raise ValueError(f"metric family {family.name} made twice")
        self._families[family.name] = family

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        family = Counter(name, help_text, labels, max_series=self.max_series)
        self._add(family)
        return family

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Gauge:
        family = Gauge(name, help_text, labels, max_series=self.max_series)
        self._add(family)
        return family

    def histogram(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        *,
        buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS_S,
    ) -> Histogram:
        family = Histogram(name, help_text, labels, buckets=buckets, max_series=self.max_series)
        self._add(family)
        return family

    def build_info(self, component: str, version: str) -> Gauge:
        """``trio_sign_build_info{component, version} 1``: which code is running."""
        info = self.gauge(
            "trio_sign_build_info",
            "Always 1; the labels say which component and version of trio_sign is running.",
            ("component", "version"),
        )
        info.labels(component=component, version=version).set(1)
        return info

    def on_collect(self, collector: Callable[[], None]) -> None:
        """Run ``collector()`` before every snapshot (it must not block or raise)."""
        self._collectors.append(collector)

    def snapshot(self) -> dict[str, Any]:
        """Every family's current values, as a JSON-serialisable dict (module docstring)."""
        for collector in self._collectors:
            collector()
        return {
            "format": SNAPSHOT_FORMAT,
            "families": [family._snapshot() for family in self._families.values()],
        }

    def render(self) -> str:
        """The Prometheus text exposition of :meth:`snapshot`."""
        return render_snapshot(self.snapshot())


# -- rendering ---------------------------------------------------------------------------------


def escape_help(text: str) -> str:
    """A ``# HELP`` text as the exposition format wants it (``\\`` and line feeds escaped)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label_value(text: str) -> str:
    """A label value as the exposition format wants it (``\\``, ``"`` and line feeds escaped)."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_number(value: float) -> str:
    """A sample value: integers without a fraction, ``NaN``, ``+Inf``, ``-Inf``."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def label_part(pairs: Iterable[tuple[str, str]]) -> str:
    rendered = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs)
    return f"{{{rendered}}}" if rendered else ""


def render_snapshot(snapshot: Mapping[str, Any]) -> str:
    """The Prometheus text exposition (0.0.4) of a snapshot: ``# HELP`` and ``# TYPE`` per
    family, then its samples; a histogram's as ``_bucket{...,le="..."}``, ``_sum``, ``_count``.

    Error handling: :class:`MetricsSnapshotError` (a ``ValueError``) naming the family when the
    snapshot is not one :meth:`Registry.snapshot` makes; nothing is rendered then.
    """
    families = _checked(snapshot)
    lines: list[str] = []
    for fam in families:
        name, kind, names = fam["name"], fam["type"], fam["labels"]
        lines.append(f"# HELP {name} {escape_help(fam['help'])}")
        lines.append(f"# TYPE {name} {kind}")
        for sample in fam["samples"]:
            pairs = list(zip(names, sample[0], strict=True))
            if kind != "histogram":
                lines.append(f"{name}{label_part(pairs)} {format_number(sample[1])}")
                continue
            counts, total, count = sample[1], sample[2], sample[3]
            for bound, cumulative in zip(fam["buckets"], counts, strict=True):
                le = label_part([*pairs, ("le", format_number(bound))])
                lines.append(f"{name}_bucket{le} {format_number(cumulative)}")
            lines.append(f"{name}_bucket{label_part([*pairs, ('le', '+Inf')])} {count}")
            lines.append(f"{name}_sum{label_part(pairs)} {format_number(total)}")
            lines.append(f"{name}_count{label_part(pairs)} {count}")
    return "\n".join(lines) + "\n" if lines else ""


def merge_snapshots(*snapshots: Mapping[str, Any]) -> dict[str, Any]:
    """One snapshot with every family of ``snapshots``; a family in several (the same name,
    type, labels and buckets, e.g. ``trio_sign_build_info``) gets the samples of all.

    Error handling: :class:`MetricsSnapshotError` for a malformed snapshot, or a family that
    differs between snapshots, or a series that appears twice.
    """
    merged: dict[str, dict[str, Any]] = {}
    for snapshot in snapshots:
        for fam in _checked(snapshot):
            name = fam["name"]
            if name not in merged:
                merged[name] = {**fam, "samples": list(fam["samples"])}
                continue
            into = merged[name]
            if any(into.get(k) != fam.get(k) for k in ("type", "labels", "buckets")):
                raise MetricsSnapshotError(f"{name}: differs between the snapshots merged")
            seen = {tuple(s[0]) for s in into["samples"]}
            for sample in fam["samples"]:
                if tuple(sample[0]) in seen:
                    raise MetricsSnapshotError(f"{name}: series {sample[0]} appears twice")
                into["samples"].append(sample)
    return {"format": SNAPSHOT_FORMAT, "families": list(merged.values())}


def _checked(snapshot: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The snapshot's families, every field checked (it may have crossed a process boundary)."""
    if not isinstance(snapshot, Mapping) or snapshot.get("format") != SNAPSHOT_FORMAT:
        raise MetricsSnapshotError(f"not a metrics snapshot (format {SNAPSHOT_FORMAT} expected)")
    families = snapshot.get("families")
    if not isinstance(families, list):
        raise MetricsSnapshotError("a snapshot's families must be a list")
    names: set[str] = set()
    for fam in families:
        if not isinstance(fam, dict):
            raise MetricsSnapshotError("a family must be an object")
        name = fam.get("name")
        if not isinstance(name, str) or _NAME.fullmatch(name) is None:
            raise MetricsSnapshotError(f"bad family name {str(name)[:80]!r}")
        if name in names:
            raise MetricsSnapshotError(f"{name}: appears twice")
        names.add(name)
        try:
            _check_family(name, fam.get("type"), fam.get("labels"))
        except ValueError as exc:
            raise MetricsSnapshotError(str(exc)) from None
        if not isinstance(fam.get("help"), str):
            raise MetricsSnapshotError(f"{name}: help must be a string")
        _check_samples(fam)
    return families


def _check_samples(fam: dict[str, Any]) -> None:
    name, width = fam["name"], len(fam["labels"])
    histogram = fam["type"] == "histogram"
    buckets = fam.get("buckets")
    if histogram and (
        not isinstance(buckets, list) or not buckets or not all(_finite(b) for b in buckets)
    ):
        raise MetricsSnapshotError(f"{name}: a histogram needs a list of finite buckets")
    samples = fam.get("samples")
    if not isinstance(samples, list):
        raise MetricsSnapshotError(f"{name}: samples must be a list")
    for sample in samples:
        if (
            not isinstance(sample, list)
            or len(sample) != (4 if histogram else 2)
            or not isinstance(sample[0], list)
            or len(sample[0]) != width
            or not all(isinstance(v, str) for v in sample[0])
        ):
            raise MetricsSnapshotError(f"{name}: a sample does not match the family's labels")
        if not histogram:
            if not _finite(sample[1]):
                raise MetricsSnapshotError(f"{name}: a sample's value must be a finite number")
            continue
        counts, total, count = sample[1], sample[2], sample[3]
        assert isinstance(buckets, list)
        if (
            not isinstance(counts, list)
            or len(counts) != len(buckets)
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts)
            or not isinstance(count, int)
            or isinstance(count, bool)
            or not _finite(total)
            or any(a > b for a, b in itertools.pairwise([0, *counts, count]))
        ):
            raise MetricsSnapshotError(f"{name}: a histogram sample is malformed")


def _check_family(name: str, kind: object, label_names: object) -> None:
    if _NAME.fullmatch(name) is None:
        raise ValueError(f"bad metric name {name!r}")
    if kind not in ("counter", "gauge", "histogram"):
        raise ValueError(f"{name}: unknown metric type {str(kind)[:20]!r}")
    if kind == "counter" and not name.endswith("_total"):
        raise ValueError(f"counter {name} must end in _total")
    if kind != "counter" and name.endswith("_total"):
        raise ValueError(f"{name}: only counters end in _total")
    if kind == "histogram" and name.endswith(_HISTOGRAM_SUFFIXES):
        raise ValueError(f"histogram {name} must not end in _bucket, _sum or _count")
    if (
        not isinstance(label_names, (list, tuple))
        or not all(isinstance(n, str) and _LABEL.fullmatch(n) for n in label_names)
        or any(n.startswith("__") for n in label_names)
        or len(set(label_names)) != len(label_names)
    ):
        raise ValueError(f"{name}: label names must be distinct [a-zA-Z_][a-zA-Z0-9_]*")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _plain(value: float) -> int | float:
    """Integers as ints in a snapshot: smaller JSON, and exact."""
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else value


__all__ = [
    "DEFAULT_LATENCY_BUCKETS_S",
    "DEFAULT_MAX_SERIES",
    "OVERFLOW_LABEL_VALUE",
    "SNAPSHOT_FORMAT",
    "Counter",
    "CounterChild",
    "Gauge",
    "GaugeChild",
    "Histogram",
    "HistogramChild",
    "MetricsSnapshotError",
    "Registry",
    "escape_help",
    "escape_label_value",
    "format_number",
    "merge_snapshots",
    "render_snapshot",
]
