"""The sans-io metrics module: families, the registry's snapshot, and its exact Prometheus text."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_sign._metrics import (
    OVERFLOW_LABEL_VALUE,
    SNAPSHOT_FORMAT,
    MetricsSnapshotError,
    Registry,
    merge_snapshots,
    render_snapshot,
)
from trio_sign.parent._health import MetricsWriter


def test_counter_gauge_and_histogram_render_exactly() -> None:
    reg = Registry()
    sessions = reg.counter("trio_sign_sessions_total", "Sessions.", ("outcome", "code"))
    sessions.labels(outcome="opened", code="OK").inc()
    sessions.labels(outcome="opened", code="OK").inc(2)
    sessions.labels(outcome="refused", code="RESOURCE_EXHAUSTED").inc()
    occupancy = reg.gauge("trio_sign_pool_sessions_open", "Open sessions.")
    occupancy.set(7)
    latency = reg.histogram(
        "trio_sign_request_duration_seconds", "Latency.", ("method",), buckets=(0.001, 0.01, 1)
    )
    commit = latency.labels(method="Commit")
    for value in (0.0005, 0.001, 0.005, 2.0):
        commit.observe(value)
    reg.build_info("enclave", "1.2.3")
    assert reg.render() == (
        "# HELP trio_sign_sessions_total Sessions.\n"
        "# TYPE trio_sign_sessions_total counter\n"
        'trio_sign_sessions_total{outcome="opened",code="OK"} 3\n'
        'trio_sign_sessions_total{outcome="refused",code="RESOURCE_EXHAUSTED"} 1\n'
        "# HELP trio_sign_pool_sessions_open Open sessions.\n"
        "# TYPE trio_sign_pool_sessions_open gauge\n"
        "trio_sign_pool_sessions_open 7\n"
        "# HELP trio_sign_request_duration_seconds Latency.\n"
        "# TYPE trio_sign_request_duration_seconds histogram\n"
        'trio_sign_request_duration_seconds_bucket{method="Commit",le="0.001"} 2\n'
        'trio_sign_request_duration_seconds_bucket{method="Commit",le="0.01"} 3\n'
        'trio_sign_request_duration_seconds_bucket{method="Commit",le="1"} 3\n'
        'trio_sign_request_duration_seconds_bucket{method="Commit",le="+Inf"} 4\n'
        'trio_sign_request_duration_seconds_sum{method="Commit"} 2.0065\n'
        'trio_sign_request_duration_seconds_count{method="Commit"} 4\n'
        "# HELP trio_sign_build_info Always 1; the labels say which component and version of"
        " trio_sign is running.\n"
        "# TYPE trio_sign_build_info gauge\n"
        'trio_sign_build_info{component="enclave",version="1.2.3"} 1\n'
    )


def test_the_snapshot_is_json_and_renders_the_same_after_a_round_trip() -> None:
    reg = Registry()
    reg.counter("a_total", "A.", ("x",)).labels(x="1").inc()
    reg.histogram("b_seconds", "B.", buckets=(0.5,)).observe(0.25)
    snapshot = reg.snapshot()
    assert snapshot["format"] == SNAPSHOT_FORMAT
    wire = json.dumps(snapshot, allow_nan=False)
    assert render_snapshot(json.loads(wire)) == render_snapshot(snapshot)
    assert snapshot["families"][1]["samples"] == [[[], [1], 0.25, 1]]


def test_collectors_run_before_each_snapshot() -> None:
    reg = Registry()
    gauge = reg.gauge("open", "Open.")
    mirrored = reg.counter("refused_total", "Refused.")
    source = {"open": 1, "refused": 0}

    def collect() -> None:
        gauge.set(source["open"])
        mirrored.labels().set_total(source["refused"])

    reg.on_collect(collect)
    source.update(open=5, refused=3)
    assert "open 5\n" in reg.render()
    assert "refused_total 3\n" in reg.render()
    with pytest.raises(ValueError, match="only goes up"):
        mirrored.labels().set_total(2)


def test_label_combinations_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    reg = Registry(max_series=3)
    counter = reg.counter("c_total", "C.", ("reason",))
    with caplog.at_level(logging.WARNING, logger="trio_sign.metrics"):
        for i in range(10):
            counter.labels(reason=f"r{i}").inc()
    samples = reg.snapshot()["families"][0]["samples"]
    assert samples == [[["r0"], 1], [["r1"], 1], [["r2"], 1], [[OVERFLOW_LABEL_VALUE], 7]]
    assert len([r for r in caplog.records if "max_series" in r.getMessage()]) == 1
    long = reg.gauge("g", "G.", ("v",))
    long.labels(v="x" * 1000).set(1)
    assert len(reg.snapshot()["families"][1]["samples"][0][0][0]) == 128


def test_families_follow_the_conventions() -> None:
    reg = Registry()
    with pytest.raises(ValueError, match="must end in _total"):
        reg.counter("sessions", "S.")
    with pytest.raises(ValueError, match="only counters end in _total"):
        reg.gauge("open_total", "O.")
    with pytest.raises(ValueError, match="_bucket"):
        reg.histogram("x_count", "X.")
    with pytest.raises(ValueError, match="label names"):
        reg.gauge("g", "G.", ("bad-label",))
    with pytest.raises(ValueError, match="'le'"):
        reg.histogram("h_seconds", "H.", ("le",))
    with pytest.raises(ValueError, match="strictly increasing"):
        reg.histogram("h_seconds", "H.", buckets=(1, 1))
    reg.gauge("g", "G.", ("a",))
    with pytest.raises(ValueError, match="made twice"):
        reg.gauge("g", "G.")
    counter = reg.counter("c_total", "C.", ("a", "b"))
    with pytest.raises(ValueError, match="takes the labels"):
        counter.labels(a="1")
    with pytest.raises(ValueError, match="only goes up"):
        counter.labels(a="1", b="2").inc(-1)
    with pytest.raises(ValueError, match="finite"):
        reg.gauge("n", "N.").set(float("nan"))
    with pytest.raises(ValueError, match="finite"):
        reg.histogram("h_seconds", "H.").observe(-1)


def _valid() -> dict[str, Any]:
    reg = Registry()
    reg.counter("c_total", "C.", ("a",)).labels(a="x").inc()
    reg.histogram("h_seconds", "H.", buckets=(1.0, 2.0)).observe(1.5)
    return reg.snapshot()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.update(format="v0"), "not a metrics snapshot"),
        (lambda s: s.update(families={}), "must be a list"),
        (lambda s: s["families"][0].update(name="bad name"), "bad family name"),
        (lambda s: s["families"][0].update(name="c"), "must end in _total"),
        (lambda s: s["families"][0].update(type="summary"), "unknown metric type"),
        (lambda s: s["families"][0]["samples"][0].__setitem__(0, []), "labels"),
        (lambda s: s["families"][0]["samples"][0].__setitem__(1, "1"), "finite number"),
        (lambda s: s["families"][0]["samples"][0].__setitem__(1, float("inf")), "finite"),
        (lambda s: s["families"][1]["samples"][0].__setitem__(1, [1, 0]), "malformed"),
        (lambda s: s["families"][1]["samples"][0].__setitem__(3, 0), "malformed"),
        (lambda s: s["families"][1].update(buckets=[]), "buckets"),
        (lambda s: s["families"].append(s["families"][0]), "appears twice"),
    ],
)
def test_a_malformed_snapshot_is_refused_with_its_family_named(mutate: Any, message: str) -> None:
    snapshot = _valid()
    mutate(snapshot)
    with pytest.raises(MetricsSnapshotError, match=message):
        render_snapshot(snapshot)


def test_merging_snapshots_joins_build_info_of_two_components() -> None:
    enclave, gateway = Registry(), Registry()
    enclave.build_info("enclave", "1.0")
    enclave.counter("trio_sign_sessions_total", "S.").inc()
    gateway.build_info("parent", "1.1")
    text = render_snapshot(merge_snapshots(enclave.snapshot(), gateway.snapshot()))
    assert text.count("# TYPE trio_sign_build_info gauge") == 1
    assert 'trio_sign_build_info{component="enclave",version="1.0"} 1\n' in text
    assert 'trio_sign_build_info{component="parent",version="1.1"} 1\n' in text
    with pytest.raises(MetricsSnapshotError, match="appears twice"):
        merge_snapshots(enclave.snapshot(), enclave.snapshot())
    other = Registry()
    other.counter("trio_sign_sessions_total", "S.", ("x",))
    with pytest.raises(MetricsSnapshotError, match="differs"):
        merge_snapshots(enclave.snapshot(), other.snapshot())


@given(
    help_text=st.text(max_size=40),
    values=st.lists(st.text(max_size=20), min_size=1, max_size=5, unique=True),
    number=st.integers(min_value=0, max_value=2**60) | st.floats(0, 1e12),
)
def test_escaping_matches_the_parents_writer(
    help_text: str, values: list[str], number: float
) -> None:
    """The enclave's numbers are rendered by the parent beside its own: the same escaping."""
    reg = Registry()
    gauge = reg.gauge("fam", help_text, ("v",))
    for value in values:
        gauge.labels(v=value).set(number)
    writer = MetricsWriter()
    writer.family("fam", "gauge", help_text, [({"v": v[:128]}, number) for v in values])
    assert reg.render() == writer.text()
