"""A batch job: encode (or decode) every file of a folder tree, locally or on Ray, resumably.

`run_batch` discovers the tasks of a shard, opens the codec once, runs the stages
(`vqdiff.batch.stages`) with `vqdiff.batch.local.run_local` or `vqdiff.batch.ray_runner.run_ray`,
keeps the index journal (appended with fsync as files finish, rewritten sorted at the end) and
writes ``summary[...].json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from vqdiff.blas import single_threaded_blas
from vqdiff.fileio import atomic_write_bytes

from .local import run_local
from .model import load_codec, resolve_model
from .stages import DEFAULT_BATCH, JobSpec, remove_temps
from .subjects import flagged
from .tasks import (
    DECODE_FORMATS,
    BatchError,
    BatchTask,
    decode_tasks,
    encode_tasks,
    read_index,
    shard_suffix,
    shard_tasks,
    subject_tasks,
)


def run_batch(kind: str, in_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
              model: str | os.PathLike | None = None, shard: tuple[int, int] = (0, 1), ray: str | None = None,
              backend: str = "auto", device: str | None = None, threads: int | None = None,
              batch_size: int = DEFAULT_BATCH, workers: int = 2, processes: bool = False, overwrite: bool = False,
              reference: str | None = None, format: str = "trk", restore_points: bool = True,
              progress: bool = True, throttle: float = 0.0, ray_actors: int | None = None, fidelity: bool = True,
              per_subject: bool = False, segment: str = "auto") -> dict:
    """Encode (``kind="encode"``) or decode every file of shard ``shard`` of ``in_dir`` into ``out_dir``.

    Writes ``out_dir/index[.shard-K-of-N].jsonl`` (one record per file of the shard, sorted by input)
    and ``summary[...].json``; returns the summary. ``ray``: None runs here, ``"local"`` starts a
    local Ray, ``"auto"`` or an address joins a cluster (`vqdiff.batch.ray_runner`). Locally, ``workers``
    threads prepare the files, or worker processes with ``processes`` (`vqdiff.batch.local`).
    Encode: ``fidelity`` records each bundle's measured reconstruction (one more decoder pass);
    ``per_subject`` writes one subject latents file per subject (``out_dir/<subject>.vqlat``,
    `vqdiff.batch.subjects`); ``segment`` ("auto", "on", "off") what a file of several bundles without
    groups becomes (`vqdiff.segment.file_parts`, as `Codec.encode_file`). Decode reads either kind of latents file.
    """
    from tqdm.auto import tqdm

    if kind not in ("encode", "decode"):
        raise BatchError(f"kind must be 'encode' or 'decode', got {kind!r}")
    if format not in DECODE_FORMATS:
        raise BatchError(f"format must be one of {DECODE_FORMATS}, got {format!r}")
    if batch_size < 1 or workers < 1:
        raise BatchError(f"batch size and workers must be >= 1 (got {batch_size}, {workers})")
    out_dir = Path(out_dir).resolve()
    if kind == "encode":
        tasks = subject_tasks(in_dir, out_dir) if per_subject else encode_tasks(in_dir, out_dir)
    else:
        tasks = decode_tasks(in_dir, out_dir, format)
    tasks = shard_tasks(tasks, *shard)
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "decode":
        known = read_index(out_dir)
        tasks = [BatchTask(**{**asdict(t), "previous": known.get(t.out_rel)}) for t in tasks]
    index_path = out_dir / f"index{shard_suffix(shard)}.jsonl"
    summary_path = out_dir / f"summary{shard_suffix(shard)}.json"
    remove_temps(index_path)
    remove_temps(summary_path)
    model_dir = resolve_model(model)
    codec = load_codec(model_dir, backend=backend, device=None if ray else device, threads=threads,
                       batch_size=batch_size)
    spec = JobSpec(kind, str(model_dir), dict(codec.model_info), codec.normalisation.to_dict(), batch_size,
                   backend, device, threads, overwrite, reference, format, restore_points, throttle,
                   engine=dict(codec.pipeline.provenance["engine"]), fidelity=fidelity, per_subject=per_subject,
                   segment=segment)

    records: dict[str, dict] = {}
    counts = {"done": 0, "skipped": 0, "failed": 0}
    now = {"streamlines": 0}
    t0 = time.perf_counter()
    bar = tqdm(total=len(tasks), unit="file", desc=kind, disable=not progress, dynamic_ncols=True)
    with contextlib.closing(bar), open(index_path, "a") as journal:

        def on_record(rec: dict, outcome: str) -> None:
            records[rec["input"]] = rec
            counts[outcome] += 1
            if outcome == "done":
                now["streamlines"] += rec["streamlines"]
            if outcome != "skipped":  # the journal: survives a crash, compacted below
                journal.write(json.dumps(rec) + "\n")
                journal.flush()
                os.fsync(journal.fileno())
            bar.update(1)
            bar.set_postfix_str(f"{now['streamlines'] / max(time.perf_counter() - t0, 1e-9):.0f} streamlines/s",
                                refresh=False)

        with single_threaded_blas():
            if ray:
                from .ray_runner import run_ray

                run_ray(spec, tasks, on_record, address=ray, actors=ray_actors, progress=progress)
            else:
                run_local(spec, codec, tasks, on_record, workers=workers, processes=processes)
    seconds = time.perf_counter() - t0
    missing = [t.rel for t in tasks if t.rel not in records]
    assert not missing, f"no record for {missing[:5]}"
    atomic_write_bytes(index_path, "".join(json.dumps(records[t.rel]) + "\n" for t in tasks).encode())

    failures = [{k: records[t.rel][k] for k in ("input", "reason", "error")} for t in tasks
                if records[t.rel]["status"] == "failed"]
    rate = now["streamlines"] / seconds if seconds > 0 else 0.0
    if not tasks:
        message = f"nothing to do: no input files in shard {shard[0]}/{shard[1]} of {in_dir}"
    elif counts["done"] == 0 and not failures:
        message = f"nothing to do: all {counts['skipped']} outputs are up to date"
    else:
        message = (f"{kind}d {counts['done']} file(s) ({now['streamlines']} streamlines, {rate:.0f} streamlines/s), "
                   f"{counts['skipped']} up to date, {len(failures)} failed")
    engine = getattr(codec, "engine", None)
    summary = {
        "job": kind, "message": message, "mode": f"ray ({ray})" if ray else "local",
        "prepare": None if ray else f"{workers} {'processes' if processes else 'threads'}",
        "in_dir": str(Path(in_dir).resolve()), "out_dir": str(out_dir), "shard": f"{shard[0]}/{shard[1]}",
        "model": dict(codec.model_info), "model_dir": str(model_dir),
        "engine": {"backend": getattr(engine, "backend", None), "provider": getattr(engine, "provider", None),
                   "batch_size": batch_size},
        "files": len(tasks), **counts,
        "streamlines": sum(r["streamlines"] or 0 for r in records.values() if r["status"] == "ok"),
        "streamlines_processed": now["streamlines"], "seconds": round(seconds, 3),
        "streamlines_per_s": round(rate, 1), "index": str(index_path), "failures": failures,
    }
    if kind == "encode":  # the bundles the two warnings flag (recognition; measured fidelity)
        summary["flagged"] = flagged(r for r in records.values() if r["status"] == "ok")
    atomic_write_bytes(summary_path, (json.dumps(summary, indent=2) + "\n").encode())
    return summary
