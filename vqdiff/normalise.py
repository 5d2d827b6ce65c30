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


OOD_MARGIN = 0.25  # fraction of the training extent added on each side before warning


def model_input(groups: np.ndarray, normalisation: Normalisation) -> np.ndarray:
    """Oriented groups (G, S, P, 3) RAS mm -> normalised model input (G, 3, S, P) float32, one axis at a
    time: the same numbers as ``groups_to_model(normalisation.apply(groups))`` without the temporaries."""
    g, s, p, _ = groups.shape
    x = np.empty((g, 3, s, p), np.float32)
    center = np.asarray(normalisation.center, np.float64)
    for a in range(3):
        x[:, a] = (groups[..., a].astype(np.float64) - center[a]) / normalisation.scale
    return x


def range_warnings(x: np.ndarray, groups: np.ndarray, normalisation: Normalisation,
                   real: np.ndarray | None = None) -> list[dict[str, Any]]:
    """A warning with the numbers when the points leave the model's training range.

    ``x`` is the model input (G, 3, S, P) (its per-channel extremes give the bounding box cheaply),
    ``groups`` the same points in RAS mm (G, S, P, 3), ``real`` the mask of real slots (pads copy real
    streamlines, so they never widen the box).
    """
    lo, hi = np.asarray(normalisation.data_min), np.asarray(normalisation.data_max)
    pad = OOD_MARGIN * (hi - lo)
    center, scale = np.asarray(normalisation.center), normalisation.scale
    box_lo = np.array([x[:, a].min() for a in range(3)], np.float64) * scale + center
    box_hi = np.array([x[:, a].max() for a in range(3)], np.float64) * scale + center
    if (box_lo >= lo - pad).all() and (box_hi <= hi + pad).all():
        return []  # the bounding box is inside: skip the per-point statistics
    pts = groups.reshape(-1, groups.shape[2], 3)
    info = normalisation.out_of_range(pts if real is None else pts[real], margin=OOD_MARGIN)
    if info is None:
        return []
    return [{"code": "out_of_training_range",
             "message": f"{_percent(info['fraction_points_outside'])} of the points lie outside the model's "
                        f"training range (widened by {100 * OOD_MARGIN:.0f}% of its extent on each side); the "
                        "reconstruction may be poor. Is the bundle in RAS mm of a comparable space?", **info}]


def _percent(fraction: float) -> str:
    """``0.0004`` -> ``"0.04%"``, ``0.05`` -> ``"5.0%"``, below 0.01% ``"<0.01%"`` (never a "0.0%" that warns)."""
    pct = 100 * float(fraction)
    return f"{pct:.1f}%" if pct >= 1 else f"{pct:.2f}%" if pct >= 0.01 else "<0.01%"
