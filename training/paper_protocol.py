"""Table 1 with the authors' own weights: the paper's protocol beside the product's, on whole bundles.

Two ways to cut a bundle into groups of 64 streamlines x 64 points (both resampled with dipy's
``set_number_of_points``):

``file``       the paper's: 64 consecutive streamlines in file order, as given (no re-orientation);
               an incomplete last group is dropped (the authors' groups were all full).
``canonical``  the product's (`vqdiff.canonical`): streamlines oriented, sorted into spatially
               coherent groups, the last group reflect-padded (what `vqdiff.codec` encodes).

Per group: BUAN at T = 5 in subject01's units (the paper's 0.05 in their [-1, 1] space), mean MDF
and MSE in the model's space. Inference is deterministic (the authors sampled Gumbel noise at
evaluation too). Models whose training data excluded the bundles (the authors' weights on subject01,
one of their validation subjects) are evaluated on every group; models trained on subject01 only on
its test split (`evaluate`).

    python -m vqdiff.training.paper_protocol ../shared/data/subject01 out/table1-authors \\
        out/authors-ae out/authors-vq out/authors-vq_ema out/authors-vq_diff \\
        --paper-table ../shared/data/paper_buan_table.csv --markdown docs/table1-authors.md
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from vqdiff.canonical import GROUP_SIZE, canonicalise, resample

log = logging.getLogger(__name__)
GROUPINGS = ("file", "canonical")
GUMBEL = "file_gumbel"  # VQ-Diff only: file order with the authors' noisy (Gumbel) inference


def file_order_groups(streamlines) -> np.ndarray:
    """(G, 64, 64, 3): consecutive streamlines in file order; the incomplete remainder is dropped."""
    x = resample(streamlines)
    g = len(x) // GROUP_SIZE
    return x[: g * GROUP_SIZE].reshape(g, GROUP_SIZE, *x.shape[1:])


def canonical_groups(streamlines) -> np.ndarray:
    """(G, 64, 64, 3): the product's canonical groups (last one reflect-padded), as the codec encodes them."""
    return canonicalise(streamlines).groups


def group_bundle(streamlines, grouping: str) -> np.ndarray:
    if grouping == "file":
        return file_order_groups(streamlines)
    if grouping == "canonical":
        return canonical_groups(streamlines)
    raise ValueError(f"unknown grouping {grouping!r}; select one of {GROUPINGS}")


def score_groups(checkpoint, groups_mm: np.ndarray, *, threshold: float = 5.0, gumbel: bool = False) -> dict:
    """Reconstruction of ``groups_mm`` by a loaded checkpoint; per-group arrays. Deterministic, or
    with ``gumbel`` the VQ-Diff bottleneck in training mode (Gumbel noise, as the authors evaluated;
    seeded)."""
    import torch

    from vqdiff.geometry import groups_to_model, model_to_groups
    from vqdiff.metrics import buan_score, mean_mdf

    from .evaluate import reconstruct

    model, norm = checkpoint.model.eval(), checkpoint.normalisation
    x = torch.from_numpy(groups_to_model(norm.apply(groups_mm)))
    if gumbel:
        model.bottleneck.train()
        torch.manual_seed(1337)
    try:
        rec = reconstruct(model, x)[1]
    finally:
        model.eval()
    rec_mm = norm.invert(model_to_groups(rec.numpy()))
    return {"buan": buan_score(groups_mm, rec_mm, threshold=threshold), "mdf": mean_mdf(groups_mm, rec_mm),
            "mse": ((rec - x) ** 2).mean(dim=(1, 2, 3)).numpy()}


def evaluate_models(data_dir: str | Path, checkpoints: list[str | Path], *, threshold: float = 5.0) -> dict:
    """{model_id: {grouping: {bundle: stats}}} for every checkpoint, both groupings, every bundle."""
    from vqdiff.checkpoint import load_checkpoint
    from vqdiff.discovery import find_bundle_files
    from vqdiff.io import load_bundle

    files = find_bundle_files(data_dir)
    if not files:
        raise FileNotFoundError(f"no bundle files under {data_dir}")
    groups = {g: {} for g in GROUPINGS}
    for f in files:
        streamlines = load_bundle(f.path).streamlines
        for g in GROUPINGS:
            groups[g][f.bundle] = group_bundle(streamlines, g)
    results: dict = {}
    for path in checkpoints:
        ck = load_checkpoint(path)
        entry = {"kind": ck.model.kind, "sha256": ck.model_hash, "path": str(path)}
        for g in GROUPINGS + ((GUMBEL,) if ck.model.kind == "vq_diff" else ()):
            per_bundle, all_ = {}, {"buan": [], "mdf": [], "mse": []}
            for bundle, gr in sorted(groups[g.split("_")[0]].items()):
                s = score_groups(ck, gr, threshold=threshold, gumbel=g == GUMBEL)
                per_bundle[bundle] = {"groups": len(gr), "buan_mean": float(s["buan"].mean()),
                                      "buan_std": float(s["buan"].std()), "mdf_mm": float(s["mdf"].mean()),
                                      "mse": float(s["mse"].mean())}
                for k in all_:
                    all_[k].append(s[k])
            cat = {k: np.concatenate(v) for k, v in all_.items()}
            entry[g] = {"per_bundle": per_bundle, "groups": int(len(cat["buan"])),
                        "buan_mean": float(cat["buan"].mean()), "buan_std": float(cat["buan"].std()),
                        "mdf_mm": float(cat["mdf"].mean()), "mse": float(cat["mse"].mean())}
            log.info("%s %s: BUAN %.4f, MDF %.3f", ck.model_id, g, entry[g]["buan_mean"], entry[g]["mdf_mm"])
        results[ck.model_id] = entry
    return {"data": str(Path(data_dir).resolve()), "threshold": threshold, "groupings": list(GROUPINGS),
            "models": results}


def _short(cell: str) -> str:
    """'0.999978 ± 0.000412' -> '0.9999 ± 0.0004' (anything else unchanged)."""
    try:
        mean, std = (float(v) for v in cell.split("±"))
    except ValueError:
        return cell
    return f"{mean:.4f} ± {std:.4f}"


def markdown(results: dict, paper_table: str | Path | None = None) -> str:
    """One BUAN table (paper | file order | canonical per model) and one mean-MDF table."""
    from .evaluate import PAPER_COLUMNS, read_paper_table

    paper = read_paper_table(paper_table) if paper_table else {}
    models = results["models"]
    bundles = sorted(next(iter(models.values()))["file"]["per_bundle"])
    names = {mid: PAPER_COLUMNS.get(m["kind"], m["kind"]) for mid, m in models.items()}
    head = "| Bundle | groups | " + " | ".join(f"{n} paper | {n} file | {n} canonical" for n in names.values()) + " |\n"
    lines = [f"BUAN at T = {results['threshold']} (mean ± std over groups of 64); paper = the paper's Table 1, "
             "file = the paper's grouping, canonical = the product's\n\n", head,
             "|---|---|" + "---|---|---|" * len(models) + "\n"]
    for b in bundles + ["all"]:
        first = next(iter(models.values()))
        groups = first["file"]["groups"] if b == "all" else first["file"]["per_bundle"][b]["groups"]
        cells = []
        for m in models.values():
            f = m["file"] if b == "all" else m["file"]["per_bundle"][b]
            c = m["canonical"] if b == "all" else m["canonical"]["per_bundle"][b]
            ref = paper.get(b, {}).get(PAPER_COLUMNS.get(m["kind"], ""), "–") if b != "all" else ""
            ref = _short(ref)
            cells += [ref, f"{f['buan_mean']:.4f} ± {f['buan_std']:.4f}", f"{c['buan_mean']:.4f} ± {c['buan_std']:.4f}"]
        lines.append(f"| {'**all**' if b == 'all' else b} | {groups} | " + " | ".join(cells) + " |\n")
    lines.append("\nMean MDF (subject01 units; file order / canonical)\n\n| Bundle | "
                 + " | ".join(names.values()) + " |\n|---|" + "---|" * len(models) + "\n")
    for b in bundles + ["all"]:
        cells = []
        for m in models.values():
            f = m["file"] if b == "all" else m["file"]["per_bundle"][b]
            c = m["canonical"] if b == "all" else m["canonical"]["per_bundle"][b]
            cells.append(f"{f['mdf_mm']:.3f} / {c['mdf_mm']:.3f}")
        lines.append(f"| {'**all**' if b == 'all' else b} | " + " | ".join(cells) + " |\n")
    for mid, m in models.items():
        if GUMBEL in m:
            lines.append(f"\n{mid} with the authors' noisy inference (Gumbel softmax at evaluation, file order, "
                         f"seed 1337): BUAN {m[GUMBEL]['buan_mean']:.4f} ± {m[GUMBEL]['buan_std']:.4f}, "
                         f"mean MDF {m[GUMBEL]['mdf_mm']:.3f} (deterministic: {m['file']['buan_mean']:.4f}, "
                         f"{m['file']['mdf_mm']:.3f})\n")
    lines.append("\nModels: " + ", ".join(f"{mid} (`{m['sha256'][:12]}`)" for mid, m in models.items()) + "\n")
    return "".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_data", help="Folder of bundle files (subject01).")
    p.add_argument("out_dir", help="Folder for table1_authors.json and .md.")
    p.add_argument("checkpoints", nargs="+", help="Checkpoint directories (e.g. out/authors-vq_diff).")
    p.add_argument("--threshold", type=float, default=5.0)
    p.add_argument("--paper-table", help="The paper's BUAN CSV to print beside ours.")
    p.add_argument("--markdown", help="Also write the Markdown table here.")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    res = evaluate_models(args.in_data, args.checkpoints, threshold=args.threshold)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table1_authors.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res, args.paper_table)
    (out / "table1_authors.md").write_text(md)
    if args.markdown:
        Path(args.markdown).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
