"""Benchmark: groups/s of every engine variant against the authors' loop, their gate, and the served one.

Encode + decode throughput (groups of 64 streamlines x 64 points per second) of each variant of
`vqdiff.export.variants` this machine can run (CPU: torch fp32, torch bf16 autocast +
channels_last, ONNX Runtime fp32 and int8 static QDQ; on a CUDA machine the CUDA variants), at
requests of 1, 8, 64 and 256 groups, beside the authors' loop (torch eager fp32, one group per
forward) timed in the same run. Then each variant's quality gate (mean MDF and BUAN change on
held-out real groups against the fp32 model) and the variant `vqdiff.export.select.select_engine`
serves here (selected afresh in this run unless ``--cache-dir`` holds a decision).

The roof (`_roof`, docs/engines.md): the machine's GEMM peak per precision the CPU runs natively
(fp32; bf16 where it has avx512_bf16 / AMX; int8 where it has an int8 dot product), measured on the
same threads before, between and after the variants' rounds (the highest: a burst of background
load lowers one measure, as it lowers one timing of a variant), divided by the model's FLOPs per
group (torch's FLOP counter): each variant's groups/s is printed as a fraction of its precision's roof
beside its ratio to the authors' loop.

    python benchmarks/bench_export.py [--model DIR] [--threads N] [--groups 128] [--json out.json]

Real groups of ``<data>/subject01``; interleaved best of ``--repeats`` timings per request size
(fair under background load); load average before and after, and a WARNING when contended.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import LoadWatch, best_time, cpu_summary, interleaved_best, requests_of, roundtrip_all
from _roof import fraction, layer_gflop_per_group, merge, print_roof, roof, spec_roof

REPO = Path(__file__).resolve().parents[1]


def default_model() -> Path:
    for p in (REPO / "models" / "default", REPO / "runs" / "default" / "best"):
        if (p / "model.safetensors").is_file():
            return p
    sys.exit("no model: pass --model CHECKPOINT_DIR (models/default and runs/default/best are missing)")


def authors_loop(model, x: np.ndarray, n: int, device: str = "cpu"):
    """torch eager fp32, one group per forward (encoder -> bottleneck -> decoder), as in the authors' code."""
    import torch

    model = model.to(device).eval()
    xs = [torch.from_numpy(np.ascontiguousarray(x[i : i + 1])) for i in range(n)]

    def run():
        with torch.no_grad():
            for b in xs:
                model(b.to(device)).reconstruction.cpu()

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="checkpoint dir (default models/default, else runs/default/best)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads of every variant")
    p.add_argument("--batches", default="1,8,64,256", help="request sizes (groups per call)")
    p.add_argument("--groups", type=int, default=128, help="groups per timing (at least one request)")
    p.add_argument("--baseline-groups", type=int, default=64, help="groups per timing at batch 1 and of the authors' loop")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", help="comma-separated variants (default: every candidate of this device)")
    p.add_argument("--cache-dir", type=Path, help="engine cache to select in (default: a fresh one: select now)")
    p.add_argument("--data", type=Path, default=None, help="subject folder (default ../shared/data/subject01)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    import torch

    from vqdiff.checkpoint import load_checkpoint
    from vqdiff.export.data import load_groups
    from vqdiff.export.select import select_engine
    from vqdiff.export.variants import CANDIDATES, device_kind, model_source, open_variant
    from vqdiff.geometry import groups_to_model

    torch.set_num_threads(args.threads)
    watch = LoadWatch(args.threads)
    model_dir = args.model or default_model()
    ckpt = load_checkpoint(model_dir)
    dev = "cuda:0" if torch.cuda.is_available() else "cpu"
    info = {"cpu": cpu_summary(), "gpu": torch.cuda.get_device_name(0) if dev != "cpu" else "none",
            "threads": args.threads, "torch": torch.__version__,
            "model": f"{ckpt.model_id} ({ckpt.model.kind}, {ckpt.model_hash[:12]}) from {model_dir}"}
    groups_mm = load_groups(args.data)
    x_all = groups_to_model(ckpt.normalisation.apply(groups_mm))
    batches = [int(b) for b in args.batches.split(",")]
    n_max = max(args.groups, max(batches), args.baseline_groups)
    x = np.resize(x_all, (n_max, *x_all.shape[1:]))  # wrap the real groups when more are needed

    tmp = tempfile.TemporaryDirectory(prefix="bench-export-")
    cache = args.cache_dir or Path(tmp.name)
    t = time.perf_counter()
    served = select_engine(model_dir, cache_dir=cache, threads=args.threads, gate_data=args.data)
    sel = served.selection
    info["selection_s"] = round(time.perf_counter() - t, 1)
    src = model_source(model_dir)
    export_dir = Path(sel["cache_dir"]) / "export"
    export_dir = export_dir if export_dir.is_dir() else src.export
    names = args.variants.split(",") if args.variants else list(CANDIDATES[device_kind(dev)])
    engines, skipped = {}, {}
    for name in names:
        try:
            engines[name] = open_variant(name, src, export_dir, device=dev, threads=args.threads)
        except Exception as e:  # noqa: BLE001 - report and go on
            skipped[name] = str(e).split(";")[0][:160]

    print(f"# vqdiff engine variants: encode + decode, groups/s (interleaved best of {args.repeats})")
    for k, v in info.items():
        print(f"- {k}: {v}")
    roof0 = roof(ckpt.model, args.threads) if dev == "cpu" else None
    base = args.baseline_groups / best_time(authors_loop(ckpt.model, x, args.baseline_groups, dev), args.repeats)
    rows: dict[str, dict[int, float]] = {n: {} for n in engines}
    for b in batches:
        n = max(b, args.groups if b > 1 else args.baseline_groups)
        runs = {name: roundtrip_all(e, requests_of(x, b, n)) for name, e in engines.items()}
        if roof0 is not None:  # the roof is re-measured between rounds too: best of, as the variants are
            roof0 = merge(roof0, roof(ckpt.model, args.threads, repeats=2))
        for name, s in interleaved_best(runs, args.repeats).items():
            rows[name][b] = n / s
    base_after = args.baseline_groups / best_time(authors_loop(ckpt.model, x, args.baseline_groups, dev), args.repeats)
    print(f"\nauthors' loop (torch eager fp32, 1 group per forward, {dev}): {base:,.1f} groups/s before the "
          f"variants, {base_after:,.1f} after; ratios below use their mean")
    base = (base + base_after) / 2
    top = merge(roof0, roof(ckpt.model, args.threads)) if roof0 is not None else None
    spec_top: dict[str, float | None] = {}
    if top is not None:
        print_roof(top)
        per_layer = layer_gflop_per_group(ckpt.model)
        for name, e in engines.items():
            spec_top[name] = spec_roof(ckpt.model, e.spec, top, per_layer, e)
            layers = "as its runtime model runs them" if hasattr(e, "runtime_precisions") else e.spec.layers
            print(f"- {name}: roof {spec_top[name] or 0:,.0f} groups/s ({e.spec.precision}, layers {layers})"
                  if spec_top[name] else f"- {name}: no roof ({e.spec.precision} is not native here)")
        top["variants"] = spec_top

    cands = sel.get("candidates", {})
    head = "| variant | precision | " + " | ".join(f"batch {b}" for b in batches) + " | gate: mean MDF / BUAN change | served |"
    print("\n" + head)
    print("|" + "---|" * (len(batches) + 4))
    print(f"| authors' loop | fp32 | {base:,.1f} (1.0x" + (f", {fraction(base, 'fp32', top)} roof)" if top else ")") + " |" + " |" * (len(batches) - 1) + " reference | |")
    for name, r in rows.items():
        g = cands.get(name, {}).get("gate")
        gate = (f"{'pass' if g['passed'] else 'FAIL'}: {g['mdf_change_mm']:+.4f} mm / {g['buan_change']:+.5f}"
                if g else "not gated")
        mark = "**served**" if name == served.variant_name else ""
        prec = engines[name].precision
        cells = " | ".join(f"{r[b]:,.0f} ({r[b] / base:.1f}x"
                           + (f", {fraction(r[b], prec, top, spec_top.get(name))} roof)" if top else ")")
                           for b in batches)
        print(f"| {name} | {engines[name].precision} | {cells} | {gate} | {mark} |")
    print("\n(x, % roof) = speed-up over the authors' loop in this run, and the fraction of the variant's roof: its "
          "reduced layers at its precision's GEMM peak, the others at fp32's (-- where that precision is not "
          "native here)." if top else "")
    print(f"(x) = speed-up over the authors' loop in this run. Gate: |mean MDF change| <= "
          f"{sel.get('gate', {}).get('max_mdf_change_mm')} mm and |BUAN change| <= {sel.get('gate', {}).get('max_buan_change')} "
          f"on {sel.get('gate', {}).get('groups')} held-out groups ({sel.get('gate', {}).get('data')}).")
    print(f"served: {served.variant_name} ({sel['mode']}, cache {sel.get('cache')}): {sel['reason']}")
    for k, why in skipped.items():
        print(f"- {k}: unavailable here ({why})")
    load = watch.finish()
    results = {"machine": info, "authors_loop_groups_per_s": base, "roof": top, "rows": {k: {str(b): v for b, v in r.items()}
                                                                             for k, r in rows.items()},
               "served": served.variant_name, "selection": {k: v for k, v in sel.items() if k != "summary"},
               "skipped": skipped, **load}
    print(json.dumps({"served": served.variant_name, "contended": load["contended"],
                      "speedup_served_batch64": (rows.get(served.variant_name, {}).get(64, 0) / base) if 64 in batches
                      else None}))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
