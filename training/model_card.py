"""Publish a trained run as a model directory with a model card.

``python -m vqdiff.training.model_card RUN_DIR EVAL_DIR OUT_MODEL_DIR`` copies ``RUN_DIR/best``
(weights + config) into ``OUT_MODEL_DIR`` and writes ``MODEL_CARD.md``, ``metrics.json`` and
``learning_curve.png`` (validation BUAN and mean MDF against training wall time, from
``RUN_DIR/log.jsonl``), so the published model documents how it was made. Every number says which
split it comes from: "within-subject test" (groups never seen in training nor in selection) or
"validation (selection)" (the groups that picked ``best/``; evaluations of datasets without a test
split, and the learning curve).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from vqdiff.checkpoint import load_checkpoint, read_config
from vqdiff.cli.common import add_overwrite_arg, check_outputs, run_main


def learning_curve(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "val_buan" in r]


def plot_curve(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["wall_s"] / 60 for r in curve]
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    ax1.plot(t, [r["val_buan"] for r in curve], "o-", color="tab:blue", ms=3)
    ax1.set_xlabel("training wall time (min)")
    ax1.set_ylabel("validation BUAN (T = 5)", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(t, [r["val_mdf"] for r in curve], "s-", color="tab:red", ms=3)
    ax2.set_ylabel("validation mean MDF (units)", color="tab:red")
    ax2.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def split_rows(metrics: dict) -> tuple[str, str]:
    """(the split row of the card, the label of the evaluated groups) from an evaluation's metrics."""
    label = metrics.get("split_label", "validation (selection)")  # metrics of before the test split: validation
    ds = metrics.get("data_split")
    if not ds:
        return ("by canonical group of 64, fixed seed, 10% of each bundle's groups held out for validation "
                "(selection; >= 1 per bundle), no test split"), label
    unit = "subject" if ds.get("split_by") == "subject" else "canonical group of 64"
    test = (f", test {ds.get('test_fraction', 0):.0%} (never seen in training or selection)"
            if ds.get("test_fraction") else ", no test split")
    return (f"by {unit}, seed {ds.get('seed')}: validation {ds.get('val_fraction', 0):.0%} (selection: best/, "
            f"early stopping){test}"), label


def cross_subject_section(cross: Path | None, compare: dict[str, Path], model_id: str, selection: str,
                          out_dir: Path) -> str:
    """The card's cross-subject section: this model beside others on the same bundles (validation data)."""
    if cross is None:
        return ""
    from .cross_subject import comparison_markdown, markdown

    mine = json.loads((cross / "cross_subject.json").read_text())
    out = Path(out_dir)
    (out / "cross_subject.json").write_text(json.dumps(mine, indent=2) + "\n")  # the card's figures, for tests
    for n, d in compare.items():
        (out / f"cross_subject_{n}.json").write_text((d / "cross_subject.json").read_text())
    summaries = {model_id: mine, **{n: json.loads((d / "cross_subject.json").read_text()) for n, d in compare.items()}}
    return f"""
## Cross-subject ({mine.get('data_role', 'cross-subject validation')})

Real bundles of another subject in its own space (`{Path(mine['data']).name}`), never trained on.
{selection}
Mean MDF over the streamlines in the input's mm, encoded as given (`register="off"`) and registered
into the model's space (`register="auto"`, decoded back): AFQ's Corticospinal / IFOF / ILF, the
bundles with a counterpart in subject01. Reproduce: `vqdiff-evaluate MODEL {mine['data']} OUT --cross-subject`.

{comparison_markdown(summaries)}
All bundles of that subject with this model:

{markdown(mine)}"""


def templates_row(path: Path) -> str:
    """The card's row on the templates: registration templates and the segmentation atlas in one file."""
    if not path.is_file():
        return "| registration templates / segmentation atlas | none (inputs are encoded as given) |"
    from vqdiff.templates import Templates

    t = Templates.load(path)
    return (f"| registration templates / segmentation atlas | `templates.safetensors` ({path.stat().st_size / 1024:.0f} KB): "
            f"{sum(len(c) for c in t.centroids.values())} QuickBundles centroids at {t.params.get('n_points')} points of "
            f"the {len(t)} training bundles, written with the model (`vqdiff-templates DATA CHECKPOINT` rebuilds them); "
            "`vqdiff.registration` recognises and registers inputs on them, `vqdiff.segment` segments multi-bundle "
            "files against them |")


def write_card(run_dir: Path, eval_dir: Path, out: Path, *, command: str, cross: Path | None = None,
               compare: dict[str, Path] | None = None, selection: str = "") -> Path:
    cfg = read_config(run_dir / "best")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    ck = load_checkpoint(run_dir / "best")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json", "templates.safetensors"):
        if (run_dir / "best" / name).is_file():
            shutil.copy2(run_dir / "best" / name, out / name)
    init = cfg.get("training", {}).get("init_from") or {}
    licence = Path(init.get("path", "")) / "LICENSE-authors.txt" if init.get("path") else None
    if licence is not None and licence.is_file():  # weights derived from the authors' keep their licence
        shutil.copy2(licence, out / licence.name)
    shutil.copy2(eval_dir / "metrics.json", out / "metrics.json")
    for png in ("reconstructions.png", "latent_tsne.png", "perturbation.png"):
        if (eval_dir / png).is_file():
            shutil.copy2(eval_dir / png, out / png)
    curve = learning_curve(run_dir)
    if curve:
        plot_curve(curve, out / "learning_curve.png")
    tr = cfg.get("training", {})
    split_row, label = split_rows(metrics)
    table = (eval_dir / "table.md").read_text() if (eval_dir / "table.md").is_file() else ""
    curve_md = "\n".join(
        f"| {r['step']} | {r['wall_s'] / 60:.1f} | {r['val_buan']:.4f} | {r['val_mdf']:.3f} | {r['val_mse']:.2e} |"
        for r in curve
    )
    init = tr.get("init_from")
    origin = (f"fine-tuned from `{init.get('model_id')}` (weights `{str(init.get('sha256'))[:12]}`, {init.get('path')}) on"
              if init else "trained on")
    text = f"""# Model card: {cfg.get('model_id')}

{ck.model.kind} {origin} the 12 bundles of `../shared/data/subject01` (one TractoInferno
subject as released by the VQ-Diff authors, coordinates = the authors' [-1, 1] space x 100).

| | |
|---|---|
| weights sha256 | `{ck.model_hash}` |
| data manifest sha256 | `{cfg.get('data_manifest_sha256')}` |
| split | {split_row} |
| steps | {tr.get('steps_done')} of {tr.get('steps')} (batch {tr.get('batch_size')}, lr {tr.get('lr')}, {tr.get('schedule')}) |
| training wall time | {tr.get('wall_time_s', 0) / 60:.1f} min on `{tr.get('device')}` (torch {tr.get('torch')}, precision {tr.get('precision')}) |
| normalisation | center {[round(c, 3) for c in ck.normalisation.center]}, scale {ck.normalisation.scale:.4f} |
| {label} BUAN (T = 5) | **{metrics['buan_mean']:.4f} ± {metrics['buan_std']:.4f}** over {metrics['groups']} groups |
| {label} mean MDF | **{metrics['mdf_mm']:.3f}** units; point-wise {metrics['pointwise_mm']:.3f}; MSE {metrics['mse']:.2e} |
| robustness AUC ({label}) | {metrics['robustness']['auc']:.4f} |
{templates_row(out / "templates.safetensors")}

Rebuild: `{command}`

## Per bundle ({label} groups)

{table}

## Learning curve (validation (selection) groups)

| step | wall (min) | BUAN | mean MDF | MSE |
|---|---|---|---|---|
{curve_md}

![learning curve](learning_curve.png) ![reconstructions](reconstructions.png)
![latent t-SNE](latent_tsne.png) ![perturbation](perturbation.png)

{cross_subject_section(cross, compare or {}, cfg.get('model_id'), selection, out)}
## Training configuration

```json
{json.dumps(tr, indent=2)}
```
"""
    (out / "MODEL_CARD.md").write_text(text)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_run", help="Training run folder (best/, log.jsonl).")
    p.add_argument("in_eval", help="Folder written by vqdiff-evaluate for RUN/best.")
    p.add_argument("out_model", help="Model folder to publish (e.g. models/default).")
    p.add_argument("--command", default="make default-model", help="The command that rebuilds this model.")
    p.add_argument("--cross-subject", help="Folder with this model's cross_subject.json (vqdiff-evaluate --cross-subject).")
    p.add_argument("--compare", nargs="*", default=[], metavar="NAME=DIR",
                   help="Other models' cross-subject folders to show beside this one.")
    p.add_argument("--selection", default="", help="How the model was chosen (a sentence for the card).")
    add_overwrite_arg(p)
    args = p.parse_args(argv)

    def work():
        check_outputs(p, [args.out_model], args.overwrite, remove=True)
        compare = dict(c.split("=", 1) for c in args.compare)
        print(write_card(Path(args.in_run), Path(args.in_eval), Path(args.out_model), command=args.command,
                         cross=Path(args.cross_subject) if args.cross_subject else None,
                         compare={k: Path(v) for k, v in compare.items()}, selection=args.selection))

    run_main(work)


if __name__ == "__main__":
    main()
