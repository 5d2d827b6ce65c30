"""The in-memory bundle: streamlines in RAS mm plus the spatial header they came with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import BundleFormatError

FORMATS = ("trk", "tck", "trx")


@dataclass(frozen=True)
class SpatialHeader:
    """Where a tractogram lives: the reference grid and its voxel → RAS mm affine.

    Attributes
    ----------
    affine : (4, 4) float64 array
        Voxel (corner or centre as nibabel's ``voxel_to_rasmm``) → RAS mm.
    dimensions : tuple of 3 int
        Reference grid size in voxels.
    voxel_sizes : tuple of 3 float
        Voxel size in mm.
    voxel_order : str
        Three-letter axis code of the grid, e.g. ``"RAS"`` or ``"LPS"``.
    """

    affine: np.ndarray
    dimensions: tuple[int, int, int]
    voxel_sizes: tuple[float, float, float]
    voxel_order: str = "RAS"

    def to_dict(self) -> dict[str, Any]:
        return {
            "affine": np.asarray(self.affine, dtype=np.float64).tolist(),
            "dimensions": [int(d) for d in self.dimensions],
            "voxel_sizes": [float(v) for v in self.voxel_sizes],
            "voxel_order": str(self.voxel_order),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpatialHeader:
        affine = np.asarray(d["affine"], dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise BundleFormatError(
                f"header affine must be a finite 4x4 matrix, got shape {affine.shape}", reason="bad_reference"
            )
        return cls(
            affine=affine,
            dimensions=tuple(int(x) for x in d["dimensions"]),
            voxel_sizes=tuple(float(x) for x in d["voxel_sizes"]),
            voxel_order=str(d.get("voxel_order", "RAS")),
        )

    @classmethod
    def identity(cls, dimensions=(256, 256, 256)) -> SpatialHeader:
        """A 1 mm grid whose voxel coordinates equal RAS mm (used for synthetic bundles)."""
        return cls(np.eye(4), tuple(dimensions), (1.0, 1.0, 1.0), "RAS")


@dataclass
class Bundle:
    """A bundle of streamlines in RAS mm.

    Attributes
    ----------
    streamlines : list of (N_i, 3) float32 arrays
        Coordinates in RAS mm (nibabel's world space), N_i >= 2, all finite.
    header : SpatialHeader
        The reference space the file was written in; writers restore it.
    source_format : str
        ``"trk"``, ``"tck"``, ``"trx"`` or ``"memory"``.
    name : str
        Bundle name (file stem by default), e.g. ``"IFOF_R"``.
    groups, dps, dpv : dict
        What the file carries besides the streamlines (`vqdiff.carried`): group name -> member
        indices; per-streamline data (N, ...) (TRX ``dps``, TRK properties); per-point data (M, ...)
        over the concatenated points (TRX ``dpv``, TRK scalars). Empty when the file has none.
    """

    streamlines: list[np.ndarray]
    header: SpatialHeader
    source_format: str = "memory"
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    dps: dict[str, np.ndarray] = field(default_factory=dict)
    dpv: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.streamlines)

    def validate(self, *, where: str | None = None) -> Bundle:
        """Check the invariants every consumer relies on; raise `BundleFormatError` otherwise."""
        validate_streamlines(self.streamlines, where=where)
        return self


def validate_streamlines(streamlines, *, where: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Raise `BundleFormatError` unless ``streamlines`` is a non-empty list of finite (N>=2, 3) arrays.

    Returns the points concatenated, (sum N_i, 3) in their own dtype, and the point counts (N,) int64,
    so that callers need not concatenate again. The checks are vectorised (the shapes in one pass, one
    `np.concatenate`, one finiteness test); the error names the first bad streamline, and for one
    streamline the shape is checked before the point count before finiteness.
    """
    n = len(streamlines)
    if n == 0:
        raise BundleFormatError(
            "the tractogram holds no streamlines; a bundle needs at least 1 streamline", reason="empty", path=where
        )
    points, first_bad = None, n
    try:  # fast path: the concatenation succeeds as (M, 3) iff every streamline is an (N_i, 3) array
        cat = np.concatenate(streamlines)
        if cat.ndim == 2 and cat.shape[1] == 3:
            points, lengths = cat, np.fromiter(map(len, streamlines), np.int64, n)
    except ValueError:
        pass
    if points is None:  # locate the first streamline that is not (N_i, 3); check those before it
        shapes = [np.shape(s) for s in streamlines]
        first_bad = next((i for i, sh in enumerate(shapes) if len(sh) != 2 or sh[1] != 3), n)
        lengths = np.array([sh[0] for sh in shapes[:first_bad]], np.int64)
        points = np.concatenate(streamlines[:first_bad]) if first_bad else np.zeros((0, 3))
    few = np.flatnonzero(lengths < 2)
    first_few = int(few[0]) if few.size else n
    first_nan = n
    if not np.isfinite(np.sum(points)):  # cheap test first (a finite sum means finite points)
        rows = np.flatnonzero(~np.isfinite(points).all(axis=1))
        if rows.size:
            first_nan = int(np.searchsorted(np.cumsum(lengths), rows[0], side="right"))
    i = min(first_bad, first_few, first_nan)
    if i == n:
        return points, lengths
    if i == first_bad:
        raise BundleFormatError(
            f"streamline {i} has shape {np.shape(streamlines[i])}; each streamline must be an (N, 3) array of points",
            reason="bad_shape",
            path=where,
        )
    if i == first_few:
        raise BundleFormatError(
            f"streamline {i} has {int(lengths[i])} point(s); every streamline needs at least 2 points",
            reason="too_few_points",
            path=where,
        )
    raise BundleFormatError(
        f"streamline {i} has NaN or infinite coordinates; only finite RAS mm coordinates are accepted",
        reason="non_finite",
        path=where,
    )
