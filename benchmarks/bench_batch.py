"""Benchmark: end-to-end batch encoding (files on disk -> latents on disk) against the engine alone.

Lays ``<data>/subject01/*.trk`` (or ``<data>/<--source>/*.trk``: ``--source crosssubject/afq_browser``
gives other subjects' bundles in their own space, which registration moves into model space) out
as ``--subjects`` TractoInferno subjects (symlinks in a temp folder), then alternates, ``--repeats``
times each:

- engine only: the groups of every file, canonicalised and normalised beforehand (not timed), run
  through the same engine in the same fixed batches of ``--batch-size`` groups, the calls the job
  makes: encode, and decode too unless ``--no-fidelity`` (a job decodes its latents to record the
  measured fidelity by default);
- end to end: ``run_batch("encode", ...)`` into an empty folder (discovery, hashing, reading,
  canonicalisation, inference, atomic writes, index), timed from the call to its return;

and prints streamlines/s of both (best run of each) and their ratio (goal >= 0.85), for the engine a job
selects and for the torch-fp32 engine (the issue's reference; ``--no-torch-reference`` skips it). It
also times the process CPU each stage costs (stages run one after the other, warm, best of 3; every
thread of the engine counts) and prints preparation CPU per group against each engine's (goal <= 0.25
against torch-fp32). When the host has no idle core, the end-to-end ratio cannot exceed
engine / (prepare + engine + finish) CPU, printed as the ceiling. The CPU model, its ISA flags and
the load average before and after are printed with the figures.

The roof (`_roof`, docs/engines.md): the machine's GEMM peak per natively supported precision on the
engine's threads, over the model's FLOPs per group (encode + decode; encode only with
``--no-fidelity``), and each engine's engine-only groups/s as a fraction of its precision's roof.

    python benchmarks/bench_batch.py [--model DIR] [--source subject01] [--subjects 10] [--batch-size 64] [--threads N]

Without ``--model`` it uses $VQDIFF_MODEL or models/default when present, else the paper's
architecture with random weights (throughput does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import LoadWatch, cpu_summary
from _roof import fraction, layer_gflop_per_group, print_roof, roof, spec_roof

REPO = Path(__file__).resolve().parents[1]


def build_tree(src: Path, root: Path, subjects: int) -> None:
    files = sorted(src.glob("*.trk"))
    if not files:
        sys.exit(f"no .trk files under {src} (use --data or VQDIFF_SHARED_DATA)")
    for s in range(subjects):
        d = root / f"sub-{s + 1:02d}" / "tractography"
        d.mkdir(parents=True)
        for f in files:
            (d / f"sub-{s + 1:02d}__{f.name}").symlink_to(f.resolve())


def model_dir(arg: str | None, tmp: Path) -> tuple[Path, str]:
    from vqdiff.codec import default_model_dir
    from vqdiff.errors import CheckpointError

    if arg:
        return Path(arg), arg
    try:
        return default_model_dir(), str(default_model_dir())
    except CheckpointError:
        from vqdiff.checkpoint import save_checkpoint
        from vqdiff.models import ModelConfig, StreamlineAutoencoder
        from vqdiff.normalise import Normalisation

        model = StreamlineAutoencoder.from_config(ModelConfig.for_kind("vq_diff")).eval()
        path = save_checkpoint(tmp / "random-model", model,
                               Normalisation.fit(np.array([[-90.0, -130, -70], [90, 90, 90]])))
        return path, "paper architecture (hidden 128, D 64), random weights"


def engine_only(codec, inputs: list[np.ndarray], batch_size: int, fidelity: bool = True) -> float:
    """Seconds of the job's engine calls over ``inputs``: encode, and decode too with ``fidelity`` (the
    job's default: it decodes the latents to record the measured fidelity)."""
    from vqdiff.batch.stages import Batcher, engine_call

    batcher = Batcher(lambda x: engine_call(codec, "encode", x, fidelity), batch_size)
    t0 = time.perf_counter()
    for i, x in enumerate(inputs):
        batcher.add(i, x)
    batcher.flush()
    return time.perf_counter() - t0


def cpu_seconds(codec, tasks, model, batch_size: int, scratch: Path, repeats: int = 3,
                fidelity: bool = True) -> dict[str, float]:
    """CPU seconds of each stage over all files, the stages run one after the other on this thread.

    Process CPU time (every thread's: an engine's intra-op threads count, numpy's BLAS is held to one
    thread), after one untimed pass (the job's pipeline and templates are built then, once per job),
    best of ``repeats`` passes per stage: the marginal cost of a file in a long job.
    """
    from vqdiff.batch.stages import Batcher, JobSpec, engine_call, finish, prepare
    from vqdiff.batch.tasks import BatchTask
    from vqdiff.blas import single_threaded_blas

    spec = JobSpec("encode", str(model), dict(codec.model_info), codec.normalisation.to_dict(), batch_size,
                   engine=dict(codec.pipeline.provenance["engine"]), fidelity=fidelity)
    tasks = [BatchTask(t.input, t.rel, t.subject, t.bundle, str(scratch / t.out_rel), t.out_rel) for t in tasks]
    cpu = {"prepare": float("inf"), "engine": float("inf"), "finish": float("inf")}
    with single_threaded_blas():
        for r in range(repeats + 1):
            c0 = time.process_time()
            items = [prepare(spec, t) for t in tasks]
            c1 = time.process_time()
            batcher = Batcher(lambda x: engine_call(codec, "encode", x, spec.fidelity), batch_size)
            done = [d for t, it in zip(tasks, items, strict=True) for d in batcher.add((t, it), it.x)] + batcher.flush()
            c2 = time.process_time()
            for (t, it), outs in done:
                finish(spec, t, it, outs)
            c3 = time.process_time()
            shutil.rmtree(scratch)
            if r:  # the first pass is the warm-up
                for k, v in zip(cpu, (c1 - c0, c2 - c1, c3 - c2), strict=True):
                    cpu[k] = min(cpu[k], v)
    return cpu


def engine_cpu(codec, inputs: list[np.ndarray], batch_size: int, repeats: int = 3, fidelity: bool = True) -> float:
    """Process CPU seconds of ``codec``'s engine over ``inputs`` in batches of ``batch_size`` (best of ``repeats``)."""
    engine_only(codec, inputs[:1], batch_size, fidelity)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        engine_only(codec, inputs, batch_size, fidelity)
        best = min(best, time.process_time() - c0)
    return best


def cpu_pressure() -> str:
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return "n/a"


def e2e_rows(codec, backend: str, args, tmp: Path, tasks, inputs, n_sl: int) -> dict:
    """Engine-only and end-to-end streamlines/s, alternated ``args.repeats`` times; their ratio."""
    from vqdiff.batch.job import run_batch

    eng, e2e = [], []
    label = f"{codec.engine.backend}/{getattr(codec.engine, 'variant_name', None) or codec.engine.provider}"
    print(f"engine {label}:\n{'run':>4} {'engine-only sl/s':>17} {'end-to-end sl/s':>16} {'ratio':>6}")
    engine_only(codec, inputs[:1], args.batch_size, args.fidelity)  # warm-up
    starts = []
    for _ in range(2):  # a job of one file: what every job pays once (model load, engine start and check)
        shutil.rmtree(tmp / "one-out", ignore_errors=True)
        t0 = time.perf_counter()
        run_batch("encode", tmp / "one", tmp / "one-out", model=args.model_path, backend=backend,
                  threads=args.threads, batch_size=args.batch_size, workers=args.workers, progress=False,
                  fidelity=args.fidelity)
        starts.append(time.perf_counter() - t0)
    print(f"a job of one file takes {min(starts):.2f} s (start-up: model, engine, its check; then one batch)")
    for r in range(args.repeats):
        eng.append(n_sl / engine_only(codec, inputs, args.batch_size, args.fidelity))
        shutil.rmtree(tmp / "out", ignore_errors=True)
        t0 = time.perf_counter()
        summary = run_batch("encode", tmp / "in", tmp / "out", model=args.model_path, backend=backend,
                            threads=args.threads, batch_size=args.batch_size, workers=args.workers,
                            progress=False, fidelity=args.fidelity)
        e2e.append(summary["streamlines_processed"] / (time.perf_counter() - t0))
        assert summary["done"] == len(tasks) and not summary["failures"], summary["message"]
        print(f"{r + 1:>4} {eng[-1]:>17.0f} {e2e[-1]:>16.0f} {e2e[-1] / eng[-1]:>6.2f}")
    return {"engine": label, "one_file_job_s": round(min(starts), 3), "engine_only_streamlines_per_s": round(max(eng)),
            "end_to_end_streamlines_per_s": round(max(e2e)), "ratio_best": round(max(e2e) / max(eng), 3),
            "ratio_median": round(float(np.median(np.array(e2e) / np.array(eng))), 3), "goal": 0.85}


def roof_lines(args, codecs: dict, rows: list[dict], groups_per_streamline: float) -> dict:
    """The roof (encode FLOPs) on the engines' threads and each engine's engine-only groups/s against it."""
    from vqdiff.checkpoint import export_source_checkpoint, load_checkpoint

    try:
        model = load_checkpoint(export_source_checkpoint(args.model_path)).model
    except Exception as exc:  # noqa: BLE001 - an export without its checkpoint: no FLOP count
        print(f"roof: not measured ({exc})")
        return {}
    from vqdiff.engine import spec_of

    what = "roundtrip" if args.fidelity else "encode"  # with fidelity the job decodes too
    r = roof(model, args.threads or os.cpu_count(), what=what)
    print_roof(r)
    per_layer = layer_gflop_per_group(model, what=what)
    for row, codec in zip(rows, codecs.values(), strict=True):
        gps = row["engine_only_streamlines_per_s"] * groups_per_streamline
        spec = spec_of(codec.engine)
        prec = spec.precision if spec else "fp32"
        top = spec_roof(model, spec, r, per_layer, codec.engine) if spec else None
        row["engine_groups_per_s"], row["roof_fraction"] = round(gps, 1), fraction(gps, prec, r, top)
        print(f"engine {row['engine']}: {gps:,.0f} groups/s engine-only = {row['roof_fraction']} of its roof "
              f"({spec.name if spec else '?'}: {top or 0:,.0f} groups/s)")
    return r


def main(argv: list[str] | None = None) -> int:
    from vqdiff.batch.model import load_codec
    from vqdiff.batch.tasks import encode_tasks
    from vqdiff.blas import single_threaded_blas
    from vqdiff.io import load_bundle

    default_data = Path(os.environ.get("VQDIFF_SHARED_DATA", REPO.parent / "shared" / "data"))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint or export directory")
    p.add_argument("--data", type=Path, default=default_data, help="the shared data folder")
    p.add_argument("--source", default="subject01",
                   help="the folder under --data whose .trk files make one subject (default subject01, the model's "
                        "own space; crosssubject/afq_browser: another subject's bundles, registered)")
    p.add_argument("--subjects", type=int, default=10,
                   help="copies of the source laid out as subjects (subject01 x 10: 120 files, 124,160 streamlines)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: the library's)")
    p.add_argument("--backend", default="auto", help="the engine measured (default: the one a job selects)")
    p.add_argument("--no-torch-reference", action="store_true",
                   help="skip the torch-fp32 reference engine (its CPU per group and its end-to-end ratio)")
    p.add_argument("--no-fidelity", dest="fidelity", action="store_false",
                   help="as the batch CLI's --no-fidelity: encode only (default: the job also decodes, to record "
                        "the measured fidelity, and so does the engine-only run)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="vqdiff-bench-batch-") as tmp:
        tmp = Path(tmp)
        build_tree(args.data / args.source, tmp / "in", args.subjects)
        one = next((tmp / "in").glob("sub-01/tractography/*MCP.trk"), None) or next((tmp / "in").rglob("*.trk"))
        (tmp / "one" / "sub-01" / "tractography").mkdir(parents=True)
        (tmp / "one" / "sub-01" / "tractography" / one.name).symlink_to(one.resolve())
        args.model_path, model_label = model_dir(args.model, tmp)
        codec = load_codec(args.model_path, backend=args.backend, threads=args.threads, batch_size=args.batch_size)
        codecs = {args.backend: codec}
        if not args.no_torch_reference and codec.engine.backend != "torch":
            codecs["torch"] = load_codec(args.model_path, backend="torch", threads=args.threads,
                                         batch_size=args.batch_size)
        tasks = encode_tasks(tmp / "in", tmp / "out")
        with single_threaded_blas():
            prepared = [codec.pipeline.prepare_encode(load_bundle(t.input)) for t in tasks]
        inputs = [x for x, _ in prepared]
        n_sl, n_groups = sum(st.n_streamlines for _, st in prepared), sum(len(x) for x in inputs)
        watch = LoadWatch(os.cpu_count())
        load_before = watch.before
        cpu_desc = cpu_summary()
        print(f"{len(tasks)} files ({args.subjects} subjects of {args.source}), {n_sl} streamlines, {n_groups} groups; "
              f"model: {model_label}; batch {args.batch_size} groups, {args.workers} prepare workers, "
              f"engine threads {args.threads or 'default'}; {cpu_desc['model']}, {cpu_desc['cores']} cores "
              f"[{' '.join(cpu_desc['isa'])}]")
        cpu = cpu_seconds(codec, tasks, args.model_path, args.batch_size, tmp / "scratch", fidelity=args.fidelity)
        ceiling = cpu["engine"] / sum(cpu.values())
        print("CPU seconds per stage (process CPU, serial, warm, best of 3): "
              + ", ".join(f"{k} {v:.3f}" for k, v in cpu.items())
              + f" -> ceiling without an idle core {ceiling:.2f}; cpu pressure: {cpu_pressure()}")
        ms = {k: 1e3 * v / n_groups for k, v in cpu.items()}
        engines = {codec.engine.backend: ms["engine"]}
        if "torch" in codecs and codecs["torch"] is not codec:
            engines["torch"] = 1e3 * engine_cpu(codecs["torch"], inputs, args.batch_size,
                                                fidelity=args.fidelity) / n_groups
        result = {"source": args.source, "groups": n_groups, "streamlines": n_sl, "cpu_ms_per_group": {k: round(v, 3) for k, v in ms.items()},
                  "engine_cpu_ms_per_group": {k: round(v, 3) for k, v in engines.items()},
                  "cpu_bound_ceiling": round(ceiling, 3), "prepare_goal": 0.25}
        for name, eng_ms in engines.items():
            ratio = ms["prepare"] / eng_ms
            result[f"prepare_over_{name}_engine_cpu"] = round(ratio, 3)
            print(f"preparation CPU per group {ms['prepare']:.3f} ms / engine {name} {eng_ms:.3f} ms: ratio "
                  f"{ratio:.3f} (goal <= 0.25 against torch-fp32)")
        result["end_to_end"] = [e2e_rows(c, b, args, tmp, tasks, inputs, n_sl) for b, c in codecs.items()]
        result["roof"] = roof_lines(args, codecs, result["end_to_end"], n_groups / n_sl)
        load = watch.finish()
        result.update({"cpu": cpu_desc, "load_average_before_after": [load_before[0], load["load_avg_after"][0]],
                       "contended": load["contended"]})
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
