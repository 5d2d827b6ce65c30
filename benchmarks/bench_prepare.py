"""Benchmark: CPU cost of bundle preparation (parse, canonicalise, normalise) per group of 64.

For every ``.trk`` of ``<data>/subject01`` (already 64 points per streamline) and of
``<data>/crosssubject/*/`` (other point counts: canonicalisation resamples them), times, with
thread CPU time and numpy's BLAS limited to one thread:

- parse: ``vqdiff.io.load_bundle(path)``;
- register: ``vqdiff.registration.register(streamlines, templates, hint=name)`` against the model's
  templates (``--model``, default models/default): recognition, and the bounded SLR for bundles
  that are not in model space (every cross-subject bundle; subject01's are, and take the identity);
- canonicalise: ``vqdiff.canonical.canonicalise`` of the registered streamlines;
- normalise: ``Normalisation.apply(groups)`` (a fixed isotropic map, as at inference);

each the best (minimum) and the median of ``--repeats`` runs per file, summed over the files of a
data set and divided by its number of canonical groups, beside a baseline timed in the same run
(nibabel's load + dipy's resampling to 64 points: the floor any preparation pays), after an untimed
warm-up. Prints the CPU model and the ISA flags that matter (avx2, avx512*, amx*), the load average
before and after (a WARNING and ``"contended": true`` when it exceeded the one core used), and a
final JSON line.

    python benchmarks/bench_prepare.py [--data ../shared/data] [--repeats 7] [--model models/default]

The timings are for whatever ``vqdiff`` is importable (run it from another checkout with
``PYTHONPATH`` to compare versions).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _common import LoadWatch, cpu_summary

REPO = Path(__file__).resolve().parents[1]
STEPS = ("parse", "register", "canonicalise", "normalise")


def cpu_ms(fn, repeats: int):
    """(best and median thread-CPU milliseconds over ``repeats`` calls, the last result)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.thread_time()
        out = fn()
        times.append(time.thread_time() - t0)
    return min(times) * 1e3, statistics.median(times) * 1e3, out


def baseline_files(files: list[Path], repeats: int) -> dict:
    """The floor any preparation pays: nibabel's TRK load and dipy's resampling to 64 points."""
    import nibabel as nib
    from dipy.tracking.streamline import set_number_of_points

    total, groups = 0.0, 0
    for path in files:
        best, _, sl = cpu_ms(lambda p=path: set_number_of_points(nib.streamlines.load(str(p)).streamlines, 64), repeats)
        total += best
        groups += -(-len(sl) // 64)
    return {"ms_per_group": round(total / groups, 4), "groups": groups}


def bench_files(files: list[Path], repeats: int, templates) -> dict:
    from vqdiff.canonical import canonicalise
    from vqdiff.io import load_bundle
    from vqdiff.normalise import Normalisation
    from vqdiff.registration import register

    norm = Normalisation((0.0, -18.0, 10.0), 80.0, (-80.0, -98.0, -70.0), (80.0, 62.0, 90.0))
    best, median = dict.fromkeys(STEPS, 0.0), dict.fromkeys(STEPS, 0.0)
    groups = streamlines = 0
    points = set()
    for path in files:
        runs = {}
        *runs["parse"], bundle = cpu_ms(lambda p=path: load_bundle(p), repeats)
        *runs["register"], reg = cpu_ms(lambda b=bundle: register(b.streamlines, templates, hint=b.name), repeats)
        moved = reg.apply(bundle.streamlines)
        *runs["canonicalise"], canon = cpu_ms(lambda m=moved: canonicalise(m), repeats)
        *runs["normalise"], _ = cpu_ms(lambda c=canon: norm.apply(c.groups), repeats)
        for step, (b, m) in runs.items():
            best[step] += b
            median[step] += m
        groups += canon.n_groups
        streamlines += canon.n_streamlines
        points.update(int(k) for k in set(canon.n_points.tolist()))

    def per_group(totals: dict) -> dict:
        out = {k: round(v / groups, 4) for k, v in totals.items()}
        out["total"] = round(sum(totals.values()) / groups, 4)
        return out

    return {"files": len(files), "streamlines": streamlines, "groups": groups,
            "points_per_streamline": sorted(points), "ms_per_group": per_group(best),
            "ms_per_group_median": per_group(median)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path,
                    default=Path(os.environ.get("VQDIFF_SHARED_DATA", REPO.parent / "shared" / "data")))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "default",
                    help="the model whose registration templates are used (default: models/default)")
    args = ap.parse_args(argv)

    import vqdiff
    from vqdiff.codec import load_templates

    templates = load_templates(args.model)
    if templates is None:
        sys.exit(f"{args.model} has no registration templates (templates.safetensors)")

    cpu = cpu_summary()
    print(f"CPU: {cpu['model']} ({cpu['cores']} cores); ISA: {' '.join(cpu['isa']) or 'none listed'}; "
          f"avx512: {'yes' if cpu['avx512'] else 'no'}, amx: {'yes' if cpu['amx'] else 'no'}")
    print(f"vqdiff from {Path(vqdiff.__file__).parent}")
    watch = LoadWatch(1)  # one thread: BLAS limited below
    sets = {"subject01": sorted((args.data / "subject01").glob("*.trk")),
            "crosssubject": sorted((args.data / "crosssubject").glob("*/*.trk"))}
    results = {}
    from vqdiff.blas import single_threaded_blas

    with single_threaded_blas():
        for label, files in sets.items():
            if not files:
                print(f"{label}: no .trk files under {args.data}, skipped", file=sys.stderr)
                continue
            bench_files(files[:1], 1, templates)  # warm-up (imports, caches), untimed
            r = results[label] = bench_files(files, args.repeats, templates)
            r["baseline"] = baseline_files(files, args.repeats)
            pts = r["points_per_streamline"]
            print(f"{label}: {r['files']} files, {r['streamlines']} streamlines, {r['groups']} groups, "
                  f"points {pts[:3]}{'...' if len(pts) > 3 else ''}")
            for kind in ("ms_per_group", "ms_per_group_median"):
                print(f"  CPU ms/group ({'best' if kind == 'ms_per_group' else 'median'} of {args.repeats}): "
                      + ", ".join(f"{k} {v:.3f}" for k, v in r[kind].items()))
            b = r["baseline"]["ms_per_group"]
            print(f"  baseline in the same run (nibabel load + dipy set_number_of_points, nothing else): "
                  f"{b:.3f} ms/group; vqdiff's whole preparation is {r['ms_per_group']['total'] / b:.2f}x it")
    load = watch.finish()
    print(json.dumps({"cpu": cpu, "load_before": load["load_avg_before"], "load_after": load["load_avg_after"],
                      "contended": load["contended"], "repeats": args.repeats, "results": results}))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
