"""Deviation scores of bundles against `vqdiff.analysis.norms.Norms`; fitting norms from a table.

`score_latents` is the one scoring entry point (the service's ``/score`` route and summary call it
with a decoded-from-upload `vqdiff.Latents` and the norms file it was configured with):

>>> from vqdiff.analysis.norms import Norms
>>> from vqdiff.analysis.scoring import score_latents
>>> s = score_latents(Latents.load("sub-01/PYT_L.vqlat"), Norms.load("norms.vqnorm"), bundle="PYT_L")
>>> s.p_value, s.flagged, s.peak_node, s.node_z          # tail probability, p < ALPHA, argmax z, (N,)

A bundle is compared with the norm of its tract (`vqdiff.analysis.tables.tract_key`: the
recognised template when registration knew it, else the bundle's name). ``p_value`` is the
bundle-level tail probability, ``node_z`` the per-node z-scores (module doc of
`vqdiff.analysis.norms`); ``flagged`` is ``p_value < ALPHA``, the threshold docs/analysis.md
recommends (chosen on the synthetic reference set's false-positive rate, checked on AFQ).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .embedding import EMBEDDING_VERSION, profile_from_embedding, profile_of
from .norms import Norms, fit, standardised, tail_probability
from .records import AnalysisError
from .tables import embedding_columns, long_to_profiles, tract_key

ALPHA = 0.01  # recommended flagging threshold on the bundle-level tail probability


@dataclass
class BundleScore:
    subject: str
    bundle: str
    tract: str
    d2: float
    p_value: float
    flagged: bool
    peak_node: int
    peak_z: float
    node_z: list[float]
    n_reference: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_profile(norms: Norms, tract: str, prof: np.ndarray, *, subject: str = "", bundle: str = "",
                  alpha: float = ALPHA) -> BundleScore:
    """Score one profile (N, D) against the norm of ``tract``; `AnalysisError` when the norms have none."""
    if tract not in norms.tracts:
        raise AnalysisError(f"the norms have no tract {tract!r} (bundle {bundle or tract!r}); they have: "
                            f"{', '.join(sorted(norms.tracts))}")
    prof = np.asarray(prof, np.float64)
    if prof.shape != (norms.n_nodes, norms.n_features):
        raise AnalysisError(f"profile of shape {prof.shape}; the norms are for ({norms.n_nodes}, {norms.n_features})")
    t = norms.tracts[tract]
    whole, nodes = t.distances(prof.reshape(1, -1))
    p = float(tail_probability(whole, t.calibration["bundle"])[0])
    cal = np.asarray(t.calibration["nodes"], np.float64)  # (N, 2): log-normal mean, sd per node
    z = standardised(nodes[0], (cal[:, 0], cal[:, 1]))  # = Phi^-1(1 - p_node), never capped (no ties)
    peak = int(np.argmax(z))
    return BundleScore(subject, bundle or tract, tract, float(whole[0]), p, bool(p < alpha), peak, float(z[peak]),
                       [float(v) for v in z], int(t.deviations.shape[0]))


def check_model(norms: Norms, model_sha256: str, where: str) -> None:
    if norms.model_sha256 and model_sha256 and norms.model_sha256 != model_sha256:
        raise AnalysisError(f"{where} was made by model {model_sha256[:12]}, the norms by {norms.model_sha256[:12]}; "
                            "score latents with norms fitted on the same model's latents")


def score_latents(latents, norms: Norms, *, bundle: str = "", subject: str = "", tract: str | None = None,
                  alpha: float = ALPHA) -> BundleScore:
    """Score one `vqdiff.Latents` (module doc); ``tract`` overrides the recognised one."""
    check_model(norms, str(latents.model.get("sha256", "")), bundle or "the latents")
    reg = latents.registration or {}
    name = bundle or str(latents.source.get("name") or reg.get("template") or "")
    key = tract or tract_key(name, reg.get("template"), reg.get("known"))
    prof = profile_of(latents.latents, latents.pad_mask)
    return score_profile(norms, key, prof, subject=subject, bundle=name, alpha=alpha)


def score_records(records, norms: Norms, *, alpha: float = ALPHA) -> tuple[list[BundleScore], list[str]]:
    """Score every record with a norm; (scores, the bundles skipped, each with why). `AnalysisError`
    when none could be scored."""
    scores, skipped = [], []
    for rec in records:
        reg = rec.latents.registration or {}
        key = tract_key(rec.bundle, reg.get("template"), reg.get("known"))
        if key not in norms.tracts and rec.bundle in norms.tracts:  # norms keyed by bundle name (long tables)
            key = rec.bundle
        if key not in norms.tracts:
            skipped.append(f"{rec.subject}/{rec.bundle} (tract {key!r} has no norm)")
            continue
        scores.append(score_latents(rec.latents, norms, bundle=rec.bundle, subject=rec.subject, tract=key,
                                    alpha=alpha))
    if not scores:
        raise AnalysisError(f"no bundle could be scored: {'; '.join(skipped)}; the norms have tracts "
                            f"{', '.join(sorted(norms.tracts))}")
    return scores, skipped


def scores_table(scores: list[BundleScore]):
    """Scores -> a pandas DataFrame: one row per bundle, node z-scores as ``z0 ... z{N-1}``."""
    import pandas as pd

    rows = []
    for s in scores:
        d = s.to_dict()
        z = d.pop("node_z")
        rows.append({**d, **{f"z{k}": v for k, v in enumerate(z)}})
    return pd.DataFrame(rows)


def table_profiles(df, layout: str, group_by: str | None = None) -> tuple[dict, dict, int, str, dict | None]:
    """A table -> (tract -> profiles (n, N * D), tract -> subjects, N, model sha256, tract -> the
    ``group_by`` column's labels (None without ``group_by``))."""
    if layout == "long":
        keys, prof = long_to_profiles(df)
        n = prof.shape[1]
        tracts = [t for _, t in keys]
        subjects = [s for s, _ in keys]
        flat = prof.reshape(len(prof), -1)
        sha = ""
    else:
        if "n_nodes" not in df or df.empty:
            raise AnalysisError("the table has no bundles (or no n_nodes column): write it with vqdiff-embed")
        n = int(df["n_nodes"].iloc[0])
        flat = profile_from_embedding(df[embedding_columns(df)].to_numpy(np.float64), n).reshape(len(df), -1)
        tracts = df["tract"].astype(str).tolist() if "tract" in df else df["bundle"].astype(str).tolist()
        subjects = df["subject"].astype(str).tolist()
        shas = set(df["model_sha256"].astype(str)) if "model_sha256" in df else {""}
        if len(shas) > 1:
            raise AnalysisError(f"mixed models in the table ({sorted(s[:12] for s in shas)}); fit norms per model")
        sha = shas.pop()
    labels = None
    if group_by is not None:
        if group_by not in df.columns:
            raise AnalysisError(f"no column {group_by!r} to group the reference bundles by; the table has: "
                                f"{', '.join(c for c in map(str, df.columns) if not re.fullmatch(r'[ef][0-9]+', c))}")
        if layout == "long":
            first = df.groupby(["subjectID", "tractID"], sort=False)[group_by].first()
            labels = [str(first[k]) for k in keys]
        else:
            labels = df[group_by].astype(str).tolist()
    profiles: dict[str, list] = {}
    subj: dict[str, list] = {}
    grp: dict[str, list] = {}
    for i, (t, s, row) in enumerate(zip(tracts, subjects, flat, strict=True)):
        profiles.setdefault(t, []).append(row)
        subj.setdefault(t, []).append(s)
        grp.setdefault(t, []).append(labels[i] if labels is not None else s)
    return {t: np.stack(v) for t, v in profiles.items()}, subj, n, sha, (grp if group_by is not None else None)


def fit_table(df, layout: str, *, lam: float | None = None, info: dict | None = None,
              group_by: str | None = None) -> Norms:
    """Norms from a cohort table (`vqdiff.analysis.tables.read_table`). ``group_by``: a column whose
    equal values mark copies of one individual, held out together in the calibration
    (`vqdiff.analysis.norms.calibrate`); default: leave-one-out."""
    profiles, subjects, n, sha, groups = table_profiles(df, layout, group_by)
    return fit(profiles, n_nodes=n, subjects=subjects, model_sha256=sha, lam=lam, groups=groups,
               info={"embedding_version": EMBEDDING_VERSION, **(info or {}),
                     **({"group_by": group_by} if group_by else {})})
