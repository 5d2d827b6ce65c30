"""The paper's evaluation protocol on a prepared dataset's held-out groups of one split.

Split (``split=``): ``"test"`` -- groups never seen in training nor in model selection (the
default when the dataset has a test split) -- or ``"val"`` -- the validation groups that selected
``best/`` (optimistic for a ``best/`` checkpoint; the only choice for format-1 datasets, and then
the default). ``metrics.json`` records ``"split"`` and a human ``"split_label"`` ("within-subject
test", "held-out-subject test", "validation (selection)"); table.md says it in its first line.

Per bundle: BUAN (dipy's ``bundle_shape_similarity(x, x_recon, rng, clust_thr=[0], threshold=T)``,
computed exactly by `vqdiff.metrics.buan_score`) on each held-out group of 64, plus MSE in model
space, mean MDF (flip-invariant, mm) and mean point-wise distance (flip-sensitive, mm). BUAN alone
scores a reversed reconstruction 1.0 and a collapse to the mean ~0.95, so the distances stand
beside it.

Robustness (the paper's perturbation test, Sec. 3.3): for every held-out group, the encoder output
``z`` is perturbed as ``z + eps * u`` -- ``u`` a random direction with a unit-norm vector at every
latent position -- passed through the (deterministic) bottleneck and decoded; the score is
BUAN(decode(bottleneck(z + eps u)), decode(bottleneck(z))) averaged over groups and ``n_dirs``
directions, for each eps in ``EPSILONS``. The summary is the normalised area under that curve
(trapezoid over eps, divided by the eps range): 1.0 = perfectly robust.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from vqdiff.checkpoint import load_checkpoint
from vqdiff.geometry import groups_to_model, model_to_groups
from vqdiff.metrics import buan_score, mean_mdf, mean_pointwise_distance

from .data import load_dataset

SPLITS = ("test", "val")


def split_label(split: str, split_by: str | None = "group") -> str:
    """What the groups of ``split`` are, for tables and model cards."""
    if split == "test":
        return "held-out-subject test" if split_by == "subject" else "within-subject test"
    return "validation (selection)"


def resolve_split(split: str | None, bundles) -> tuple[str, str | None]:
    """(split, note): ``split`` checked against the data, or the default (test when there is one)."""
    has_test = any(len(b.test_groups) for b in bundles)
    if split is None:
        if has_test:
            return "test", "no split given: evaluating on the test split (never seen in training or selection)"
        return "val", ("the dataset has no test split (prepared without --test-fraction, or format 1): evaluating "
                       "on the validation split, which selected best/ -- optimistic for that checkpoint")
    if split == "validation":
        split = "val"
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; select one of {SPLITS}")
    if split == "test" and not has_test:
        raise ValueError("the dataset has no test split; prepare it with --test-fraction > 0, or pass --split val")
    return split, None

log = logging.getLogger(__name__)
EPSILONS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


@torch.no_grad()
def reconstruct(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder outputs z, reconstructions) of model-layout groups ``x``, 64 groups per call."""
    z = torch.cat([model.encoder(x[i : i + 64]) for i in range(0, len(x), 64)])
    lat = torch.cat([model.bottleneck(z[i : i + 64]).latents for i in range(0, len(z), 64)])
    rec = torch.cat([model.decoder(lat[i : i + 64]) for i in range(0, len(lat), 64)])
    return z, rec


@torch.no_grad()
def robustness(model, norm, x: torch.Tensor, *, threshold: float, n_dirs: int = 2, seed: int = 0,
               epsilons=EPSILONS) -> dict:
    gen = torch.Generator().manual_seed(seed)
    z, base = reconstruct(model, x)
    base_mm = norm.invert(model_to_groups(base.numpy()))
    curve = []
    for eps in epsilons:
        scores = []
        for _ in range(n_dirs):
            u = torch.randn(z.shape, generator=gen)
            u = u / u.norm(dim=1, keepdim=True)  # unit vector at every latent position
            lat = model.bottleneck(z + eps * u).latents
            rec = norm.invert(model_to_groups(model.decoder(lat).numpy()))
            scores.append(buan_score(base_mm, rec, threshold=threshold))
        curve.append(float(np.mean(scores)))
    eps = np.asarray(epsilons, float)
    auc = float(np.trapezoid(curve, eps) / (eps[-1] - eps[0]))
    return {"epsilons": list(epsilons), "buan": curve, "auc": auc, "directions": n_dirs}


@torch.no_grad()
def validate(model, norm, groups_mm: np.ndarray, device, *, threshold: float = 5.0) -> dict:
    """Held-out metrics: MSE (model space), mean MDF and point distance (mm), BUAN at ``threshold``."""
    if len(groups_mm) == 0:
        return {}
    was_training = model.training
    model.eval()
    x = torch.from_numpy(groups_to_model(norm.apply(groups_mm))).to(device)
    recon = reconstruct(model, x)[1].float()
    model.train(was_training)
    mse = torch.mean((recon - x) ** 2).item()
    rec_mm = norm.invert(model_to_groups(recon.cpu().numpy()))
    return {
        "val_mse": mse,
        "val_mdf": float(mean_mdf(groups_mm, rec_mm).mean()),
        "val_pointwise": float(mean_pointwise_distance(groups_mm, rec_mm).mean()),
        "val_buan": float(np.mean(buan_score(groups_mm, rec_mm, threshold=threshold))),
    }


@torch.no_grad()
def codes_in_use(model, x: torch.Tensor) -> int | None:
    """Distinct codes chosen (argmax / argmin per latent position) over ``x``; None without a codebook."""
    used = set()
    for i in range(0, len(x), 64):
        idx = model.encode(x[i : i + 64]).indices
        if idx is None:
            return None
        used.update(idx.unique().tolist())
    return len(used)


def evaluate(checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path, *, threshold: float = 5.0,
             paper_table: str | Path | None = None, figures: bool = True, n_dirs: int = 2,
             split: str | None = None) -> dict:
    """Evaluate ``checkpoint`` on the held-out groups of ``split`` of ``data_dir`` (default: test when the
    dataset has one, else validation; ``summary["split_note"]`` says so); write results to ``out_dir``."""
    import dataclasses

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ck = load_checkpoint(checkpoint)
    model, norm = ck.model.eval(), ck.normalisation
    manifest, bundles = load_dataset(data_dir)
    split, note = resolve_split(split, bundles)
    if note:
        log.warning("%s", note)
    # the figures take the groups of the chosen split where they read held-out groups
    bundles = [dataclasses.replace(b, val_groups=b.held_out(split)) for b in bundles]
    per_bundle, all_x, all_rec = {}, [], []
    for b in bundles:
        groups = b.val_groups
        if len(groups) == 0:
            continue
        x = torch.from_numpy(groups_to_model(norm.apply(groups)))
        _, rec = reconstruct(model, x)
        rec_mm = norm.invert(model_to_groups(rec.numpy()))
        buan = buan_score(groups, rec_mm, threshold=threshold)
        per_bundle[b.bundle] = {
            "groups": len(groups),
            "buan_mean": float(np.mean(buan)),
            "buan_std": float(np.std(buan)),
            "mse": float(torch.mean((rec - x) ** 2)),
            "mdf_mm": float(np.mean(mean_mdf(groups, rec_mm))),
            "pointwise_mm": float(np.mean(mean_pointwise_distance(groups, rec_mm))),
        }
        all_x.append(groups)
        all_rec.append(rec_mm)
    if not per_bundle:
        raise ValueError(f"{data_dir} has no {split} groups; prepare it with --val-fraction / --test-fraction > 0")
    x_all, rec_all = np.concatenate(all_x), np.concatenate(all_rec)
    buan_all = buan_score(x_all, rec_all, threshold=threshold)
    x_t = torch.from_numpy(groups_to_model(norm.apply(x_all)))
    summary = {
        "model": {"id": ck.model_id, "kind": model.kind, "sha256": ck.model_hash},
        "split": split,
        "split_label": split_label(split, manifest.get("split_by")),
        "split_note": note,
        "data_split": {k: manifest.get(k) for k in ("split_by", "val_fraction", "test_fraction", "seed")},
        "data_manifest_sha256": manifest.get("sha256"),
        "threshold": threshold,
        "groups": int(len(x_all)),
        "buan_mean": float(np.mean(buan_all)),
        "buan_std": float(np.std(buan_all)),
        "mse": float(sum(v["mse"] * v["groups"] for v in per_bundle.values()) / len(x_all)),
        "mdf_mm": float(np.mean(mean_mdf(x_all, rec_all))),
        "pointwise_mm": float(np.mean(mean_pointwise_distance(x_all, rec_all))),
        "robustness": robustness(model, norm, x_t, threshold=threshold, n_dirs=n_dirs),
        "codes_in_use": codes_in_use(model, x_t),
        "per_bundle": per_bundle,
        "training": ck.info.get("training", {}),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(markdown_table(summary, paper_table))
    if figures:
        from .figures import write_figures

        write_figures(out, model, norm, bundles, summary, epsilons=EPSILONS)
    return summary


def read_paper_table(path: str | Path) -> dict[str, dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


PAPER_COLUMNS = {"ae": "AE", "vae": "VAE", "vq": "VQ-VAE", "vq_ema": "VQ-VAE-EMA", "vq_diff": "VQ-Diff"}


def markdown_table(summary: dict, paper_table: str | Path | None = None) -> str:
    paper = read_paper_table(paper_table) if paper_table else {}
    col = PAPER_COLUMNS.get(summary["model"]["kind"])
    head = "| Bundle | groups | BUAN (ours) | paper BUAN | mean MDF (mm) | point-wise (mm) | MSE |\n"
    where = summary.get("split_label", split_label("val"))  # (metrics of before the test split: validation)
    lines = [f"BUAN at threshold {summary['threshold']} on the {where} groups; model {summary['model']['id']} "
             f"({summary['model']['kind']}, {summary['model']['sha256'][:12]})\n\n", head,
             "|---|---|---|---|---|---|---|\n"]
    for name, m in summary["per_bundle"].items():
        ref = paper.get(name, {}).get(col, "–") if col else "–"
        lines.append(f"| {name} | {m['groups']} | {m['buan_mean']:.4f} ± {m['buan_std']:.4f} | {ref} | "
                     f"{m['mdf_mm']:.3f} | {m['pointwise_mm']:.3f} | {m['mse']:.2e} |\n")
    lines.append(f"| **all** | {summary['groups']} | {summary['buan_mean']:.4f} ± {summary['buan_std']:.4f} | | "
                 f"{summary['mdf_mm']:.3f} | {summary['pointwise_mm']:.3f} | {summary['mse']:.2e} |\n")
    r = summary["robustness"]
    lines.append(f"\nRobustness AUC {r['auc']:.4f} (BUAN of perturbed vs unperturbed decode at eps "
                 f"{r['epsilons']}: {[round(v, 4) for v in r['buan']]})\n")
    return "".join(lines)
