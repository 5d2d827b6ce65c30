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
(``n_points=`` resamples each streamline back to its original point count).

Implementation: every step is vectorised over the whole bundle (no Python loop per streamline or
per group): validation and zero-length detection on the concatenated points, resampling by dipy's
compiled ``set_number_of_points`` on one `Streamlines` sequence, orientation distances in a planar
float64 layout, and the per-group principal components of all full groups at once (plus one call
for the short last group) from their (64, 64) Gram matrices. Top eigenvectors come from a batched
block subspace iteration with a Rayleigh-Ritz step that accepts a matrix only once its error bound
``||M u - theta_1 u|| / (theta_1 - theta_2)`` is below 1e-11; the rest (a near-degenerate top
eigenvalue) are solved by LAPACK's ``eigh``, so the orders are those of an exact eigensolver.
"""


from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bundle import validate_streamlines
from .errors import BundleFormatError

GROUP_SIZE = 64
NUM_POINTS = 64
_BLOCK = 4  # subspace size of the top-eigenvector iteration
_SQUARINGS = 2  # the iteration multiplies by m^4
_ROUNDS = 8  # Rayleigh-Ritz rounds before the exact fallback
_TOL = 1e-11  # accepted bound on sin(angle) between an iterated and the exact top eigenvector


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


def _principal_axis(vectors: np.ndarray) -> np.ndarray:
    """Unit principal eigenvector of sum v v^T, sign fixed: its largest-|.| component is > 0."""
    cov = vectors.T @ vectors
    _, eigvecs = np.linalg.eigh(cov)
    axis = eigvecs[:, -1]
    if axis[np.argmax(np.abs(axis))] < 0:
        axis = -axis
    return axis


def _orient(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flips (N,) bool, ``x`` (N, P, 3) with the flipped streamlines reversed, in x's dtype)."""
    n, p, _ = x.shape
    d = x[:, -1].astype(np.float64) - x[:, 0]  # (N, 3)
    first = d @ _principal_axis(d) < 0
    oriented = x.copy()
    oriented[first] = x[first, ::-1]
    centroid = oriented.reshape(n, -1).mean(axis=0, dtype=np.float64).reshape(p, 3)
    xt = np.empty((3, n, p))  # planar float64 copy of x: contiguous (N, P) rows per axis
    for k in range(3):
        xt[k] = x[:, :, k]

    def distances(c: np.ndarray) -> np.ndarray:  # (N, P) = norm(x - c, axis=-1), bit for bit
        sq = [np.square(xt[k] - c[:, k]) for k in range(3)]
        return np.sqrt((sq[0] + sq[1]) + sq[2], out=sq[0])  # the summation order of np.linalg.norm

    direct = distances(centroid).mean(axis=1)
    # |x[:, ::-1] - c| read backwards is |x - c[::-1]|: same numbers, the mean taken in the same order
    reverse = np.ascontiguousarray(distances(centroid[::-1])[:, ::-1]).mean(axis=1)
    flips = reverse < direct
    change = np.flatnonzero(flips != first)
    oriented[change] = oriented[change, ::-1]
    return flips, oriented


def orientation_flips(x: np.ndarray) -> np.ndarray:
    """Which streamlines of ``x`` (N, P, 3) to reverse so that all run the same way -> (N,) bool."""
    return _orient(np.asarray(x))[0]


def _top_eigvecs(m: np.ndarray) -> np.ndarray:
    """Unit eigenvectors (G, n) of the largest eigenvalue of symmetric PSD matrices ``m`` (G, n, n).

    Block subspace iteration with ``m^4`` and a Rayleigh-Ritz step per round; a matrix is done once its
    bound ``||m u - theta_1 u|| / (theta_1 - theta_2)`` is below `_TOL`, the others (slow or no
    convergence: near-degenerate top eigenvalue) go to LAPACK's ``eigh``. Signs are arbitrary.
    """
    g, n, _ = m.shape
    if n <= 4 * _BLOCK:
        return np.linalg.eigh(m)[1][..., -1]
    power = m
    for _ in range(_SQUARINGS):  # power = m^(2^k) / trace, scaled so that it cannot overflow
        power = power @ power
        power /= np.maximum(np.trace(power, axis1=1, axis2=2), np.finfo(float).tiny)[:, None, None]
    start = np.argsort(np.einsum("gii->gi", m), axis=1, kind="stable")[:, -_BLOCK:]
    y = np.take_along_axis(power, start[:, None, :], axis=2)  # the columns of the largest variances
    out = np.empty((g, n))
    todo = np.arange(g)
    for _ in range(_ROUNDS):
        q = np.linalg.qr(y)[0]  # (g', n, b) orthonormal
        mq = m[todo] @ q
        theta, w = np.linalg.eigh(q.transpose(0, 2, 1) @ mq)
        u = (q @ w[:, :, -1:])[..., 0]
        resid = (mq @ w[:, :, -1:])[..., 0] - theta[:, -1:] * u
        ok = np.sqrt(np.einsum("gi,gi->g", resid, resid)) <= _TOL * (theta[:, -1] - theta[:, -2])
        out[todo[ok]] = u[ok]
        todo, q = todo[~ok], q[~ok]
        if len(todo) == 0:
            return out
        y = power[todo] @ q
    out[todo] = np.linalg.eigh(m[todo])[1][..., -1]
    return out


def _pc1_projections(centred: np.ndarray) -> np.ndarray:
    """Projections (G, S) of centred rows (G, S, D) on each batch's first principal axis.

    The axis is the top eigenvector of the (D, D) covariance, or, with fewer rows than columns, X^T u
    for u the top eigenvector of the (S, S) Gram matrix X X^T (the same axis); its sign is fixed so
    that its largest-|.| component is positive.
    """
    g, s, d = centred.shape
    if s < 2:
        return np.zeros((g, s))
    if s < d:
        u = _top_eigvecs(centred @ centred.transpose(0, 2, 1))
        axis = (u[:, None, :] @ centred)[:, 0]
        norm = np.sqrt(np.einsum("gd,gd->g", axis, axis))
        axis /= np.where(norm > 0, norm, 1.0)[:, None]
    else:
        axis = _top_eigvecs(centred.transpose(0, 2, 1) @ centred)
    big = np.take_along_axis(axis, np.argmax(np.abs(axis), axis=1)[:, None], axis=1)
    axis *= np.where(big < 0, -1.0, 1.0)
    return (centred @ axis[:, :, None])[..., 0]


def _sorted_within(flat: np.ndarray) -> np.ndarray:
    """Stable argsort (G, S) of each batch of rows (G, S, D) float64 along its own PC1."""
    centred = flat - flat.mean(axis=1, keepdims=True)
    return np.argsort(_pc1_projections(centred), axis=1, kind="stable")


def _sorted_projection(flat: np.ndarray) -> np.ndarray:
    """Projection (N,) of rows (N, D) on their first principal component (centred)."""
    return _pc1_projections((flat - flat.mean(axis=0))[None])[0]


def group_order(oriented: np.ndarray, group_size: int = GROUP_SIZE) -> np.ndarray:
    """Permutation (N,) of oriented streamlines (N, P, 3): slabs along PC1, re-sorted per group."""
    n = len(oriented)
    flat = np.asarray(oriented).reshape(n, -1).astype(np.float64)
    perm = np.argsort(_sorted_projection(flat), kind="stable")
    full = n // group_size * group_size
    for lo, hi in ((0, full), (full, n)):  # all full groups in one batch, then the short last one
        if hi > lo:
            chunks = perm[lo:hi].reshape(-1, min(group_size, hi - lo))
            local = _sorted_within(flat[chunks])
            perm[lo:hi] = np.take_along_axis(chunks, local, axis=1).ravel()
    return perm


def sort_groups(groups: np.ndarray) -> np.ndarray:
    """Groups (G, S, P, 3), each re-sorted (stably) along its own first principal component.

    The within-group step of `group_order`, for groups formed elsewhere (training samples).
    """
    groups = np.asarray(groups)
    g, s = groups.shape[:2]
    local = _sorted_within(groups.reshape(g, s, -1).astype(np.float64))
    return np.take_along_axis(groups, local[:, :, None, None], axis=1)


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
    streamlines, *, num_points: int = NUM_POINTS, group_size: int = GROUP_SIZE
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1-3 of the module doc: validate, resample, orient and order a bundle.

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
    points, n_points = validate_streamlines(streamlines)
    points = np.ascontiguousarray(points, dtype=np.float32)
    x = _resample_flat(points, n_points, num_points)  # (N, P, 3)
    flipped, oriented = _orient(x)
    return oriented, flipped, group_order(oriented, group_size).astype(np.int64), n_points


def canonicalise(
    streamlines, *, num_points: int = NUM_POINTS, group_size: int = GROUP_SIZE
) -> CanonicalGroups:
    """Turn a bundle's streamlines into oriented, ordered, padded groups (see the module doc)."""
    oriented, flipped, perm, n_points = canonical_order(streamlines, num_points=num_points,
                                                        group_size=group_size)
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
