"""Benchmark: groups/s of every available backend against the authors' style, in one run.

Encode + decode throughput (groups of 64 streamlines x 64 points per second) of every backend that
`vqdiff.export.runtime.load_engine` can open here (TensorRT, ONNX Runtime CUDA / CPU, torch), at
batch 1, 8, 64 and 256, beside the authors' style: torch eager fp32, one group per forward call.
Real groups of ``<data>/subject01``; best of ``--repeats`` timings (the machine may be shared).
``--variants`` adds the CPU variants (ONNX Runtime graph optimisation levels, an fp16 graph, int8
static QDQ, torch bf16 autocast) with their quality on held-out groups (BUAN at 5 mm and mean MDF
in mm, against the fp32 model).

    python benchmarks/bench_export.py [--model DIR] [--export DIR] [--threads N] [--variants]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def machine_info(threads: int) -> dict:
    import onnxruntime
    import torch

    cpu, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": cpu, "cores": os.cpu_count(), "isa": isa, "gpu": gpu, "threads": threads,
        "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "load_avg_start": round(os.getloadavg()[0], 2),
    }


def default_model() -> Path:
    for p in (REPO / "models" / "default", REPO / "runs" / "default" / "best"):
        if (p / "model.safetensors").is_file():
            return p
    sys.exit("no model: pass --model CHECKPOINT_DIR (models/default and runs/default/best are missing)")


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_engine(engine, x: np.ndarray, batch: int, n: int, repeats: int) -> float:
    """Requests of ``batch`` groups; the engine runs them in its own chunks (``engine.batch_size``)."""
    xs = [np.ascontiguousarray(x[s : s + batch]) for s in range(0, n, batch)]

    def run():
        for b in xs:
            lat, _ = engine.encode_with_indices(b)
            engine.decode_groups(lat)

    return n / best_time(run, repeats)


def bench_authors(model, x: np.ndarray, n: int, repeats: int) -> float:
    """torch eager fp32, one group per forward (encoder -> bottleneck -> decoder), as in the authors' code."""
    import torch

    xs = [torch.from_numpy(np.ascontiguousarray(x[i : i + 1])) for i in range(n)]

    def run():
        with torch.no_grad():
            for b in xs:
                model(b)

    return n / best_time(run, repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="checkpoint dir (default models/default, else runs/default/best)")
    p.add_argument("--export", type=Path, help="export dir of that model (default: exported to a temp dir)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads for every backend")
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--groups", type=int, default=256, help="groups per timing (at least one batch)")
    p.add_argument("--baseline-groups", type=int, default=64, help="groups per timing of the authors' style")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", action="store_true", help="also the CPU variants, with quality")
    p.add_argument("--dataset", type=Path, default=REPO / "runs" / "default-data",
                   help="prepared dataset whose validation groups are held out for --variants")
    p.add_argument("--data", type=Path, default=None, help="subject folder (default ../shared/data/subject01)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    import torch

    from vqdiff.checkpoint import load_checkpoint
    from vqdiff.export.data import load_groups
    from vqdiff.export.manifest import read_manifest
    from vqdiff.export.onnx_export import export_checkpoint
    from vqdiff.export.runtime import BACKENDS, load_engine
    from vqdiff.geometry import groups_to_model

    torch.set_num_threads(args.threads)
    model_dir = args.model or default_model()
    ckpt = load_checkpoint(model_dir)
    info = machine_info(args.threads)
    groups_mm = load_groups(args.data)
    x_all = groups_to_model(ckpt.normalisation.apply(groups_mm))
    batches = [int(b) for b in args.batches.split(",")]
    n_max = max(args.groups, max(batches))
    x = np.resize(x_all, (n_max, *x_all.shape[1:]))  # wrap the real groups when more are needed

    tmp = None
    export_dir = args.export
    if export_dir is None or not (export_dir / "manifest.json").is_file():
        tmp = tempfile.TemporaryDirectory(prefix="bench-export-")
        export_dir = Path(tmp.name) / "export"
        t = time.perf_counter()
        export_checkpoint(model_dir, export_dir, parity_groups=groups_mm[::3], threads=args.threads)
        info["export_s"] = round(time.perf_counter() - t, 1)
    manifest = read_manifest(export_dir)
    info["model"] = f"{manifest['model']['id']} ({manifest['model']['kind']}, {manifest['model']['sha256'][:12]}) from {model_dir}"

    print(f"# vqdiff export benchmark: encode + decode, groups/s (best of {args.repeats})")
    for k, v in info.items():
        print(f"- {k}: {v}")

    results: dict = {"machine": info, "rows": {}}
    base = bench_authors(ckpt.model.eval(), x, args.baseline_groups, args.repeats)
    results["baseline"] = base
    rows = {"torch eager, 1 group/call (authors' style)": {b: None for b in batches}}
    rows["torch eager, 1 group/call (authors' style)"][1] = base
    skipped = {}
    engines = []
    for name in BACKENDS:
        try:
            path = model_dir if name == "torch" else export_dir
            engines.append((name, load_engine(path, backend=name, threads=args.threads)))
        except Exception as e:  # noqa: BLE001 - report and go on
            skipped[name] = str(e).split(";")[0][:120]
    v = manifest.get("variants", {}).get("int8")
    if v and v.get("kept"):
        engines.append(("ort-cpu int8", load_engine(export_dir, backend="ort-cpu", threads=args.threads,
                                                    variant="int8")))
    for name, engine in engines:
        label = f"{name} ({engine.provider})"
        rows[label] = {}
        for b in batches:
            n = max(b, args.groups if b > 1 else args.baseline_groups)
            rows[label][b] = bench_engine(engine, x, b, n, args.repeats)

    head = "| backend | " + " | ".join(f"batch {b}" for b in batches) + " |"
    print("\n" + head)
    print("|" + "---|" * (len(batches) + 1))
    for label, r in rows.items():
        cells = []
        for b in batches:
            gs = r.get(b)
            cells.append("" if gs is None else f"{gs:,.0f} ({gs / base:.1f}x)")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\n(x) = speed-up over the authors' style in this run. A request of B groups is run by each engine in "
          "its own chunks (ORT CPU: 8, torch: 256).")
    for k, why in skipped.items():
        print(f"- {k}: unavailable here ({why})")
    results["rows"] = {k: {str(b): v for b, v in r.items()} for k, r in rows.items()}
    results["skipped"] = skipped

    if args.variants:
        results["variants"] = variants(args, ckpt, export_dir, x_all, groups_mm)
    info["load_avg_end"] = round(os.getloadavg()[0], 2)
    print(f"\n- load_avg_end: {info['load_avg_end']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    if tmp is not None:
        tmp.cleanup()
    return 0


def _held_out(args, groups_mm):
    """(calibration groups, held-out groups) in mm: the dataset's train / validation split when there."""
    if (args.dataset / "manifest.json").is_file():
        from vqdiff.training.data import load_dataset

        _, bundles = load_dataset(args.dataset)
        val = np.concatenate([b.val_groups for b in bundles])
        train = np.concatenate([b.train[: len(b.train) // 64 * 64].reshape(-1, 64, 64, 3) for b in bundles])
        rng = np.random.default_rng(0)
        return train[rng.choice(len(train), min(len(train), 128), replace=False)], val, f"{args.dataset} validation"
    from vqdiff.export.data import split_groups

    calib, held = split_groups(groups_mm, 0.5, 0)
    return calib, held, "random half of the real groups"


def variants(args, ckpt, export_dir: Path, x_all, groups_mm) -> dict:
    import torch

    from vqdiff.export.onnx_tools import make_fp16_onnx
    from vqdiff.export.ort_backend import ort_session
    from vqdiff.export.quantize import evaluate_int8, groups_per_second, quality, roundtrip
    from vqdiff.geometry import groups_to_model

    out: dict = {}
    calib, held, held_desc = _held_out(args, groups_mm)
    xh = groups_to_model(ckpt.normalisation.apply(held))
    xb = np.resize(x_all, (64, *x_all.shape[1:]))
    print(f"\n## CPU variants (64 groups in chunks of 8, {args.threads} threads; quality on {len(held)} held-out "
          f"groups: {held_desc})")

    # graph optimisation levels (same numbers: the fp32 graph; quality identical by construction)
    pairs = {lvl: (ort_session(export_dir / "encoder.onnx", threads=args.threads, level=lvl),
                   ort_session(export_dir / "decoder.onnx", threads=args.threads, level=lvl))
             for lvl in ("disable", "basic", "extended", "all")}
    with tempfile.TemporaryDirectory() as d:
        enc16 = make_fp16_onnx(export_dir / "encoder.onnx", Path(d) / "e16.onnx", keep_fp32_from="z")
        dec16 = make_fp16_onnx(export_dir / "decoder.onnx", Path(d) / "d16.onnx")
        pairs["fp16 graph"] = (ort_session(enc16, threads=args.threads), ort_session(dec16, threads=args.threads))
        speed = groups_per_second(pairs, xb, batch=8, repeats=max(args.repeats, 10))
        ref = quality(held, roundtrip(*pairs["all"], xh), ckpt.normalisation)
        q16 = quality(held, roundtrip(*pairs["fp16 graph"], xh), ckpt.normalisation)

    # torch: fp32 batched, channels_last, bf16 autocast (oneDNN AVX-512 BF16)
    model = ckpt.model.eval()

    def torch_rt(x, bf16=False, cl=False):
        m = model.to(memory_format=torch.channels_last) if cl else model
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            t = torch.from_numpy(np.ascontiguousarray(x))
            if cl:
                t = t.to(memory_format=torch.channels_last)
            r = m(t).reconstruction.float().numpy()
        model.to(memory_format=torch.contiguous_format)
        return r

    tspeed = {}
    for name, kw in (("torch fp32", {}), ("torch fp32 channels_last", {"cl": True}),
                     ("torch bf16 autocast", {"bf16": True}), ("torch bf16 autocast channels_last",
                                                                {"bf16": True, "cl": True})):
        tspeed[name] = 64 / best_time(lambda kw=kw: torch_rt(xb, **kw), args.repeats)
    tq = {name: quality(held, np.concatenate([torch_rt(xh[s:s + 64], **kw) for s in range(0, len(xh), 64)]),
                        ckpt.normalisation)
          for name, kw in (("torch fp32", {}), ("torch bf16 autocast", {"bf16": True}))}

    int8 = evaluate_int8(export_dir, held, ckpt.normalisation, out_dir=tempfile.mkdtemp(), threads=args.threads,
                         calibration_mm=calib, repeats=max(args.repeats, 10))

    print("\n| variant | groups/s | vs ORT fp32 (level all) | BUAN | BUAN drop | mean MDF mm | MDF rise | kept |")
    print("|---|---|---|---|---|---|---|---|")
    base = speed["all"]
    for lvl in ("disable", "basic", "extended", "all"):
        print(f"| ORT CPU fp32, graph opt `{lvl}` | {speed[lvl]:,.0f} | {speed[lvl] / base:.2f}x | "
              f"{ref['buan']:.4f} | 0 | {ref['mean_mdf_mm']:.3f} | 0 | {'yes (default)' if lvl == 'all' else 'no'} |")
    d, r = ref["buan"] - q16["buan"], q16["mean_mdf_mm"] - ref["mean_mdf_mm"]
    print(f"| ORT CPU fp16 graph (bottleneck fp32) | {speed['fp16 graph']:,.0f} | {speed['fp16 graph'] / base:.2f}x | "
          f"{q16['buan']:.4f} | {d:.4f} | {q16['mean_mdf_mm']:.3f} | {r:+.3f} | no |")
    print("| ORT CPU bf16 | - | - | - | - | - | - | no: ORT's CPU provider has no bf16 Conv kernel |")
    for name, c in int8["combinations"].items():
        if name == "fp32":
            continue
        kept = "yes" if int8["keep"] == name else "no"
        print(f"| ORT CPU {name} (static QDQ) | {c['groups_per_s']:,.0f} | {c['speedup']:.2f}x (same-run fp32 "
              f"{int8['combinations']['fp32']['groups_per_s']:,.0f}) | {c['buan']:.4f} | {c['buan_drop']:.4f} | "
              f"{c['mean_mdf_mm']:.3f} | {c['mdf_rise_mm']:+.3f} | {kept} |")
    for name, gs in tspeed.items():
        q = tq.get(name) or (tq["torch bf16 autocast"] if "bf16" in name else tq["torch fp32"])
        d, r = tq["torch fp32"]["buan"] - q["buan"], q["mean_mdf_mm"] - tq["torch fp32"]["mean_mdf_mm"]
        print(f"| {name} | {gs:,.0f} | {gs / base:.2f}x | {q['buan']:.4f} | {d:.4f} | {q['mean_mdf_mm']:.3f} | "
              f"{r:+.3f} | no (torch path) |")
    out.update({"ort_levels": speed, "fp32_quality": ref, "fp16_quality": q16, "torch_speed": tspeed,
                "torch_quality": tq, "int8": int8, "held_out": held_desc})
    return out


if __name__ == "__main__":
    sys.exit(main())
