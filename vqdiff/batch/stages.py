"""The three stages every file of a batch job goes through, the same locally and on Ray.

1. `prepare` (CPU): hash the input, skip it when its output is up to date, load and run the codec
   core's `vqdiff.codec.Pipeline.prepare_encode` (or read the latents) -> engine input ``x``.
2. the engine: `Batcher` concatenates the groups of many files into calls of exactly ``batch_size``
   groups (the last call padded with zeros), so a file's result depends neither on which files share
   its batches nor on local vs Ray: outputs are byte-identical.
3. `finish` (CPU): the core's `assemble_latents` (or `assemble_bundle`), written atomically (temp
   file + fsync + rename); returns the file's index record.

Resume: a latents file records its input's sha256 (``source.input_sha256``), the model's
(``model.sha256``) and its provenance (engine, vqdiff and canonicalisation versions); an existing
output that matches all of them is skipped. Decoded TRK/TCK/TRX files cannot carry that, so they are
matched against the index (input sha256, model, format, restore_points, vqdiff version, and the
output's own sha256).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from vqdiff import __version__
from vqdiff.codec import same_provenance
from vqdiff.errors import VQDiffError
from vqdiff.fileio import TMP_MARK, atomic_write_bytes, file_sha256
from vqdiff.latents import FORMAT, FORMAT_VERSION
from vqdiff.subject import FORMAT as SUBJECT_FORMAT

from .subjects import (
    fidelity_summary,
    latents_summary,
    prepare_subject_task,
    registration_summary,
    subject_sha,
    subject_up_to_date,
)
from .tasks import BatchTask

log = logging.getLogger(__name__)

DEFAULT_BATCH = 64  # groups per engine call (fixed: results do not depend on how files share calls)
# A file that cannot be read or written is reported and skipped, whatever raised (a corrupt file can make
# nibabel, zipfile or numpy raise anything): one bad file never stops a 10,000-file run. Errors that are
# not ours are logged with their traceback, because they may also be our bugs.
_EXPECTED = (VQDiffError, OSError, ValueError)


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
    engine: dict | None = None  # {"backend", "variant"} of the engine that runs the job (provenance)
    fidelity: bool = True  # encode: decode the latents and record the measured fidelity
    per_subject: bool = False  # encode: one subject latents file per subject (tasks with members)
    segment: str = "auto"  # encode: a file of several bundles without groups (`vqdiff.segment.MODES`)

    @cached_property
    def pipeline(self):
        """The codec core's steps for this job's model (built where the spec is used, e.g. on a Ray worker)."""
        from vqdiff.codec import Pipeline, load_templates
        from vqdiff.normalise import Normalisation
        from vqdiff.quality import poor_limits

        return Pipeline(Normalisation.from_dict(self.normalisation), self.model_info, load_templates(self.model),
                        self.engine, poor_limits(self.model))

    def __getstate__(self) -> dict:  # the cached pipeline is rebuilt on the other side
        return {k: v for k, v in self.__dict__.items() if k != "pipeline"}


@dataclass
class Prepared:
    x: np.ndarray  # engine input: encode (G, 3, 64, 64) normalised groups, decode (G, D, 16, 16) latents
    state: Any  # what `finish` needs besides the engine output
    input_sha256: str


def engine_call(codec, kind: str, x: np.ndarray, fidelity: bool = False) -> tuple[np.ndarray, ...]:
    """One engine call: encode -> (latents, [decoded groups with ``fidelity``,] [indices]); decode ->
    (normalised groups,)."""
    if kind == "encode":
        latents, indices = codec.encode_groups(x)
        decoded = (codec.decode_groups(latents),) if fidelity else ()
        return (latents, *decoded) if indices is None else (latents, *decoded, indices)
    return (codec.decode_groups(x),)


def _encode_outputs(spec: JobSpec, outputs: tuple) -> tuple:
    """(latents, indices | None, decoded | None) of `engine_call`'s encode outputs."""
    decoded, rest = (outputs[1], outputs[2:]) if spec.fidelity else (None, outputs[1:])
    return outputs[0], rest[0] if rest else None, decoded


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


def remove_temps(path: Path) -> list[Path]:
    """Remove leftovers of interrupted writes of ``path`` (ours and `save_bundle`'s temp files)."""
    if not path.parent.is_dir():
        return []
    stale = [*path.parent.glob(f".{path.name}{TMP_MARK}*"), *path.parent.glob(f".{path.name}.*.tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted run", p)
    return stale


def record(spec: JobSpec, task: BatchTask, *, status: str = "ok", **fields) -> dict:
    rec = {"subject": task.subject, "bundle": task.bundle, "input": task.rel, "input_sha256": None,
           "output": task.out_rel, "output_sha256": None, "model_id": spec.model_info.get("id"),
           "model_sha256": spec.model_info.get("sha256"), "streamlines": None, "groups": None}
    if spec.kind == "decode":  # a decoded file cannot record what made it: the index does
        rec.update(format=spec.format, restore_points=spec.restore_points, vqdiff=__version__)
    rec.update(fields, status=status)
    return rec


def _failed(spec, task, exc: Exception, sha=None) -> tuple[dict, str]:
    reason = getattr(exc, "reason", None) or type(exc).__name__
    log.warning("failed: %s: %s", task.rel, exc, exc_info=not isinstance(exc, _EXPECTED))
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
        header = _latents_header(out) if spec.kind == "encode" else {}
        if spec.kind == "encode" and (spec.per_subject or header["__metadata__"].get("format") == SUBJECT_FORMAT):
            fields, why = subject_up_to_date(spec, sha, header)  # a subject folder, or a TRX with groups
            if fields is None:
                return None, why
            return record(spec, task, input_sha256=sha, output_sha256=file_sha256(out), **fields), ""
        if spec.kind == "encode":
            meta = header["__metadata__"]
            if (meta.get("format"), meta.get("format_version")) != (FORMAT, str(FORMAT_VERSION)):
                return None, f"it is not a {FORMAT} v{FORMAT_VERSION} file"
            if spec.fidelity and "fidelity" not in meta:
                return None, "it records no fidelity"
            theirs = (json.loads(meta["source"]).get("input_sha256"), json.loads(meta["model"]).get("sha256"))
            if theirs != (sha, spec.model_info.get("sha256")):
                return None, f"it records input {str(theirs[0])[:12]} / model {str(theirs[1])[:12]}"
            made = json.loads(meta.get("provenance", "{}"))
            if not same_provenance(made, spec.pipeline.provenance):
                return None, f"it was made by {made or 'an older vqdiff'}, not {spec.pipeline.provenance}"
            return record(spec, task, input_sha256=sha, output_sha256=file_sha256(out),
                          streamlines=header["flipped"]["shape"][0], groups=header["latents"]["shape"][0],
                          registration=registration_summary(json.loads(meta.get("registration", "{}"))),
                          fidelity=fidelity_summary(json.loads(meta.get("fidelity", "{}")))), ""
        prev = task.previous or {}
        want = {"input_sha256": sha, "model_sha256": spec.model_info.get("sha256"), "format": spec.format,
                "restore_points": spec.restore_points, "vqdiff": __version__, "status": "ok"}
        if any(prev.get(k) != v for k, v in want.items()):
            return None, "the index has no matching entry for it"
        if prev.get("output_sha256") != file_sha256(out):
            return None, "its content differs from the index entry"
        return dict(prev), ""
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        return None, f"it is unreadable ({exc})"


def prepare(spec: JobSpec, task: BatchTask) -> Prepared | tuple[dict, str]:
    """Stage 1: a `Prepared` to run, or ``(record, "skipped" | "failed")``."""
    out = Path(task.output)
    remove_temps(out)
    sha = None
    try:
        from vqdiff.io import read_whole

        # read once when the reader parses the bytes whole: hashed here, parsed below
        whole = spec.kind == "encode" and not task.members and read_whole(task.input)
        data = Path(task.input).read_bytes() if whole else None
        sha = (subject_sha(task.members) if task.members else file_sha256(task.input) if data is None
               else hashlib.sha256(data).hexdigest())
        if out.exists():
            rec, why = _up_to_date(spec, task, sha)
            if rec is not None:
                return rec, "skipped"
            if not spec.overwrite:
                raise FileExistsError(f"{task.out_rel} exists but is not this input's output under this model "
                                      f"({why}); use -f to replace it")
        if spec.kind == "encode" and task.members:
            return Prepared(*prepare_subject_task(spec, task, sha), sha)
        if spec.kind == "encode":
            from vqdiff.io import load_bundle

            bundle = load_bundle(task.input, reference=spec.reference, data=data)
            from vqdiff.filesteps import prepare_file
            from vqdiff.subject import SubjectState

            # a TRX with groups or a segmented file is a subject, as `Codec.encode_file` has it
            x, state = prepare_file(spec.pipeline, bundle, input_sha256=sha, segment=spec.segment)
            if not isinstance(state, SubjectState):
                state.bundle = state.bundle if spec.fidelity else None  # kept only to measure the fidelity
            return Prepared(x, state, sha)
        from vqdiff.subject import Subject, decode_input, load_latents

        lat = load_latents(task.input)
        x = decode_input(spec.pipeline, lat) if isinstance(lat, Subject) else spec.pipeline.prepare_decode(lat)
        return Prepared(x, lat, sha)
    except Exception as exc:  # noqa: BLE001 (see _EXPECTED)
        return _failed(spec, task, exc, sha)


def finish(spec: JobSpec, task: BatchTask, item: Prepared, outputs: tuple[np.ndarray, ...]) -> tuple[dict, str]:
    """Stage 3: write ``task.output`` atomically from the engine ``outputs``; ``(record, "done" | "failed")``."""
    out = Path(task.output)
    try:
        if spec.kind == "encode":
            from vqdiff.subject import SubjectState, assemble_subject

            latents, indices, decoded = _encode_outputs(spec, outputs)
            if isinstance(item.state, SubjectState):
                lat = assemble_subject(spec.pipeline, item.state, latents, indices, decoded)
            else:
                lat = spec.pipeline.assemble_latents(item.state, latents, indices, decoded)
            parts = lat.to_parts()
            atomic_write_bytes(out, parts)
            digest = hashlib.sha256()
            for part in parts:
                digest.update(part)
            n, g, out_sha, extra = lat.n_streamlines, len(latents), digest.hexdigest(), latents_summary(lat)
        else:
            from vqdiff.io import save_bundle
            from vqdiff.subject import Subject, assemble_bundles, assemble_file

            lat = item.state
            if isinstance(lat, Subject):
                parts = assemble_bundles(spec.pipeline, lat, outputs[0], restore_points=spec.restore_points)
                bundle = assemble_file(lat, parts, restore_points=spec.restore_points)
            else:
                bundle = spec.pipeline.assemble_bundle(lat, outputs[0], restore_points=spec.restore_points)
            bundle.name = bundle.name or task.bundle
            out.parent.mkdir(parents=True, exist_ok=True)
            save_bundle(bundle, out, format=spec.format, overwrite=True)
            n, g, out_sha = lat.n_streamlines, len(outputs[0]), file_sha256(out)
            extra = {}
    except Exception as exc:  # noqa: BLE001 (see _EXPECTED)
        return _failed(spec, task, exc, item.input_sha256)
    if spec.throttle:
        time.sleep(spec.throttle)
    return record(spec, task, input_sha256=item.input_sha256, output_sha256=out_sha, streamlines=n, groups=g,
                  **extra), "done"
