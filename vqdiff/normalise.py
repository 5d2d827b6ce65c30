"""Normalisation of RAS mm coordinates into the model's [-1, 1]-like space, and its inverse.

The statistics are fitted on training data only and stored with the model (checkpoint
``config.json``, export manifest, every latents file). The map is isotropic (one scale for the
three axes) so shapes are not distorted: ``x_norm = (x - center) / scale`` with ``center`` the
per-axis mid-range and ``scale`` the largest per-axis half-range of the training points, which
puts the training data in [-1, 1] (the authors' convention). The per-axis training range is kept
so that callers can warn when new data falls far outside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Normalisation:
    center: tuple[float, float, float]
    scale: float
    data_min: tuple[float, float, float]
    data_max: tuple[float, float, float]
    kind: str = "minmax_isotropic"

    @classmethod
    def fit(cls, points: np.ndarray) -> Normalisation:
        """Fit on training coordinates of any shape (..., 3) in RAS mm."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        if len(pts) == 0 or not np.all(np.isfinite(pts)):
            raise ValueError("normalisation needs at least one finite (x, y, z) training point")
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        scale = float(np.max(hi - lo) / 2.0)
        if scale <= 0:
            raise ValueError("training points have zero extent; cannot fit a normalisation")
        return cls(tuple(map(float, (lo + hi) / 2.0)), scale, tuple(map(float, lo)), tuple(map(float, hi)))

    @classmethod
    def identity(cls) -> Normalisation:
        return cls((0.0, 0.0, 0.0), 1.0, (-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """RAS mm (..., 3) -> model space (..., 3), float32."""
        return ((np.asarray(x, np.float64) - np.asarray(self.center)) / self.scale).astype(np.float32)

    def invert(self, y: np.ndarray) -> np.ndarray:
        """Model space (..., 3) -> RAS mm (..., 3), float32."""
        return (np.asarray(y, np.float64) * self.scale + np.asarray(self.center)).astype(np.float32)

    def out_of_range(self, points: np.ndarray, *, margin: float = 0.25) -> dict[str, Any] | None:
        """Describe how far ``points`` leave the training range (widened by ``margin`` of its extent).

        Returns None when they stay inside, else a dict with the numbers for a warning.
        """
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        lo, hi = np.asarray(self.data_min), np.asarray(self.data_max)
        pad = margin * (hi - lo)
        p_lo, p_hi = pts.min(axis=0), pts.max(axis=0)
        outside = np.mean(np.any((pts < lo - pad) | (pts > hi + pad), axis=1))
        if outside == 0:
            return None
        return {
            "fraction_points_outside": float(outside),
            "input_min": p_lo.round(3).tolist(),
            "input_max": p_hi.round(3).tolist(),
            "training_min": lo.round(3).tolist(),
            "training_max": hi.round(3).tolist(),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "center": list(self.center),
            "scale": self.scale,
            "data_min": list(self.data_min),
            "data_max": list(self.data_max),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalisation:
        if d.get("kind") != "minmax_isotropic":
            raise ValueError(f"unknown normalisation kind {d.get('kind')!r}; accepted: 'minmax_isotropic'")
        vectors = {k: tuple(map(float, d[k])) for k in ("center", "data_min", "data_max")}
        scale = float(d["scale"])
        if any(len(v) != 3 for v in vectors.values()) or not np.isfinite([*sum(vectors.values(), ()), scale]).all() \
                or not scale > 0:
            raise ValueError(f"normalisation needs finite 3-vectors center, data_min, data_max and a scale > 0; got {d}")
        return cls(vectors["center"], scale, vectors["data_min"], vectors["data_max"])
