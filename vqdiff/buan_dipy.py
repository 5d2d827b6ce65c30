"""Bit-exact, vectorised emulation of the dipy internals that BUAN with ``clust_thr=[0]`` uses.

The building blocks of `vqdiff.buan` (see its docstring for how they combine into the score):

dipy_float_dtype
    The dtype dipy's ``set_number_of_points`` computes in.
planar
    (G, S, P, 3) -> the "planar" layout (3, P, G*S) = (coordinate, point, streamline) every
    function below works on, so that each per-point operation is a contiguous vector operation.
set_number_of_points
    dipy's ``set_number_of_points`` for same-length streamlines, operation by operation.
mdf32_pairs
    dipy's float32 ``bundles_distances_mdf`` entry for given pairs of streamlines.
qbx_threshold0, qbx_and_merge_threshold0
    Exact replay of QuickBundlesX with the single threshold 0 (and of ``qbx_and_merge``).
has_duplicates, centroid_sets
    Which groups hold duplicate streamlines (up to reversal), and dipy's final centroids of
    every group (the streamlines themselves unless a group has duplicates, then replayed).

Only numpy is imported; nothing here imports dipy.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BUAN_NB_POINTS",
    "centroid_sets",
    "dipy_float_dtype",
    "has_duplicates",
    "mdf32_pairs",
    "planar",
    "qbx_and_merge_threshold0",
    "qbx_threshold0",
    "set_number_of_points",
]

#: Number of points dipy resamples to inside ``bundle_shape_similarity`` (``nb_pts=20``).
BUAN_NB_POINTS = 20


def dipy_float_dtype(a: np.ndarray) -> np.ndarray:
    """The dtype dipy's ``set_number_of_points`` computes in (float32 / float64)."""
    if a.dtype in (np.float32, np.float64):
        return a
    if a.dtype in (np.int64, np.uint64):
        return a.astype(np.float64)
    return a.astype(np.float32)


def planar(a: np.ndarray) -> np.ndarray:
    """(G, S, P, 3) -> contiguous (3, P, G*S) in the dtype dipy computes in."""
    a = dipy_float_dtype(a)
    G, S, P, _ = a.shape
    return np.ascontiguousarray(a.reshape(G * S, P, 3).transpose(2, 1, 0))


def set_number_of_points(st: np.ndarray, n: int) -> np.ndarray:
    """dipy's ``set_number_of_points`` for same-length streamlines, bit-exact, vectorised.

    ``st``: (3, P, N) float32 or float64.  Returns (3, n, N) of the same dtype.  Mirrors
    ``c_set_number_of_points``: segment differences in the input dtype, arc lengths accumulated
    in float64 (``sqrt`` correctly rounded), sample positions ``next_point += step``, the first
    segment end ``k`` with ``arclength[k] >= next_point``, and
    ``s[k-1] + ratio * (s[k] - s[k-1])`` evaluated in float64 and rounded to the input dtype.
    """
    _, P, N = st.shape
    d = st[:, 1:] - st[:, :-1]  # (3, P-1, N), float32 subtraction for float32 input
    sq = d.astype(np.float64)
    sq *= sq
    seg = sq[0]
    seg += sq[1]
    seg += sq[2]
    np.sqrt(seg, out=seg)
    arc = np.empty((P, N))
    arc[0] = 0.0
    for m in range(P - 1):  # sequential, as dipy's loop
        np.add(arc[m], seg[m], out=arc[m + 1])
    out = np.empty((3, n, N), dtype=st.dtype)
    out[:, 0] = st[:, 0]  # next_point = 0 == arclength[0]
    out[:, -1] = st[:, -1]  # "last resampled point always the one from original streamline"
    if n <= 2:
        return out
    length = arc[-1]
    zero = length == 0.0  # dipy leaves such output uninitialised; use the (only) point
    t = np.empty((n - 2, N))
    np.divide(length, n - 1, out=t[0])  # next_point after one step
    for i in range(1, n - 2):
        np.add(t[i - 1], t[0], out=t[i])  # next_point += step
    # k = first index with arclength[k] >= next_point: guess from uniform spacing, then walk
    # (only the entries still off move; each walks one way until it reaches its segment)
    guess = t * ((P - 1) / np.where(zero, 1.0, length))
    np.ceil(guess, out=guess)
    np.maximum(guess, 1, out=guess)
    np.minimum(guess, P - 1, out=guess)
    fk = guess.astype(np.intp) * N  # flat index k * N + column of arclength[k]
    fk += np.arange(N)
    fk = fk.ravel()
    tf = t.ravel()
    flat_arc = arc.ravel()
    right = np.flatnonzero(flat_arc.take(fk) < tf)  # arclength[k] < next_point
    while right.size:
        fk[right] += N
        right = right[flat_arc.take(fk[right]) < tf[right]]
    left = np.flatnonzero((flat_arc.take(fk - N) >= tf) & (fk >= 2 * N))  # arclength[k-1] >= next_point
    while left.size:
        fk[left] -= N
        left = left[(flat_arc.take(fk[left] - N) >= tf[left]) & (fk[left] >= 2 * N)]
    fk = fk.reshape(n - 2, N)
    ak = flat_arc.take(fk)
    fk -= N  # now indexes point k-1 (and segment k-1 of d)
    den = flat_arc.take(fk)
    den -= ak  # arclength[k-1] - arclength[k]
    num = ak - t
    on_point = num == 0.0
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 only where on_point or zero
        ratio = np.divide(num, den, out=num)  # == -((ak - t) / (ak - ak1)) exactly
    ratio += 1.0  # 1 - (ak - t) / (ak - ak1)
    mid = out[:, 1:-1]
    for c in range(3):
        prod = np.multiply(d[c].ravel().take(fk), ratio, dtype=np.float64)
        np.add(st[c].ravel().take(fk), prod, out=mid[c], dtype=np.float64, casting="unsafe")
    if on_point.any():  # next_point == arclength[k]: the point itself
        sel = fk[on_point] + N
        for c in range(3):
            mid[c][on_point] = st[c].ravel().take(sel)
    if zero.any():
        out[:, :, zero] = st[:, :1, zero]
    return out


def mdf32_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """dipy's ``bundles_distances_mdf`` entry for each pair ``(a[..., k], b[..., k])``, bit-exact.

    ``a, b``: (3, P, K) float32.  ``track_direct_flip_dist``: float32 differences and squared
    norm (x, y, z in order), ``sqrt`` and the sum over points in float64, then
    ``float32(sum) / float32(P)``; the smaller of direct and flipped.  Returns (K,) float64.
    """
    P = a.shape[1]

    def one(bb: np.ndarray) -> np.ndarray:
        sub = a - bb
        np.multiply(sub, sub, out=sub)
        tm = sub[0]
        tm += sub[1]
        tm += sub[2]
        r = np.sqrt(tm, dtype=np.float64)
        acc = r[0].copy()
        for p in range(1, P):  # sequential double sum over points
            acc += r[p]
        return acc.astype(np.float32) / np.float32(P)

    direct = one(b)
    flipped = one(b[:, ::-1])
    return np.where(direct < flipped, direct, flipped).astype(np.float64)


def qbx_threshold0(feats: np.ndarray, order) -> list[np.ndarray]:
    """Exact replay of dipy's QuickBundlesX with the single threshold 0.

    ``feats``: (n, P, 3) float32.  A streamline joins the first-created cluster whose centroid
    equals it (preferred) or its reversal (then it is added reversed); the centroid is the
    float32 running mean ``(c * C + e) / (C + 1)``.  Returns the centroids in creation order.
    """
    zero = np.float32(0.0)
    cents: list[np.ndarray] = []
    counts: list[int] = []
    index: dict[bytes, list[int]] = {}

    def key(a: np.ndarray) -> bytes:
        return (a + zero).tobytes()  # + 0.0 maps -0.0 to 0.0 (they are at distance 0)

    for i in order:
        e = feats[int(i)]
        er = np.ascontiguousarray(e[::-1])
        cd = index.get(key(e))
        cr = index.get(key(er))
        kd = min(cd) if cd else None
        kr = min(cr) if cr else None
        if kd is None and kr is None:
            cents.append(e.copy())
            counts.append(1)
            index.setdefault(key(e), []).append(len(cents) - 1)
            continue
        if kd is not None and (kr is None or kd <= kr):
            c_id, elem = kd, e
        else:
            c_id, elem = kr, er
        old = cents[c_id]
        C = counts[c_id]
        new = ((old * np.float32(C)) + elem) / np.float32(C + 1)
        counts[c_id] = C + 1
        ko, kn = key(old), key(new)
        if ko != kn:
            index[ko].remove(c_id)
            if not index[ko]:
                del index[ko]
            index.setdefault(kn, []).append(c_id)
        cents[c_id] = new
    return cents


def qbx_and_merge_threshold0(feats: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """dipy's ``qbx_and_merge(streamlines, [0])`` on resampled float32 features (n, P, 3)."""
    n = feats.shape[0]
    order = rng.choice(n, n, replace=False)
    c1 = qbx_threshold0(feats, order)
    order2 = rng.choice(len(c1), len(c1), replace=False)
    return np.stack(qbx_threshold0(np.stack(c1), order2))


def has_duplicates(f: np.ndarray, G: int, S: int) -> np.ndarray:
    """(G,) bool: does group g hold two streamlines bitwise equal up to reversal?

    ``f``: (3, P, G*S) float32.  An exact, flip-invariant integer hash of the bits; a hash
    collision only sends a group to the exact replay, so it cannot change a result.
    """
    if S < 2:
        return np.zeros(G, dtype=bool)
    P = f.shape[1]
    h2 = (P + 1) // 2
    sym = (f[:, :h2] + f[:, ::-1][:, :h2]) + np.float32(0.0)  # equal for s and reversed(s)
    bits = sym.view(np.uint32).astype(np.uint64)  # (3, h2, N)
    m = np.arange(1, 3 * h2 + 1, dtype=np.uint64).reshape(3, h2, 1)
    m1 = (m * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
    m2 = (m * np.uint64(0xC2B2AE3D27D4EB4F)) | np.uint64(1)
    h = (bits * m1).sum(axis=(0, 1), dtype=np.uint64)
    h ^= (bits * m2).sum(axis=(0, 1), dtype=np.uint64) >> np.uint64(7)
    hs = np.sort(h.reshape(G, S), axis=1)
    return (hs[:, 1:] == hs[:, :-1]).any(axis=1)



def centroid_sets(f1: np.ndarray, f2: np.ndarray, G: int, S: int, seed: int):
    """dipy's final centroids of both bundles of every group, (3, P, G*S), with validity masks.

    Groups without duplicates keep their resampled streamlines (n = S centroids); groups with
    duplicates are replayed exactly and padded (with a copy of a centroid) up to S.
    """
    v1 = np.ones((G, S), dtype=bool)
    v2 = np.ones((G, S), dtype=bool)
    flagged = np.flatnonzero(has_duplicates(f1, G, S) | has_duplicates(f2, G, S))
    if flagged.size == 0:
        return f1, v1, f2, v2
    c1, c2 = f1.copy(), f2.copy()
    for g in flagged:
        rng = np.random.default_rng(seed)  # dipy draws bundle 1's orders, then bundle 2's
        cols = slice(g * S, (g + 1) * S)
        for f, c, v in ((f1, c1, v1), (f2, c2, v2)):
            feats = np.ascontiguousarray(f[:, :, cols].transpose(2, 1, 0))  # (S, P, 3)
            cents = qbx_and_merge_threshold0(feats, rng)
            block = np.empty_like(feats)
            block[: len(cents)] = cents
            block[len(cents) :] = cents[0]
            c[:, :, cols] = block.transpose(2, 1, 0)
            v[g, len(cents) :] = False
    return c1, v1, c2, v2

