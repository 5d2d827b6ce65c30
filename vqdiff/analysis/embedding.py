"""A bundle's along-tract profile and fixed-size embedding, from its latents file alone (no decoding).

The latents of a bundle are ``(G, D, 16, 16)``: G groups of 64 streamlines in canonical order, D
(64) features, a grid of 16 rows across the group's streamlines (each row covers 4 consecutive
streamline slots) by 16 columns along them. The canonical orientation (`vqdiff.canonical`, rule
2) runs every streamline of a bundle the same way, and registration (`vqdiff.registration`) puts
the bundle in model space first, so column ``n`` of the grid is the same stretch of the tract for
every group, and for the same tract of every subject: **node n** (0 = the canonical start).

- **Profile** (`profile`, N = 16 nodes x D features): the mean of the latents over groups and rows,
  each row weighted by its share of real streamlines (``pad_mask``: the reflected copies that pad
  the last group carry no weight). A sum over all streamlines' rows is the same for any order of
  the streamlines and of the groups: the profile depends on the set of streamlines only (order
  invariance of a file: permuting its groups, together with ``order`` and ``pad_mask``, changes
  nothing; shuffling the input file changes the canonical order only where streamlines tie).
- **Embedding** (`embedding`, K = N x D = 1024 values ``e0 ... e1023``, ``e[n * D + d]`` = profile
  node n, feature d): the profile flattened, scaled by ``1 / sqrt(N)`` so that the Euclidean
  distance between two embeddings is the root-mean-square over nodes of the per-node Euclidean
  distances. **The documented distance is the Euclidean distance on the ``e`` columns**
  (`distance`). Measured against cosine and L2-normalised variants in docs/analysis.md: Euclidean
  on the raw profile identifies tracts across subjects at least as well, and it keeps the
  magnitude, which carries the position of the tract in model space.
- **Registration features** (`registration_features`): what the recorded input -> model transform
  says about the subject: isotropic scale (``|det A|^(1/3)``), rotation angle of its polar
  rotation (degrees), translation (mm), and the recorded residual / known flag. Separate named
  columns, never mixed into the ``e`` columns (the embedding lives in model space).

``EMBEDDING_VERSION`` is written with every table and norms file; readers refuse another version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..geometry import GROUP_SIZE

EMBEDDING_VERSION = 1


@dataclass(frozen=True)
class BundleFeatures:
    """What `features` reads from one latents file."""

    profile: np.ndarray  # (N, D) float64
    registration: dict[str, Any] = field(default_factory=dict)
    n_streamlines: int = 0
    n_groups: int = 0
    template: str | None = None
    known: bool | None = None
    model_sha256: str = ""
    model_id: str = ""

    @property
    def n_nodes(self) -> int:
        return int(self.profile.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.profile.shape[1])

    @property
    def embedding(self) -> np.ndarray:
        return embedding_from_profile(self.profile)


def row_weights(pad_mask: np.ndarray, n_groups: int, rows: int) -> np.ndarray:
    """(G, rows) share of real streamlines among the slots each latent row covers."""
    per_row = GROUP_SIZE // rows
    return np.asarray(pad_mask, np.float64).reshape(n_groups, rows, per_row).mean(axis=2)


def _weights(latents: np.ndarray, pad_mask: np.ndarray) -> np.ndarray:
    lat = np.asarray(latents)
    if lat.ndim != 4:
        raise ValueError(f"latents must be (G, D, rows, nodes), got shape {lat.shape}")
    g, _, r, _ = lat.shape
    if GROUP_SIZE % r or np.asarray(pad_mask).size != g * GROUP_SIZE:
        raise ValueError(f"pad_mask of {np.asarray(pad_mask).size} slots does not fit {g} groups of "
                         f"{GROUP_SIZE} with {r} latent rows")
    w = row_weights(pad_mask, g, r)  # (G, R)
    if w.sum() <= 0:
        raise ValueError("the latents hold no real streamline")
    return w / w.sum()


def profile_of(latents: np.ndarray, pad_mask: np.ndarray) -> np.ndarray:
    """Latents (G, D, R, N) and pad_mask (G * 64,) -> the profile (N, D) float64 (module doc)."""
    w = _weights(latents, pad_mask)  # (G, R): one (1, R) @ (R, N) product per group and feature
    per_group = np.matmul(w[:, None, None, :], np.asarray(latents, np.float64))  # (G, D, 1, N)
    return per_group.sum(axis=0)[:, 0, :].T  # (D, N) -> (N, D)


def profile_and_spread(latents: np.ndarray, pad_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(profile (N, D), spread (N, D): the weighted standard deviation over the streamline rows)."""
    w = _weights(latents, pad_mask)
    lat = np.asarray(latents, np.float64)
    mean = np.tensordot(w, lat, axes=([0, 1], [0, 2]))  # (D, N)
    var = np.tensordot(w, (lat - mean[None, :, None, :]) ** 2, axes=([0, 1], [0, 2]))
    return mean.T, np.sqrt(np.maximum(var, 0.0)).T


def profile(latents) -> np.ndarray:
    """The along-tract profile (N nodes, D features) of a `vqdiff.Latents` (module doc)."""
    return profile_of(latents.latents, latents.pad_mask)


def embedding_from_profile(prof: np.ndarray) -> np.ndarray:
    """Profile (N, D) -> embedding (N * D,): flattened node-major, scaled by ``1 / sqrt(N)``."""
    prof = np.asarray(prof, np.float64)
    return prof.reshape(-1) / math.sqrt(prof.shape[0])


def profile_from_embedding(emb: np.ndarray, n_nodes: int) -> np.ndarray:
    """The inverse of `embedding_from_profile` for one (K,) or many (M, K) embeddings."""
    emb = np.asarray(emb, np.float64)
    k = emb.shape[-1]
    if k % n_nodes:
        raise ValueError(f"an embedding of {k} values is not {n_nodes} nodes of features")
    return (emb * math.sqrt(n_nodes)).reshape(*emb.shape[:-1], n_nodes, k // n_nodes)


def embedding(latents) -> np.ndarray:
    """The fixed-size, order-invariant embedding (N * D,) float64 of a `vqdiff.Latents` (module doc)."""
    return embedding_from_profile(profile(latents))


def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The documented distance: Euclidean on embeddings; ``a`` (K,) or (M, K) against ``b`` (K,) or (M, K)."""
    return np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis=-1)


def registration_features(matrix: np.ndarray, registration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Named features of the recorded input -> model ``matrix`` (4, 4) and registration record."""
    m = np.asarray(matrix, np.float64)
    a = m[:3, :3]
    det = float(np.linalg.det(a))
    u, _, vt = np.linalg.svd(a)
    rot = u @ vt
    if np.linalg.det(rot) < 0:  # a reflection: report the rotation part of the proper factor
        rot = u @ np.diag([1.0, 1.0, -1.0]) @ vt
    cos = float(np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0))
    reg = registration or {}
    return {
        "reg_scale": abs(det) ** (1.0 / 3.0),
        "reg_rotation_deg": math.degrees(math.acos(cos)),
        "reg_tx_mm": float(m[0, 3]), "reg_ty_mm": float(m[1, 3]), "reg_tz_mm": float(m[2, 3]),
        "reg_method": reg.get("method"),
        "reg_residual_mm": reg.get("residual_mm"),
    }


def features(latents) -> BundleFeatures:
    """Everything the analysis reads from one `vqdiff.Latents`: profile, registration features."""
    prof = profile_of(latents.latents, latents.pad_mask)
    reg = dict(latents.registration or {})
    return BundleFeatures(
        profile=prof, registration=registration_features(latents.matrix, reg),
        n_streamlines=latents.n_streamlines, n_groups=latents.n_groups, template=reg.get("template"),
        known=reg.get("known"), model_sha256=str(latents.model.get("sha256", "")),
        model_id=str(latents.model.get("id", "")))
