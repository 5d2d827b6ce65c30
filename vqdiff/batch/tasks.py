"""Batch jobs' tasks and index: which input file becomes which output file, shards, the index.

A job is the sorted list of `BatchTask` (one input file -> one output file) of one shard; the index
(JSON Lines, one record per file, ``index[.shard-K-of-N].jsonl``) describes what was written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vqdiff.errors import VQDiffError

DECODE_FORMATS = ("trk", "trx", "tck")
LATENTS_SUFFIX = ".vqlat"


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
    members: tuple = ()  # encode per subject: ((path, bundle name), ...) of the subject's files



def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N), 0 <= K < N (Slurm ``$SLURM_ARRAY_TASK_ID/N``, Kubernetes ``$JOB_COMPLETION_INDEX/N``)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise BatchError(f"shard must be K/N with 0 <= K < N (e.g. 0/4, 1/4, 2/4, 3/4), got {text!r}")
    return int(m[1]), int(m[2])


def shard_of(rel: str, n: int) -> int:
    """The shard (of ``n``) an input path belongs to: a stable hash of the path alone, so adding or
    removing files between array tasks never moves the other files to another shard."""
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") % n


def shard_tasks(tasks: Iterable[BatchTask], k: int, n: int) -> list[BatchTask]:
    """Shard ``k`` of ``n`` (by `shard_of` of the input path), sorted by input path."""
    return sorted((t for t in tasks if shard_of(t.rel, n) == k), key=lambda t: t.rel)


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


def subject_tasks(in_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[BatchTask]:
    """One task per subject of ``in_dir`` (the subjects of `encode_tasks`): its bundle files, in path order,
    -> ``out_dir/<subject>.vqlat`` (one subject latents file, `vqdiff.subject`)."""
    from vqdiff.discovery import find_bundle_files

    in_dir, out_dir = Path(in_dir).resolve(), Path(out_dir).resolve()
    by_subject: dict[str, list] = {}
    for f in find_bundle_files(in_dir):
        if out_dir == in_dir or out_dir not in f.path.parents:
            by_subject.setdefault(f.subject, []).append(f)
    tasks = []
    for subject, files in sorted(by_subject.items()):
        bundles = [f.bundle for f in files]
        if len(set(bundles)) != len(bundles):
            raise BatchError(f"subject {subject} has several files of one bundle ({bundles}); rename them")
        out_rel = f"{subject or 'subject'}{LATENTS_SUFFIX}"
        tasks.append(BatchTask(str(files[0].path.parent), subject, subject, "", str(out_dir / out_rel), out_rel,
                               members=tuple((str(f.path), f.bundle) for f in files)))
    return tasks


def decode_tasks(in_dir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = "trk") -> list[BatchTask]:
    """``in_dir/**/*.vqlat`` -> the same relative paths under ``out_dir`` with the ``fmt`` suffix."""
    in_dir, out_dir = Path(in_dir).resolve(), Path(out_dir).resolve()
    if not in_dir.is_dir():
        raise FileNotFoundError(f"{in_dir} is not a directory of latents files (*{LATENTS_SUFFIX})")
    paths = sorted(p for p in in_dir.rglob(f"*{LATENTS_SUFFIX}") if p.is_file() and not p.name.startswith("."))
    return _tasks(((p, p.parent.name if p.parent != in_dir else "", p.stem,
                    p.relative_to(in_dir).with_suffix(f".{fmt}").as_posix()) for p in paths), in_dir, out_dir)



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
