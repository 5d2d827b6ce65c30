"""Per-bundle templates of a model's training data: centroids, mirror partners and calibration.

A `Templates` holds, for every bundle the model was trained on, up to 16 QuickBundles centroids at
20 points in model space, the bundle's mirror partner (the bundle its x -> -x image matches:
``IFOF_L`` <-> ``IFOF_R``; midline bundles are their own) and a calibration of the residuals the
training bundles give. It is saved as one safetensors file (centroids as float32 tensors, the rest
as JSON metadata; nothing is pickled): 39 KB for the 12 bundles of subject01.

Distances are dipy's bundle minimum distance (BMD) on centroids: ``residual = (mean over a of the
MDF to the nearest b + mean over b of the MDF to the nearest a) / 2`` in mm (model units), i.e. the
square root of the cost `dipy.align.streamlinear.StreamlineLinearRegistration` minimises (computed
with its Cython kernel, one thread: deterministic).

Registration onto a template (`vqdiff.slr.fit`) lives in `vqdiff.slr`.

Calibration (from the training bundles only): ``mirror_mm`` is the residual of the mirror partner's
bundle, mirrored and registered onto the template - a second instance of the same bundle, the best
stand-in one subject offers for another subject's; ``unknown_mm = UNKNOWN_FACTOR * mirror_mm`` is
the residual above which a registered input is called unknown; ``identity_mm`` is the residual
below which an input is taken to be in model space already (half the training bundle's streamlines
against the template, times 1.5, at least 0.5 mm).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .slr import apply_matrix, centre_radius, coarse_start, fit

FORMAT = "vqdiff-templates"
FORMAT_VERSION = 1
N_POINTS = 20  # points per centroid
QB_THRESHOLD = 8.0  # QuickBundles MDF threshold (mm of the input)
MAX_CENTROIDS = 16  # largest clusters kept per bundle
MAX_STREAMLINES = 500  # evenly strided subsample clustered per bundle
MIN_CLUSTER_FRACTION = 0.01  # clusters smaller than this share of the streamlines are dropped
UNKNOWN_FACTOR = 1.5
MIRROR = np.diag([-1.0, 1.0, 1.0, 1.0])


# ---------------------------------------------------------------------------------------- geometry
_SHARED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("vqdiff_shared_centroids", default=None)


@contextlib.contextmanager
def shared_centroids() -> Iterator[None]:
    """Within it, `bundle_centroids` of the same streamlines (the same list object, of the same length)
    with the same parameters is computed once and its copies returned after: a file's preparation
    (segment=auto's detection, its registration, the registration again with the bundle's name) clusters
    the file once instead of three times (and `shared_fit` fits those centroids onto a template once).
    The results are the same bits either way (deterministic); per context (thread, task), forgotten on exit."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def bundle_centroids(streamlines: Sequence[np.ndarray], *, threshold: float = QB_THRESHOLD,
                     max_centroids: int = MAX_CENTROIDS, max_streamlines: int = MAX_STREAMLINES,
                     n_points: int = N_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """QuickBundles centroids of an evenly strided subsample -> ((K, n_points, 3) float64, sizes (K,)).

    Deterministic (the subsample and QuickBundles' order follow the input order), so the training
    bundle itself gives exactly its template's centroids. Computed once per streamlines within
    `shared_centroids`.
    """
    memo = _SHARED.get()
    if memo is None:
        return _bundle_centroids(streamlines, threshold, max_centroids, max_streamlines, n_points)
    key = (id(streamlines), len(streamlines), threshold, max_centroids, max_streamlines, n_points)
    hit = memo.get(key)
    if hit is None or hit[0] is not streamlines:  # the object is held, so its id is not reused meanwhile
        hit = memo[key] = (streamlines, _bundle_centroids(streamlines, threshold, max_centroids, max_streamlines,
                                                          n_points))
    return hit[1][0].copy(), hit[1][1].copy()


def shared_fit(moving: np.ndarray, static: np.ndarray, *, model: str) -> Any:
    """`vqdiff.slr.fit` of ``moving`` onto ``static``, once per (moving's values, the static array object,
    ``model``) within `shared_centroids` (a copy of its matrix returned); outside it, a plain `fit`."""
    from dataclasses import replace

    memo = _SHARED.get()
    if memo is None:
        return fit(moving, static, model=model)
    moving = np.ascontiguousarray(moving)
    key = ("fit", moving.dtype.str, moving.shape, moving.tobytes(), id(static), model)
    hit = memo.get(key)
    if hit is None or hit[0] is not static:
        hit = memo[key] = (static, fit(moving, static, model=model))
    return replace(hit[1], matrix=hit[1].matrix.copy())


def _bundle_centroids(streamlines: Sequence[np.ndarray], threshold: float, max_centroids: int,
                      max_streamlines: int, n_points: int) -> tuple[np.ndarray, np.ndarray]:
    from dipy.segment.clustering import QuickBundles
    from dipy.segment.featurespeed import ResampleFeature
    from dipy.segment.metric import AveragePointwiseEuclideanMetric

    step = max(1, math.ceil(len(streamlines) / max_streamlines))
    sub = [np.ascontiguousarray(s, dtype=np.float32) for s in streamlines[::step]]
    metric = AveragePointwiseEuclideanMetric(ResampleFeature(nb_points=n_points))
    clusters = sorted(QuickBundles(threshold=threshold, metric=metric).cluster(sub), key=lambda c: -len(c))
    keep = [c for c in clusters if len(c) >= MIN_CLUSTER_FRACTION * len(sub)][:max_centroids] or clusters[:1]
    return (np.array([c.centroid for c in keep], dtype=np.float64),
            np.array([len(c) for c in keep], dtype=np.float64))


def mdf_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Ka, Kb) minimum average direct-flip distances between two centroid sets (K, P, 3)."""
    direct = np.linalg.norm(a[:, None] - b[None], axis=-1).mean(-1)
    flipped = np.linalg.norm(a[:, None] - b[None, :, ::-1], axis=-1).mean(-1)
    return np.minimum(direct, flipped)


def residual(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric bundle minimum distance (mm): the square root of dipy's BMD cost (its kernel)."""
    from dipy.align.bundlemin import _bundle_minimum_distance

    fa = np.ascontiguousarray(a.reshape(-1, 3), dtype=np.float64)
    fb = np.ascontiguousarray(b.reshape(-1, 3), dtype=np.float64)
    return float(math.sqrt(_bundle_minimum_distance(fa, fb, len(a), len(b), a.shape[1], num_threads=1)))


# ---------------------------------------------------------------------------------------- templates
@dataclass
class Templates:
    """Compact per-bundle templates of a model's training data, in model space.

    Attributes: ``names`` (bundle names, in order), ``centroids`` ({name: (K, 20, 3) float64}),
    ``sizes`` ({name: (K,) cluster sizes}), ``partner`` ({name: mirror partner's name}),
    ``calibration`` ({name: {"identity_mm", "mirror_mm", "unknown_mm"}}), ``params`` (how the
    centroids were made), ``aliases`` ({name: [other names a hint may use]}).
    """

    names: list[str]
    centroids: dict[str, np.ndarray]
    sizes: dict[str, np.ndarray]
    partner: dict[str, str]
    calibration: dict[str, dict[str, float]]
    params: dict[str, Any] = field(default_factory=dict)
    aliases: dict[str, list[str]] = field(default_factory=dict)
    _stats: dict[str, tuple[np.ndarray, float]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def centre_radius(self, name: str) -> tuple[np.ndarray, float]:
        """`vqdiff.slr.centre_radius` of a template's centroids (computed once: they are read-only)."""
        if name not in self._stats:
            self._stats[name] = centre_radius(self.centroids[name])
        return self._stats[name]

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        n = sum(len(c) for c in self.centroids.values())
        return f"Templates({len(self.names)} bundles {self.names}, {n} centroids, params={self.params})"

    def __contains__(self, name: object) -> bool:
        return name in self.centroids

    def centroid_params(self) -> dict[str, Any]:
        keys = ("threshold", "max_centroids", "max_streamlines", "n_points")
        return {k: self.params[k] for k in keys if k in self.params}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_bundles(cls, bundles: Mapping[str, Sequence[np.ndarray]], *, aliases: Mapping[str, Sequence[str]] | None = None,
                     threshold: float = QB_THRESHOLD, max_centroids: int = MAX_CENTROIDS,
                     max_streamlines: int = MAX_STREAMLINES, n_points: int = N_POINTS) -> Templates:
        """Templates of ``{name: streamlines}`` (model space): centroids, mirror partners, calibration."""
        if not bundles:
            raise ValueError("no bundles to build templates from")
        params = {"threshold": float(threshold), "max_centroids": int(max_centroids),
                  "max_streamlines": int(max_streamlines), "n_points": int(n_points)}
        names = list(bundles)
        cents, sizes = {}, {}
        for n in names:
            cents[n], sizes[n] = bundle_centroids(bundles[n], **params)
        partner = {}
        for n in names:  # the template the mirror image matches best (centres and sizes matched)
            mir = apply_matrix(MIRROR, cents[n])
            partner[n] = min(names, key=lambda m: residual(apply_matrix(coarse_start(mir, cents[m]), mir), cents[m]))
        partner = {n: (p if partner.get(p) == n else n) for n, p in partner.items()}  # mutual, or itself
        calibration = {}
        for n in names:
            half, _ = bundle_centroids(list(bundles[n])[1::2], **params)
            other = [apply_matrix(MIRROR, s) for s in bundles[partner[n]]]
            mir, _ = bundle_centroids(other, **params)
            mirror_mm = fit(mir, cents[n]).residual_mm
            calibration[n] = {"identity_mm": round(max(0.5, 1.5 * residual(half, cents[n])), 4),
                              "mirror_mm": round(mirror_mm, 4),
                              "unknown_mm": round(UNKNOWN_FACTOR * mirror_mm, 4)}
        return cls(names, cents, sizes, partner, calibration, params,
                   {k: list(v) for k, v in (aliases or {}).items()})

    @staticmethod
    def folder_bundles(folder: str | os.PathLike) -> dict[str, list[np.ndarray]]:
        """The streamlines of every ``.trk`` / ``.trx`` of ``folder``, by bundle name (the file stem)."""
        from .io import load_bundle

        paths = sorted(p for p in Path(folder).iterdir() if p.suffix in (".trk", ".trx"))
        return {p.stem: list(load_bundle(p).streamlines) for p in paths}

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, **kwargs: Any) -> Templates:
        """Templates of every ``.trk`` / ``.trx`` of ``folder`` (bundle name = file stem)."""
        return cls.from_bundles(cls.folder_bundles(folder), **kwargs)

    # ------------------------------------------------------------------ file
    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        tensors = {"centroids": np.concatenate([self.centroids[n] for n in self.names]).astype(np.float32),
                   "sizes": np.concatenate([self.sizes[n] for n in self.names]).astype(np.float32),
                   "counts": np.array([len(self.centroids[n]) for n in self.names], dtype=np.int64)}
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "names": self.names,
                "partner": self.partner, "calibration": self.calibration, "params": self.params,
                "aliases": self.aliases}
        return save(tensors, metadata={"vqdiff_templates": json.dumps(meta, sort_keys=True)})

    def save(self, path: str | os.PathLike) -> Path:
        from .fileio import atomic_write_bytes

        return atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> Templates:
        from safetensors.numpy import load

        try:
            n = int.from_bytes(data[:8], "little")
            meta = json.loads(json.loads(data[8:8 + n])["__metadata__"]["vqdiff_templates"])
            tensors = load(bytes(data))
        except Exception as exc:
            raise ValueError(f"not a {FORMAT} file: {exc}") from exc
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"not a {FORMAT} version {FORMAT_VERSION} file: {meta.get('format')!r} "
                             f"version {meta.get('format_version')!r}")
        try:
            names, counts, cen = list(meta["names"]), tensors["counts"].tolist(), tensors["centroids"]
            ok = (len(names) == len(counts) == len(set(names)) and sum(counts) == len(cen) == len(tensors["sizes"])
                  and cen.ndim == 3 and cen.shape[2] == 3 and cen.shape[1] == meta["params"]["n_points"]
                  and all(n in meta["calibration"] and n in meta["partner"] for n in names) and min(counts) > 0)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{FORMAT}: incomplete file ({exc})") from exc
        if not ok:
            raise ValueError(f"{FORMAT}: the centroids, counts, names and calibration do not match")
        spans = dict(zip(names, zip(np.cumsum([0, *counts[:-1]]), np.cumsum(counts), strict=True), strict=True))
        cents = {n: cen[a:b].astype(np.float64) for n, (a, b) in spans.items()}
        sizes = {n: tensors["sizes"][a:b].astype(np.float64) for n, (a, b) in spans.items()}
        return cls(names, cents, sizes, dict(meta["partner"]), {k: dict(v) for k, v in meta["calibration"].items()},
                   dict(meta["params"]), {k: list(v) for k, v in meta.get("aliases", {}).items()})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Templates:
        try:
            return cls.from_bytes(Path(path).read_bytes())
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
