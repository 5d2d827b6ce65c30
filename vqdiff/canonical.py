"""Canonicalisation: a bundle of streamlines -> groups of 64 x 64 points, and its exact inverse.

The encoder's 2-D convolutions span neighbouring streamlines of a group, so *which* streamlines
share a group, their order inside it and their direction all matter. The rules, in order:

1. **Resample** every streamline to ``num_points`` (64) equidistant points with dipy's
   ``set_number_of_points``.
2. **Orient** (`orientation_flips`): let ``d_i = last_i - first_i`` and ``a`` the principal
   eigenvector of ``sum_i d_i d_i^T`` (sign fixed so its largest-magnitude component is
   positive). A first pass flips streamline *i* when ``d_i . a < 0``. The oriented mean
   streamline ``c`` (the centroid) is then the reference: streamline *i* is finally flipped when
   it is closer to ``c`` reversed than as given (mean point-wise distance, ties keep it as given).
   The rule depends only on the set of streamlines, not on their order in the file.
3. **Order** (`group_order`): streamlines are sorted by their projection on the first principal
   component of the oriented, flattened (num_points * 3) shapes, so each run of 64 consecutive
   streamlines is a slab of similar shapes; inside each group they are sorted again by the
   projection on that group's own first principal component so that neighbours are close.
   Sorting is stable, ties keep file order.
4. **Cut and pad**: consecutive runs of ``group_size`` (64). The last group, if short, is padded
   by *reflection*: the real streamlines r-1, r-2, ..., 0, r-1, ... are repeated (copies of real
   streamlines keep the group in the training distribution and neighbours close at the seam).
   ``pad_mask`` marks the real slots.

`uncanonicalise` undoes 4 -> 2: it keeps only real slots, puts every streamline back at its
original index and reverses the flipped ones. Resampling (1) is not undone unless asked for
(``restore_points=True`` resamples each streamline back to its original point count).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bundle import validate_streamlines
from .errors import BundleFormatError

GROUP_SIZE = 64
NUM_POINTS = 64


@dataclass
class CanonicalGroups:
    """The output of `canonicalise`.

    Attributes
    ----------
    groups : (G, group_size, num_points, 3) float32
        Oriented, ordered, padded streamlines in the input's RAS mm space.
    order : (G * group_size,) int64
        Slot -> index of the input streamline it holds (pads point at the copied streamline).
    pad_mask : (G * group_size,) bool
        True where the slot holds a real streamline, False for padding.
    flipped : (N,) bool
        Per input streamline: reversed by the orientation rule.
    n_points : (N,) int64
        Per input streamline: its point count before resampling.
    """

    groups: np.ndarray
    order: np.ndarray
    pad_mask: np.ndarray
    flipped: np.ndarray
    n_points: np.ndarray

    @property
    def n_streamlines(self) -> int:
        return int(self.flipped.shape[0])

    @property
    def n_groups(self) -> int:
        return int(self.groups.shape[0])


def resample(streamlines, num_points: int = NUM_POINTS) -> np.ndarray:
    """Resample each streamline to ``num_points`` points -> (N, num_points, 3) float32."""
    from dipy.tracking.streamline import set_number_of_points

    if len(streamlines) == 0:
        return np.zeros((0, num_points, 3), np.float32)
    if all(len(s) == num_points for s in streamlines):  # nothing to do (already resampled data)
        return np.stack([np.asarray(s, dtype=np.float32) for s in streamlines])
    arrays = [np.ascontiguousarray(s, dtype=np.float32) for s in streamlines]
    bad = [i for i, a in enumerate(arrays) if not np.any(a[1:] != a[:-1])]
    if bad:  # dipy divides by the arc length and returns uninitialised memory when it is 0
        raise BundleFormatError(
            f"{len(bad)} streamline(s) have zero length (all points identical), e.g. streamline {bad[0]}; "
            "streamlines need at least 2 distinct points to be resampled",
            reason="zero_length",
        )
    return np.stack(set_number_of_points(arrays, nb_points=num_points)).astype(np.float32, copy=False)


def _principal_axis(vectors: np.ndarray) -> np.ndarray:
    """Unit principal eigenvector of sum v v^T, sign fixed: its largest-|.| component is > 0."""
    cov = vectors.T @ vectors
    _, eigvecs = np.linalg.eigh(cov)
    axis = eigvecs[:, -1]
    if axis[np.argmax(np.abs(axis))] < 0:
        axis = -axis
    return axis


def orientation_flips(x: np.ndarray) -> np.ndarray:
    """Which streamlines of ``x`` (N, P, 3) to reverse so that all run the same way -> (N,) bool."""
    x = np.asarray(x, dtype=np.float64)
    d = x[:, -1] - x[:, 0]  # (N, 3)
    flips = d @ _principal_axis(d) < 0
    oriented = np.where(flips[:, None, None], x[:, ::-1], x)
    centroid = oriented.mean(axis=0)  # (P, 3)
    direct = np.linalg.norm(x - centroid, axis=2).mean(axis=1)
    reverse = np.linalg.norm(x[:, ::-1] - centroid, axis=2).mean(axis=1)
    return reverse < direct


def _pc1_projection(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(len(x), -1).astype(np.float64)
    flat = flat - flat.mean(axis=0)
    if len(flat) < 2:
        return np.zeros(len(flat))
    if len(flat) < flat.shape[1]:  # few rows: the SVD is cheaper than the (D, D) eigenproblem
        axis = np.linalg.svd(flat, full_matrices=False)[2][0]
        axis = -axis if axis[np.argmax(np.abs(axis))] < 0 else axis
    else:
        axis = _principal_axis(flat)
    return flat @ axis


def group_order(oriented: np.ndarray, group_size: int = GROUP_SIZE) -> np.ndarray:
    """Permutation (N,) of oriented streamlines (N, P, 3): slabs along PC1, re-sorted per group."""
    perm = np.argsort(_pc1_projection(oriented), kind="stable")
    for start in range(0, len(perm), group_size):
        chunk = perm[start : start + group_size]
        local = np.argsort(_pc1_projection(oriented[chunk]), kind="stable")
        perm[start : start + group_size] = chunk[local]
    return perm


def _reflect_pad(real: int, group_size: int) -> np.ndarray:
    """Slot indices (within the last group's real part) that fill its ``group_size - real`` pads."""
    mirror = np.arange(real - 1, -1, -1)
    reps = -(-(group_size - real) // real)
    return np.tile(mirror, reps)[: group_size - real]


def canonicalise(
    streamlines, *, num_points: int = NUM_POINTS, group_size: int = GROUP_SIZE
) -> CanonicalGroups:
    """Turn a bundle's streamlines into oriented, ordered, padded groups (see the module doc)."""
    validate_streamlines(streamlines)
    n_points = np.array([len(s) for s in streamlines], dtype=np.int64)
    x = resample(streamlines, num_points)  # (N, P, 3)
    flipped = orientation_flips(x)
    oriented = np.where(flipped[:, None, None], x[:, ::-1], x)
    perm = group_order(oriented, group_size)

    n = len(perm)
    n_groups = -(-n // group_size)
    tail = n - (n_groups - 1) * group_size
    pad = _reflect_pad(tail, group_size) + (n_groups - 1) * group_size  # positions in perm
    order = np.concatenate([perm, perm[pad]])
    pad_mask = np.concatenate([np.ones(n, bool), np.zeros(len(pad), bool)])
    groups = oriented[order].reshape(n_groups, group_size, num_points, 3).astype(np.float32)
    return CanonicalGroups(groups, order.astype(np.int64), pad_mask, flipped, n_points)


def uncanonicalise(
    groups: np.ndarray,
    order: np.ndarray,
    pad_mask: np.ndarray,
    flipped: np.ndarray,
    *,
    n_points: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Inverse of `canonicalise`: groups (G, S, P, 3) -> list of N streamlines in input order/direction.

    With ``n_points`` given, each streamline is resampled back to its original point count.
    """
    groups = np.asarray(groups)
    g, s, p, c = groups.shape
    slots = groups.reshape(g * s, p, c)
    if order.shape != (g * s,) or pad_mask.shape != (g * s,):
        raise ValueError(f"order/pad_mask must have shape ({g * s},) for {g} groups of {s}; got {order.shape}")
    n = int(flipped.shape[0])
    real = np.flatnonzero(pad_mask)
    if len(real) != n or not np.array_equal(np.sort(order[real]), np.arange(n)):
        raise ValueError("order and pad_mask do not describe a permutation of the input streamlines")
    out = np.empty((n, p, c), dtype=slots.dtype)
    out[order[real]] = slots[real]
    out[flipped] = out[flipped, ::-1]
    if n_points is None:
        return list(out)
    from dipy.tracking.streamline import set_number_of_points

    return [
        s if int(k) == p else set_number_of_points(np.ascontiguousarray(s), nb_points=int(k))
        for s, k in zip(out, n_points, strict=True)
    ]
