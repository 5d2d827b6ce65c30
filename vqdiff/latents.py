"""`Latents`: a bundle's encoding, self-describing and saved as a versioned safetensors file.

A latents file holds the tensors ``latents`` (G, D, 16, 16) float32, ``order`` and ``pad_mask``
(G*64,), ``flipped`` and ``n_points`` (N,), optionally ``indices`` (G, 16, 16) int64 (argmax code
per position), ``transform`` (4, 4) float64 (input RAS mm -> model space; the identity when the
bundle was encoded as given), and a JSON header in the safetensors metadata: format name and
version, the model (id, kind, sha256), the normalisation, the input's spatial header, the source
(format, name, sha256 of the file), the registration (recognised bundle, residual, method) and the
provenance (engine backend and variant, vqdiff and canonicalisation versions). Optional, in version 2
files (absent keys leave the bytes as before): ``fidelity`` (the encoding's measured reconstruction,
`vqdiff.quality.fidelity`) and ``carried`` (names of the file's groups, dps and dpv, whose arrays are
the tensors ``carried.<groups|dps|dpv>.<k>``). A subject (several bundles) is `vqdiff.subject`'s file.
Readers refuse other formats and unknown versions; version 1 files (no transform) read as identity.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import SpatialHeader
from .errors import LatentsFormatError
from .fileio import safetensors_metadata, safetensors_parts, save_file
from .geometry import GROUP_SIZE
from .normalise import Normalisation

FORMAT = "vqdiff-latents"
FORMAT_VERSION = 2  # 2: + transform (4, 4) and registration; version 1 files still read (identity)
READ_VERSIONS = (1, 2)
SUFFIX = ".vqlat"
_TENSORS = ("latents", "order", "pad_mask", "flipped", "n_points")
MAX_POINTS_PER_STREAMLINE = 1_000_000  # far above any tractogram's; bounds what restore_points allocates


@dataclass
class Latents:
    latents: np.ndarray  # (G, D, 16, 16) float32
    order: np.ndarray  # (G*64,) int64
    pad_mask: np.ndarray  # (G*64,) bool
    flipped: np.ndarray  # (N,) bool
    n_points: np.ndarray  # (N,) int64
    header: SpatialHeader
    model: dict[str, Any]  # {"id", "kind", "sha256"}
    normalisation: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)  # {"format", "name"}
    indices: np.ndarray | None = None  # (G, 16, 16) int64
    transform: np.ndarray | None = None  # (4, 4) float64 input RAS mm -> model space; None: identity
    registration: dict[str, Any] = field(default_factory=dict)  # {"template", "residual_mm", "method", ...}
    provenance: dict[str, Any] = field(default_factory=dict)  # {"engine": {"backend", "variant"}, "vqdiff", ...}
    format_version: int = FORMAT_VERSION
    carried: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # {"groups", "dps", "dpv"}: name -> array
    fidelity: dict[str, Any] = field(default_factory=dict)  # measured reconstruction (`vqdiff.quality.fidelity`)

    @property
    def matrix(self) -> np.ndarray:
        """The input -> model space transform (identity when none was recorded)."""
        return np.eye(4) if self.transform is None else np.asarray(self.transform, np.float64)

    @property
    def n_streamlines(self) -> int:
        return int(self.flipped.shape[0])

    @property
    def n_groups(self) -> int:
        return int(self.latents.shape[0])

    def _check(self) -> None:
        """Refuse inconsistent latents up front (shapes, slots, point counts, the model's hash), so that
        nothing downstream fails on them. Counts are summed as Python ints (no int64 overflow)."""
        g = self.latents.shape[0] if self.latents.ndim == 4 else -1
        slots = self.order.shape[0] if self.order.ndim == 1 else -1
        n = self.flipped.shape[0] if self.flipped.ndim == 1 else -1
        problems = []
        if self.latents.ndim != 4:
            problems.append(f"latents must be 4-D (G, D, H, W), got shape {self.latents.shape}")
        elif g == 0:
            problems.append("latents hold no groups")
        elif slots != g * GROUP_SIZE:
            problems.append(f"order has {slots} slots; {g} groups of {GROUP_SIZE} need {g * GROUP_SIZE}")
        if self.pad_mask.shape != self.order.shape:
            problems.append(f"pad_mask shape {self.pad_mask.shape} != order shape {self.order.shape}")
        if n < 0 or self.n_points.shape != (n,):
            problems.append(f"n_points shape {self.n_points.shape} != flipped's ({n},)")
        elif n and not (int(self.n_points.min()) >= 2 and int(self.n_points.max()) <= MAX_POINTS_PER_STREAMLINE):
            problems.append(f"n_points must lie in [2, {MAX_POINTS_PER_STREAMLINE}] (got {int(self.n_points.min())}"
                            f"..{int(self.n_points.max())})")
        if self.indices is not None and self.indices.shape != (g, *self.latents.shape[2:]):
            problems.append(f"indices shape {self.indices.shape} != (G, H, W) of the latents")
        if not problems and int(self.pad_mask.sum()) != n:
            problems.append(f"pad_mask marks {int(self.pad_mask.sum())} real slots for {n} streamlines")
        elif not problems and n and not np.array_equal(np.sort(self.order[self.pad_mask]), np.arange(n)):
            problems.append("order is not a permutation of the streamlines")
        if not problems and self.order.size and not (0 <= int(self.order.min()) and int(self.order.max()) < n):
            problems.append(f"order points outside the {n} streamlines")
        t = self.matrix
        if t.shape != (4, 4) or not np.isfinite(t).all() or not np.array_equal(t[3], [0, 0, 0, 1]) \
                or abs(np.linalg.det(t[:3, :3])) < 1e-9:
            problems.append(f"transform must be a finite invertible affine 4x4, got {t.tolist()}")
        if not problems and self.carried:
            problems += carried_problems(self.carried, n, self.total_points)
        sha = self.model.get("sha256") if isinstance(self.model, dict) else None
        if not (isinstance(sha, str) and len(sha) == 64):
            problems.append("the model's weights hash (model.sha256, 64 hex digits) is missing: without it the "
                            "latents could be decoded by any model")
        if problems:
            raise LatentsFormatError("inconsistent latents file: " + "; ".join(problems))

    @property
    def total_points(self) -> int:
        """Points of the decoded bundle with ``restore_points`` (a Python int: no overflow)."""
        return sum(int(k) for k in self.n_points.tolist())

    # ------------------------------------------------------------------ serialisation
    def _tensors(self) -> dict[str, np.ndarray]:
        t = {
            "latents": np.ascontiguousarray(self.latents, np.float32),
            "order": np.ascontiguousarray(self.order, np.int64),
            "pad_mask": np.ascontiguousarray(self.pad_mask, np.uint8),
            "flipped": np.ascontiguousarray(self.flipped, np.uint8),
            "n_points": np.ascontiguousarray(self.n_points, np.int64),
        }
        if self.indices is not None:
            t["indices"] = np.ascontiguousarray(self.indices, np.int64)
        t["transform"] = np.ascontiguousarray(self.matrix, np.float64)
        t.update(carried_tensors(self.carried))
        return t

    def _metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "model": json.dumps(self.model),
            "normalisation": json.dumps(self.normalisation),
            "header": json.dumps(self.header.to_dict()),
            "source": json.dumps(self.source),
            "registration": json.dumps(self.registration),
            "provenance": json.dumps(self.provenance),
            **optional_metadata(self.carried, self.fidelity),
        }

    def to_bytes(self) -> bytes:
        return b"".join(self.to_parts())

    def to_parts(self) -> list:
        """The file's bytes as buffers (`vqdiff.fileio.safetensors_parts`: the tensors not copied), to
        write or hash one after the other; ``b"".join`` of them is `to_bytes`."""
        self._check()
        return safetensors_parts(self._tensors(), self._metadata())

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write atomically (temp file + rename); refuse to overwrite unless asked."""
        return save_file(path, self.to_parts, overwrite=overwrite)

    @classmethod
    def from_bytes(cls, data: bytes) -> Latents:
        from safetensors import SafetensorError
        from safetensors.numpy import load

        metadata = _read_metadata(data)
        try:
            tensors = load(bytes(data))
        except (SafetensorError, ValueError) as e:
            raise LatentsFormatError(f"unreadable latents tensors: {e}") from e
        return cls._from_parts(tensors, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Latents:
        path = Path(path)
        try:
            return cls.from_bytes(path.read_bytes())
        except LatentsFormatError as e:
            raise LatentsFormatError(f"{path}: {e}") from e

    @classmethod
    def _from_parts(cls, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> Latents:
        missing = [k for k in _TENSORS if k not in tensors]
        if missing:
            raise LatentsFormatError(f"latents file lacks tensor(s) {missing}; expected {list(_TENSORS)}")
        try:
            header = SpatialHeader.from_dict(json.loads(meta["header"]))
            obj = cls(
                latents=tensors["latents"].astype(np.float32, copy=False),
                order=tensors["order"].astype(np.int64, copy=False),
                pad_mask=tensors["pad_mask"].astype(bool),
                flipped=tensors["flipped"].astype(bool),
                n_points=tensors["n_points"].astype(np.int64, copy=False),
                header=header,
                model=json.loads(meta["model"]),
                normalisation=json.loads(meta["normalisation"]),
                source=json.loads(meta.get("source", "{}")),
                indices=tensors.get("indices"),
                transform=tensors.get("transform"),
                registration=json.loads(meta.get("registration", "{}")),
                provenance=json.loads(meta.get("provenance", "{}")),
                format_version=int(meta["format_version"]),
                carried=read_carried(tensors, meta),
                fidelity=json.loads(meta.get("fidelity", "{}")),
            )
            Normalisation.from_dict(obj.normalisation)  # usable for decoding, or refused here
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LatentsFormatError(f"latents metadata is incomplete or invalid: {e}") from e
        obj._check()
        return obj


CARRIED_KINDS = ("groups", "dps", "dpv")


def carried_tensors(carried: dict[str, dict[str, np.ndarray]], prefix: str = "") -> dict[str, np.ndarray]:
    """The carried arrays as tensors ``<prefix>carried.<kind>.<k>`` (names in `optional_metadata`)."""
    out = {}
    for kind in CARRIED_KINDS:
        for k, v in enumerate(carried.get(kind, {}).values()):
            arr = np.asarray(v)
            out[f"{prefix}carried.{kind}.{k}"] = np.ascontiguousarray(arr.astype(np.uint8) if arr.dtype == bool else arr)
    return out


def optional_metadata(carried: dict, fidelity: dict) -> dict[str, str]:
    """The metadata keys a file has only when it carries data or a fidelity record (a file without them
    has the same bytes as before they existed)."""
    out = {}
    if any(carried.get(k) for k in CARRIED_KINDS):
        out["carried"] = json.dumps({k: list(carried.get(k, {})) for k in CARRIED_KINDS})
    if fidelity:
        out["fidelity"] = json.dumps(fidelity)
    return out


def read_carried(tensors: dict[str, np.ndarray], meta: dict[str, str], prefix: str = "") -> dict[str, dict]:
    if "carried" not in meta:
        return {}
    names = json.loads(meta["carried"])
    return {kind: {str(name): tensors[f"{prefix}carried.{kind}.{k}"] for k, name in enumerate(names.get(kind, []))}
            for kind in CARRIED_KINDS}


def carried_problems(carried: dict, n: int, points: int) -> list[str]:
    """What does not fit ``n`` streamlines of ``points`` points in carried data (empty when all fits)."""
    from .carried import check_group
    from .errors import BundleFormatError

    problems = []
    for name, members in carried.get("groups", {}).items():
        try:
            check_group(name, members, n)
        except BundleFormatError as exc:
            problems.append(str(exc))
    for kind, rows in (("dps", n), ("dpv", points)):
        problems += [f"{kind} {name!r} has {np.shape(v)[0] if np.ndim(v) else 0} rows, not {rows}"
                     for name, v in carried.get(kind, {}).items() if np.ndim(v) not in (1, 2) or len(v) != rows]
    return problems


def _read_metadata(data: bytes) -> dict[str, str]:
    """Parse and check the safetensors JSON header without touching the tensors."""
    accepted = f"a {FORMAT} file (safetensors, version {' or '.join(map(str, READ_VERSIONS))}) written by vqdiff encode"
    meta = safetensors_metadata(data, (FORMAT,), accepted, LatentsFormatError)
    if meta.get("format_version") not in {str(v) for v in READ_VERSIONS}:
        raise LatentsFormatError(
            f"latents format_version {meta.get('format_version')!r} is not supported; "
            f"this vqdiff reads versions {', '.join(map(str, READ_VERSIONS))}"
        )
    return meta
