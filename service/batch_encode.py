"""Batch encoding (and decoding) of folder trees of bundles: local by default, resumable, sharded.

A job is the sorted list of `BatchTask` (one input file -> one output file) of one shard. Every file
goes through three stages, the same locally and on Ray (`vqdiff.service.batch_ray`):

1. ``prepare`` (CPU, a pool of threads): hash the input, skip it when its output is up to date, load,
   canonicalise and normalise -> engine input ``x`` (G, ...).
2. the engine (main thread / one Ray actor per GPU): `Batcher` concatenates the groups of many files
   into calls of exactly ``batch_size`` groups (the last call padded with zeros), so a file's result
   depends neither on which files share its batches nor on local vs Ray: outputs are byte-identical.
3. ``finish`` (CPU, a writer thread): assemble the file's `Latents` (or bundle), write it atomically
   (temp file + fsync + rename), return its index record.

Resume: a latents file records its input's sha256 (``source.input_sha256``) and the model's
(``model.sha256``); an existing output that matches both is skipped. Decoded TRK/TCK/TRX files
cannot carry that, so they are matched against the index (input sha256, model, format, and the
output's own sha256). The index (JSON Lines, one record per file) is appended with fsync as files
finish and rewritten, sorted, at the end; ``summary`` describes the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from vqdiff.errors import VQDiffError
from vqdiff.fileio import TMP_MARK, atomic_write_bytes

log = logging.getLogger(__name__)

DEFAULT_BATCH = 64  # groups per engine call (fixed: results do not depend on how files share calls)
DECODE_FORMATS = ("trk", "trx", "tck")
LATENTS_SUFFIX = ".vqlat"
_TMP = TMP_MARK  # our temp files: .<name>.tmp-<pid>-<thread>; save_bundle's: .<name>.<random>.tmp
_FAILURES = (VQDiffError, OSError, ValueError)  # per-file problems; anything else is a bug and stops the run


class BatchError(VQDiffError, ValueError):
    """A batch job cannot start (bad shard, clashing outputs, unusable backend)."""


@dataclass(frozen=True)
class BatchTask:
    input: str  # absolute path of the input file
    rel: str  # input path relative to IN_DIR (posix), the task's key
    subject: str
    bundle: str
    output: str  # absolute path of the output file
    out_rel: str  # output path relative to OUT_DIR
    previous: dict | None = field(default=None, compare=False)  # decode: this output's last index record


@dataclass
class JobSpec:
    """Everything a worker needs to run a job's stages (picklable: travels to Ray workers)."""

    kind: str  # "encode" | "decode"
    model: str  # checkpoint or export directory
    model_info: dict  # {"id", "kind", "sha256"}
    normalisation: dict
    batch_size: int = DEFAULT_BATCH
    backend: str = "auto"
    device: str | None = None
    threads: int | None = None
    overwrite: bool = False
    reference: str | None = None  # encode: the space of .tck inputs
    format: str = "trk"  # decode: output format
    restore_points: bool = True  # decode: resample to the original point counts
    throttle: float = 0.0  # seconds slept after each written file (lets tests kill a run mid-way)


@dataclass
class Prepared:
    x: np.ndarray  # engine input: encode (G, 3, 64, 64) normalised groups, decode (G, D, 16, 16) latents
    state: Any  # what `finish` needs besides the engine output
    input_sha256: str


# ---------------------------------------------------------------------------------------------- tasks
def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N), 0 <= K < N (Slurm ``$SLURM_ARRAY_TASK_ID/N``, Kubernetes ``$JOB_COMPLETION_INDEX/N``)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise BatchError(f"shard must be K/N with 0 <= K < N (e.g. 0/4, 1/4, 2/4, 3/4), got {text!r}")
    return int(m[1]), int(m[2])


def shard_tasks(tasks: Iterable[BatchTask], k: int, n: int) -> list[BatchTask]:
    """Shard ``k`` of ``n``: every n-th task of the list sorted by input path, starting at k."""
    return [t for i, t in enumerate(sorted(tasks, key=lambda t: t.rel)) if i % n == k]


def _tasks(pairs, in_dir: Path, out_dir: Path) -> list[BatchTask]:
    tasks, seen = [], {}
    for path, subject, bundle, out_rel in pairs:
        path = Path(path)
        if out_dir != in_dir and out_dir in path.parents:  # OUT_DIR inside IN_DIR: never read our outputs
            continue
        rel = path.relative_to(in_dir).as_posix()
        if out_rel in seen:
            raise BatchError(f"{rel} and {seen[out_rel]} would both be written to {out_rel}; rename one of them")
        seen[out_rel] = rel
        tasks.append(BatchTask(str(path), rel, subject, bundle, str(out_dir / out_rel), out_rel))
    return sorted(tasks, key=lambda t: t.rel)


def encode_tasks(in_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[BatchTask]:
    """Bundle files under ``in_dir`` (TractoInferno ``sub-X/tractography/sub-X__B.trk`` or flat
    ``<subject>/<bundle>.trk``) -> ``out_dir/<subject>/<bundle>.vqlat``."""
    from vqdiff.discovery import find_bundle_files  # the one discovery rule of the project

    in_dir, out_dir = Path(in_dir).resolve(), Path(out_dir).resolve()
    files = find_bundle_files(in_dir)
    return _tasks(((f.path, f.subject, f.bundle, f"{f.subject}/{f.bundle}{LATENTS_SUFFIX}") for f in files),
                  in_dir, out_dir)


def decode_tasks(in_dir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = "trk") -> list[BatchTask]:
    """``in_dir/**/*.vqlat`` -> the same relative paths under ``out_dir`` with the ``fmt`` suffix."""
    in_dir, out_dir = Path(in_dir).resolve(), Path(out_dir).resolve()
    if not in_dir.is_dir():
        raise FileNotFoundError(f"{in_dir} is not a directory of latents files (*{LATENTS_SUFFIX})")
    paths = sorted(p for p in in_dir.rglob(f"*{LATENTS_SUFFIX}") if p.is_file() and not p.name.startswith("."))
    return _tasks(((p, p.parent.name if p.parent != in_dir else "", p.stem,
                    p.relative_to(in_dir).with_suffix(f".{fmt}").as_posix()) for p in paths), in_dir, out_dir)


# ---------------------------------------------------------------------------------------------- model
def load_codec(model: str | os.PathLike | None = None, *, backend: str = "auto", device: str | None = None,
               threads: int | None = None, batch_size: int = DEFAULT_BATCH):
    """The `Codec` a batch job runs: `vqdiff.export.runtime.make_codec` (ONNX Runtime / TensorRT / torch,
    export or checkpoint directory) where that module exists, else the torch `Codec.from_checkpoint`."""
    from vqdiff.api import Codec, default_model_dir

    path = Path(model) if model else default_model_dir()
    try:
        from vqdiff.export.runtime import make_codec
    except ImportError:
        make_codec = None
    if make_codec is not None:
        try:
            return make_codec(path, backend=backend, device=device, threads=threads, batch_size=batch_size)
        except ValueError as exc:  # unknown backend, contradictory device
            raise BatchError(str(exc)) from exc
    if backend not in ("auto", "torch"):
        raise BatchError(f"backend {backend!r} needs vqdiff.export.runtime, which is not installed; "
                         "use --backend torch (or auto)")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    return Codec.from_checkpoint(path, device=device or "cpu", batch_size=batch_size)


def engine_call(codec, kind: str, x: np.ndarray) -> tuple[np.ndarray, ...]:
    """One engine call: encode -> (latents, indices) or (latents,); decode -> (normalised groups,)."""
    if kind == "encode":
        latents, indices = codec.encode_groups(x)
        return (latents,) if indices is None else (latents, indices)
    return (codec.decode_groups(x),)


class Batcher:
    """Feeds ``run`` exactly ``batch_size`` groups per call, concatenated across files in arrival order.

    `add` returns the files whose groups are all done, as ``(key, outputs)``; `flush` pads the rest.
    """

    def __init__(self, run: Callable[[np.ndarray], tuple[np.ndarray, ...]], batch_size: int):
        self.run, self.batch_size = run, int(batch_size)
        self._queue: deque[list] = deque()  # [key, x, consumed, parts, done] not yet fully sent
        self._open: deque[list] = deque()  # the same entries, until their outputs are complete
        self._buffered = 0

    def add(self, key, x: np.ndarray) -> list[tuple[Any, tuple[np.ndarray, ...]]]:
        entry = [key, x, 0, [], 0]
        self._queue.append(entry)
        self._open.append(entry)
        self._buffered += len(x)
        while self._buffered >= self.batch_size:
            self._step()
        return self._completed()

    def flush(self) -> list[tuple[Any, tuple[np.ndarray, ...]]]:
        while self._buffered:
            self._step()
        return self._completed()

    def _step(self) -> None:
        pieces, take = [], 0
        while take < self.batch_size and self._queue:
            e = self._queue[0]
            n = min(self.batch_size - take, len(e[1]) - e[2])
            pieces.append((e, e[1][e[2]:e[2] + n]))
            e[2] += n
            take += n
            if e[2] == len(e[1]):
                self._queue.popleft()
        x = np.concatenate([p for _, p in pieces])
        if take < self.batch_size:  # pad: every call sees the same batch shape
            x = np.concatenate([x, np.zeros((self.batch_size - take, *x.shape[1:]), x.dtype)])
        outs = self.run(x)
        start = 0
        for e, p in pieces:
            e[3].append(tuple(o[start:start + len(p)] for o in outs))
            e[4] += len(p)
            start += len(p)
        self._buffered -= take

    def _completed(self):
        done = []
        while self._open and self._open[0][4] == len(self._open[0][1]):
            key, _, _, parts, _ = self._open.popleft()
            done.append((key, tuple(np.concatenate(cols) for cols in zip(*parts, strict=True)) if parts else ()))
        return done


# ---------------------------------------------------------------------------------------------- stages
def file_sha256(path) -> str:
    from vqdiff.checkpoint import file_sha256 as sha

    return sha(path)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    atomic_write_bytes(path, data)


def remove_temps(path: Path) -> list[Path]:
    """Remove leftovers of interrupted writes of ``path`` (ours and `save_bundle`'s temp files)."""
    if not path.parent.is_dir():
        return []
    stale = [*path.parent.glob(f".{path.name}{_TMP}*"), *path.parent.glob(f".{path.name}.*.tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted run", p)
    return stale


def record(spec: JobSpec, task: BatchTask, *, status: str = "ok", **fields) -> dict:
    rec = {"subject": task.subject, "bundle": task.bundle, "input": task.rel, "input_sha256": None,
           "output": task.out_rel, "output_sha256": None, "model_id": spec.model_info.get("id"),
           "model_sha256": spec.model_info.get("sha256"), "streamlines": None, "groups": None}
    if spec.kind == "decode":
        rec.update(format=spec.format, restore_points=spec.restore_points)
    rec.update(fields, status=status)
    return rec


def _failed(spec, task, exc: BaseException, sha=None) -> tuple[dict, str]:
    reason = getattr(exc, "reason", None) or type(exc).__name__
    log.warning("failed: %s: %s", task.rel, exc)
    return record(spec, task, status="failed", input_sha256=sha, reason=reason, error=str(exc)), "failed"


def _latents_header(path: Path) -> dict:
    """The safetensors JSON header of a latents file (shapes + metadata), checked for completeness."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= min(size - 8, 100_000_000):
            raise ValueError("not a latents file")
        header = json.loads(f.read(n))
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    if size != 8 + n + end:
        raise ValueError(f"incomplete latents file ({size} bytes, expected {8 + n + end})")
    return header


def _up_to_date(spec: JobSpec, task: BatchTask, sha: str) -> tuple[dict | None, str]:
    """(record, "") when ``task.output`` is this input's output under this model, else (None, why not)."""
    out = Path(task.output)
    try:
        if spec.kind == "encode":
            header = _latents_header(out)
            meta = header["__metadata__"]
            from vqdiff.latents import FORMAT, FORMAT_VERSION

            if (meta.get("format"), meta.get("format_version")) != (FORMAT, str(FORMAT_VERSION)):
                return None, f"it is not a {FORMAT} v{FORMAT_VERSION} file"
            theirs = (json.loads(meta["source"]).get("input_sha256"), json.loads(meta["model"]).get("sha256"))
            if theirs != (sha, spec.model_info.get("sha256")):
                return None, f"it records input {str(theirs[0])[:12]} / model {str(theirs[1])[:12]}"
            return record(spec, task, input_sha256=sha, output_sha256=file_sha256(out),
                          streamlines=header["flipped"]["shape"][0], groups=header["latents"]["shape"][0]), ""
        prev = task.previous or {}
        want = {"input_sha256": sha, "model_sha256": spec.model_info.get("sha256"), "format": spec.format,
                "restore_points": spec.restore_points, "status": "ok"}
        if any(prev.get(k) != v for k, v in want.items()):
            return None, "the index has no matching entry for it"
        if prev.get("output_sha256") != file_sha256(out):
            return None, "its content differs from the index entry"
        return dict(prev), ""
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        return None, f"it is unreadable ({exc})"


def prepare(spec: JobSpec, task: BatchTask) -> Prepared | tuple[dict, str]:
    """Stage 1: a `Prepared` to run, or ``(record, "skipped" | "failed")``."""
    from vqdiff.api import groups_to_model

    out = Path(task.output)
    remove_temps(out)
    sha = None
    try:
        sha = file_sha256(task.input)
        if out.exists():
            rec, why = _up_to_date(spec, task, sha)
            if rec is not None:
                return rec, "skipped"
            if not spec.overwrite:
                raise FileExistsError(f"{task.out_rel} exists but is not this input's output under this model "
                                      f"({why}); use -f to replace it")
        if spec.kind == "encode":
            from vqdiff.canonical import canonicalise
            from vqdiff.io import load_bundle
            from vqdiff.normalise import Normalisation

            bundle = load_bundle(task.input, reference=spec.reference)
            canon = canonicalise(bundle.streamlines)
            x = groups_to_model(Normalisation.from_dict(spec.normalisation).apply(canon.groups))
            canon.groups = None
            source = {"format": bundle.source_format, "name": bundle.name, "input_sha256": sha}
            return Prepared(x, (canon, bundle.header, source), sha)
        from vqdiff.errors import ModelMismatchError
        from vqdiff.latents import Latents

        lat = Latents.load(task.input)
        theirs, ours = lat.model.get("sha256"), spec.model_info.get("sha256")
        if theirs and ours and theirs != ours:
            raise ModelMismatchError(f"made by model {lat.model.get('id')!r} ({theirs[:12]}), not by "
                                     f"{spec.model_info.get('id')!r} ({ours[:12]}); decode it with that model")
        return Prepared(lat.latents, lat, sha)
    except _FAILURES as exc:
        return _failed(spec, task, exc, sha)


def finish(spec: JobSpec, task: BatchTask, item: Prepared, outputs: tuple[np.ndarray, ...]) -> tuple[dict, str]:
    """Stage 3: write ``task.output`` atomically from the engine ``outputs``; ``(record, "done" | "failed")``."""
    out = Path(task.output)
    try:
        if spec.kind == "encode":
            from vqdiff.latents import Latents

            canon, header, source = item.state
            lat = Latents(latents=outputs[0], order=canon.order, pad_mask=canon.pad_mask, flipped=canon.flipped,
                          n_points=canon.n_points, header=header, model=spec.model_info,
                          normalisation=spec.normalisation, source=source,
                          indices=outputs[1] if len(outputs) > 1 else None)
            data = lat.to_bytes()
            atomic_write(out, data)
            n, g, out_sha = lat.n_streamlines, lat.n_groups, _sha_bytes(data)
        else:
            from vqdiff.api import model_to_groups
            from vqdiff.bundle import Bundle
            from vqdiff.canonical import uncanonicalise
            from vqdiff.io import save_bundle
            from vqdiff.normalise import Normalisation

            lat = item.state
            streamlines = uncanonicalise(Normalisation.from_dict(lat.normalisation).invert(model_to_groups(outputs[0])),
                                         lat.order, lat.pad_mask, lat.flipped,
                                         n_points=lat.n_points if spec.restore_points else None)
            out.parent.mkdir(parents=True, exist_ok=True)
            save_bundle(Bundle(streamlines, lat.header, name=lat.source.get("name", task.bundle)), out,
                        format=spec.format, overwrite=True)
            n, g, out_sha = lat.n_streamlines, lat.n_groups, file_sha256(out)
    except _FAILURES as exc:
        return _failed(spec, task, exc, item.input_sha256)
    if spec.throttle:
        time.sleep(spec.throttle)
    return record(spec, task, input_sha256=item.input_sha256, output_sha256=out_sha, streamlines=n, groups=g), "done"


def _sha_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------- local run
def run_local(spec: JobSpec, codec, tasks: list[BatchTask], on_record: Callable[[dict, str], None], *,
              workers: int = 2, prefetch: int | None = None) -> None:
    """Run ``tasks`` here: ``workers`` threads prepare files while this thread runs the engine on
    full batches and one writer thread finishes them. ``on_record(record, outcome)`` is called here."""
    batcher = Batcher(partial(engine_call, codec, spec.kind), spec.batch_size)
    prefetch = prefetch or 2 * workers + 2
    todo, pending, writes = iter(tasks), deque(), deque()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="vqdiff-prepare")
    writer = ThreadPoolExecutor(1, thread_name_prefix="vqdiff-write")

    def submit_ready(ready):
        for (task, item), outs in ready:
            writes.append(writer.submit(finish, spec, task, item, outs))

    def drain(wait: bool = False):
        while writes and (wait or writes[0].done()):
            on_record(*writes.popleft().result())

    try:
        while True:
            while len(pending) < prefetch and (task := next(todo, None)) is not None:
                pending.append((task, pool.submit(prepare, spec, task)))
            if not pending:
                break
            task, fut = pending.popleft()
            res = fut.result()
            if isinstance(res, Prepared):
                submit_ready(batcher.add((task, res), res.x))
            else:
                on_record(*res)
            drain()
        submit_ready(batcher.flush())
        drain(wait=True)
    finally:  # on an error or Ctrl-C: drop what has not started, let started writes finish (atomic anyway)
        pool.shutdown(cancel_futures=True)
        writer.shutdown(cancel_futures=True)


@contextlib.contextmanager
def single_threaded_blas():
    """numpy's BLAS on one thread: canonicalisation's small eigen-problems, run from several
    threads beside the engine, are many times slower with BLAS threads spinning on a busy host."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        if "OPENBLAS_NUM_THREADS" not in os.environ:
            log.warning("threadpoolctl is not installed: set OPENBLAS_NUM_THREADS=1 (or pip install "
                        "threadpoolctl), else canonicalisation may crawl beside the engine on a busy host")
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield



# ---------------------------------------------------------------------------------------------- the job
def resolve_model(model: str | os.PathLike | None) -> Path:
    from vqdiff.api import default_model_dir

    return Path(model).resolve() if model else default_model_dir().resolve()


def shard_suffix(shard: tuple[int, int]) -> str:
    return "" if shard == (0, 1) else f".shard-{shard[0]}-of-{shard[1]}"


def read_index(out_dir: Path) -> dict[str, dict]:
    """Output path -> its last successful record, over every ``index*.jsonl`` of ``out_dir``
    (lines cut by a crash are ignored)."""
    known: dict[str, dict] = {}
    for path in sorted(out_dir.glob("index*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError, TypeError, KeyError):
                rec = json.loads(line)
                if rec["status"] == "ok":
                    known[rec["output"]] = rec
    return known


def run_batch(kind: str, in_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
              model: str | os.PathLike | None = None, shard: tuple[int, int] = (0, 1), ray: str | None = None,
              backend: str = "auto", device: str | None = None, threads: int | None = None,
              batch_size: int = DEFAULT_BATCH, workers: int = 2, overwrite: bool = False,
              reference: str | None = None, format: str = "trk", restore_points: bool = True,
              progress: bool = True, throttle: float = 0.0, ray_actors: int | None = None) -> dict:
    """Encode (``kind="encode"``) or decode every file of shard ``shard`` of ``in_dir`` into ``out_dir``.

    Writes ``out_dir/index[.shard-K-of-N].jsonl`` (one record per file of the shard, sorted by input)
    and ``summary[...].json``; returns the summary. ``ray``: None runs here, ``"local"`` starts a
    local Ray, ``"auto"`` or an address joins a cluster (`vqdiff.service.batch_ray`).
    """
    from tqdm.auto import tqdm

    if kind not in ("encode", "decode"):
        raise BatchError(f"kind must be 'encode' or 'decode', got {kind!r}")
    if format not in DECODE_FORMATS:
        raise BatchError(f"format must be one of {DECODE_FORMATS}, got {format!r}")
    if batch_size < 1 or workers < 1:
        raise BatchError(f"batch size and workers must be >= 1 (got {batch_size}, {workers})")
    out_dir = Path(out_dir).resolve()
    tasks = encode_tasks(in_dir, out_dir) if kind == "encode" else decode_tasks(in_dir, out_dir, format)
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
                   backend, device, threads, overwrite, reference, format, restore_points, throttle)

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
                from vqdiff.service.batch_ray import run_ray

                run_ray(spec, tasks, on_record, address=ray, actors=ray_actors, progress=progress)
            else:
                run_local(spec, codec, tasks, on_record, workers=workers)
    seconds = time.perf_counter() - t0
    missing = [t.rel for t in tasks if t.rel not in records]
    assert not missing, f"no record for {missing[:5]}"
    atomic_write(index_path, "".join(json.dumps(records[t.rel]) + "\n" for t in tasks).encode())

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
        "in_dir": str(Path(in_dir).resolve()), "out_dir": str(out_dir), "shard": f"{shard[0]}/{shard[1]}",
        "model": dict(codec.model_info), "model_dir": str(model_dir),
        "engine": {"backend": getattr(engine, "backend", None), "provider": getattr(engine, "provider", None),
                   "batch_size": batch_size},
        "files": len(tasks), **counts,
        "streamlines": sum(r["streamlines"] or 0 for r in records.values() if r["status"] == "ok"),
        "streamlines_processed": now["streamlines"], "seconds": round(seconds, 3),
        "streamlines_per_s": round(rate, 1), "index": str(index_path), "failures": failures,
    }
    atomic_write(summary_path, (json.dumps(summary, indent=2) + "\n").encode())
    return summary
