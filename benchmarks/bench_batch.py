"""Benchmark: end-to-end batch encoding (files on disk -> latents on disk) against the engine alone.

Lays ``<data>/subject01/*.trk`` out as ``--subjects`` TractoInferno subjects (symlinks in a temp
folder), then alternates, ``--repeats`` times each:

- engine only: the groups of every file, canonicalised and normalised beforehand (not timed), run
  through the same engine in the same fixed batches of ``--batch-size`` groups;
- end to end: ``run_batch("encode", ...)`` into an empty folder (discovery, hashing, reading,
  canonicalisation, inference, atomic writes, index), timed from the call to its return;

and prints streamlines/s of both (best run of each) and their ratio (goal >= 0.85). It also times the
CPU each stage costs (thread CPU time, stages run one after the other) and prints preparation CPU per
group against the engine's (goal <= 0.25): when the host has no idle core, the end-to-end ratio
cannot exceed engine / (prepare + engine + finish) CPU, printed as the ceiling. The CPU model, its
AVX-512 / AMX flags and the load average before and after are printed with the figures.

    python benchmarks/bench_batch.py [--model DIR] [--subjects 3] [--batch-size 64] [--threads N]

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
from _common import LoadWatch

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


def engine_only(codec, inputs: list[np.ndarray], batch_size: int) -> float:
    from vqdiff.batch.stages import Batcher, engine_call

    batcher = Batcher(lambda x: engine_call(codec, "encode", x), batch_size)
    t0 = time.perf_counter()
    for i, x in enumerate(inputs):
        batcher.add(i, x)
    batcher.flush()
    return time.perf_counter() - t0


def cpu_seconds(codec, tasks, model, batch_size: int, scratch: Path) -> dict[str, float]:
    """CPU seconds of each stage over all files, run serially on this thread."""
    from vqdiff.batch.local import single_threaded_blas
    from vqdiff.batch.stages import Batcher, JobSpec, engine_call, finish, prepare
    from vqdiff.batch.tasks import BatchTask

    spec = JobSpec("encode", str(model), dict(codec.model_info), codec.normalisation.to_dict(), batch_size,
                   engine=dict(codec.pipeline.provenance["engine"]))
    tasks = [BatchTask(t.input, t.rel, t.subject, t.bundle, str(scratch / t.out_rel), t.out_rel) for t in tasks]
    cpu = {}
    with single_threaded_blas():
        c0 = time.thread_time()
        items = [prepare(spec, t) for t in tasks]
        cpu["prepare"] = time.thread_time() - c0
        batcher = Batcher(lambda x: engine_call(codec, "encode", x), batch_size)
        c0 = time.thread_time()
        done = [d for t, it in zip(tasks, items, strict=True) for d in batcher.add((t, it), it.x)] + batcher.flush()
        cpu["engine"] = time.thread_time() - c0
        c0 = time.thread_time()
        for (t, it), outs in done:
            finish(spec, t, it, outs)
        cpu["finish"] = time.thread_time() - c0
    shutil.rmtree(scratch)
    return cpu


def cpu_flags() -> str:
    """The CPU model and the vector / matrix extensions that decide which engine is fastest."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    return f"{model} [{' '.join(f for f in wanted if f in flags) or 'no avx2'}]"


def cpu_pressure() -> str:
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    from vqdiff.batch.job import run_batch
    from vqdiff.batch.local import single_threaded_blas
    from vqdiff.batch.model import load_codec
    from vqdiff.batch.tasks import encode_tasks
    from vqdiff.io import load_bundle

    default_data = Path(os.environ.get("VQDIFF_SHARED_DATA", REPO.parent / "shared" / "data"))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint or export directory")
    p.add_argument("--data", type=Path, default=default_data, help="the shared data folder")
    p.add_argument("--subjects", type=int, default=3, help="copies of subject01 laid out as subjects")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: torch's)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="vqdiff-bench-batch-") as tmp:
        tmp = Path(tmp)
        build_tree(args.data / "subject01", tmp / "in", args.subjects)
        model, model_label = model_dir(args.model, tmp)
        codec = load_codec(model, backend=args.backend, threads=args.threads, batch_size=args.batch_size)
        tasks = encode_tasks(tmp / "in", tmp / "out")
        with single_threaded_blas():
            prepared = [codec.pipeline.prepare_encode(load_bundle(t.input)) for t in tasks]
        inputs = [x for x, _ in prepared]
        n_sl, n_groups = sum(st.n_streamlines for _, st in prepared), sum(len(x) for x in inputs)
        watch = LoadWatch(os.cpu_count())
        load_before = watch.before
        engine_only(codec, inputs[:1], args.batch_size)  # warm-up
        print(f"{len(tasks)} files ({args.subjects} subjects), {n_sl} streamlines, {n_groups} groups; "
              f"model: {model_label}; engine {codec.engine.backend}/{codec.engine.provider}, "
              f"batch {args.batch_size} groups, {args.workers} prepare workers, "
              f"torch threads {__import__('torch').get_num_threads()}; cpus {os.cpu_count()}, "
              f"load average {load_before[0]:.2f}; {cpu_flags()}")
        cpu = cpu_seconds(codec, tasks, model, args.batch_size, tmp / "scratch")
        ceiling = cpu["engine"] / sum(cpu.values())
        prep_ratio = cpu["prepare"] / cpu["engine"]
        print("CPU seconds per stage (serial): " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
              + f" -> ceiling without an idle core {ceiling:.2f}; cpu pressure: {cpu_pressure()}")
        print(f"preparation CPU per group: {1e3 * cpu['prepare'] / n_groups:.3f} ms, engine "
              f"({codec.engine.backend}) {1e3 * cpu['engine'] / n_groups:.3f} ms: ratio {prep_ratio:.3f} (goal <= 0.25)")
        print(f"{'run':>4} {'engine-only sl/s':>17} {'end-to-end sl/s':>16} {'ratio':>6}")
        eng, e2e = [], []
        for r in range(args.repeats):
            eng.append(n_sl / engine_only(codec, inputs, args.batch_size))
            shutil.rmtree(tmp / "out", ignore_errors=True)
            t0 = time.perf_counter()
            summary = run_batch("encode", tmp / "in", tmp / "out", model=model, backend=args.backend,
                                threads=args.threads, batch_size=args.batch_size, workers=args.workers,
                                progress=False)
            e2e.append(summary["streamlines_processed"] / (time.perf_counter() - t0))
            assert summary["done"] == len(tasks) and not summary["failures"], summary["message"]
            print(f"{r + 1:>4} {eng[-1]:>17.0f} {e2e[-1]:>16.0f} {e2e[-1] / eng[-1]:>6.2f}")
        result = {"engine_only_streamlines_per_s": round(max(eng)), "end_to_end_streamlines_per_s": round(max(e2e)),
                  "ratio_best": round(max(e2e) / max(eng), 3),
                  "ratio_median": round(float(np.median(np.array(e2e) / np.array(eng))), 3), "goal": 0.85,
                  "cpu_bound_ceiling": round(ceiling, 3), "prepare_cpu_ms_per_group": round(1e3 * cpu["prepare"] / n_groups, 3),
                  "engine_cpu_ms_per_group": round(1e3 * cpu["engine"] / n_groups, 3),
                  "prepare_over_engine_cpu": round(prep_ratio, 3), "prepare_goal": 0.25,
                  "engine": f"{codec.engine.backend}/{getattr(codec.engine, 'variant_name', None) or codec.engine.provider}"}
        load = watch.finish()
        result.update({"load_average_before_after": [load_before[0], load["load_avg_after"][0]],
                       "contended": load["contended"]})
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
