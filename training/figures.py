"""PNG figures of an evaluation: reconstructions per bundle, latent t-SNE, a perturbation series.

Imported by `vqdiff.training.evaluate` (never the other way round): everything the figures need
from the evaluation comes in through the arguments of `write_figures`, the eps values of the
perturbation series included (by default those of ``summary["robustness"]``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vqdiff.geometry import GROUP_SIZE, groups_to_model, model_to_groups


def _plot_group(ax, group: np.ndarray, color: str, axes=(1, 2), **kw) -> None:
    for s in group:
        ax.plot(s[:, axes[0]], s[:, axes[1]], color=color, lw=0.4, alpha=0.6, **kw)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


@torch.no_grad()
def _decode_mm(model, norm, groups_mm: np.ndarray, eps: float = 0.0, seed: int = 0) -> np.ndarray:
    x = torch.from_numpy(groups_to_model(norm.apply(groups_mm)))
    z = model.encoder(x)
    if eps:
        u = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
        z = z + eps * u / u.norm(dim=1, keepdim=True)
    return norm.invert(model_to_groups(model.decoder(model.bottleneck(z).latents).numpy()))


def write_figures(out: Path, model, norm, bundles, summary: dict, *, epsilons=None) -> list[Path]:
    """Write the PNG figures of an evaluation into ``out``; returns their paths.

    ``summary`` is the evaluation summary (``metrics.json``); ``epsilons`` are the perturbation
    sizes of the perturbation series, by default ``summary["robustness"]["epsilons"]``.
    """
    epsilons = tuple(summary["robustness"]["epsilons"] if epsilons is None else epsilons)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    with_val = [b for b in bundles if len(b.val_groups)]
    # 1. original vs reconstruction, one held-out group per bundle (sagittal projection: y vs z)
    cols = min(4, len(with_val))
    rows = -(-len(with_val) // cols)
    fig, axs = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, b in zip(axs.flat, with_val, strict=False):
        rec = _decode_mm(model, norm, b.val_groups[:1])
        _plot_group(ax, b.val_groups[0], "tab:blue")
        _plot_group(ax, rec[0], "tab:red")
        ax.set_title(f"{b.bundle}  BUAN {summary['per_bundle'][b.bundle]['buan_mean']:.3f}", fontsize=8)
    for ax in list(axs.flat)[len(with_val):]:
        ax.axis("off")
    fig.suptitle("held-out group: original (blue) vs reconstruction (red), y-z projection", fontsize=9)
    fig.tight_layout()
    written.append(out / "reconstructions.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # 2. t-SNE of the latents of every canonical group (train and held-out), coloured by bundle
    from sklearn.manifold import TSNE

    feats, labels = [], []
    with torch.no_grad():
        for b in bundles:
            n = len(b.train) // GROUP_SIZE * GROUP_SIZE
            groups = np.concatenate([b.train[:n].reshape(-1, GROUP_SIZE, *b.train.shape[1:]), b.val_groups])
            x = torch.from_numpy(groups_to_model(norm.apply(groups)))
            feats.append(model.encode(x).latents.reshape(len(x), -1).numpy())
            labels += [b.bundle] * len(x)
    feats = np.concatenate(feats)
    if len(feats) >= 5:
        emb = TSNE(n_components=2, perplexity=min(30.0, len(feats) - 1.0), random_state=0, init="pca").fit_transform(
            feats)
        fig, ax = plt.subplots(figsize=(6.5, 5))
        names = sorted(set(labels))
        cmap = plt.get_cmap("tab20", len(names))
        for i, name in enumerate(names):
            m = np.array(labels) == name
            ax.scatter(emb[m, 0], emb[m, 1], s=12, color=cmap(i), label=name)
        ax.legend(fontsize=6, markerscale=1, loc="best", ncol=2)
        ax.set_title(f"latent t-SNE ({summary['model']['kind']}), one point per group of 64", fontsize=9)
        fig.tight_layout()
        written.append(out / "latent_tsne.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    # 3. perturbation series on one held-out group (MCP as in the paper when present)
    target = next((b for b in with_val if b.bundle == "MCP"), with_val[0])
    fig, axs = plt.subplots(1, len(epsilons), figsize=(2.4 * len(epsilons), 2.6), squeeze=False)
    for ax, eps in zip(axs[0], epsilons, strict=True):
        rec = _decode_mm(model, norm, target.val_groups[:1], eps=eps)
        _plot_group(ax, target.val_groups[0], "0.8")
        _plot_group(ax, rec[0], "tab:red")
        ax.set_title(f"eps = {eps}", fontsize=8)
    fig.suptitle(f"{target.bundle}: decode(bottleneck(z + eps u)); robustness AUC "
                 f"{summary['robustness']['auc']:.3f}", fontsize=9)
    fig.tight_layout()
    written.append(out / "perturbation.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written
