"""Normative model of tract profiles (fit) and deviation scores of a subject's bundles (score).

fit: per tract of a cohort table (vqdiff-embed), a robust centre and a shrunk correlation of the
16-node profile, calibrated on held-out bundles as tail probabilities (leave-one-out; with
--group-by, leave-one-group-out for references made of copies of a few individuals). score: per
bundle, the tail probability p of its whole profile (flagged when p < --alpha, 0.01 recommended)
and the z-score of each node; optionally a table and one figure per bundle (node z with the reference band, the
decoded bundle coloured by node z: decoding needs the model). See docs/analysis.md.

Examples::

    vqdiff-norms fit cohort.parquet norms.vqnorm --label "reference: 40 healthy adults, site A"
    vqdiff-norms score latents/sub-07 --norms norms.vqnorm --out-table sub-07_scores.csv --out-figures figs/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vqdiff.cli.common import add_overwrite_arg, add_verbose_arg, check_outputs, run_main, setup_logging


def _build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="Fit norms from a cohort table.")
    f.add_argument("in_table", help="Cohort table written by vqdiff-embed (.csv or .parquet, wide or long).")
    f.add_argument("out_norms", help="Output norms file (.vqnorm).")
    f.add_argument("--label", default="", help="What the reference bundles are (shown on every figure).")
    f.add_argument("--diagonal", action="store_true", help="No correlations (shrinkage 1): the comparison model.")
    f.add_argument("--group-by", metavar="COLUMN",
                   help="A table column whose equal values mark copies of one individual (e.g. synthetic draws of "
                        "one subject): the calibration holds each such group out together instead of one bundle "
                        "at a time. Not needed for a cohort of real subjects.")
    add_overwrite_arg(f)
    add_verbose_arg(f)
    s = sub.add_parser("score", help="Score a subject's bundles against norms.")
    s.add_argument("in_latents", nargs="+", help="The subject's latents files or folder.")
    s.add_argument("--norms", required=True, help="Norms file written by `vqdiff-norms fit`.")
    s.add_argument("--alpha", type=float, default=None, help="Flag bundles with p below this [0.01].")
    s.add_argument("--out-table", help="Write the scores (.csv or .parquet): one row per bundle, z0..z15.")
    s.add_argument("--out-figures", help="Folder for one figure per bundle (<subject>_<bundle>.png).")
    s.add_argument("--model", help="Model to decode the bundles for the figures (default: the bundled one).")
    add_overwrite_arg(s)
    add_verbose_arg(s)
    return p


def _fit(parser, args) -> None:
    from vqdiff.analysis.scoring import fit_table
    from vqdiff.analysis.tables import read_table

    check_outputs(parser, [args.out_norms], args.overwrite)
    t0 = time.perf_counter()
    df, layout = read_table(args.in_table)
    norms = fit_table(df, layout, lam=1.0 if args.diagonal else None, group_by=args.group_by,
                      info={"label": args.label, "table": str(args.in_table), "layout": layout})
    norms.save(args.out_norms, overwrite=args.overwrite)
    print(json.dumps({"norms": args.out_norms, "tracts": {t: {"n": int(n.deviations.shape[0]), "shrinkage": round(n.lam, 3)}
                                                          for t, n in norms.tracts.items()},
                      "skipped": norms.meta.get("skipped_tracts", []), "seconds": round(time.perf_counter() - t0, 3)}))


def _score(parser, args) -> None:
    from vqdiff.analysis.norms import Norms
    from vqdiff.analysis.records import iter_records
    from vqdiff.analysis.scoring import ALPHA, score_records, scores_table
    from vqdiff.analysis.tables import write_table

    alpha = ALPHA if args.alpha is None else args.alpha
    if not 0 < alpha < 1:
        parser.error(f"--alpha must be in (0, 1), got {alpha}")
    outs = [p for p in (args.out_table,) if p]
    check_outputs(parser, outs, args.overwrite)
    norms = Norms.load(args.norms)
    records = list(iter_records(args.in_latents))
    t0 = time.perf_counter()
    scores, skipped = score_records(records, norms, alpha=alpha)
    seconds = time.perf_counter() - t0
    for s in skipped:
        print(f"warning: not scored: {s}")
    if args.out_table:
        write_table(scores_table(scores), args.out_table, layout="scores", overwrite=args.overwrite)
    figures = []
    if args.out_figures:
        figures = _figures(args, records, scores, norms, alpha)
    print(json.dumps({"scored": [{k: v for k, v in s.to_dict().items() if k != "node_z"} for s in scores],
                      "skipped": skipped, "alpha": alpha, "score_seconds": round(seconds, 4), "figures": figures},
                     indent=2))


def _figures(args, records, scores, norms, alpha) -> list[str]:
    from vqdiff.analysis.figures import score_figure
    from vqdiff.codec import Codec

    folder = Path(args.out_figures)
    folder.mkdir(parents=True, exist_ok=True)
    codec = Codec.from_checkpoint(args.model) if args.model else Codec.default()
    by_key = {(r.subject, r.bundle): r for r in records}
    label = norms.meta.get("label") or f"norms: {norms.meta.get('table', '')}"
    out = []
    for s in scores:
        path = folder / f"{s.subject}_{s.bundle}.png"
        if path.exists() and not args.overwrite:
            print(f"warning: {path} exists; not overwritten (use -f)")
            continue
        rec = by_key[(s.subject, s.bundle)]
        bundle = codec.decode(rec.latents)
        score_figure(s, path, streamlines=bundle.streamlines, flipped=rec.latents.flipped, label=label, alpha=alpha)
        out.append(str(path))
    return out


def main(argv=None) -> None:
    parser = _build_arg_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    run_main(lambda: _fit(parser, args) if args.command == "fit" else _score(parser, args))


if __name__ == "__main__":
    main()
