"""Assemble the paper's Table 1 on our data: one evaluation per model kind, beside the paper's.

``python -m vqdiff.training.table1 RUNS_DIR OUT.md --paper-table paper_buan_table.csv`` reads
``RUNS_DIR/<kind>-eval/metrics.json`` for every kind present and writes a Markdown table of
held-out BUAN (mean ± std) per bundle with the paper's value beside ours, then overall BUAN,
mean MDF, MSE, robustness AUC and training wall time per kind.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vqdiff.bottlenecks import KINDS

from .evaluate import PAPER_COLUMNS, read_paper_table


def build_table(runs: Path, paper_table: str | None) -> str:
    found = {k: json.loads((runs / f"{k}-eval" / "metrics.json").read_text())
             for k in KINDS if (runs / f"{k}-eval" / "metrics.json").is_file()}
    if not found:
        raise FileNotFoundError(f"no <kind>-eval/metrics.json under {runs}")
    paper = read_paper_table(paper_table) if paper_table else {}
    kinds = list(found)
    bundles = list(next(iter(found.values()))["per_bundle"])
    head = "| Bundle | " + " | ".join(f"{PAPER_COLUMNS[k]} ours | {PAPER_COLUMNS[k]} paper" for k in kinds) + " |\n"
    lines = [head, "|---" * (1 + 2 * len(kinds)) + "|\n"]
    for b in bundles:
        cells = []
        for k in kinds:
            m = found[k]["per_bundle"].get(b)
            cells.append(f"{m['buan_mean']:.4f} ± {m['buan_std']:.4f}" if m else "–")
            cells.append(paper.get(b, {}).get(PAPER_COLUMNS[k], "–"))
        lines.append(f"| {b} | " + " | ".join(cells) + " |\n")
    label = next(iter(found.values())).get("split_label", "validation (selection)")
    lines.insert(0, f"BUAN at T = 5 on the {label} groups (mean ± std over groups)\n\n")
    lines.append(f"\n| kind | {label} BUAN | mean MDF (units) | point-wise (units) | MSE | robustness AUC | "
                 "codes in use | steps (best) | wall (min) |\n|---|---|---|---|---|---|---|---|---|\n")
    for k in kinds:
        m = found[k]
        tr = m.get("training", {})
        codes = m.get("codes_in_use")
        lines.append(f"| {k} | {m['buan_mean']:.4f} ± {m['buan_std']:.4f} | {m['mdf_mm']:.3f} | "
                     f"{m['pointwise_mm']:.3f} | {m['mse']:.2e} | {m['robustness']['auc']:.4f} | "
                     f"{codes if codes is not None else '–'} | {tr.get('steps_done', '?')} | "
                     f"{tr.get('wall_time_s', 0) / 60:.1f} |\n")
    return "".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_runs", help="Folder with <kind>-eval/metrics.json for each kind.")
    p.add_argument("out_md", help="Markdown file to write.")
    p.add_argument("--paper-table", help="The paper's BUAN CSV.")
    args = p.parse_args(argv)
    text = build_table(Path(args.in_runs), args.paper_table)
    Path(args.out_md).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
