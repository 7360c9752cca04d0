"""Smoke test for ``scripts/bench --grpc``: the whole pipeline (share files, both server
processes, the load generator process, verification, report) at a tiny size."""

from __future__ import annotations

import pytest

from trio_sign.bench._grpc import GrpcBenchOptions, bench_grpc

pytest.importorskip("grpc", reason="grpcio is a test dependency")


def test_bench_grpc_pipeline(capsys: pytest.CaptureFixture[str]) -> None:
    opts = GrpcBenchOptions(
        accounts=8,
        rounds=1,
        concurrency=(1, 4),
        warmup_s=0.1,
        duration_s=0.4,
        open_base=4,
        verify_every=5,
        profile=False,
    )
    runs = bench_grpc(opts)
    for kind in ("ours", "grpcio"):
        (run,) = runs[kind]
        assert len(run.gc["collections"]) == 3, run.gc  # the server stopped cleanly
        assert [p["phase"] for p in run.phases] == ["closed", "closed", "open"]
        for phase in run.phases:
            assert phase["errors"] == {}, (kind, phase)
            assert phase["sessions"] > 0, (kind, phase)
            assert phase["verified"] > 0, (kind, phase)
            assert phase["verify_failed"] == 0, (kind, phase)
    # The same arrivals for both servers in the open loop.
    ours_open, grpcio_open = runs["ours"][0].open(), runs["grpcio"][0].open()
    assert ours_open is not None
    assert grpcio_open is not None
    assert grpcio_open["offered_per_s"] == ours_open["offered_per_s"]
    out = capsys.readouterr().out
    assert "targets" in out
    assert out.count("MET") + out.count("MISSED") == 3
