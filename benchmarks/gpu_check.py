"""The GPU check: what `scripts/gpu-check.sh` runs after ``pytest -m gpu`` on a lent CUDA machine.

1. training: one optimiser step (forward, MSE + bottleneck loss, backward, clip, AdamW; channels_last)
   at batch 256: fp32, bf16 autocast, bf16 + ``torch.compile``; ms/step and groups/s.
2. engines: encode + decode groups/s of `vqdiff.export.torch_cuda.CudaGraphEngine` (fp32 eager,
   fp32 graphs, bf16 eager, bf16 graphs, fp16 graphs) at requests of 1, 64 and 512 groups, beside
   the authors' loop (torch eager fp32, one group per forward, host <-> device per group) on the
   same GPU, interleaved best of 3.
3. end to end: encode every bundle of subject01 (12,416 streamlines, 194 groups; read, register,
   canonicalise, engine, latents) with the bf16 and fp32 graph engines: wall time, and the engine's
   share; plus the whole subject's groups in one engine call.
4. parity: GPU latents / reconstructions against the CPU torch fp32 reference on every subject01
   group (max abs error <= 1e-4 and equal codes up to ties for fp32; the quality gate for bf16 / fp16,
   judged on the GPU only: the dry run reports it, CPU bf16 kernels differ by CPU).
5. service: what `bentoml serve` does on this host (`vqdiff.service.settings`: a GPU host runs ONE
   worker with the GPU engine, so no copy of the engine per CPU core) and its micro-batcher
   (`vqdiff.service.batcher.MicroBatcher`, the service's own class) around the bf16 graph engine: 16
   concurrent requests of 4 groups joined into engine calls of up to 64 groups, beside one engine
   call per request; engine calls, groups per call, wall time.

``--dry-run`` runs every step on the CPU at tiny sizes instead (torch fp32 / bf16 engines of
`vqdiff.export.torch_backend` stand in for the CUDA ones; ``torch.compile`` is skipped): the CI check
that this script works. Prints a table per step; ``--out DIR`` also gets ``gpu_check.json``.
Exit status 1 when a step failed or a parity check did not pass.

    python benchmarks/gpu_check.py [--dry-run] [--model models/default] [--data DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from _common import LoadWatch, best_time, cpu_summary, interleaved_best, requests_of, roundtrip_all

REPO = Path(__file__).resolve().parents[1]
FULL = {"train_batch": 256, "train_steps": 20, "train_warmup": 3, "batches": (1, 64, 512), "calls": {1: 200, 64: 40, 512: 10},
        "authors_groups": 200, "bundles": None, "parity_groups": None, "repeats": 3}
TINY = {"train_batch": 4, "train_steps": 1, "train_warmup": 1, "batches": (1, 8), "calls": {1: 2, 8: 1},
        "authors_groups": 2, "bundles": ("POPT_R", "PYT_R"), "parity_groups": 8, "repeats": 1}


def synced(torch, dev):
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)


# ------------------------------------------------------------------------------------------- steps
def training(ctx) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from vqdiff.models import ModelConfig, StreamlineAutoencoder

    dev, cfg = ctx["device"], ctx["sizes"]
    sync = synced(torch, dev)
    xb = torch.from_numpy(np.ascontiguousarray(np.resize(ctx["x"], (cfg["train_batch"], *ctx["x"].shape[1:]))))
    xb = xb.to(dev).contiguous(memory_format=torch.channels_last)
    configs = [("fp32", False), ("bf16", False), ("bf16", True)]
    rows = []
    for precision, compiled in configs:
        label = f"{precision}{' + torch.compile' if compiled else ''}"
        if compiled and ctx["dry_run"]:
            rows.append({"config": label, "skipped": "torch.compile is skipped in the dry run (minutes of C++ "
                                                      "compilation on 2 cores)"})
            continue
        torch.manual_seed(0)
        model = StreamlineAutoencoder.from_config(ModelConfig.for_kind("vq_diff")).to(dev)
        model = model.to(memory_format=torch.channels_last).train()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        net = torch.compile(model) if compiled else model

        def step(net=net, model=model, opt=opt, precision=precision):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = net(xb)
                loss = F.mse_loss(out.reconstruction.float(), xb) + out.bottleneck.loss.float()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return loss.detach()

        t0 = time.perf_counter()
        for _ in range(cfg["train_warmup"]):  # warm-up (and compilation)
            step()
        sync()
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(cfg["train_steps"]):
            loss = step()
        sync()
        dt = (time.perf_counter() - t0) / cfg["train_steps"]
        rows.append({"config": label, "batch": cfg["train_batch"], "ms_per_step": round(1e3 * dt, 2),
                     "groups_per_s": round(cfg["train_batch"] / dt, 1), "warmup_s": round(warm, 1),
                     "loss": round(float(loss), 5)})
    base = next((r for r in rows if r.get("config") == "fp32"), None)
    for r in rows:
        if base and "ms_per_step" in r:
            r["speedup_vs_fp32"] = round(base["ms_per_step"] / r["ms_per_step"], 2)
    return rows


def _engines(ctx) -> dict:
    """label -> engine (the CUDA graph engine's variants; CPU torch stand-ins in the dry run)."""
    if ctx["dry_run"]:
        from vqdiff.export.torch_backend import TorchBackendEngine

        return {"torch-fp32 (cpu stand-in)": TorchBackendEngine(ctx["model_dir"], precision="fp32"),
                "torch-bf16 (cpu stand-in)": TorchBackendEngine(ctx["model_dir"], precision="bf16")}
    from vqdiff.export.torch_cuda import CudaGraphEngine

    out = {}
    for label, precision, graphs in (("fp32 eager", "fp32", False), ("fp32 graphs", "fp32", True),
                                     ("bf16 eager", "bf16", False), ("bf16 graphs", "bf16", True),
                                     ("fp16 graphs", "fp16", True)):
        t0 = time.perf_counter()
        out[label] = CudaGraphEngine(ctx["model_dir"], device=str(ctx["device"]), precision=precision, graphs=graphs)
        out[label].open_s = round(time.perf_counter() - t0, 2)
    return out


def engines(ctx) -> dict:
    import torch

    from vqdiff.checkpoint import load_checkpoint

    dev, cfg, x = ctx["device"], ctx["sizes"], ctx["x"]
    sync = synced(torch, dev)
    model = load_checkpoint(ctx["model_dir"]).model.to(dev).eval()
    n_auth = cfg["authors_groups"]
    xs_auth = [torch.from_numpy(np.ascontiguousarray(x[i % len(x) : i % len(x) + 1])) for i in range(n_auth)]

    def authors():
        with torch.no_grad():
            for b in xs_auth:
                model(b.to(dev)).reconstruction.cpu()
        sync()

    base = n_auth / best_time(authors, cfg["repeats"])
    ctx["engine_objects"] = engs = _engines(ctx)
    rows = {label: {} for label in engs}
    for b in cfg["batches"]:
        n = b * cfg["calls"][b]
        reqs = requests_of(np.resize(x, (n, *x.shape[1:])), b, n)  # the groups repeated to n, resized once
        for label, s in interleaved_best({k: roundtrip_all(e, reqs) for k, e in engs.items()},
                                         cfg["repeats"]).items():
            rows[label][b] = round(n / s, 1)
    return {"authors_loop_groups_per_s": round(base, 1), "device": str(dev), "rows": rows,
            "open_s": {k: getattr(e, "open_s", None) for k, e in engs.items()}}


def encode_subject(ctx) -> dict:
    from vqdiff.codec import Codec, load_templates
    from vqdiff.io import load_bundle

    files = sorted(ctx["data"].glob("*.trk"))
    if ctx["sizes"]["bundles"]:
        files = [f for f in files if f.stem in ctx["sizes"]["bundles"]]
    templates = load_templates(ctx["model_dir"])
    engs = ctx["engine_objects"]
    out = {"files": len(files), "registration": templates is not None, "engines": {}}
    for label in [k for k in engs if "graphs" in k or "stand-in" in k]:
        e = engs[label]
        codec = Codec(e, e.normalisation, e.model_info, templates)
        codec.encode(load_bundle(files[0]))  # warm-up
        t0 = time.perf_counter()
        read = prep = eng = 0.0
        sl = groups = 0
        xs = []
        for f in files:
            t = time.perf_counter()
            bundle = load_bundle(f)
            read += time.perf_counter() - t
            t = time.perf_counter()
            x, state = codec.pipeline.prepare_encode(bundle)
            prep += time.perf_counter() - t
            t = time.perf_counter()
            lat, idx = e.encode_with_indices(x)
            eng += time.perf_counter() - t
            codec.pipeline.assemble_latents(state, lat, idx).to_bytes()
            sl, groups = sl + len(bundle.streamlines), groups + len(x)
            xs.append(x)
        wall = time.perf_counter() - t0
        allx = np.concatenate(xs)
        one = best_time(lambda e=e, allx=allx: e.encode_with_indices(allx), ctx["sizes"]["repeats"])
        out["engines"][label] = {"streamlines": sl, "groups": groups, "wall_s": round(wall, 3),
                                 "read_s": round(read, 3), "prepare_s": round(prep, 3), "engine_s": round(eng, 3),
                                 "engine_one_call_s": round(one, 4), "streamlines_per_s": round(sl / wall, 1)}
    return out


def parity(ctx) -> dict:
    """Every engine against torch fp32 on the CPU: fp32 ones by `export.parity.run_parity` (max abs
    error, codes equal up to ties), reduced-precision ones by the quality gate."""
    from vqdiff.checkpoint import load_checkpoint
    from vqdiff.export.parity import PARITY_ATOL, run_parity, torch_reference
    from vqdiff.export.variants import gate

    n = ctx["sizes"]["parity_groups"]
    x, groups_mm = (ctx["x"][:n], ctx["groups_mm"][:n]) if n else (ctx["x"], ctx["groups_mm"])
    ckpt = load_checkpoint(ctx["model_dir"])  # CPU, fp32: the reference
    ref = torch_reference(ckpt.model, x)
    ref_q = gate(groups_mm, ref["reconstruction"], ckpt.normalisation, None)
    out = {"groups": int(len(x)), "atol": PARITY_ATOL, "reference": "torch fp32 on the CPU", "engines": {}}
    for label, e in ctx["engine_objects"].items():

        def run_encoder(b, e=e):
            latents, indices = e.encode_with_indices(b)
            return latents, None, indices

        q = gate(groups_mm, e.decode_groups(e.encode_with_indices(x)[0]), ckpt.normalisation, ref_q)
        row = {"gate": q, "criterion": "quality gate", "passed": q["passed"]}
        reduced = getattr(e, "precision", "fp32") != "fp32"
        if reduced and ctx["dry_run"]:  # the CPU stand-in's bf16/fp16 numbers depend on the CPU, not on us
            row = {**row, "passed": None, "criterion": f"quality gate {'met' if q['passed'] else 'missed'}, not judged "
                   "in the dry run: reduced precision on the CPU is native (AVX512-BF16, AMX) or emulated by "
                   "CPU, so its error differs by machine; the GPU run judges it"}
        if not reduced:  # as at export: latents, decoder and end to end
            rep = run_parity(ckpt.model, None, None, x, ref=ref, run_encoder=run_encoder,
                             run_decoder=e.decode_groups, label=label)
            row = {**row, "max_abs_error": rep["max_abs_error"], "indices": rep["indices"], "passed": rep["passed"],
                   "criterion": "export.parity.run_parity (max abs <= 1e-4 incl. end to end, codes equal up to ties)"}
        out["engines"][label] = row
    out["passed"] = all(v["passed"] is not False for v in out["engines"].values())
    return out


# ------------------------------------------------------------------------------------------- report
def service(ctx) -> dict:
    import asyncio

    from vqdiff.service.batcher import MicroBatcher
    from vqdiff.service.settings import Settings

    settings = Settings.from_env({**os.environ, "VQDIFF_DEVICE": str(ctx["device"])})
    if ctx["dry_run"]:
        from vqdiff.export.torch_backend import TorchBackendEngine

        engine, label = TorchBackendEngine(ctx["model_dir"], precision="fp32"), "torch-fp32 (cpu stand-in)"
    else:
        from vqdiff.export.torch_cuda import CudaGraphEngine

        engine, label = CudaGraphEngine(ctx["model_dir"], device=str(ctx["device"]), precision="bf16"), "bf16 graphs"
    x = np.resize(ctx["x"], (64, *ctx["x"].shape[1:])).astype(np.float32)  # the dry run's data has fewer groups
    requests = [np.ascontiguousarray(x[i * 4: i * 4 + 4]) for i in range(16)]
    engine.encode_with_indices(np.concatenate(requests))  # warm (graphs captured, kernels chosen)

    async def joined():
        batcher = MicroBatcher({"encode": engine.encode_with_indices}, max_groups=settings.max_batch_groups,
                               max_wait_ms=settings.max_batch_wait_ms, metrics=False)
        t0 = time.perf_counter()
        await asyncio.gather(*(batcher.run("encode", r) for r in requests))
        batcher.close()
        return time.perf_counter() - t0, batcher.calls

    t0 = time.perf_counter()
    for r in requests:
        engine.encode_with_indices(r)
    alone_s = time.perf_counter() - t0
    joined_s, calls = asyncio.run(joined())
    return {"device": str(ctx["device"]), "workers": settings.workers, "engine_threads": settings.threads,
            "max_batch_groups": settings.max_batch_groups, "max_batch_wait_ms": settings.max_batch_wait_ms,
            "engine": label, "requests": len(requests), "groups": 4 * len(requests), "joined_calls": calls,
            "groups_per_call": round(4 * len(requests) / calls, 1), "joined_s": round(joined_s, 4),
            "one_call_per_request_s": round(alone_s, 4)}


def _print(name: str, res) -> None:
    print(f"\n## {name}")
    if name == "service":
        print(f"on this host `bentoml serve` runs {res['workers']} worker(s) ({res['device']}; engine threads "
              f"{res['engine_threads']}), each with one engine and a micro-batcher (at most "
              f"{res['max_batch_groups']} groups per call, {res['max_batch_wait_ms']} ms wait)")
        print(f"{res['requests']} concurrent requests x 4 groups on {res['engine']}: {res['joined_calls']} engine "
              f"call(s), {res['groups_per_call']} groups per call, {res['joined_s']} s; one call per request: "
              f"{res['one_call_per_request_s']} s")
        return
    if name == "training":
        print("| config | batch | ms/step | groups/s | vs fp32 | warm-up s |\n|---|---|---|---|---|---|")
        for r in res:
            if "skipped" in r:
                print(f"| {r['config']} | - | - | - | - | {r['skipped']} |")
            else:
                print(f"| {r['config']} | {r['batch']} | {r['ms_per_step']} | {r['groups_per_s']:,.0f} | "
                      f"{r.get('speedup_vs_fp32', 1.0)}x | {r['warmup_s']} |")
    elif name == "engines":
        base = res["authors_loop_groups_per_s"]
        bs = sorted({b for r in res["rows"].values() for b in r})
        print("| engine | " + " | ".join(f"batch {b}" for b in bs) + " |\n|---|" + "---|" * len(bs))
        print(f"| authors' loop (eager fp32, 1 group/forward) | {base:,.0f} (1.0x) |" + " |" * (len(bs) - 1))
        for label, r in res["rows"].items():
            print(f"| {label} | " + " | ".join(f"{r[b]:,.0f} ({r[b] / base:.1f}x)" for b in bs) + " |")
    elif name == "encode_subject":
        print("| engine | streamlines | groups | wall s | read s | prepare s | engine s | one call s |\n"
              "|---|---|---|---|---|---|---|---|")
        for label, r in res["engines"].items():
            print(f"| {label} | {r['streamlines']} | {r['groups']} | {r['wall_s']} | {r['read_s']} | "
                  f"{r['prepare_s']} | {r['engine_s']} | {r['engine_one_call_s']} |")
    elif name == "parity":
        print(f"against {res['reference']} on {res['groups']} groups\n| engine | latents | reconstruction | "
              "end to end | codes unexplained | MDF change mm | BUAN change | passed |\n|---|---|---|---|---|---|---|---|")
        for label, r in res["engines"].items():
            e, g = r.get("max_abs_error"), r["gate"]
            err = (f"{e['latents']:.2e} | {e['reconstruction']:.2e} | {e['end_to_end']:.2e}" if e else "- | - | -")
            print(f"| {label} | {err} | "
                  f"{r.get('indices', {}).get('unexplained', '-')} | {g['mdf_change_mm']:+.4f} | {g['buan_change']:+.5f} | "
                  f"{ {True: 'yes', False: 'NO', None: '-'}[r['passed']]} ({r['criterion']}) |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes")
    p.add_argument("--model", default=str(REPO / "models" / "default"))
    p.add_argument("--data", help="subject folder (default $VQDIFF_SHARED_DATA/subject01)")
    p.add_argument("--out", type=Path, help="folder for gpu_check.json")
    args = p.parse_args(argv)

    import torch

    from vqdiff.export.data import load_groups
    from vqdiff.normalise import Normalisation

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu-check: torch sees no CUDA GPU here; run with --dry-run for the CPU check", file=sys.stderr)
        return 2
    dev = torch.device("cuda:0" if cuda and not args.dry_run else "cpu")
    watch = LoadWatch(os.cpu_count())
    sizes = TINY if args.dry_run else FULL
    from vqdiff.export.data import default_data_dir

    data = Path(args.data) if args.data else default_data_dir()
    groups_mm = load_groups(data, bundles=sizes["bundles"])
    from vqdiff.checkpoint import read_config

    norm = Normalisation.from_dict(read_config(args.model)["normalisation"])
    from vqdiff.geometry import groups_to_model

    ctx = {"device": dev, "dry_run": args.dry_run, "sizes": sizes, "model_dir": args.model, "data": data,
           "groups_mm": groups_mm, "x": groups_to_model(norm.apply(groups_mm))}
    info = {"dry_run": args.dry_run, "device": str(dev), "gpu": torch.cuda.get_device_name(0) if cuda else "none",
            "torch": torch.__version__, "cuda": torch.version.cuda, "cpu": cpu_summary(),
            "cudnn_tf32_default": bool(torch.backends.cudnn.allow_tf32), "model": args.model,
            "data": f"{data} ({len(groups_mm)} groups)"}
    print("# gpu-check" + (" (dry run: CPU, tiny sizes)" if args.dry_run else ""))
    for k, v in info.items():
        print(f"- {k}: {v}")
    report, failed = {"machine": info}, []
    for name, fn in (("training", training), ("engines", engines), ("encode_subject", encode_subject),
                     ("parity", parity), ("service", service)):
        t0 = time.perf_counter()
        try:
            report[name] = fn(ctx)
            _print(name, report[name])
        except Exception as exc:  # noqa: BLE001 - report every step, fail at the end
            traceback.print_exc()
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append(name)
        print(f"({name}: {time.perf_counter() - t0:.1f} s)", flush=True)
    if isinstance(report.get("parity"), dict) and report["parity"].get("passed") is False:
        failed.append("parity (did not pass)")
    report.update(watch.finish())
    report["failed"] = failed
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\ngpu-check {'FAILED: ' + ', '.join(failed) if failed else 'passed'}"
          + (" (dry run)" if args.dry_run else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
