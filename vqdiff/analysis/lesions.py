"""Synthetic lesions of real bundles, located at a node of the canonical profile (validation only).

Every lesion starts from the bundle resampled to 64 points per streamline and oriented by the
canonical rules (`vqdiff.canonical.resample`, `orientation_flips`), so that points ``4k .. 4k + 3``
of every streamline are node ``k`` of the 16-node profile (`vqdiff.analysis.embedding`); the
lesioned bundle is returned as those 64-point streamlines (encoding resamples to 64 points anyway,
so an untouched bundle encodes the same). Kinds, with their size parameters:

- ``remove`` (`remove_cross_section`): at node ``k``, the streamlines on one side of the bundle's
  cross-section are removed: those whose position at the node, projected on a direction across the
  tract (random, perpendicular to the mean tangent there), is in the top ``fraction`` (default 0.5).
  What a lesion killing the fibres through one part of a cross-section does to the tract.
- ``truncate`` (`truncate_end`): a share ``fraction`` (default 0.5) of the streamlines lose the last
  ``length`` (default 0.3) of their length at one end (``end`` 0: the canonical start, 1: the
  end). The lesion's node is that end's node (0 or 15).
- ``displace`` (`displace_segment`): the points of nodes ``k - width .. k + width`` (default
  width 1.5 nodes, a cosine bump reaching 0 at the edges) move by up to ``shift_mm`` (default 4 mm)
  in a direction across the tract: a local kink of a segment.

`lesion` draws one lesion of a kind at a random node (2 .. 13 for the located kinds) and returns the
streamlines and the lesion's node. The node is in the orientation of the input space; a caller that
encodes the bundle maps it to the model-space node with `model_node` (the registration may turn the
bundle so that canonicalisation runs it the other way).
"""

from __future__ import annotations

import numpy as np

from ..canonical import orientation_flips, resample
from ..geometry import NUM_POINTS

KINDS = ("remove", "truncate", "displace")
N_NODES = 16
PER_NODE = NUM_POINTS // N_NODES


def oriented(streamlines) -> np.ndarray:
    """(N, 64, 3) float64: the streamlines resampled and oriented by the canonical rules."""
    x = resample(streamlines).astype(np.float64)
    flips = orientation_flips(x.astype(np.float32))
    x[flips] = x[flips, ::-1]
    return x


def _across(x: np.ndarray, node: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(unit tangent, unit random direction across the tract) at ``node`` of oriented ``x``."""
    mid = node * PER_NODE + PER_NODE // 2
    lo, hi = max(mid - 2, 0), min(mid + 2, NUM_POINTS - 1)
    t = (x[:, hi] - x[:, lo]).mean(axis=0)
    t /= np.linalg.norm(t) + 1e-12
    v = rng.normal(size=3)
    v -= v.dot(t) * t
    return t, v / (np.linalg.norm(v) + 1e-12)


def remove_cross_section(x: np.ndarray, node: int, rng: np.random.Generator, *, fraction: float = 0.5) -> np.ndarray:
    """Remove the ``fraction`` of streamlines on one side of the cross-section at ``node`` (module doc)."""
    _, v = _across(x, node, rng)
    proj = x[:, node * PER_NODE + PER_NODE // 2] @ v
    keep = proj < np.quantile(proj, 1.0 - fraction)
    if keep.sum() < 2:
        raise ValueError(f"removing {fraction:.0%} of {len(x)} streamlines leaves fewer than 2")
    return x[keep]


def truncate_end(x: np.ndarray, end: int, rng: np.random.Generator, *, fraction: float = 0.5,
                 length: float = 0.3) -> np.ndarray:
    """Cut the last ``length`` of a ``fraction`` of the streamlines at ``end`` (0 start, 1 end) (module doc)."""
    out = x.copy()
    chosen = rng.random(len(x)) < fraction
    keep = 1.0 - length
    src = np.linspace(0.0, keep, NUM_POINTS) if end == 1 else np.linspace(1.0 - keep, 1.0, NUM_POINTS)
    pos = src * (NUM_POINTS - 1)
    i0 = np.clip(np.floor(pos).astype(int), 0, NUM_POINTS - 2)
    w = (pos - i0)[None, :, None]
    cut = x[chosen][:, i0] * (1 - w) + x[chosen][:, i0 + 1] * w
    out[chosen] = cut
    return out


def displace_segment(x: np.ndarray, node: int, rng: np.random.Generator, *, shift_mm: float = 4.0,
                     width: float = 1.5) -> np.ndarray:
    """Move the points around ``node`` across the tract by a cosine bump of ``shift_mm`` (module doc)."""
    _, v = _across(x, node, rng)
    centre = node * PER_NODE + (PER_NODE - 1) / 2
    half = width * PER_NODE
    d = np.abs(np.arange(NUM_POINTS) - centre) / half
    bump = np.where(d < 1, 0.5 * (1 + np.cos(np.pi * np.minimum(d, 1))), 0.0)
    return x + shift_mm * bump[None, :, None] * v[None, None, :]


def lesion(streamlines, kind: str, rng: np.random.Generator, **size) -> tuple[list[np.ndarray], int]:
    """One lesion of ``kind`` at a random place -> (lesioned 64-point streamlines float32, the lesion's node)."""
    if kind not in KINDS:
        raise ValueError(f"lesion kind {kind!r}; expected one of {KINDS}")
    x = oriented(streamlines)
    if kind == "truncate":
        end = int(rng.integers(0, 2))
        y, node = truncate_end(x, end, rng, **size), (N_NODES - 1) * end
    else:
        node = int(rng.integers(2, N_NODES - 2))
        y = (remove_cross_section if kind == "remove" else displace_segment)(x, node, rng, **size)
    return [s.astype(np.float32) for s in y], node


def model_node(node: int, flipped: np.ndarray) -> int:
    """The lesion's node in the encoded bundle: reversed when canonicalisation (in model space) flipped
    most of the given (oriented) streamlines."""
    return N_NODES - 1 - node if float(np.mean(flipped)) > 0.5 else node
