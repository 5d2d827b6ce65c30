"""Nearest bundles in a cohort table, by the documented distance (Euclidean on the ``e`` columns).

>>> from vqdiff.analysis.similarity import nearest
>>> from vqdiff.analysis.tables import read_table
>>> cohort, _ = read_table("cohort.parquet")
>>> nearest(Latents.load("sub-07/IFOF_L.vqlat"), cohort, k=5)      # DataFrame: subject, bundle, distance
>>> nearest(("sub-01", "IFOF_L"), cohort, k=5)                       # a row of the table (itself left out)
"""

from __future__ import annotations

import numpy as np

from .embedding import distance, embedding
from .records import AnalysisError
from .tables import embedding_columns

SHOWN = ("subject", "bundle", "tract", "template", "known", "n_streamlines")


def query_embedding(query, table) -> tuple[np.ndarray, tuple[str, str] | None]:
    """(embedding (K,), the table row it came from or None) of a `vqdiff.Latents`, an embedding or a
    ``(subject, bundle)`` of the table."""
    if isinstance(query, tuple) and len(query) == 2 and all(isinstance(q, str) for q in query):
        rows = table[(table["subject"] == query[0]) & (table["bundle"] == query[1])]
        if rows.empty:
            raise AnalysisError(f"no bundle {query[1]!r} of subject {query[0]!r} in the table")
        return rows[embedding_columns(table)].to_numpy(np.float64)[0], query
    if hasattr(query, "latents") and hasattr(query, "pad_mask"):
        sha = str(query.model.get("sha256", ""))
        if "model_sha256" in table and sha and not (table["model_sha256"].astype(str) == sha).all():
            raise AnalysisError(f"the query was made by model {sha[:12]}, the table's bundles by another: "
                                "latents of different models are not comparable")
        return embedding(query), None
    return np.asarray(query, np.float64), None


def nearest(query, table, *, k: int = 5, tract: str | None = None, exclude_path=None):
    """The ``k`` nearest bundles of ``table`` (wide layout) to ``query`` (`query_embedding`), closest
    first, with their ``distance``; ``tract`` keeps only bundles of that tract; ``exclude_path``
    leaves out the table's row of that latents file (a query that is in the table)."""
    if k < 1:
        raise AnalysisError(f"k must be >= 1, got {k}")
    cols = embedding_columns(table)
    if not cols:
        raise AnalysisError("the table has no embedding columns e0...: write it with vqdiff-embed (wide layout)")
    q, own = query_embedding(query, table)
    if q.shape != (len(cols),):
        raise AnalysisError(f"the query's embedding has {q.size} values, the table's {len(cols)}")
    cand = table
    if own is not None:
        cand = cand[~((cand["subject"] == own[0]) & (cand["bundle"] == own[1]))]
    if exclude_path is not None and "path" in cand:
        from pathlib import Path

        target = Path(exclude_path).resolve()
        cand = cand[[Path(p).resolve() != target for p in cand["path"].astype(str)]]
    if tract is not None:
        cand = cand[cand["tract"] == tract]
    d = distance(cand[cols].to_numpy(np.float64), q)
    order = np.argsort(d, kind="stable")[:k]
    out = cand.iloc[order][[c for c in SHOWN if c in cand.columns]].copy()
    out.insert(len(out.columns), "distance", d[order])
    return out.reset_index(drop=True)
