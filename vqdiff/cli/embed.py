"""Cohort table of bundle embeddings from latents files or batch output folders.

One row per bundle (wide layout): subject, bundle (the batch index's names), tract, the recognised
template, counts, registration features (reg_*), fidelity when the index has it, and the
embedding e0 ... e1023 (Euclidean distance on these columns is the documented distance). With
--layout long: AFQ-Insight's layout, one row per bundle and node: subjectID, tractID, nodeID and
the node's features f0 ... f63. See docs/analysis.md.

Examples::

    vqdiff-embed latents/ cohort.parquet
    vqdiff-embed latents/sub-01 latents/sub-02/IFOF_L.vqlat cohort.csv -f
    vqdiff-embed latents/ nodes.csv --layout long
"""

from __future__ import annotations

import argparse
import json
import time

from vqdiff.cli.common import add_overwrite_arg, add_verbose_arg, check_outputs, run_main, setup_logging


def _build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_latents", nargs="+", help="Latents files (.vqlat) or folders of them (vqdiff-encode-batch outputs).")
    p.add_argument("out_table", help="Output table (.csv or .parquet).")
    p.add_argument("--layout", choices=("wide", "long"), default="wide",
                   help="wide: one row per bundle with e0..eK; long: subjectID, tractID, nodeID + features.")
    add_overwrite_arg(p)
    add_verbose_arg(p)
    return p


def main(argv=None) -> None:
    parser = _build_arg_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def work():
        from vqdiff.analysis.tables import TABLE_SUFFIXES, build_tables, write_table

        if not args.out_table.lower().endswith(TABLE_SUFFIXES):
            parser.error(f"out_table must end with {' or '.join(TABLE_SUFFIXES)}, got {args.out_table}")
        check_outputs(parser, [args.out_table], args.overwrite)
        t0 = time.perf_counter()
        df = build_tables(args.in_latents, layouts=(args.layout,))[args.layout]
        write_table(df, args.out_table, layout=args.layout, overwrite=args.overwrite)
        n = df["subject"].nunique() if args.layout == "wide" else df["subjectID"].nunique()
        rows = len(df) if args.layout == "wide" else len(df) // int(df["nodeID"].max() + 1)
        print(json.dumps({"table": args.out_table, "layout": args.layout, "bundles": int(rows), "subjects": int(n),
                          "rows": len(df), "seconds": round(time.perf_counter() - t0, 3)}))

    run_main(work)


if __name__ == "__main__":
    main()
