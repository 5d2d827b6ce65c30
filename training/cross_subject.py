"""Cross-subject evaluation: a model on bundles of other subjects in their own spaces (validation data).

For every bundle file of a folder: the recognised template, whether the model knows it, the
registration residual, and the reconstruction error in the input's mm (mean and p95 MDF over the
streamlines, both sides at 64 points as `vqdiff.quality` compares them) encoded as given
(``register="off"``) and registered (``register="auto"``, decoded back into the input's space).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _errors(codec, bundle, register: str) -> tuple[np.ndarray, dict]:
    from vqdiff.quality import streamline_mdf

    lat = codec.encode(bundle, register=register)
    return streamline_mdf(bundle, codec.decode(lat)), lat.registration


def evaluate_cross_subject(model: str | Path, folder: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Per-bundle figures of checkpoint ``model`` on every .trk / .trx bundle of ``folder``; written to
    ``out_dir/cross_subject.json`` and ``.md`` when given."""
    from vqdiff.codec import Codec
    from vqdiff.io import load_bundle

    codec = Codec.from_checkpoint(model)
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".trk", ".trx"))
    if not paths:
        raise FileNotFoundError(f"no .trk or .trx bundles in {folder}")
    rows = {}
    for path in paths:
        bundle = load_bundle(path)
        as_is, _ = _errors(codec, bundle, "off")
        regd, reg = _errors(codec, bundle, "auto") if codec.pipeline.templates is not None else (as_is, {})
        rows[path.stem] = {"streamlines": len(bundle), "template": reg.get("template"), "known": reg.get("known"),
                           "method": reg.get("method"), "residual_mm": reg.get("residual_mm"),
                           "as_is_mean_mm": round(float(as_is.mean()), 3),
                           "as_is_p95_mm": round(float(np.percentile(as_is, 95)), 3),
                           "registered_mean_mm": round(float(regd.mean()), 3),
                           "registered_p95_mm": round(float(np.percentile(regd, 95)), 3)}
        log.info("%s: %s", path.stem, rows[path.stem])
    summary = {"model": codec.model_info, "data": str(Path(folder).resolve()), "data_role": "cross-subject validation",
               "has_templates": codec.pipeline.templates is not None, "bundles": rows,
               "median_as_is_mean_mm": round(float(np.median([r["as_is_mean_mm"] for r in rows.values()])), 3),
               "median_registered_mean_mm": round(float(np.median([r["registered_mean_mm"] for r in rows.values()])), 3)}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cross_subject.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "cross_subject.md").write_text(markdown(summary))
    return summary


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"Cross-subject validation of `{summary['model'].get('id')}` on `{summary['data']}` "
             "(mean / p95 MDF in the input's mm)", "",
             "| bundle | recognised as | known | residual | as-is mean | as-is p95 | registered mean | registered p95 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in summary["bundles"].items():
        lines.append(f"| {name} | {r['template']} | {r['known']} | {r['residual_mm']} | {r['as_is_mean_mm']} | "
                     f"{r['as_is_p95_mm']} | {r['registered_mean_mm']} | {r['registered_p95_mm']} |")
    return "\n".join(lines) + "\n"


# The AFQ bundles with a counterpart in subject01 (PYT, IFOF, ILF): the figures the default model is held to.
TARGET_BUNDLES = ("Left_Corticospinal", "Right_Corticospinal", "Left_IFOF", "Right_IFOF", "Left_ILF", "Right_ILF")


def best_of(row: dict[str, Any]) -> float:
    """A model's figure on a bundle: the better of as-is and registered mean MDF (mm)."""
    return min(row["as_is_mean_mm"], row["registered_mean_mm"])


def target_summary(summary: dict[str, Any], bundles=TARGET_BUNDLES) -> dict[str, Any]:
    """Median / max over ``bundles`` of the registered and best-of mean MDF (mm)."""
    rows = [summary["bundles"][b] for b in bundles if b in summary["bundles"]]
    if not rows:
        return {"bundles": 0}
    reg = [r["registered_mean_mm"] for r in rows]
    best = [best_of(r) for r in rows]
    return {"bundles": len(rows), "median_registered_mm": round(float(np.median(reg)), 3),
            "max_registered_mm": round(float(np.max(reg)), 3), "median_best_mm": round(float(np.median(best)), 3),
            "max_best_mm": round(float(np.max(best)), 3)}


def comparison_markdown(summaries: dict[str, dict[str, Any]], bundles=TARGET_BUNDLES) -> str:
    """One table: per bundle, every model's as-is / registered mean MDF (mm), then the medians."""
    names = list(summaries)
    lines = ["| AFQ bundle | " + " | ".join(f"{n} as-is / registered" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for b in bundles:
        cells = []
        for n in names:
            r = summaries[n]["bundles"].get(b)
            cells.append(f"{r['as_is_mean_mm']:.2f} / {r['registered_mean_mm']:.2f}" if r else "–")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    t = {n: target_summary(s, bundles) for n, s in summaries.items()}
    lines.append("| **median (max), registered** | " + " | ".join(
        f"{t[n]['median_registered_mm']:.2f} ({t[n]['max_registered_mm']:.2f})" for n in names) + " |")
    lines.append("| **median (max), better of the two** | " + " | ".join(
        f"{t[n]['median_best_mm']:.2f} ({t[n]['max_best_mm']:.2f})" for n in names) + " |")
    return "\n".join(lines) + "\n"
