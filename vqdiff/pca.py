"""First principal components of many small point sets at once: the linear algebra of
`vqdiff.canonical.group_order`.

Everything is float64 and batched: the Gram matrices of many groups through one Lanczos solve, the
bundle's own axis by Lanczos on its centred rows (``x.T x`` never formed; very large bundles accumulate
the covariance block by block, bounded temporaries), no Python loop per group or per streamline.
Axes are signed as canonicalisation requires: the largest-magnitude component positive.
"""

from __future__ import annotations

import functools

import numpy as np

BLOCK_ROWS = 512  # rows (streamlines) converted to float64 at a time
TOL = 1e-11  # accepted bound on sin(angle) between a computed and the exact top eigenvector
IMPLICIT_BYTES = 64 << 20  # centred float64 rows kept whole for `top_right_vector` up to this size


@functools.lru_cache(maxsize=16)
def _probe(n: int) -> np.ndarray:
    """A fixed pseudo-random unit vector (n,), the same in every process (read-only)."""
    r = np.random.default_rng(20250101).standard_normal(n)
    r /= np.sqrt(r @ r)
    r.flags.writeable = False
    return r


def top_eigvecs(m: np.ndarray) -> np.ndarray:
    """Unit eigenvectors (G, n) of the largest eigenvalue of symmetric PSD matrices ``m`` (G, n, n).

    `_lanczos` on the products ``m v``, started from each matrix's column of largest variance plus a
    little of a fixed generic vector r (so that no eigenvector is structurally orthogonal to the start:
    a block-diagonal m would hide one). Signs are arbitrary.
    """
    g, n, _ = m.shape
    if n <= 16:
        return np.linalg.eigh(m)[1][..., -1]
    start = m[np.arange(g), :, np.argmax(np.einsum("gii->gi", m), axis=1)] + 0.3 * (m @ _probe(n))
    floor = np.finfo(float).eps * n * np.abs(m).max(axis=(1, 2))  # below it, beta is a breakdown
    return _lanczos(lambda v: (m @ v[:, :, None])[..., 0], start, floor)


def top_right_vector(x: np.ndarray) -> np.ndarray:
    """Unit top eigenvector (D,) of ``x.T @ x`` for rows ``x`` (N, D) float64, the product never formed.

    `top_eigvecs` (the same start, checks and tolerance) on the operator ``v -> x.T (x v)``: two
    matrix-vector products per step, about 4 N D flops, where forming the (D, D) matrix costs N D^2
    (D = 192: 10 steps are ~5x fewer flops). Sign arbitrary.
    """
    d = x.shape[1]
    var = np.einsum("ij,ij->j", x, x)  # the diagonal of x.T x, whose entries are at most its largest
    start = x.T @ x[:, int(np.argmax(var))] + 0.3 * (x.T @ (x @ _probe(d)))
    floor = np.finfo(float).eps * d * var.max(keepdims=True)
    return _lanczos(lambda v: (x.T @ (x @ v[0]))[None], start[None], floor)[0]


def _lanczos(apply, start: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """Unit top eigenvectors (G, n) of G symmetric PSD operators, ``apply(v)`` (G, n) -> (G, n), from
    ``start`` (G, n); ``floor`` (G,): a beta at or below it is a breakdown.

    Batched Lanczos with full re-orthogonalisation (classical Gram-Schmidt, twice). Every 2 steps from
    the 8th (real groups converge in 8-12), the top Ritz pairs are checked: all done once each residual
    ``|beta_k s_k|`` (= ``||m u - theta_1 u||``) is below `TOL` times the Ritz gap ``theta_1 - theta_2``,
    or the operator's Krylov space is exhausted (a breakdown, exact); at ``n`` steps the Krylov space
    is the whole space.
    """
    g, n = start.shape
    basis = np.zeros((g, n + 1, n))
    alpha, beta = np.zeros((g, n)), np.zeros((g, n))
    norm = np.sqrt(np.einsum("gi,gi->g", start, start))
    basis[:, 0] = start / np.where(norm > 0, norm, 1.0)[:, None]  # a zero operator keeps a zero basis
    for k in range(n):
        w = apply(basis[:, k])
        alpha[:, k] = np.einsum("gi,gi->g", w, basis[:, k])
        done = basis[:, : k + 1]
        for _ in range(2):
            w -= ((done @ w[:, :, None]).transpose(0, 2, 1) @ done)[:, 0]
        beta[:, k] = np.sqrt(np.einsum("gi,gi->g", w, w))
        dead = beta[:, k] <= floor
        if k == n - 1 or (k >= 7 and k % 2 == 1):
            i = np.arange(k + 1)
            t = np.zeros((g, k + 1, k + 1))
            t[:, i, i] = alpha[:, : k + 1]
            t[:, i[:-1], i[1:]] = t[:, i[1:], i[:-1]] = beta[:, :k]
            theta, s = np.linalg.eigh(t)
            residual = np.abs(beta[:, k] * s[:, -1, -1])
            if k == n - 1 or np.all(dead | (residual <= TOL * (theta[:, -1] - theta[:, -2]))):
                u = (s[:, None, :, -1] @ done)[:, 0]
                norm = np.sqrt(np.einsum("gi,gi->g", u, u))
                return u / np.where(norm > 0, norm, 1.0)[:, None]
        basis[:, k + 1] = w / np.where(dead, np.inf, beta[:, k])[:, None]  # a dead operator adds zeros
    raise AssertionError("unreachable: the loop returns at k == n - 1")


def signed(axis: np.ndarray) -> np.ndarray:
    """``axis`` (G, D) with each row's sign fixed (in place): its largest-|.| component is positive."""
    big = axis[np.arange(len(axis)), np.argmax(np.abs(axis), axis=1)]
    axis *= np.where(big < 0, -1.0, 1.0)[:, None]
    return axis


def unit_signed(axis: np.ndarray) -> np.ndarray:
    """``axis`` (G, D) scaled to unit rows (zero rows stay zero) and `signed`, in place."""
    norm = np.sqrt(np.einsum("gd,gd->g", axis, axis))
    axis /= np.where(norm > 0, norm, 1.0)[:, None]
    return signed(axis)


def pc1_projections(flat: np.ndarray) -> np.ndarray:
    """Projections (N,) of the rows (N, D) of ``flat`` (any float dtype) on their first principal
    component, after centring, in float64.

    The centred rows in float64 go through `top_right_vector` (no covariance matrix) while they take
    at most `IMPLICIT_BYTES`; larger bundles accumulate the (D, D) covariance over blocks of rows
    converted and centred one block at a time (no (N, D) float64 temporary).
    """
    n, d = flat.shape
    mean = flat.mean(axis=0, dtype=np.float64)
    if n < 2:
        return np.zeros(n)
    if n * d * 8 <= IMPLICIT_BYTES:
        centred = np.subtract(flat, mean, dtype=np.float64)
        return centred @ signed(top_right_vector(centred)[None])[0]
    buf = np.empty((min(n, 2 * BLOCK_ROWS), d))  # syrk is more efficient on 1024 rows than on 512
    blocks = [(lo, min(lo + len(buf), n)) for lo in range(0, n, len(buf))]
    cov = np.zeros((d, d))
    for lo, hi in blocks:
        centred = np.subtract(flat[lo:hi], mean, out=buf[: hi - lo])
        cov += centred.T @ centred
    axis = signed(top_eigvecs(cov[None]))[0]
    out = np.empty(n)
    for lo, hi in blocks:
        np.matmul(np.subtract(flat[lo:hi], mean, out=buf[: hi - lo]), axis, out=out[lo:hi])
    return out


def sorted_by_own_pc1(flat: np.ndarray, batches: list[np.ndarray]) -> list[np.ndarray]:
    """Re-sort groups of rows along their own first principal component, many groups at a time.

    ``batches``: arrays (k, w) of row indices into ``flat`` (N, D), one group per row. Returns them with
    each group stably sorted by the projection of its (float64, centred) rows on its PC1 axis ``X^T u``
    (unit, `signed`), u the top eigenvector of the group's (w, w) Gram matrix. The Gram matrices of all
    groups (short ones zero-padded, which leaves u unchanged) go through one `top_eigvecs`; the centred
    rows are kept for the projections (a few MB per call: callers pass about `BLOCK_ROWS` x 16 rows).
    """
    width = max(b.shape[1] for b in batches)
    grams = np.zeros((sum(len(b) for b in batches), width, width))
    centred, g0 = [], 0
    for b in batches:
        k, w = b.shape
        rows = flat[b].astype(np.float64)  # (k, w, D)
        rows -= rows.mean(axis=1, keepdims=True)
        grams[g0 : g0 + k, :w, :w] = rows @ rows.transpose(0, 2, 1)
        centred.append(rows)
        g0 += k
    u = top_eigvecs(grams)
    out, g0 = [], 0
    for b, rows in zip(batches, centred, strict=True):
        k, w = b.shape
        axis = unit_signed((u[g0 : g0 + k, None, :w] @ rows)[:, 0])
        local = np.argsort((rows @ axis[:, :, None])[..., 0], axis=1, kind="stable")
        out.append(b[np.arange(k)[:, None], local])
        g0 += k
    return out
