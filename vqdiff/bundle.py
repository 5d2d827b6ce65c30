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
    """

    streamlines: list[np.ndarray]
    header: SpatialHeader
    source_format: str = "memory"
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.streamlines)

    def validate(self, *, where: str | None = None) -> Bundle:
        """Check the invariants every consumer relies on; raise `BundleFormatError` otherwise."""
        validate_streamlines(self.streamlines, where=where)
        return self


def validate_streamlines(streamlines, *, where: str | None = None) -> None:
    """Raise `BundleFormatError` unless ``streamlines`` is a non-empty list of finite (N>=2, 3) arrays."""
    if len(streamlines) == 0:
        raise BundleFormatError(
            "the tractogram holds no streamlines; a bundle needs at least 1 streamline", reason="empty", path=where
        )
    for i, s in enumerate(streamlines):
        s = np.asarray(s)
        if s.ndim != 2 or s.shape[1] != 3:
            raise BundleFormatError(
                f"streamline {i} has shape {s.shape}; each streamline must be an (N, 3) array of points",
                reason="bad_shape",
                path=where,
            )
        if s.shape[0] < 2:
            raise BundleFormatError(
                f"streamline {i} has {s.shape[0]} point(s); every streamline needs at least 2 points",
                reason="too_few_points",
                path=where,
            )
        if not np.all(np.isfinite(s)):
            raise BundleFormatError(
                f"streamline {i} has NaN or infinite coordinates; only finite RAS mm coordinates are accepted",
                reason="non_finite",
                path=where,
            )
