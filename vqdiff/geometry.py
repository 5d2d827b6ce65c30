"""The group geometry every stage shares: 64 streamlines x 64 points per group, the latent grid.

These are the only definitions of the numbers; `vqdiff.checkpoint` records them in every
checkpoint's ``config.json`` (``"geometry"``) and refuses a checkpoint made for another geometry.
Layouts:

- streamline groups ``(G, GROUP_SIZE, NUM_POINTS, 3)`` in RAS mm or model space (canonicalisation);
- model input ``(G, 3, GROUP_SIZE, NUM_POINTS)`` float32, channels = x, y, z (engines);
- latents ``(G, D, *LATENT_GRID)`` float32, D the model's ``embedding_dim``.

`map_points` moves points through an affine (file space -> RAS mm, input -> model space and back).
"""

from __future__ import annotations

from typing import Any

import numpy as np

GROUP_SIZE = 64  # streamlines per group
NUM_POINTS = 64  # points per streamline after resampling
COORDS = 3  # x, y, z
GROUP_SHAPE = (COORDS, GROUP_SIZE, NUM_POINTS)  # one model input
DOWNSAMPLING = 4  # the encoder's two stride-2 convolutions
LATENT_GRID = (GROUP_SIZE // DOWNSAMPLING, NUM_POINTS // DOWNSAMPLING)  # (16, 16)
_CHUNK = 1 << 13  # points per block of `map_points` (float64 temporaries stay in cache)


def geometry() -> dict[str, Any]:
    """The geometry as recorded in checkpoints and exports."""
    return {"group_size": GROUP_SIZE, "num_points": NUM_POINTS, "latent_grid": list(LATENT_GRID)}


def check_geometry(recorded: dict[str, Any] | None, where: str) -> None:
    """Raise ValueError when ``recorded`` (from a checkpoint/export) differs from this vqdiff's geometry."""
    if recorded is None:  # written before the geometry was recorded: it was this one
        return
    ours = geometry()
    theirs = {k: recorded.get(k) for k in ours}
    if {k: list(v) if isinstance(v, tuple | list) else v for k, v in theirs.items()} != ours:
        raise ValueError(f"{where} was made for groups {theirs}; this vqdiff uses {ours}")


def n_groups(n_streamlines: int) -> int:
    """Groups needed for ``n_streamlines`` (the last one padded)."""
    return -(-int(n_streamlines) // GROUP_SIZE)


def groups_to_model(groups: np.ndarray) -> np.ndarray:
    """(G, S, P, 3) streamline groups -> (G, 3, S, P) model layout (channels = xyz)."""
    return np.ascontiguousarray(np.asarray(groups).transpose(0, 3, 1, 2))


def model_to_groups(x: np.ndarray) -> np.ndarray:
    """(G, 3, S, P) model layout -> (G, S, P, 3)."""
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


def map_points(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Map points (..., 3) (any strides, any float dtype) through a 4x4 affine in float64; return (M, 3)
    native float32: a TRK file's voxmm -> RAS mm, a bundle into model space and back.

    Per output axis ``((x * a0 + y * a1) + z * a2) + t`` on one coordinate at a time, in blocks along
    the first axis (no BLAS: no thread spin on busy hosts, and numpy's product with a 3 x 3 matrix is
    3-4x slower on 30,000 points; small temporaries); a diagonal map (the usual voxmm -> RAS mm shift)
    skips the zero terms, which leaves every finite result unchanged.
    """
    out = np.empty((*points.shape[:-1], 3), dtype=np.float32)
    rot, shift = np.asarray(affine[:3, :3], np.float64), np.asarray(affine[:3, 3], np.float64)
    diagonal = not np.any(rot - np.diag(np.diag(rot)))
    terms = [[(i, rot[i, i])] if diagonal else [(j, rot[i, j]) for j in range(3)] for i in range(3)]
    step = max(1, _CHUNK // max(1, int(np.prod(points.shape[1:-1]))))  # about _CHUNK points per block
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite input: the readers' checks report it
        for lo in range(0, len(points), step):
            block = points[lo:lo + step]
            for i in range(3):
                (j, a), *rest = terms[i]
                acc = np.multiply(block[..., j], a, dtype=np.float64)
                for j, a in rest:
                    acc += np.multiply(block[..., j], a, dtype=np.float64)
                acc += shift[i]
                out[lo:lo + step, ..., i] = acc
    return out.reshape(-1, 3)
