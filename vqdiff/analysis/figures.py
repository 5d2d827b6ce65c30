"""One figure per scored bundle: node z-scores with the normative band, and the decoded bundle
coloured by node z (matplotlib, the ``eval`` extra; imported only when a figure is asked for)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .lesions import N_NODES, PER_NODE


def node_of_points(flipped: np.ndarray, n_points: int) -> np.ndarray:
    """(N, n_points) node of every point of decoded streamlines in their input direction: canonical
    point j of a streamline the canonicalisation flipped is its point n_points - 1 - j."""
    j = np.arange(n_points)
    per = n_points // N_NODES if n_points >= N_NODES else 1
    canon = np.where(np.asarray(flipped)[:, None], n_points - 1 - j[None, :], j[None, :])
    return np.minimum(canon // per, N_NODES - 1)


def score_figure(score, path: str | Path, *, streamlines=None, flipped=None, label: str = "",
                 alpha: float | None = None) -> Path:
    """Write ``path`` (.png / .pdf / .svg): the node z-scores of ``score`` (`BundleScore`) against the
    band of the reference bundles (z within +-1.96: 95 %), and, given the decoded ``streamlines``
    (64 points each, input direction) and the latents' ``flipped``, the bundle coloured by node z."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = np.asarray(score.node_z)
    ncols = 2 if streamlines is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.2), squeeze=False)
    ax = axes[0, 0]
    nodes = np.arange(len(z))
    ax.axhspan(-1.96, 1.96, color="0.85", label="reference band (95 %)")
    ax.plot(nodes, z, "o-", color="C3", label="this bundle")
    ax.axvline(score.peak_node, color="C3", ls=":", lw=1)
    ax.set_xlabel(f"node (0 = canonical start; {PER_NODE} of 64 points each)")
    ax.set_ylabel("node z-score")
    verdict = "FLAGGED" if score.flagged else "within norms"
    thr = f" (p < {alpha:g})" if alpha is not None else ""
    ax.set_title(f"{score.subject}/{score.bundle} vs {score.tract}: p = {score.p_value:.2g}, {verdict}{thr}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    if streamlines is not None:
        from matplotlib.collections import LineCollection

        ax2 = axes[0, 1]
        pts = np.concatenate(streamlines)
        centre = pts.mean(axis=0)
        _, _, vt = np.linalg.svd(pts - centre, full_matrices=False)
        proj = [(s - centre) @ vt[:2].T for s in streamlines]
        node = node_of_points(flipped, len(streamlines[0]))
        segs, colours = [], []
        for p, nd in zip(proj, node, strict=True):
            segs.extend(np.stack([p[:-1], p[1:]], axis=1))
            colours.extend(z[nd[:-1]])
        lim = max(3.0, float(np.abs(z).max()))
        lc = LineCollection(segs, array=np.asarray(colours), cmap="coolwarm", norm=plt.Normalize(-lim, lim), lw=0.4)
        ax2.add_collection(lc)
        ax2.autoscale()
        ax2.set_aspect("equal")
        ax2.set_xlabel("principal axis 1 (mm)")
        ax2.set_ylabel("principal axis 2 (mm)")
        ax2.set_title("decoded bundle, coloured by node z", fontsize=9)
        fig.colorbar(lc, ax=ax2, label="node z")
    if label:
        fig.text(0.01, 0.01, label, fontsize=7, color="0.3")
    fig.tight_layout(rect=(0, 0.04 if label else 0, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
