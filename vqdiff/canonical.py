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
(``n_points=`` brings each streamline back to its original point count, `at_fractions`).

Implementation: vectorised over the whole bundle, no Python loop per streamline or per group:
validation and zero-length detection on the concatenated points, resampling by dipy's compiled
``set_number_of_points`` on one `Streamlines` sequence, orientation in place with float32 distances in
a planar layout (the flips of float64 on every real bundle: there the closest direct/reversed pair
differs by 17 %), and the principal components by `vqdiff.pca`: the global one by Lanczos on the
centred rows (no covariance matrix), the per-group ones from the groups' (64, 64) Gram matrices, 16
groups per batched Lanczos solve; each stops only once every bound ``||M u - theta_1 u|| / (theta_1 -
theta_2)`` is below 1e-11, so the orders are those of an exact eigensolver up to exact ties. Work
arrays are bounded (blocks of 512 streamlines, 64 MB of centred rows): they stay in cache and are
reused instead of page-faulted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bundle import validate_streamlines
from .errors import BundleFormatError
from .geometry import GROUP_SIZE, NUM_POINTS  # noqa: F401 (re-exported: importable from here too)
from .pca import BLOCK_ROWS, pc1_projections, signed, sorted_by_own_pc1

CANONICAL_VERSION = 1  # bump when a rule of the module doc changes (recorded in every latents file)
_SOLVE_GROUPS = 16  # groups per batched eigen-solve (its temporaries stay small)


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


def _flatten(streamlines) -> tuple[np.ndarray, np.ndarray]:
    """(concatenated float32 points (M, 3), point counts (N,) int64), without validation."""
    lengths = np.fromiter((len(s) for s in streamlines), np.int64, len(streamlines))
    if len(lengths) == 0:
        return np.zeros((0, 3), np.float32), lengths
    return np.ascontiguousarray(np.concatenate(streamlines), dtype=np.float32).reshape(-1, 3), lengths


def _zero_length(points: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the streamlines (flat ``points``, ``lengths``) whose points all coincide."""
    ends = np.cumsum(lengths)
    starts = ends - lengths
    step = points[1:] != points[:-1]  # (M - 1, 3); NaN != NaN counts as a move
    moves = np.zeros(len(points) + (len(points) == 0), np.int64)  # moves[k]: moves among the first k steps
    np.cumsum(step[:, 0] | step[:, 1] | step[:, 2], out=moves[1:])
    return np.flatnonzero(moves[np.maximum(ends - 1, starts)] == moves[starts])


def zero_length_streamlines(streamlines) -> np.ndarray:
    """Indices (int64, ascending) of the streamlines whose points all coincide (as float32).

    ``streamlines``: a sequence of (N_i, 3) arrays or a `Bundle`. Such streamlines have no direction
    and cannot be resampled; streamlines of 0 or 1 point count as zero-length.
    """
    points, lengths = _flatten(getattr(streamlines, "streamlines", streamlines))
    return _zero_length(points, lengths).astype(np.int64)


def _resample_flat(points: np.ndarray, lengths: np.ndarray, num_points: int) -> np.ndarray:
    """`resample` on concatenated float32 ``points`` (M, 3) with per-streamline ``lengths``."""
    n = len(lengths)
    if n == 0:
        return np.zeros((0, num_points, 3), np.float32)
    if np.all(lengths == num_points):  # nothing to do (already resampled data)
        return points.reshape(n, num_points, 3)
    if num_points < 2:
        raise ValueError("nb_points must be at least 2")
    bad = _zero_length(points, lengths)
    if bad.size:  # dipy divides by the arc length and returns uninitialised memory when it is 0
        raise BundleFormatError(
            f"{bad.size} streamline(s) have zero length (all points identical), e.g. streamline {bad[0]}; "
            "streamlines need at least 2 distinct points to be resampled",
            reason="zero_length",
        )
    from dipy.tracking.streamline import Streamlines, set_number_of_points

    seq = Streamlines()  # a view of the flat points: dipy then resamples all of them in one C loop
    seq._data, seq._lengths = points, lengths.astype(np.intp)
    seq._offsets = (np.cumsum(seq._lengths) - seq._lengths).astype(np.intp)
    out = set_number_of_points(seq, nb_points=num_points)
    return np.asarray(out._data, dtype=np.float32).reshape(n, num_points, 3)


def resample(streamlines, num_points: int = NUM_POINTS) -> np.ndarray:
    """Resample each streamline to ``num_points`` points -> (N, num_points, 3) float32."""
    return _resample_flat(*_flatten(streamlines), num_points)


def principal_axis(vectors: np.ndarray) -> np.ndarray:
    """Unit principal eigenvector of sum v v^T, sign fixed: its largest-|.| component is > 0."""
    return signed(np.linalg.eigh(vectors.T @ vectors)[1][:, -1][None])[0]


def _mean_distances(x: np.ndarray, centroid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean point-wise distance of each streamline of ``x`` (N, P, 3) to ``centroid`` (P, 3), as given
    and reversed: ``norm(x - c, axis=-1).mean(-1)`` and the same for ``x[:, ::-1]``, in float32.

    float32 halves the memory traffic; it can only change a flip where the two distances agree to
    ~1e-6 (on the real bundles the closest pair differs by 17 %). Both distances of a streamline are
    computed with the same operations in the same order, so exact ties (a palindromic streamline)
    stay exact and keep it as given. Blocks of `BLOCK_ROWS` streamlines in a planar layout: the
    temporaries stay in cache and every reduction runs along contiguous memory.
    """
    n, p, _ = x.shape
    direct, reverse = np.empty(n, np.float32), np.empty(n, np.float32)
    planes = [np.ascontiguousarray(centroid[:, k], np.float32) for k in range(3)]
    backwards = [np.ascontiguousarray(centroid[::-1, k], np.float32) for k in range(3)]
    acc, tmp = np.empty((BLOCK_ROWS, p), np.float32), np.empty((BLOCK_ROWS, p), np.float32)
    for lo in range(0, n, BLOCK_ROWS):
        rows = x[lo : lo + BLOCK_ROWS]
        a, t = acc[: len(rows)], tmp[: len(rows)]
        for c, out in ((planes, direct), (backwards, reverse)):
            np.square(np.subtract(rows[:, :, 0], c[0], out=a, dtype=np.float32), out=a)
            a += np.square(np.subtract(rows[:, :, 1], c[1], out=t, dtype=np.float32), out=t)
            a += np.square(np.subtract(rows[:, :, 2], c[2], out=t, dtype=np.float32), out=t)
            np.sqrt(a, out=a)
            if out is reverse:  # |x - c[::-1]| read backwards is |x[:, ::-1] - c|: same numbers and order
                np.copyto(t, a[:, ::-1])
            (t if out is reverse else a).mean(axis=1, out=out[lo : lo + len(rows)])
    return direct, reverse


def _reverse_rows(x: np.ndarray, rows: np.ndarray) -> None:
    """Reverse, in place, the streamlines ``rows`` (bool mask) of a C-contiguous (N, P, 3) array."""
    points = x.view(np.dtype((np.void, 3 * x.itemsize))).reshape(x.shape[:2])  # one item per point
    points[rows] = points[rows, ::-1]


def _orient(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orient ``x`` (N, P, 3) C-contiguous **in place**: (flips (N,) bool, x with flipped rows reversed)."""
    n, p, _ = x.shape
    d = x[:, -1].astype(np.float64) - x[:, 0]  # (N, 3)
    first = d @ principal_axis(d) < 0
    _reverse_rows(x, first)  # x is now oriented by the first pass
    centroid = x.reshape(n, -1).mean(axis=0, dtype=np.float64).reshape(p, 3)
    direct, reverse = _mean_distances(x, centroid)
    # for the rows reversed above, "as given" is "reversed" now: the same numbers, swapped
    flips = np.where(first, direct, reverse) < np.where(first, reverse, direct)
    _reverse_rows(x, flips != first)
    return flips, x


def orientation_flips(x: np.ndarray) -> np.ndarray:
    """Which streamlines of ``x`` (N, P, 3) to reverse so that all run the same way -> (N,) bool."""
    return _orient(np.array(x, order="C"))[0]


def group_order(oriented: np.ndarray, group_size: int = GROUP_SIZE) -> np.ndarray:
    """Permutation (N,) of oriented streamlines (N, P, 3): slabs along PC1, re-sorted per group."""
    x = np.asarray(oriented)
    n = len(x)
    if n == 0:
        return np.zeros(0, np.int64)
    flat = x.reshape(n, -1)
    perm = np.argsort(pc1_projections(flat), kind="stable")
    full = n // group_size * group_size
    step = max(1, BLOCK_ROWS // group_size) * group_size  # whole groups, about BLOCK_ROWS rows
    batches = [perm[lo : min(lo + step, full)].reshape(-1, group_size) for lo in range(0, full, step)]
    if n > full:
        batches.append(perm[full:][None])  # the short last group
    per_solve = max(1, _SOLVE_GROUPS * group_size // step)  # batches per eigen-solve
    return np.concatenate([b.ravel() for i in range(0, len(batches), per_solve)
                           for b in sorted_by_own_pc1(flat, batches[i : i + per_solve])])


def sort_groups(groups: np.ndarray) -> np.ndarray:
    """Groups (G, S, P, 3), each re-sorted (stably) along its own first principal component.

    The within-group step of `group_order`, for groups formed elsewhere (training samples).
    """
    groups = np.asarray(groups)
    g, s = groups.shape[:2]
    step = max(1, BLOCK_ROWS // s)
    members = np.arange(g * s).reshape(g, s)
    batches = [members[i : i + step] for i in range(0, g, step)]
    per_solve = max(1, _SOLVE_GROUPS // step)  # batches per eigen-solve, as in `group_order`
    order = np.concatenate([r for i in range(0, len(batches), per_solve)
                            for r in sorted_by_own_pc1(groups.reshape(g * s, -1), batches[i : i + per_solve])])
    return groups.reshape(g * s, *groups.shape[2:])[order]


def sort_group(group: np.ndarray) -> np.ndarray:
    """One group (S, P, 3) re-sorted (stably) along its own first principal component."""
    return sort_groups(np.asarray(group)[None])[0]


def reflect_pad(real: int, group_size: int = GROUP_SIZE) -> np.ndarray:
    """Slot indices (within the last group's ``real`` slots) that fill its ``group_size - real`` pads.

    The mirror r-1, r-2, ..., 0 of the real slots, repeated: ``reflect_pad(3, 8) = [2, 1, 0, 2, 1]``.
    """
    if not 0 < real <= group_size:
        raise ValueError(f"a group of {group_size} needs 1 to {group_size} real streamlines, got {real}")
    mirror = np.arange(real - 1, -1, -1)
    reps = -(-(group_size - real) // real)
    return np.tile(mirror, reps)[: group_size - real]


def canonical_order(
    streamlines, *, num_points: int = NUM_POINTS, group_size: int = GROUP_SIZE,
    validated: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1-3 of the module doc: validate, resample, orient and order a bundle.

    ``validated``: what `validate_streamlines` returned for ``streamlines`` (their points concatenated
    and their point counts), when the caller has it already: the bundle is then not validated again.

    Returns
    -------
    oriented : (N, num_points, 3) float32
        Resampled streamlines in input order, reversed where ``flipped``.
    flipped : (N,) bool
    perm : (N,) int64
        Canonical order: ``oriented[perm]`` are the consecutive groups of ``group_size``.
    n_points : (N,) int64
        Point counts before resampling.
    """
    points, n_points = validate_streamlines(streamlines) if validated is None else validated
    points = np.ascontiguousarray(points, dtype=np.float32)
    x = _resample_flat(points, n_points, num_points)  # (N, P, 3), our own array: oriented in place
    flipped, oriented = _orient(x)
    return oriented, flipped, group_order(oriented, group_size).astype(np.int64), n_points


def canonicalise(
    streamlines, *, num_points: int = NUM_POINTS, group_size: int = GROUP_SIZE,
    validated: tuple[np.ndarray, np.ndarray] | None = None,
) -> CanonicalGroups:
    """Turn a bundle's streamlines into oriented, ordered, padded groups (see the module doc).

    ``validated``: as `canonical_order`'s (``streamlines`` may then be None).
    """
    oriented, flipped, perm, n_points = canonical_order(streamlines, num_points=num_points,
                                                        group_size=group_size, validated=validated)
    n = len(perm)
    n_groups = -(-n // group_size)
    tail = n - (n_groups - 1) * group_size
    pad = reflect_pad(tail, group_size) + (n_groups - 1) * group_size  # positions in perm
    order = np.concatenate([perm, perm[pad]])
    pad_mask = np.concatenate([np.ones(n, bool), np.zeros(len(pad), bool)])
    groups = oriented[order].reshape(n_groups, group_size, num_points, 3)
    return CanonicalGroups(groups, order, pad_mask, flipped, n_points)


def uncanonicalise(
    groups: np.ndarray,
    order: np.ndarray,
    pad_mask: np.ndarray,
    flipped: np.ndarray,
    *,
    n_points: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Inverse of `canonicalise`: groups (G, S, P, 3) -> list of N streamlines in input order/direction.

    With ``n_points`` given, each streamline is brought back to its original point count by
    `restore_point_counts` (interpolation at the original's fractions, not a new arc-length resampling).
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
    return restore_point_counts(out, n_points)


def at_fractions(x: np.ndarray, num_points: int) -> np.ndarray:
    """Streamlines ``x`` (N, P, 3) taken at ``num_points`` equally spaced fractions of their *point
    index* (linear interpolation between neighbouring points) -> (N, num_points, 3) float (float32
    unless ``x`` is float64).

    How a model's output goes back to other point counts: its point k stands for the fraction
    k / (P - 1) of the input's arc length, but its own spacing is irregular (on AFQ bundles the segment
    lengths of a reconstruction vary by ~10 %, against 0.4 % for the resampled input), so resampling
    it by its own arc length (dipy's ``set_number_of_points``) would slide every point along the
    track: +0.32 mm mean MDF on AFQ Right_ILF. Endpoints are kept exactly; ``num_points == P``
    returns ``x`` unchanged.
    """
    x = np.asarray(x)
    if x.dtype != np.float64:
        x = x.astype(np.float32, copy=False)
    p = x.shape[1]
    if num_points == p:
        return x
    if num_points < 2:
        raise ValueError(f"a streamline needs at least 2 points, asked for {num_points}")
    if p < 2:
        raise ValueError(f"streamlines of {p} point cannot be interpolated")
    t = np.linspace(0.0, p - 1, num_points)
    lo = np.minimum(t.astype(np.int64), p - 2)
    w = (t - lo).astype(x.dtype)[None, :, None]
    out = x[:, lo + 1] * w  # two temporaries of the output's size, not four
    out += x[:, lo] * (1 - w)
    return out


def restore_point_counts(x: np.ndarray, n_points) -> list[np.ndarray]:
    """Streamlines ``x`` (N, P, 3) back to their point counts ``n_points`` (N,) by `at_fractions`,
    one vectorised call per distinct count (the endpoints are kept exactly)."""
    x = np.asarray(x)
    n_points = np.asarray(n_points, dtype=np.int64)
    if np.any(n_points < 2):
        raise ValueError("nb_points must be at least 2")
    back = list(x)
    for k in np.unique(n_points[n_points != x.shape[1]]).tolist():
        idx = np.flatnonzero(n_points == k)
        for i, streamline in zip(idx.tolist(), at_fractions(x[idx], k), strict=True):
            back[i] = streamline
    return back
