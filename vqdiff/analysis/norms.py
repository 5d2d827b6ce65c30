"""Normative model of tract profiles and calibrated deviation scores (numpy only).

Per tract (the table's ``tract`` column), from the profiles ``x`` (N nodes x D features, flattened
to p = N * D) of n reference bundles:

- **centre** ``m``: the coordinate-wise median (robust to a few odd reference bundles);
- **scale** ``s``: the per-coordinate root-mean-square deviation about ``m``;
- **correlation with shrinkage**: ``R = lam I + (1 - lam) Y'Y / (n - 1)``, ``Y`` the standardised
  deviations ``(x_i - m) / s``; ``lam`` by Schaefer & Strimmer's (2005) closed form for a
  diagonal target (the estimate of the sample correlations' variance over their squares), in
  [`MIN_SHRINKAGE`, 1]. ``R`` is never formed: its inverse is applied by Woodbury's identity on
  the n x n Gram matrix, so a tract with p = 1024 and n = 25 costs a 25 x 25 solve.
- **distances**: ``d2 = z' R^-1 z`` with ``z = (x - m) / s`` for the whole profile (bundle level), and
  the same on each node's D coordinates with that node's block of ``R`` (node level).
- **calibration** (tail probabilities): held out. Each reference bundle is scored by the model
  fitted without it (leave-one-out), or without its whole group when the reference bundles come in
  groups of copies of one individual (``groups``: leave-one-group-out); ``log d2`` of those held-out scores is fitted by a normal law (mean,
  sd), once for the bundle level and once per node. A new bundle's tail probability is
  ``P(D2 >= d2)`` under that law (`p_value`), its node z-score ``Phi^-1(1 - p_node)`` =
  ``(log d2_node - mu) / sd`` (`standardised`: computed directly, so it is never capped): about N(0, 1)
  for bundles like the reference ones, large where the profile deviates. Held-out scores are the
  honest reference (in-sample distances are smaller); the log-normal extrapolates beyond the
  1 / (n + 1) resolution of an empirical rank.

Why this model (measured in docs/analysis.md): with n ~ 25 reference bundles and p = 1024, the
sample covariance is singular; the shrunk correlation keeps the dominant directions of normal
variation (what the synthetic subjects' elastic and similarity differences move together) and
falls back to a per-coordinate z-score elsewhere. A diagonal model (``lam = 1``) is the comparison.

Norms files: safetensors, per tract ``{tract}/centre``, ``/scale`` (p,), ``/deviations`` (n, p)
(the standardised ``Y``), metadata JSON: version, embedding version, model sha256, nodes,
features, per tract ``lam``, ``n``, the calibrations and the reference subjects.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .embedding import EMBEDDING_VERSION
from .records import AnalysisError

NORMS_FORMAT = "vqdiff-norms"
NORMS_VERSION = 1
MIN_SHRINKAGE = 0.05
MIN_REFERENCE = 5  # bundles per tract
_EPS = 1e-6


def _sf(u: np.ndarray) -> np.ndarray:
    """Standard normal upper tail ``P(U >= u)`` by ``erfc`` (numpy only): accurate far into the tail,
    where ``1 - Phi(u)`` would round to 0 (u > 8.3)."""
    from math import erfc

    return 0.5 * np.vectorize(erfc, otypes=[np.float64])(np.asarray(u, np.float64) / math.sqrt(2.0))


def shrinkage(y: np.ndarray) -> float:
    """Schaefer & Strimmer's shrinkage intensity of the correlation towards the identity, from the
    standardised deviations ``y`` (n, p)."""
    n = y.shape[0]
    if n < 3:
        return 1.0
    w_mean = y.T @ y / n  # (p, p) mean of y_ki y_kj
    sq = (y * y).T @ (y * y)  # sum_k y_ki^2 y_kj^2
    var = n / (n - 1) ** 3 * (sq - n * w_mean * w_mean)
    r = w_mean * n / (n - 1)
    off = ~np.eye(y.shape[1], dtype=bool)
    denom = float((r[off] ** 2).sum())
    lam = float(var[off].sum() / denom) if denom > 0 else 1.0
    return min(1.0, max(MIN_SHRINKAGE, lam))


def mahalanobis(z: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """``z' R^-1 z`` for rows ``z`` (M, q), ``R = lam I + (1 - lam) y'y / (n - 1)`` (y (n, q)), by Woodbury."""
    n = y.shape[0]
    c = (1.0 - lam) / max(n - 1, 1)
    zz = np.einsum("mq,mq->m", z, z)
    if c == 0.0 or n == 0:
        return zz / lam
    gram = lam * np.eye(n) + c * (y @ y.T)
    yz = z @ y.T  # (M, n)
    return (zz - c * np.einsum("mn,mn->m", yz, np.linalg.solve(gram, yz.T).T)) / lam


@dataclass
class TractNorm:
    centre: np.ndarray  # (p,)
    scale: np.ndarray  # (p,)
    deviations: np.ndarray  # (n, p) standardised
    lam: float
    n_nodes: int
    calibration: dict[str, Any] = field(default_factory=dict)  # {"bundle": [mu, sd], "nodes": [[mu, sd]...]}
    subjects: list[str] = field(default_factory=list)

    _prep: tuple | None = field(default=None, repr=False, compare=False)

    def _woodbury(self) -> tuple:
        """(whole-profile kernel (n, n), node blocks of the deviations (N, n, D), node kernels (N, n, n)):
        ``R^-1 = (I - Y' K Y) / lam`` with ``K = c (lam I + c Y Y')^-1``, computed once per norm."""
        if self._prep is None:
            y, lam = self.deviations, self.lam
            n, p = y.shape
            c = (1.0 - lam) / max(n - 1, 1)
            eye = np.eye(n)
            whole = c * np.linalg.inv(lam * eye + c * (y @ y.T))
            blocks = y.reshape(n, self.n_nodes, p // self.n_nodes).transpose(1, 0, 2)
            nodes = c * np.linalg.inv(lam * eye + c * blocks @ blocks.transpose(0, 2, 1))
            self._prep = (whole, blocks, nodes)
        return self._prep

    def distances(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Profiles (M, p) -> (bundle-level d2 (M,), node-level d2 (M, N)) (module doc)."""
        z = (np.atleast_2d(np.asarray(x, np.float64)) - self.centre) / self.scale
        whole_k, blocks, node_k = self._woodbury()
        yz = z @ self.deviations.T  # (M, n)
        whole = (np.einsum("mq,mq->m", z, z) - np.einsum("mn,nl,ml->m", yz, whole_k, yz)) / self.lam
        zb = z.reshape(len(z), self.n_nodes, -1)  # (M, N, D)
        yzb = np.einsum("knd,mkd->mkn", blocks, zb)
        nodes = (np.einsum("mkd,mkd->mk", zb, zb) - np.einsum("mkn,knl,mkl->mk", yzb, node_k, yzb)) / self.lam
        return whole, nodes


def fit_tract(x: np.ndarray, n_nodes: int, *, lam: float | None = None) -> TractNorm:
    """The normative model of one tract from reference profiles ``x`` (n, p) (module doc); ``lam``
    fixes the shrinkage (1.0: diagonal model) instead of estimating it."""
    x = np.asarray(x, np.float64)
    centre = np.median(x, axis=0)
    dev = x - centre
    scale = np.sqrt((dev ** 2).mean(axis=0))
    scale = np.maximum(scale, max(float(np.median(scale)) * 1e-3, _EPS))
    y = dev / scale
    return TractNorm(centre, scale, y, shrinkage(y) if lam is None else float(lam), n_nodes)


def _lognormal(d2: np.ndarray) -> list[float]:
    v = np.log(np.maximum(d2, 1e-12))
    return [float(v.mean()), float(max(v.std(ddof=1), 1e-3))]


def calibrate(norm: TractNorm, x: np.ndarray, *, lam: float | None = None, groups=None) -> TractNorm:
    """Held-out calibration of ``norm`` fitted on ``x`` (module doc); returns ``norm``.

    ``groups`` (one label per row of ``x``; default: every row its own group, i.e. leave-one-out):
    each group's bundles are scored by the model fitted without that group. Give the rows that are
    copies of one individual (synthetic draws of one real bundle) one label, so that the held-out
    distances are those of an individual the model has not seen, which is what a new subject is.
    """
    x = np.asarray(x, np.float64)
    labels = np.arange(len(x)) if groups is None else np.asarray([str(g) for g in groups])
    if len(labels) != len(x):
        raise AnalysisError(f"{len(labels)} group labels for {len(x)} reference bundles")
    kinds = list(dict.fromkeys(labels.tolist()))
    if len(kinds) < 2:
        raise AnalysisError(f"held-out calibration needs 2 or more groups of reference bundles, got {len(kinds)}")
    whole, nodes = np.empty(len(x)), np.empty((len(x), norm.n_nodes))
    for g in kinds:
        out = labels == g
        if (~out).sum() < 2:
            raise AnalysisError(f"group {g!r} holds {out.sum()} of {len(x)} reference bundles: fewer than 2 remain "
                                "to fit the model that scores it")
        held = fit_tract(x[~out], norm.n_nodes, lam=norm.lam if lam is None else lam)
        whole[out], nodes[out] = held.distances(x[out])
    norm.calibration = {"bundle": _lognormal(whole),
                        "nodes": [_lognormal(nodes[:, k]) for k in range(norm.n_nodes)],
                        "loo_bundle_d2": [float(v) for v in whole],
                        "held_out": "leave-one-out" if groups is None else f"leave-one-group-out ({len(kinds)} groups)"}
    return norm


def standardised(d2: np.ndarray, mu_sd) -> np.ndarray:
    """``(log d2 - mu) / sd``: a distance on the calibration's standard normal scale. This is the node
    z-score (`Phi^-1(1 - p)` of the tail probability ``p``, computed without the round trip through
    ``p``, which underflows to 0 for z above ~8.3 and would make every such node tie)."""
    mu, sd = mu_sd
    return (np.log(np.maximum(np.asarray(d2, np.float64), 1e-12)) - mu) / sd


def tail_probability(d2: np.ndarray, mu_sd) -> np.ndarray:
    """``P(D2 >= d2)`` under the calibration's log-normal law."""
    return _sf(standardised(d2, mu_sd))


@dataclass
class Norms:
    tracts: dict[str, TractNorm]
    n_nodes: int
    n_features: int
    model_sha256: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        from ..fileio import atomic_write_bytes, safetensors_parts

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: -f) to replace it")
        tensors = {}
        for name, t in self.tracts.items():
            tensors[f"{name}/centre"] = np.ascontiguousarray(t.centre)
            tensors[f"{name}/scale"] = np.ascontiguousarray(t.scale)
            tensors[f"{name}/deviations"] = np.ascontiguousarray(t.deviations)
        tracts = {name: {"lam": t.lam, "n": int(t.deviations.shape[0]), "calibration": t.calibration,
                         "subjects": t.subjects} for name, t in self.tracts.items()}
        meta = {"format": NORMS_FORMAT, "format_version": str(NORMS_VERSION),
                "embedding_version": str(EMBEDDING_VERSION), "model_sha256": self.model_sha256,
                "n_nodes": str(self.n_nodes), "n_features": str(self.n_features), "tracts": json.dumps(tracts),
                "info": json.dumps(self.meta)}
        atomic_write_bytes(path, safetensors_parts(tensors, meta))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Norms:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file, safe_open

        path = Path(path)
        accepted = f"a {NORMS_FORMAT} file (version {NORMS_VERSION}) written by `vqdiff-norms fit`"
        if not path.is_file():
            raise AnalysisError(f"{path} does not exist; expected {accepted}")
        try:
            with safe_open(str(path), "np") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise AnalysisError(f"{path}: not {accepted} ({e})") from e
        if meta.get("format") != NORMS_FORMAT or meta.get("format_version") != str(NORMS_VERSION):
            raise AnalysisError(f"{path}: not {accepted}")
        if meta.get("embedding_version") != str(EMBEDDING_VERSION):
            raise AnalysisError(f"{path}: norms of embedding version {meta.get('embedding_version')}; this vqdiff "
                                f"scores version {EMBEDDING_VERSION}: refit them")
        n_nodes = int(meta["n_nodes"])
        tracts = {name: TractNorm(tensors[f"{name}/centre"], tensors[f"{name}/scale"], tensors[f"{name}/deviations"],
                                  float(info["lam"]), n_nodes, info["calibration"], list(info.get("subjects", [])))
                  for name, info in json.loads(meta["tracts"]).items()}
        return cls(tracts, n_nodes, int(meta["n_features"]), meta.get("model_sha256", ""),
                   json.loads(meta.get("info", "{}")))


def fit(profiles: dict[str, np.ndarray], *, n_nodes: int, subjects: dict[str, list[str]] | None = None,
        model_sha256: str = "", lam: float | None = None, info: dict[str, Any] | None = None,
        groups: dict[str, list[str]] | None = None) -> Norms:
    """Norms of every tract: ``profiles`` tract -> (n, N * D) reference profiles (module doc);
    ``groups`` tract -> one label per profile for the held-out calibration (`calibrate`; default
    leave-one-out)."""
    tracts, small = {}, []
    for name, x in sorted(profiles.items()):
        x = np.asarray(x, np.float64)
        if len(x) < MIN_REFERENCE:
            small.append(f"{name} ({len(x)})")
            continue
        g = None if groups is None else groups[name]
        norm = calibrate(fit_tract(x, n_nodes, lam=lam), x, groups=g)
        norm.subjects = list((subjects or {}).get(name, []))
        tracts[name] = norm
    if not tracts:
        raise AnalysisError(f"no tract has the {MIN_REFERENCE} reference bundles a norm needs (got: {', '.join(small)})")
    n_features = next(iter(profiles.values())).shape[1] // n_nodes
    return Norms(tracts, n_nodes, n_features, model_sha256, {**(info or {}), "skipped_tracts": small})
