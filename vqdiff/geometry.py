"""The group geometry every stage shares: 64 streamlines x 64 points per group, the latent grid.

These are the only definitions of the numbers; `vqdiff.checkpoint` records them in every
checkpoint's ``config.json`` (``"geometry"``) and refuses a checkpoint made for another geometry.
Layouts:

- streamline groups ``(G, GROUP_SIZE, NUM_POINTS, 3)`` in RAS mm or model space (canonicalisation);
- model input ``(G, 3, GROUP_SIZE, NUM_POINTS)`` float32, channels = x, y, z (engines);
- latents ``(G, D, *LATENT_GRID)`` float32, D the model's ``embedding_dim``.
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
