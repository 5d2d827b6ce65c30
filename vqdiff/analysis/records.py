"""Latents files and batch folders -> (subject, bundle, `vqdiff.Latents`) records.

`iter_records` is the one reader of the analysis: every table, similarity query and score starts
here. It accepts latents files (``*.vqlat``: one bundle, or a subject's several bundles, `vqdiff.subject`)
and folders holding them, such as a ``vqdiff-encode-batch`` output (``<out>/<subject>/<bundle>.vqlat``,
or ``<out>/<subject>.vqlat`` with ``--per-subject``, plus ``index.jsonl``). Names:

- a file listed in an ``index*.jsonl`` of its folder or a folder above (up to the folder given) takes
  the index record's ``subject`` and ``bundle`` (the batch encoder's names), and the record's
  ``fidelity`` when it has one;
- any other file: subject = its folder's name, bundle = the file name without ``.vqlat``;
- a subject file: one record per bundle, named by the bundle's name in the file (its group or segment);
  subject = the index record's ``subject``, else the file name without ``.vqlat``.

Fidelity: the index record's, else the latents' own (every file written since fidelity is measured).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import VQDiffError
from ..latents import SUFFIX, Latents
from ..subject import load_latents

ACCEPTED = f"latents files (*{SUFFIX}) or folders holding them (vqdiff-encode-batch outputs)"


class AnalysisError(VQDiffError, ValueError):
    """Analysis input that cannot be used (no latents, mixed models, unknown tract, bad table)."""


@dataclass
class LatentsRecord:
    subject: str
    bundle: str
    path: Path
    latents: Latents
    index: dict[str, Any] = field(default_factory=dict)  # the batch index record, when there is one


def _index_records(folder: Path, *, recursive: bool = True) -> dict[Path, dict]:
    """Absolute output path -> the last ``ok`` record of every ``index*.jsonl`` in (or under) ``folder``."""
    known: dict[Path, dict] = {}
    for index in sorted(folder.rglob("index*.jsonl") if recursive else folder.glob("index*.jsonl")):
        for line in index.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError, TypeError, KeyError, AttributeError):
                rec = json.loads(line)
                if rec.get("status") == "ok" and rec.get("output"):
                    known[(index.parent / rec["output"]).resolve()] = rec
    return known


def find_latents(paths: Iterable[str | os.PathLike]) -> list[tuple[Path, dict]]:
    """(file, index record or {}) for every latents file named or found under the folders named.

    Raises `AnalysisError` when a path does not exist, is not a latents file, or nothing is found.
    """
    found: list[tuple[Path, dict]] = []
    paths = [Path(p) for p in paths]
    if not paths:
        raise AnalysisError(f"no input given; expected {ACCEPTED}")
    for p in paths:
        if p.is_dir():
            known = _index_records(p)
            files = sorted(f for f in p.rglob(f"*{SUFFIX}") if f.is_file() and not f.name.startswith("."))
            if not files:
                raise AnalysisError(f"{p}: no latents found; expected {ACCEPTED}")
            found.extend((f, known.get(f.resolve(), {})) for f in files)
        elif p.is_file():
            if p.suffix != SUFFIX:
                raise AnalysisError(f"{p} is not a latents file; expected {ACCEPTED}")
            known = {**_index_records(p.parent.parent, recursive=False), **_index_records(p.parent, recursive=False)}
            found.append((p, known.get(p.resolve(), {})))
        else:
            raise AnalysisError(f"{p} does not exist; expected {ACCEPTED}")
    return found


def _read_file(path: Path, index: dict) -> Iterator[LatentsRecord]:
    """The records of one file (a one-bundle latents file: one record; a subject file: one per bundle)."""
    lat = load_latents(path)
    if isinstance(lat, Latents):
        subject = str(index.get("subject") or path.parent.name)
        yield LatentsRecord(subject, str(index.get("bundle") or path.stem), path, lat, index)
        return
    subject = str(index.get("subject") or path.stem)
    per_bundle = index.get("bundles") if isinstance(index.get("bundles"), dict) else {}
    for part in lat.parts:
        yield LatentsRecord(subject, part.name, path, part.latents, {**index, **(per_bundle.get(part.name) or {})})


def iter_records(paths: Iterable[str | os.PathLike], *, same_model: bool = True) -> Iterator[LatentsRecord]:
    """(subject, bundle, latents) records of ``paths`` (module doc), in path order.

    ``same_model``: refuse latents made by different models (their latent spaces are not comparable).
    """
    first: LatentsRecord | None = None
    for path, index in find_latents(paths):
        for rec in _read_file(path, index):
            if same_model and first is not None and rec.latents.model.get("sha256") != first.latents.model.get("sha256"):
                raise AnalysisError(
                    f"mixed models: {rec.path} was made by {_model(rec)}, {first.path} by {_model(first)}; "
                    "latents of different models are not comparable: embed each model's latents separately")
            first = first or rec
            yield rec


def _model(rec: LatentsRecord) -> str:
    m = rec.latents.model
    return f"{m.get('id')!r} ({str(m.get('sha256'))[:12]})"
