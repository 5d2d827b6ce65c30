"""Exact, batched BUAN score of dipy with ``clust_thr=[0]``: the algorithm of `vqdiff.metrics.buan_score`.

`buan_scores` takes validated ``(G, S, P, 3)`` arrays (see `vqdiff.metrics` for the argument
checks) and a threshold ``> 0``; the dipy numerics it relies on are emulated in `vqdiff.buan_dipy`.

BUAN score: what dipy computes and what is implemented here
-----------------------------------------------------------
``bundle_shape_similarity(b1, b2, rng, clust_thr=[0], threshold=T)`` (dipy 1.12) is::

    c1 = qbx_and_merge(b1, [0], nb_pts=20, rng=rng).centroids     # "clustering" of bundle 1
    c2 = qbx_and_merge(b2, [0], nb_pts=20, rng=rng).centroids
    r1 = set_number_of_points(c1, 20); r2 = set_number_of_points(c2, 20)   # in ba_analysis
    D = bundles_distances_mdf(r1, r2)                              # (n1, n2)
    BA = 0.5 * (#{i : min_j D[i, j] < T} / n1 + #{j : min_i D[i, j] < T} / n2)

where ``qbx_and_merge`` resamples every streamline to 20 points with ``set_number_of_points``
(equal arc-length steps on the polyline), casts to float32, runs QuickBundlesX with the single
threshold 0 in the random order ``rng.choice(S, S, replace=False)``, then runs QuickBundlesX(0)
again on the resulting centroids in the order ``rng.choice(n, n, replace=False)`` ("merge").
``D[i, j] = min(direct, flipped)`` with ``direct = float32(sum_p sqrt(|a_p - b_p|^2)) / 20`` (the
squared norm accumulated in float32, the sum of square roots in float64) and the flipped term
using ``b`` reversed; so the score is

.. math::

    \\mathrm{BA} = \\tfrac12\\Big(\\tfrac{1}{n_1}\\sum_{i} [\\min_j D_{ij} < T]
                  + \\tfrac{1}{n_2}\\sum_{j} [\\min_i D_{ij} < T]\\Big).

With threshold 0 a streamline joins an existing cluster only at distance exactly 0 (QuickBundlesX
creates a new cluster when ``dist > threshold``), i.e. only if its float32 20-point resampling is
*bitwise equal* (``-0.0 == 0.0``) to that cluster's centroid or to the centroid reversed.  Hence:

* Groups whose resampled streamlines are pairwise distinct (up to reversal) - all real groups -
  give ``n1 = n2 = S`` centroids equal to the resampled streamlines themselves, the clustering
  order (the only use of ``rng``) has no effect, and the fast path evaluates the formula above.
* Duplicates (e.g. padded groups repeating streamlines, or a reconstruction that collapses every
  streamline to one shape) are *not* simply merged: a cluster's centroid is the float32 running
  mean ``c <- (c * C + e) / (C + 1)``, which for 2 copies stays equal to ``e`` but for the 3rd copy
  usually drifts by one ulp; the drifted cluster then no longer matches and the next copy opens a
  new cluster, and the merge pass repeats this on the centroids.  For example the 64 identical
  copies of a real group's mean streamline end as 6 centroids, not 1 nor 64, and ``n1`` counts
  them all.  A reversed copy counts as a duplicate when its resampling is the exact reversal
  (the case for the real streamlines): it joins through the flipped comparison.  Groups with any
  duplicate are therefore replayed exactly (a small per-group simulation of both QuickBundlesX
  passes in the same random order as dipy, from ``np.random.default_rng(seed)``).  The number
  of centroids does not depend on the order; the order only decides which orientation a
  centroid has when a streamline also occurs reversed (float32 rounding of its distances) and
  astronomically rare coincidences (a drifted centroid bitwise equal to another streamline);
  both are reproduced when ``seed`` seeds a fresh generator given to dipy for that group, as
  :func:`vqdiff.metrics.buan_score_dipy` does.
* Resampling, the float32 cast and the MDF are emulated operation by operation (float32 versus
  float64 arithmetic, correctly rounded ``sqrt`` and summation order as in dipy's Cython), so
  every distance that decides a ``< T`` comparison equals dipy's bit for bit and the score is
  identical, not approximately equal.  Distances that provably cannot decide a comparison are
  skipped, in this order: the exact distance of the paired streamlines ``(i, i)`` (decides most
  rows and columns of good reconstructions); the lower bound ``|mean_p a_p - mean_p b_p| <=
  MDF(a, b)`` (Jensen, invariant to flipping) on the pairs of still open rows / columns; the finer
  bound from 4 blocks of 5 points (both orientations) on the survivors; then the exact distance
  of the best remaining candidate of each open row / column and finally of all remaining
  candidates.  A pair is only discarded when its bound exceeds ``T * (1 + 1e-4)``, far above the
  ~1e-6 relative float32 error of dipy's distance.  Groups are processed in chunks of about
  2048 streamlines so that the working set stays in cache.
* Input dtypes follow dipy: float32 streamlines are resampled in float32 arithmetic, float64 in
  float64 (then cast to float32), int64/uint64 as float64, other dtypes as float32.
* Edge cases: a zero-length streamline (all points equal) makes dipy's resampling return
  uninitialised memory; here it resamples to copies of its point.  Non-finite coordinates are
  rejected.  ``threshold <= 0`` gives 0.  Identical bundles without duplicates give 1.0 for any
  ``threshold > 0``.
"""

from __future__ import annotations

import numpy as np

from .buan_dipy import (
    BUAN_NB_POINTS,
    centroid_sets,
    dipy_float_dtype,
    mdf32_pairs,
    planar,
    set_number_of_points,
)

__all__ = ["buan_scores"]

# Relative safety margin of the pruning bound: dipy's float32 MDF is within ~1e-6 relative of the
# exact one; 1e-4 is a wide margin (pairs inside it are evaluated exactly, never guessed).
_PRUNE_REL = 1e-4
# Streamlines processed per chunk by buan_scores (working set of a few MB, cache resident).
_CHUNK_STREAMLINES = 2048
_CHUNK_PAIRS = 4096


def buan_scores(xa: np.ndarray, ya: np.ndarray, threshold: float, seed: int) -> np.ndarray:
    """(G,) float64 BUAN scores of validated (G, S, P, 3) arrays, ``P >= 2``, ``threshold > 0``.

    Groups are processed in chunks of about ``_CHUNK_STREAMLINES`` streamlines.
    """
    G, S = xa.shape[:2]
    score = np.empty(G)
    step = max(1, _CHUNK_STREAMLINES // S)  # groups per chunk: keeps the working set in cache
    for g0 in range(0, G, step):
        score[g0 : g0 + step] = _buan_chunk(xa[g0 : g0 + step], ya[g0 : g0 + step], threshold, seed)
    return score


def _adjacency(r1, v1, r2, v2, threshold: float):
    """Rows / columns of every group's dipy MDF matrix whose minimum is < threshold, exactly.

    ``r1, r2``: (3, P, G*S) float32 centroids as ``ba_analysis`` sees them; ``v1, v2``: (G, S)
    validity.  Exact distances are computed only where they can decide a comparison.
    """
    G, S = v1.shape
    row_sat = np.zeros(G * S, dtype=bool)
    col_sat = np.zeros(G * S, dtype=bool)
    chunk = _CHUNK_PAIRS

    def evaluate(i: np.ndarray, j: np.ndarray) -> None:  # flat indices g*S + i, g*S + j
        for s in range(0, i.size, chunk):
            ii, jj = i[s : s + chunk], j[s : s + chunk]
            hit = mdf32_pairs(r1.take(ii, axis=2), r2.take(jj, axis=2)) < threshold
            row_sat[ii[hit]] = True
            col_sat[jj[hit]] = True

    # 1) the paired streamlines (i, i): cheap and decisive for good reconstructions
    both = (v1 & v2).ravel()
    if both.all():
        hit = mdf32_pairs(r1, r2) < threshold
        row_sat |= hit
        col_sat |= hit
    else:
        idx = np.flatnonzero(both)
        evaluate(idx, idx)
    open_r = (v1.ravel() & ~row_sat).reshape(G, S)
    open_c = (v2.ravel() & ~col_sat).reshape(G, S)
    groups = np.flatnonzero(open_r.any(axis=1) | open_c.any(axis=1))
    if groups.size == 0:
        return row_sat.reshape(G, S), col_sat.reshape(G, S)

    # 2) lower bounds, float64: |mean_p a_p - mean_p b_p| <= MDF(a, b) (both orientations) on
    #    every pair with an open row or column, then a finer bound from blocks of points
    limit = threshold * (1.0 + _PRUNE_REL) + 1e-6
    P = r1.shape[1]
    m1 = (_point_sums(r1, 0, P) / P).reshape(3, G, S)
    m2 = (_point_sums(r2, 0, P) / P).reshape(3, G, S)
    gr, ir = np.nonzero(open_r)
    gc, jc = np.nonzero(open_c)
    near = np.zeros((G, S, S), dtype=bool)
    if gr.size + gc.size < groups.size * S:  # few open rows / columns: bound just those
        for gg, kk, mine, other, valid, rows in (
            (gr, ir, m1, m2, v2, True),
            (gc, jc, m2, m1, v1, False),
        ):
            if gg.size == 0:
                continue
            lb = np.zeros((gg.size, S))
            for c in range(3):
                diff = mine[c][gg, kk][:, None] - other[c][gg]
                diff *= diff
                lb += diff
            np.sqrt(lb, out=lb)
            ok = (lb < limit) & valid[gg]
            if rows:
                near[gg, kk, :] |= ok
            else:
                near[gg, :, kk] |= ok
    else:  # most rows / columns open: bound every pair of the groups concerned
        lb = np.zeros((groups.size, S, S))
        for c in range(3):
            diff = m1[c][groups][:, :, None] - m2[c][groups][:, None, :]
            diff *= diff
            lb += diff
        np.sqrt(lb, out=lb)
        ok = lb < limit
        ok &= v1[groups][:, :, None] & v2[groups][:, None, :]
        ok &= open_r[groups][:, :, None] | open_c[groups][:, None, :]
        near[groups] = ok
    g, i, j = np.nonzero(near)
    if g.size == 0:
        return row_sat.reshape(G, S), col_sat.reshape(G, S)
    fi = g * S + i
    fj = g * S + j
    lb4 = _block_lower_bound(_block_rows(r1), _block_rows(r2), fi, fj)
    keep = lb4 < limit
    g, i, j, fi, fj = g[keep], i[keep], j[keep], fi[keep], fj[keep]
    lbm = np.full((G, S, S), np.inf)
    lbm[g, i, j] = lb4[keep]

    # 3) first the most promising candidate of every open row / column ...
    has = np.isfinite(lbm)
    gi, ii = np.nonzero(open_r & has.any(axis=2))
    gj, jj = np.nonzero(open_c & has.any(axis=1))
    g3 = np.concatenate([gi, gj])
    i3 = np.concatenate([ii, np.argmin(lbm[gj, :, jj], axis=1)])
    j3 = np.concatenate([np.argmin(lbm[gi, ii], axis=1), jj])
    evaluate(g3 * S + i3, g3 * S + j3)
    lbm[g3, i3, j3] = np.inf  # done

    # 4) ... then every remaining candidate of a still open row or column
    still = (~row_sat[fi] | ~col_sat[fj]) & np.isfinite(lbm[g, i, j])
    evaluate(fi[still], fj[still])
    return row_sat.reshape(G, S), col_sat.reshape(G, S)


def _point_sums(r: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``r[:, start:stop].sum(axis=1)`` in float64 for (3, P, N) ``r`` (explicit loop: fast)."""
    acc = r[:, start].astype(np.float64)
    for p in range(start + 1, stop):
        acc += r[:, p]
    return acc


def _block_rows(r: np.ndarray):
    """Block means of every streamline of ``r`` (3, P, N) for :func:`_block_lower_bound`.

    Returns ``(means, flipped, sizes)``: means (3*nb, N) float64 (row ``c*nb + b``: coordinate
    ``c`` of block ``b``), the same with the blocks reversed, and the (nb,) block sizes.  The
    blocks are runs of consecutive points partitioned symmetrically under reversal, so block
    ``b`` of a reversed streamline has the mean of block ``nb - 1 - b``.
    """
    P = r.shape[1]
    nb = min(4, P)
    edges = np.linspace(0, P, nb + 1).round().astype(np.intp)
    if not np.array_equal(edges, P - edges[::-1]):
        edges = np.array([0, P])
    sizes = np.diff(edges).astype(np.float64)
    nb = sizes.size
    means = np.empty((3, nb, r.shape[2]))
    for b in range(nb):
        means[:, b] = _point_sums(r, edges[b], edges[b + 1])
        means[:, b] /= sizes[b]
    return means.reshape(3 * nb, -1), np.ascontiguousarray(means[:, ::-1]).reshape(3 * nb, -1), sizes


def _block_lower_bound(b1, b2, fi: np.ndarray, fj: np.ndarray) -> np.ndarray:
    """``min_orientation sum_b |B_b| * |mean_b a - mean_b b| / P <= MDF(a, b)`` per pair.

    Jensen's inequality on every block of points, for the direct and the flipped pairing.
    ``b1, b2``: :func:`_block_rows` of both sides; ``fi, fj``: streamline indices.
    """
    rows1, _, sizes = b1
    rows2, flip2, _ = b2
    nb = sizes.size
    P = sizes.sum()
    out = np.empty(fi.size)
    for s in range(0, fi.size, _CHUNK_PAIRS):
        a = rows1.take(fi[s : s + _CHUNK_PAIRS], axis=1)  # (3*nb, K)
        best = None
        for other in (rows2, flip2):
            diff = other.take(fj[s : s + _CHUNK_PAIRS], axis=1)
            np.subtract(a, diff, out=diff)
            diff *= diff
            sq = diff[:nb]
            sq += diff[nb : 2 * nb]
            sq += diff[2 * nb :]
            np.sqrt(sq, out=sq)
            bound = sq[0] * sizes[0]
            for b in range(1, nb):
                bound += sq[b] * sizes[b]
            best = bound if best is None else np.minimum(best, bound, out=best)
        out[s : s + a.shape[1]] = best / P
    return out


def _buan_chunk(xa: np.ndarray, ya: np.ndarray, threshold: float, seed: int) -> np.ndarray:
    G, S = xa.shape[:2]
    N = G * S
    n = BUAN_NB_POINTS
    # both bundles in one (3, P, 2N) array when dipy would compute them in the same dtype
    px, py = dipy_float_dtype(xa), dipy_float_dtype(ya)
    if px.dtype == py.dtype:
        f = set_number_of_points(planar(np.concatenate([px, py])), n).astype(np.float32, copy=False)
        f1, f2 = f[:, :, :N], f[:, :, N:]
    else:
        f1 = set_number_of_points(planar(px), n).astype(np.float32, copy=False)
        f2 = set_number_of_points(planar(py), n).astype(np.float32, copy=False)
    c1, v1, c2, v2 = centroid_sets(f1, f2, G, S, seed)
    # ba_analysis resamples the float32 centroids again
    r = set_number_of_points(np.concatenate([c1, c2], axis=2), n)
    row_sat, col_sat = _adjacency(r[:, :, :N], v1, r[:, :, N:], v2, threshold)
    return 0.5 * (row_sat.sum(axis=1) / v1.sum(axis=1) + col_sat.sum(axis=1) / v2.sum(axis=1))

