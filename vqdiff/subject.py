"""A subject: one file's streamlines encoded part by part (a TRX's groups, later a segmentation), in one
versioned, self-describing latents file.

The parts of a file (`subject_parts`, the one place where a segmentation plugs in):

- a TRX with groups: each group is a part named by its group name (recognition reads the name as it
  reads a file name). A streamline in several groups is encoded once, in the first of its groups by
  the file's order of groups; the streamlines in no group form one more part, `UNGROUPED` (``"ungrouped"``,
  or ``"ungrouped_2"``... if a group has that name). Every group's member list is recorded as the file
  had it, so decoding restores each group exactly, whatever part its members were encoded in.
- otherwise: ``segment(bundle)`` when given (a list of ``(name, indices)``), else the whole file as
  one part named by the file.

Each part is registered and encoded on its own (a `vqdiff.latents.Latents`); the subject keeps which
streamlines of the file each part holds, so decoding puts every streamline back at its place.

The file (`Subject.save`, ``.vqlat``) is a safetensors file whose metadata says ``format:
vqdiff-subject``, ``format_version: 1`` (readers refuse others) and holds, as JSON, the file's header,
source (format, name, sha256), streamline count, the model, and every part's name and own latents
metadata (registration, source, fidelity...); the tensors are each part's latents tensors under
``part.<i>.`` plus ``part.<i>.members`` (its streamlines' indices in the file), and the file's carried
data (``carried.<groups|dps|dpv>.<k>``, names in the ``carried`` metadata). `load_latents` reads either
kind of file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, SpatialHeader
from .errors import LatentsFormatError
from .fileio import safetensors_metadata, safetensors_parts, save_file
from .latents import FORMAT as LATENTS_FORMAT
from .latents import Latents, carried_problems, carried_tensors, optional_metadata, read_carried

FORMAT = "vqdiff-subject"
FORMAT_VERSION = 1
READ_VERSIONS = (1,)
UNGROUPED = "ungrouped"
MAX_PARTS = 10_000

Parts = list[tuple[str, np.ndarray]]


def group_parts(bundle: Bundle) -> Parts:
    """The parts of a file with groups (module doc: first group by file order, then `UNGROUPED`)."""
    n = len(bundle.streamlines)
    owner = np.full(n, -1, np.int64)
    names = list(bundle.groups)
    for k, members in enumerate(bundle.groups.values()):
        idx = np.asarray(members, np.int64)
        free = idx[owner[idx] < 0]
        owner[free] = k
    parts = [(name, np.flatnonzero(owner == k)) for k, name in enumerate(names)]
    parts = [(name, idx) for name, idx in parts if idx.size]
    rest = np.flatnonzero(owner < 0)
    if rest.size:
        name, i = UNGROUPED, 1
        while name in bundle.groups:
            i += 1
            name = f"{UNGROUPED}_{i}"
        parts.append((name, rest))
    return parts


def subject_parts(bundle: Bundle, *, segment: Callable[[Bundle], Parts] | None = None) -> Parts:
    """A file's parts ``[(name, indices into its streamlines)]``, each encoded on its own: its groups when
    it has some (`group_parts`), else ``segment(bundle)`` when given (where a segmentation of a
    multi-bundle file plugs in), else the whole file as one part named by the file."""
    if bundle.groups:
        return group_parts(bundle)
    if segment is not None:
        return segment(bundle)
    return [(bundle.name or "bundle", np.arange(len(bundle.streamlines), dtype=np.int64))]


def check_parts(parts: Parts, n: int) -> list[tuple[str, np.ndarray]]:
    """Refuse parts that are not a partition of the ``n`` streamlines (each exactly once), or unnamed/duplicate."""
    out, seen = [], np.zeros(n, np.int64)
    for name, idx in parts:
        idx = np.asarray(idx, np.int64)
        if not name or idx.ndim != 1 or idx.size == 0 or idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"part {name!r}: expected a name and a non-empty 1-D array of indices in [0, {n})")
        seen[idx] += 1
        out.append((str(name), idx))
    names = [p[0] for p in out]
    if len(set(names)) != len(names) or not (seen == 1).all():
        raise ValueError(f"parts must have distinct names and hold every one of the {n} streamlines exactly once "
                         f"({int((seen == 0).sum())} in none, {int((seen > 1).sum())} in several)")
    return out


def part_bundle(bundle: Bundle, name: str, indices: np.ndarray) -> Bundle:
    """The streamlines ``indices`` of ``bundle`` as a bundle named ``name`` (no carried data: the subject keeps it)."""
    return Bundle([bundle.streamlines[i] for i in np.asarray(indices).tolist()], bundle.header,
                  source_format=bundle.source_format, name=name)


@dataclass
class Part:
    name: str
    members: np.ndarray  # (n,) int64: the part's streamlines' indices in the file, in the part's order
    latents: Latents


@dataclass
class Subject:
    """A file encoded part by part (module doc). ``carried``: the file's groups, dps and dpv."""

    parts: list[Part]
    n_streamlines: int
    header: SpatialHeader
    source: dict[str, Any] = field(default_factory=dict)
    carried: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parts]

    def __getitem__(self, name: str) -> Latents:
        for p in self.parts:
            if p.name == name:
                return p.latents
        raise KeyError(f"no bundle {name!r} in this subject; it holds {self.names}")

    @property
    def model(self) -> dict[str, Any]:
        return self.parts[0].latents.model if self.parts else {}

    @property
    def fidelity(self) -> dict[str, dict[str, Any]]:
        """Every bundle's measured fidelity (empty records when encoded without it)."""
        return {p.name: dict(p.latents.fidelity) for p in self.parts}

    def n_points(self) -> np.ndarray:
        """(N,) every streamline's original point count, in file order."""
        out = np.zeros(self.n_streamlines, np.int64)
        for p in self.parts:
            out[p.members] = p.latents.n_points
        return out

    def _check(self) -> None:
        problems = []
        if not self.parts or len(self.parts) > MAX_PARTS:
            problems.append(f"a subject holds 1 to {MAX_PARTS} bundles, this one {len(self.parts)}")
        else:
            try:
                check_parts([(p.name, p.members) for p in self.parts], self.n_streamlines)
            except ValueError as exc:
                problems.append(str(exc))
            problems += [f"bundle {p.name!r} has {p.latents.n_streamlines} streamlines for {len(p.members)} members"
                         for p in self.parts if p.latents.n_streamlines != len(p.members)]
            if len({p.latents.model.get("sha256") for p in self.parts}) > 1:
                problems.append("its bundles were encoded by different models")
        if not problems and self.carried:
            problems += carried_problems(self.carried, self.n_streamlines, int(self.n_points().sum()))
        if problems:
            raise LatentsFormatError("inconsistent subject latents file: " + "; ".join(problems))

    # ------------------------------------------------------------------ serialisation
    def to_parts(self) -> list:
        self._check()
        tensors: dict[str, np.ndarray] = {}
        meta_parts = []
        for i, p in enumerate(self.parts):
            tensors.update({f"part.{i}.{k}": v for k, v in p.latents._tensors().items()})
            tensors[f"part.{i}.members"] = np.ascontiguousarray(p.members, np.int64)
            meta_parts.append({"name": p.name, "metadata": p.latents._metadata()})
        tensors.update(carried_tensors(self.carried))
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "subject": json.dumps({"n_streamlines": int(self.n_streamlines), "header": self.header.to_dict(),
                                       "source": self.source, "model": self.model}),
                "parts": json.dumps(meta_parts), **optional_metadata(self.carried, {})}
        return safetensors_parts(tensors, meta)

    def to_bytes(self) -> bytes:
        return b"".join(self.to_parts())

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        return save_file(path, self.to_parts, overwrite=overwrite)

    @classmethod
    def from_bytes(cls, data: bytes) -> Subject:
        meta = _metadata(data)
        if meta.get("format") != FORMAT:
            raise LatentsFormatError(f"not a {FORMAT} file (format {meta.get('format')!r})")
        if meta.get("format_version") not in {str(v) for v in READ_VERSIONS}:
            raise LatentsFormatError(f"subject format_version {meta.get('format_version')!r} is not supported; "
                                     f"this vqdiff reads versions {', '.join(map(str, READ_VERSIONS))}")
        from safetensors import SafetensorError
        from safetensors.numpy import load

        try:
            tensors = load(bytes(data))
        except (SafetensorError, ValueError) as e:
            raise LatentsFormatError(f"unreadable subject tensors: {e}") from e
        try:
            head = json.loads(meta["subject"])
            parts = []
            for i, entry in enumerate(json.loads(meta["parts"])):
                prefix = f"part.{i}."
                own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                lat = Latents._from_parts(own, {str(k): str(v) for k, v in entry["metadata"].items()})
                parts.append(Part(str(entry["name"]), own["members"].astype(np.int64), lat))
            obj = cls(parts, int(head["n_streamlines"]), SpatialHeader.from_dict(head["header"]),
                      dict(head.get("source", {})), read_carried(tensors, meta), int(meta["format_version"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LatentsFormatError(f"subject metadata is incomplete or invalid: {e}") from e
        obj._check()
        return obj

    @classmethod
    def load(cls, path: str | os.PathLike) -> Subject:
        path = Path(path)
        try:
            return cls.from_bytes(path.read_bytes())
        except LatentsFormatError as e:
            raise LatentsFormatError(f"{path}: {e}") from e


def _metadata(data: bytes) -> dict[str, Any]:
    accepted = f"a {LATENTS_FORMAT} or {FORMAT} file (safetensors) written by vqdiff encode"
    return safetensors_metadata(data, (LATENTS_FORMAT, FORMAT), accepted, LatentsFormatError)


def load_latents(source: str | os.PathLike | bytes) -> Latents | Subject:
    """A ``.vqlat`` file (path or bytes) as `Latents` (one bundle) or `Subject` (several), by its format tag."""
    data = bytes(source) if isinstance(source, bytes | bytearray | memoryview) else Path(source).read_bytes()
    try:
        if _metadata(data).get("format") == FORMAT:
            return Subject.from_bytes(data)
        return Latents.from_bytes(data)
    except LatentsFormatError as e:
        if isinstance(source, bytes | bytearray | memoryview):
            raise
        raise LatentsFormatError(f"{source}: {e}") from e


@dataclass
class SubjectState:
    """What `assemble_subject` needs besides the engine's output: each part's `EncodeState` and group count."""

    parts: list[tuple[str, np.ndarray]]
    states: list[Any]
    sizes: list[int]
    n_streamlines: int
    header: SpatialHeader
    source: dict[str, Any]
    carried: dict[str, dict[str, np.ndarray]]
    warnings: list[tuple[str, dict]] = field(default_factory=list)


def prepare_subject(pipeline, bundle: Bundle, *, parts: Parts | None = None, input_sha256: str | None = None,
                    register: str = "auto") -> tuple[np.ndarray, SubjectState]:
    """``pipeline.prepare_encode`` of every part of ``bundle`` (`subject_parts` by default) -> (the engine input
    of all parts, concatenated, and the state). Each part is registered and recognised on its own."""
    from .carried import check_carried

    bundle.validate()
    check_carried(bundle)
    n = len(bundle.streamlines)
    parts = check_parts(subject_parts(bundle) if parts is None else parts, n)
    if len(parts) > MAX_PARTS:
        raise ValueError(f"{len(parts)} parts; a subject holds at most {MAX_PARTS}")
    xs, states = [], []
    for name, idx in parts:
        x, st = pipeline.prepare_encode(part_bundle(bundle, name, idx), register=register)
        xs.append(x)
        states.append(st)
    source = {"format": bundle.source_format, "name": bundle.name}
    if input_sha256:
        source["input_sha256"] = input_sha256
    carried = {k: dict(getattr(bundle, k)) for k in ("groups", "dps", "dpv") if getattr(bundle, k)}
    return np.concatenate(xs), SubjectState(parts, states, [len(x) for x in xs], n, bundle.header, source, carried)


def _split(array: np.ndarray | None, sizes: list[int]) -> list:
    return [None] * len(sizes) if array is None else np.split(array, np.cumsum(sizes)[:-1])


def assemble_subject(pipeline, state: SubjectState, latents: np.ndarray, indices: np.ndarray | None,
                     decoded: np.ndarray | None = None) -> Subject:
    """The `Subject` from the engine's output for all parts (``decoded``: record each part's fidelity);
    every part's warnings are collected in ``state.warnings`` as ``(name, warning)``."""
    out = []
    for (name, idx), st, lat, ind, dec in zip(state.parts, state.states, _split(latents, state.sizes),
                                              _split(indices, state.sizes), _split(decoded, state.sizes),
                                              strict=True):
        out.append(Part(name, idx, pipeline.assemble_latents(st, lat, ind, dec)))
        state.warnings += [(name, w) for w in st.warnings]
    return Subject(out, state.n_streamlines, state.header, state.source, state.carried)


def decode_input(pipeline, subject: Subject, *, strict: bool = True) -> np.ndarray:
    """The decoder input of every part, concatenated (after the model-identity check)."""
    return np.concatenate([pipeline.prepare_decode(p.latents, strict=strict) for p in subject.parts])


def assemble_bundles(pipeline, subject: Subject, groups: np.ndarray, *, restore_points: bool = False
                     ) -> dict[str, Bundle]:
    """The decoder's output for all parts -> every part's bundle by name (its order, the file's space, its
    rows of the file's dps, and of its dpv with ``restore_points``)."""
    from .carried import take

    sizes, counts = [p.latents.n_groups for p in subject.parts], subject.n_points()
    out = {}
    for p, g in zip(subject.parts, _split(groups, sizes), strict=True):
        out[p.name] = b = pipeline.assemble_bundle(p.latents, g, restore_points=restore_points)
        if subject.carried.get("dps") or subject.carried.get("dpv"):  # the part's rows of the file's data
            own = take(subject.carried, p.members, counts)
            b.dps, b.dpv = own["dps"], own["dpv"] if restore_points else {}
    return out


def assemble_file(subject: Subject, bundles: dict[str, Bundle], *, restore_points: bool = False) -> Bundle:
    """The decoded ``bundles`` (by part name) put back into the file: every streamline at its place, the
    file's header, groups and dps, and its dpv when ``restore_points`` (else named in a warning)."""
    import logging

    streamlines: list = [None] * subject.n_streamlines
    for p in subject.parts:
        for j, i in enumerate(p.members.tolist()):
            streamlines[i] = bundles[p.name].streamlines[j]
    c = subject.carried
    dpv = dict(c.get("dpv", {})) if restore_points else {}
    if c.get("dpv") and not restore_points:
        logging.getLogger(__name__).warning(
            "per-point data %s not restored: the decoded streamlines have 64 points, the data the original counts; "
            "decode with restore_points to get them back", ", ".join(repr(k) for k in c["dpv"]))
    return Bundle(streamlines, subject.header, source_format="memory", name=subject.source.get("name", ""),
                  groups=dict(c.get("groups", {})), dps=dict(c.get("dps", {})), dpv=dpv)
