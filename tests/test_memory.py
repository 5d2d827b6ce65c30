"""The soak benchmark's RSS verdict (what tells whether the service's RSS stays bounded)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("bentoml")


REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- bench
@pytest.fixture(scope="module")
def bench_soak():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_soak
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return bench_soak


def _series(rss_of_t, duration=300, every=5):
    """Samples as RssSampler takes them: one before the load (t=0), then every ``every`` s of load."""
    out = [{"t": 0.0, "procs": {"worker:1": {"pid": 1, "VmRSS": 200.0, "cpu_s": 0.0}}}]
    for k in range(1, duration // every + 2):
        t = min(k * every, duration + 0.5)
        out.append({"t": t, "procs": {"worker:1": {"pid": 1, "VmRSS": float(rss_of_t(t)), "cpu_s": t / 2}}})
    return out


def test_soak_verdict_passes_a_swinging_worker_and_fails_a_climbing_one(bench_soak):
    swing = _series(lambda t: 400 if int(t) % 10 else 900)  # trims: 400 <-> 900 MB, no trend
    rss = bench_soak.rss_summary(swing, 0.0, 300.0, 60.0, 30.0, 1.25)["worker:1"]
    assert rss["level_warmup_mb"] == 900 and rss["level_end_mb"] == 900 and rss["within_bound"]
    assert rss["cpu_s"] == pytest.approx(150.25, abs=0.1)  # CPU seconds during the load
    assert bench_soak.rss_verdict({"worker:1": rss}, 1.25)["ok"]

    climb = _series(lambda t: 300 + 2 * t)  # +2 MB/s: 420 MB at the end of the warm-up, 900 at the end
    rss = bench_soak.rss_summary(climb, 0.0, 300.0, 60.0, 30.0, 1.25)["worker:1"]
    assert rss["level_warmup_mb"] == 420 and rss["max_growth"] > 2 and not rss["within_bound"]

    plateau = _series(lambda t: 240 + 8 * min(t, 130))  # retention that plateaus after the warm-up: caught
    rss = bench_soak.rss_summary(plateau, 0.0, 300.0, 60.0, 30.0, 1.25)["worker:1"]
    assert rss["level_warmup_mb"] == 720 and rss["end_growth"] == pytest.approx(1280 / 720, abs=1e-3)
    assert not rss["within_bound"]
    verdict = bench_soak.rss_verdict({"worker:1": rss, "arbiter": {**rss, "within_bound": False}}, 1.25)
    assert not verdict["ok"] and verdict["over"] == ["worker:1"]  # the arbiter is not a worker
