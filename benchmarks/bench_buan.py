"""Benchmark: exact batched BUAN (vqdiff.metrics.buan_score) against dipy, in one run.

Loads the real groups (consecutive chunks of 64 streamlines of every bundle in
``<data>/subject01/*.trk``), builds reconstructions ``x + N(0, sigma^2)`` for each requested
sigma, times dipy's ``bundle_shape_similarity(..., clust_thr=[0])`` group by group and the
batched reimplementation over all groups (best of ``--repeats``), and prints ms/group, the
speed-up and the largest absolute difference of the scores.

    python benchmarks/bench_buan.py [--groups N] [--threshold T] [--sigma 0.5,1,2,5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from _common import LoadWatch

REPO = Path(__file__).resolve().parents[1]


def load_groups(data: Path, limit: int | None) -> np.ndarray:
    from vqdiff.io import file_order_groups

    files = sorted((data / "subject01").glob("*.trk"))
    if not files:
        sys.exit(f"no .trk files under {data / 'subject01'} (use --data or VQDIFF_SHARED_DATA)")
    groups = file_order_groups(files)
    return groups[:limit] if limit else groups


def main(argv: list[str] | None = None) -> int:
    from vqdiff.metrics import buan_score, buan_score_dipy

    default_data = Path(os.environ.get("VQDIFF_SHARED_DATA", REPO.parent / "shared" / "data"))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=None, help="number of real groups (default: all)")
    p.add_argument("--threshold", type=float, default=5.0, help="BUAN threshold in mm (default 5)")
    p.add_argument("--sigma", default="0.5,1,2,5", help="comma-separated noise levels in mm")
    p.add_argument("--repeats", type=int, default=5, help="repeats of the fast version (best kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=default_data, help="the shared data folder")
    args = p.parse_args(argv)

    x = load_groups(args.data, args.groups)
    G = len(x)
    rng = np.random.default_rng(args.seed)
    watch = LoadWatch(1)  # both versions run on one core (numpy, no threads)
    buan_score(x[:1], x[:1], threshold=args.threshold)  # warm-up (imports, allocations)
    buan_score_dipy(x[:1], x[:1], threshold=args.threshold)  # the baseline too
    print(f"{G} groups of {x.shape[1]} streamlines x {x.shape[2]} points, threshold {args.threshold} mm")
    header = (
        f"{'sigma':>6} {'mean BA':>8} {'dipy ms/group':>14} {'fast ms/group':>14} "
        f"{'speed-up':>9} {'max |diff|':>11}"
    )
    print(header)
    print("-" * len(header))
    worst_ratio, worst_diff = np.inf, 0.0
    for sigma in (float(s) for s in args.sigma.split(",")):
        y = (x + rng.normal(0.0, sigma, x.shape)).astype(np.float32)
        t0 = time.perf_counter()
        ref = buan_score_dipy(x, y, threshold=args.threshold)
        t_dipy = (time.perf_counter() - t0) / G
        t_fast = np.inf
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fast = buan_score(x, y, threshold=args.threshold)
            t_fast = min(t_fast, (time.perf_counter() - t0) / G)
        diff = float(np.abs(fast - ref).max())
        ratio = t_dipy / t_fast
        worst_ratio, worst_diff = min(worst_ratio, ratio), max(worst_diff, diff)
        print(
            f"{sigma:6.2f} {ref.mean():8.4f} {t_dipy * 1e3:14.3f} {t_fast * 1e3:14.4f} "
            f"{ratio:8.1f}x {diff:11.2e}"
        )
    print(f"min speed-up {worst_ratio:.1f}x, max |fast - dipy| {worst_diff:.2e}")
    load = watch.finish()
    print(json.dumps({"groups": G, "min_speedup": round(worst_ratio, 2), "max_abs_diff": worst_diff, **load}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
