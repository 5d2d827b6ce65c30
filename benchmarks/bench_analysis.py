"""Timings of the latent analysis on cached synthetic encodings (run analysis_validation.py first).

- ``vqdiff-embed`` wall time (a fresh process, parquet) on the 10 held-out synthetic subjects x 12
  bundles = 120 latents files, 3 runs;
- scoring one subject (12 bundles) against norms fitted on the 20 reference synthetic subjects:
  latents already loaded, and including reading the files.

    nice -n 10 .venv/bin/python benchmarks/bench_analysis.py [--synth runs/analysis/synth-...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYNTH = REPO / "runs" / "analysis" / "synth-e2-w40-a0.05-h0.03-s0"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synth", default=str(SYNTH), help="folder of synthNN subject folders of latents")
    args = p.parse_args(argv)
    root = Path(args.synth)
    subjects = sorted(d for d in root.glob("synth*") if d.is_dir())
    if len(subjects) < 30:
        sys.exit(f"{root}: expected 30 synthetic subjects; run benchmarks/analysis_validation.py first")
    reference, held = subjects[:20], subjects[20:30]
    res = {"load_before": [round(x, 2) for x in os.getloadavg()]}
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "t.parquet"
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([str(Path(sys.executable).parent / "vqdiff-embed"), *map(str, held), str(out), "-f"],
                           check=True, capture_output=True)
            walls.append(round(time.perf_counter() - t0, 3))
    res["embed_cli_120_bundles_wall_s"] = walls

    from vqdiff.analysis.records import iter_records
    from vqdiff.analysis.scoring import fit_table, score_records
    from vqdiff.analysis.tables import build_tables

    norms = fit_table(build_tables(reference)["wide"], "wide")
    recs = list(iter_records([held[0]]))
    score_records(recs, norms)  # warm: the norms' kernels are computed once
    t0 = time.perf_counter()
    for _ in range(20):
        score_records(recs, norms)
    res["score_subject_ms"] = {"bundles": len(recs), "loaded": round(1000 * (time.perf_counter() - t0) / 20, 2)}
    t0 = time.perf_counter()
    for _ in range(5):
        score_records(list(iter_records([held[0]])), norms)
    res["score_subject_ms"]["reading_the_files"] = round(1000 * (time.perf_counter() - t0) / 5, 2)
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
