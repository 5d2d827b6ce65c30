"""Evaluate a checkpoint with the paper's protocol on a prepared dataset's held-out groups.

``--split test`` (the default when the dataset has a test split): groups never seen in training
nor in model selection; ``--split val``: the validation groups that selected ``best/`` (the
default, with a warning, for datasets without a test split). The printed summary and
``metrics.json`` say which (``"split"``, ``"split_label"``).

Writes ``metrics.json`` (per-bundle and overall BUAN, MSE, mean MDF, point-wise distance,
robustness curve and AUC), ``table.md`` (shaped like the paper's Table 1, beside the paper's
numbers with ``--paper-table``) and PNG figures (reconstructions, latent t-SNE, perturbation).

With ``--cross-subject``, IN_DATA is instead a folder of bundle files of other subjects in their own
spaces (validation data): per bundle, the recognised template, the registration residual and the
mean / p95 MDF in the input's mm encoded as given and registered (``cross_subject.json`` / ``.md``).

Examples::

    vqdiff-evaluate models/default runs/default-data runs/eval \\
        --paper-table ../shared/data/paper_buan_table.csv
    vqdiff-evaluate models/default ../shared/data/crosssubject/afq_browser runs/eval-cross --cross-subject
"""

from __future__ import annotations

import argparse
import json
import sys

from vqdiff.cli.common import add_overwrite_arg, add_verbose_arg, check_outputs, run_main, setup_logging


def _build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_checkpoint", help="Checkpoint directory (model.safetensors + config.json).")
    p.add_argument("in_data", help="Dataset folder written by vqdiff-prepare (with --cross-subject: a folder of "
                   "bundle files).")
    p.add_argument("out_dir", help="Output folder for metrics.json, table.md and figures.")
    p.add_argument("--split", choices=("test", "val"),
                   help="Held-out groups to evaluate on [test when the dataset has a test split, else val].")
    p.add_argument("--threshold", type=float, default=5.0,
                   help="BUAN threshold in data units [%(default)s] (the paper's 0.05 in [-1, 1] = 5 here).")
    p.add_argument("--paper-table", help="The paper's BUAN table (CSV) to print beside ours.")
    p.add_argument("--directions", type=int, default=2, help="Random directions per eps in the robustness test.")
    p.add_argument("--no-figures", dest="figures", action="store_false")
    p.add_argument("--cross-subject", action="store_true",
                   help="Evaluate on other subjects' bundles in their own spaces, as given and registered.")
    add_overwrite_arg(p)
    add_verbose_arg(p)
    return p


def main(argv=None) -> None:
    parser = _build_arg_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def work():
        from .evaluate import evaluate

        check_outputs(parser, [args.out_dir], args.overwrite)
        if args.cross_subject:
            from .cross_subject import evaluate_cross_subject

            s = evaluate_cross_subject(args.in_checkpoint, args.in_data, args.out_dir)
            print(json.dumps({k: s[k] for k in ("model", "median_as_is_mean_mm", "median_registered_mean_mm")}
                             | {"bundles": len(s["bundles"])}, indent=2))
            return
        try:
            s = evaluate(args.in_checkpoint, args.in_data, args.out_dir, threshold=args.threshold,
                         paper_table=args.paper_table, figures=args.figures, n_dirs=args.directions,
                         split=args.split)
        except ValueError as e:  # no groups in the split asked for, and the like: an input error
            print(f"error: {e}", file=sys.stderr)
            return 2
        keys = ("model", "split", "split_label", "split_note", "groups", "buan_mean", "buan_std", "mdf_mm",
                "pointwise_mm", "mse")
        print(json.dumps({**{k: s[k] for k in keys}, "robustness_auc": s["robustness"]["auc"]}, indent=2))

    run_main(work)


if __name__ == "__main__":
    main()
