"""The bundles of a cohort table nearest to a query bundle (Euclidean distance on the embedding).

QUERY is a latents file (.vqlat) or SUBJECT/BUNDLE naming a row of the table (the query's own row
is left out of the answer). Prints the k nearest bundles with their distances (a table, or JSON with --json).

Examples::

    vqdiff-similar latents/sub-07/IFOF_L.vqlat cohort.parquet --k 5
    vqdiff-similar sub-01/IFOF_L cohort.parquet --k 3 --tract IFOF_L --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vqdiff.cli.common import add_verbose_arg, run_main, setup_logging


def _build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_query", help="Query: a latents file (.vqlat) or SUBJECT/BUNDLE of the table.")
    p.add_argument("in_table", help="Cohort table written by vqdiff-embed (wide layout, .csv or .parquet).")
    p.add_argument("--k", type=int, default=5, help="Number of neighbours [%(default)s].")
    p.add_argument("--tract", help="Only bundles of this tract (the table's tract column).")
    p.add_argument("--json", action="store_true", help="Print JSON records instead of a table.")
    add_verbose_arg(p)
    return p


def main(argv=None) -> None:
    parser = _build_arg_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def work():
        from vqdiff.analysis.records import AnalysisError
        from vqdiff.analysis.similarity import nearest
        from vqdiff.analysis.tables import read_table
        from vqdiff.latents import SUFFIX, Latents

        table, layout = read_table(args.in_table)
        if layout != "wide":
            raise AnalysisError(f"{args.in_table} is a long table; similarity needs the wide layout (vqdiff-embed "
                                "without --layout long)")
        if args.in_query.endswith(SUFFIX):
            if not Path(args.in_query).is_file():
                raise AnalysisError(f"{args.in_query} does not exist; expected a latents file or SUBJECT/BUNDLE")
            query = Latents.load(args.in_query)
        elif args.in_query.count("/") == 1:
            query = tuple(args.in_query.split("/"))
        else:
            raise AnalysisError(f"query {args.in_query!r}: expected a latents file (*{SUFFIX}) or SUBJECT/BUNDLE")
        own = args.in_query if args.in_query.endswith(SUFFIX) else None
        out = nearest(query, table, k=args.k, tract=args.tract, exclude_path=own)
        if args.json:
            print(json.dumps(out.to_dict(orient="records"), indent=2, default=str))
        else:
            print(out.to_string(index=False))

    run_main(work)


if __name__ == "__main__":
    main()
