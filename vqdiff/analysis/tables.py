"""Cohort tables: one row per bundle (wide) or per bundle and node (long, AFQ-Insight's layout).

Wide columns, in order: ``subject``, ``bundle`` (the batch index's names, `vqdiff.analysis.records`),
``tract`` (the norms' key: the recognised template when registration knew the bundle, else the
bundle's name), ``template``, ``known`` (registration's recognition), ``n_streamlines``,
``n_groups``, ``model_id``, ``model_sha256``, ``embedding_version``, ``n_nodes``, the registration
features ``reg_*`` (`vqdiff.analysis.embedding.registration_features`), ``fidelity_*`` (the encoding's measured
fidelity, from the latents or the batch index record, when present), ``path``, then the embedding
``e0 ... e{K-1}``.

Long columns: ``subjectID``, ``tractID``, ``nodeID`` and the profile's features ``f0 ... f{D-1}``
(the node's mean latent; AFQ-Insight reads every column after the three keys as a feature).

Files: ``.csv`` or ``.parquet`` (pandas / pyarrow; no hand-written quoting). Parquet files also
carry ``{"vqdiff_analysis": {"embedding_version", "layout"}}`` in their schema metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .embedding import EMBEDDING_VERSION, features
from .records import AnalysisError, LatentsRecord, iter_records

LAYOUTS = ("wide", "long")
TABLE_SUFFIXES = (".csv", ".parquet")
KEY_COLUMNS = ("subject", "bundle")
LONG_KEYS = ("subjectID", "tractID", "nodeID")


_LEFT, _RIGHT = {"l", "left", "lh", "lt"}, {"r", "right", "rh", "rt"}


def named_tract(name: str) -> tuple[str, str] | None:
    """(tract family, side "L" / "R" / "") a name spells (`vqdiff.tract_names`), or None."""
    from ..tract_names import name_words, tract_family

    words = name_words(name)
    fam = tract_family(words)
    if fam is None:
        return None
    side = "L" if _LEFT & set(words) else "R" if _RIGHT & set(words) else ""
    return fam[0], side


def tract_key(bundle: str, template: str | None, known: bool | None) -> str:
    """The tract a bundle is compared as: its recognised template when registration knew it or when
    the bundle's name spells the template's tract and side (``Left_Corticospinal`` recognised as
    ``PYT_L``, even when an odd shape left it unknown), else the bundle's own name."""
    if template and (known or (named_tract(bundle) is not None and named_tract(bundle) == named_tract(template))):
        return str(template)
    return str(bundle)


def _row(rec: LatentsRecord) -> tuple[dict[str, Any], np.ndarray]:
    f = features(rec.latents)
    row: dict[str, Any] = {
        "subject": rec.subject, "bundle": rec.bundle, "tract": tract_key(rec.bundle, f.template, f.known),
        "template": f.template, "known": f.known, "n_streamlines": f.n_streamlines, "n_groups": f.n_groups,
        "model_id": f.model_id, "model_sha256": f.model_sha256, "embedding_version": EMBEDDING_VERSION,
        "n_nodes": f.n_nodes, **f.registration,
    }
    fidelity = rec.index.get("fidelity") or rec.latents.fidelity
    if isinstance(fidelity, dict):
        row.update({f"fidelity_{k}": v for k, v in fidelity.items() if isinstance(v, int | float)})
    row["path"] = str(rec.path)
    return row, f.profile


def build_tables(paths, *, layouts=("wide",)) -> dict[str, Any]:
    """Latents files / folders -> {layout: pandas.DataFrame} (module doc); duplicates refused."""
    import pandas as pd

    rows, profiles, seen = [], [], {}
    for rec in iter_records(paths):
        key = (rec.subject, rec.bundle)
        if key in seen:
            raise AnalysisError(f"{rec.path} and {seen[key]} are both subject {rec.subject!r}, bundle {rec.bundle!r}; "
                                "give each subject its own folder")
        seen[key] = rec.path
        row, prof = _row(rec)
        rows.append(row)
        profiles.append(prof)
    shapes = {p.shape for p in profiles}
    if len(shapes) > 1:
        raise AnalysisError(f"profiles of different shapes {sorted(shapes)}: latents of different model geometries")
    out = {}
    prof = np.stack(profiles)  # (M, N, D)
    m, n, d = prof.shape
    if "wide" in layouts:
        meta = pd.DataFrame(rows)
        emb = pd.DataFrame(prof.reshape(m, n * d) / np.sqrt(n), columns=[f"e{i}" for i in range(n * d)])
        out["wide"] = pd.concat([meta, emb], axis=1)
    if "long" in layouts:
        keys = pd.DataFrame({"subjectID": np.repeat([r["subject"] for r in rows], n),
                             "tractID": np.repeat([r["bundle"] for r in rows], n),
                             "nodeID": np.tile(np.arange(n), m)})
        feats = pd.DataFrame(prof.reshape(m * n, d), columns=[f"f{i}" for i in range(d)])
        out["long"] = pd.concat([keys, feats], axis=1)
    return out


def embedding_columns(df) -> list[str]:
    cols = [c for c in df.columns if isinstance(c, str) and c.startswith("e") and c[1:].isdigit()]
    return sorted(cols, key=lambda c: int(c[1:]))


def feature_columns(df) -> list[str]:
    cols = [c for c in df.columns if isinstance(c, str) and c.startswith("f") and c[1:].isdigit()]
    return sorted(cols, key=lambda c: int(c[1:]))


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise AnalysisError(f"{path}: tables are {' or '.join(TABLE_SUFFIXES)} files")


def write_table(df, path: str | os.PathLike, *, layout: str = "wide", overwrite: bool = False) -> Path:
    """Write ``df`` as CSV or Parquet by the suffix of ``path``; refuse to overwrite unless asked."""
    path = Path(path)
    _check_suffix(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: -f) to replace it")
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix.lower() == ".csv":
        df.to_csv(tmp, index=False)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(df, preserve_index=False)
        meta = dict(table.schema.metadata or {})
        meta[b"vqdiff_analysis"] = json.dumps({"embedding_version": EMBEDDING_VERSION, "layout": layout}).encode()
        pq.write_table(table.replace_schema_metadata(meta), tmp)
    os.replace(tmp, path)
    return path


def read_table(path: str | os.PathLike):
    """A table written by `write_table` (or any CSV / Parquet with its columns) -> (DataFrame, layout).

    Raises `AnalysisError` naming what is accepted for a missing file, another suffix, a table with
    neither layout's columns, or another embedding version.
    """
    import pandas as pd

    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise AnalysisError(f"{path} does not exist; expected a table written by vqdiff-embed (.csv or .parquet)")
    try:
        df = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except (ValueError, OSError) as e:  # pandas / pyarrow parse errors derive from these
        raise AnalysisError(f"{path}: unreadable table ({e})") from e
    if all(c in df.columns for c in KEY_COLUMNS) and embedding_columns(df):
        versions = set(df["embedding_version"].unique()) if "embedding_version" in df else {EMBEDDING_VERSION}
        if versions != {EMBEDDING_VERSION}:
            raise AnalysisError(f"{path}: embedding version(s) {sorted(versions)}; this vqdiff reads version "
                                f"{EMBEDDING_VERSION}: re-run vqdiff-embed on the latents")
        for c in ("subject", "bundle", "tract"):
            if c in df:
                df[c] = df[c].astype(str)
        return df, "wide"
    if all(c in df.columns for c in LONG_KEYS) and feature_columns(df):
        df["subjectID"], df["tractID"] = df["subjectID"].astype(str), df["tractID"].astype(str)
        return df, "long"
    raise AnalysisError(f"{path}: not a vqdiff-embed table: expected columns subject, bundle, e0... (wide) or "
                        "subjectID, tractID, nodeID, f0... (long)")


def long_to_profiles(df) -> tuple[list[tuple[str, str]], np.ndarray]:
    """A long table -> ([(subject, tract)], profiles (M, N, D)); every bundle must have all N nodes."""
    feats = feature_columns(df)
    df = df.sort_values(["subjectID", "tractID", "nodeID"])
    groups = df.groupby(["subjectID", "tractID"], sort=True)
    sizes = groups.size()
    if sizes.nunique() != 1:
        raise AnalysisError(f"bundles with different numbers of nodes {sorted(sizes.unique())} in the long table")
    n = int(sizes.iloc[0])
    values = df[feats].to_numpy(np.float64).reshape(len(sizes), n, len(feats))
    return [(str(s), str(t)) for s, t in sizes.index], values
