"""Files of several bundles without groups: tell that a file is not one bundle, and cut it into bundles.

>>> from vqdiff.segment import segment
>>> seg = segment(bundle.streamlines, templates, name=bundle.name)  # "auto": cuts only a multi-bundle file
>>> seg.detection.multi, seg.detection.reasons     # (True, ('clusters', 'extent', 'scale_at_lower_bound'))
>>> [(p.name, len(p.indices)) for p in seg.parts]  # [('CC_Fr_1', 960), ..., ('unassigned_1', 6)]
>>> seg.to_parts()                                 # [(name, indices)]: what `vqdiff.subject` encodes

Detection (`detect`), three signals, any of which calls the file several bundles:

- ``clusters``: dipy's QuickBundles at `CLUSTER_MM` (40 mm MDF, 20 points) on an evenly strided
  subsample finds at least two clusters of `CLUSTER_SHARE` (5%) of the streamlines or more. Every one
  of the 12 subject01 and 20 AFQ single bundles is one such cluster; subject01's 12 bundles
  concatenated give 6, AFQ's 20 give 7.
- ``extent``: shrunk by the similarity's smallest scale (0.6), the file's principal extents (the
  standard deviations of its QuickBundles centroids' points along their principal axes) still exceed
  those of every template by more than `EXTENT_FACTOR` along some axis: a shape no template has.
- ``scale_at_lower_bound``: registering the whole file onto its best template (`vqdiff.registration`)
  shrinks it to the scale's lower bound. Other bounds (rotation, the upper scale) are not a sign of
  several bundles (AFQ's single arcuate and uncinate bundles end at the rotation bound, its cingulum
  hippocampus at scale 1.4); they give the ``registration_at_bound`` warning (`Registration.warnings`).

Segmentation (`segment`), in model space, against the model's templates as the atlas (up to 16
QuickBundles centroids per training bundle at 20 points: `templates.safetensors`, which
`vqdiff-train` / `vqdiff-templates` write; no other file: on subject01's 12 bundles concatenated, a
346-centroid atlas named 97.8% of the streamlines right, the templates' 134 centroids 97.4%):

1. the file's centroids are registered onto all the atlas centroids at once (`vqdiff.slr.fit`, the
   bounded similarity; identity kept unless it lowers the residual by a fifth: `atlas_registration`);
2. per atlas bundle, dipy's RecoBundles (`dipy.segment.bundles.RecoBundles`) finds its neighbourhood,
   a local bounded SLR registers that onto the bundle (unless the file is in model space already) and
   the streamlines within `PRUNING_MM` of a centroid are claimed (`claims`);
3. a streamline claimed by several atlas bundles goes to the one whose nearest centroid is closest
   (MDF, 20 points, after that bundle's local SLR); ties to the first in the atlas's order;
4. the streamlines no atlas bundle claims are clustered by QuickBundles at `UNASSIGNED_MM`; clusters
   under `MIN_PART` streamlines join the nearest larger one within `UNASSIGNED_MM`, and each becomes
   an unnamed part (``unassigned_1``, ... by decreasing size), so every streamline is in exactly one
   part (`unassigned_clusters`).

Deterministic (strided subsamples, QuickBundles in input order, a fixed seed, one thread).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .registration import MIN_GAIN, Registration, register, transform
from .slr import SCALE_RANGE, fit
from .templates import Templates, bundle_centroids, mdf_matrix, residual

MODES = ("auto", "on", "off")  # segment a file detected as several bundles / always / never
CLUSTER_MM = 40.0
CLUSTER_SHARE = 0.05
DETECT_STREAMLINES = 1000
EXTENT_FACTOR = 1.0
PRUNING_MM = 12.0
REDUCTION_MM = 15.0
NEIGHBOURHOOD_MM = 20.0
UNASSIGNED_MM = 20.0
MIN_PART = 32
UNASSIGNED = "unassigned"
SEED = 0
ATLAS_CENTROIDS = {"max_centroids": 64, "max_streamlines": 2000}  # the file's centroids for its registration

log = logging.getLogger(__name__)


def _resampled(streamlines: Sequence[np.ndarray], n_points: int) -> np.ndarray:
    from dipy.tracking.streamline import set_number_of_points

    return np.asarray(set_number_of_points([np.asarray(s, np.float32) for s in streamlines], nb_points=n_points),
                      dtype=np.float64)


def _qb(streamlines: Sequence[np.ndarray], threshold: float, n_points: int = 20):
    from dipy.segment.clustering import QuickBundles
    from dipy.segment.featurespeed import ResampleFeature
    from dipy.segment.metric import AveragePointwiseEuclideanMetric

    metric = AveragePointwiseEuclideanMetric(ResampleFeature(nb_points=n_points))
    return QuickBundles(threshold=threshold, metric=metric).cluster([np.asarray(s, np.float32) for s in streamlines])


def principal_extents(centroids: np.ndarray) -> np.ndarray:
    """(3,) standard deviations of the points of ``centroids`` (K, P, 3) along their principal axes, largest first."""
    p = centroids.reshape(-1, 3) - centroids.reshape(-1, 3).mean(0)
    return np.sqrt(np.maximum(np.linalg.eigvalsh(p.T @ p / len(p)), 0.0))[::-1]


def extent_excess(centroids: np.ndarray, templates: Templates) -> float:
    """By how much the file, shrunk by the smallest scale, still exceeds the closest template's extents
    along its worst principal axis (``min_t max_i lo * e_i / e_t,i``; above 1: larger than any template)."""
    mine = principal_extents(centroids) * SCALE_RANGE[0]
    return float(min(np.max(mine / np.maximum(principal_extents(templates.centroids[n]), 1e-6))
                     for n in templates.names))


@dataclass(frozen=True)
class Detection:
    """Whether a file is several bundles (``multi``), which signals said so (``reasons``: "clusters",
    "extent", "scale_at_lower_bound") and their numbers."""

    multi: bool
    reasons: tuple[str, ...]
    cluster_shares: tuple[float, ...]  # the QuickBundles clusters at CLUSTER_MM, largest first (shares)
    extent_excess: float
    registration: Registration | None = None

    @property
    def clusters(self) -> int:
        return sum(s >= CLUSTER_SHARE for s in self.cluster_shares)

    def to_dict(self) -> dict[str, Any]:
        reg = self.registration
        return {"multi": self.multi, "reasons": list(self.reasons), "clusters": self.clusters,
                "cluster_mm": CLUSTER_MM, "cluster_shares": [round(s, 4) for s in self.cluster_shares[:8]],
                "extent_excess": round(self.extent_excess, 3), "extent_factor": EXTENT_FACTOR,
                "registration": None if reg is None else {"template": reg.template, "scale": round(reg.scale, 4),
                                                          "at_bound": list(reg.at_bound)}}


def detect(streamlines: Sequence[np.ndarray], templates: Templates, *,
           registration: Registration | None = None) -> Detection:
    """Is ``streamlines`` (RAS mm) several bundles? (module doc). ``registration``: the file's own
    registration when the caller has it (else it is made here, `vqdiff.registration.register`)."""
    if len(streamlines) == 0:
        raise ValueError("an empty file holds no bundle")
    step = max(1, math.ceil(len(streamlines) / DETECT_STREAMLINES))
    sub = streamlines[::step]
    shares = tuple(sorted((len(c) / len(sub) for c in _qb(sub, CLUSTER_MM)), reverse=True))
    cents, _ = bundle_centroids(streamlines, **templates.centroid_params())
    excess = extent_excess(cents, templates)
    reg = registration if registration is not None else register(streamlines, templates)
    reasons = []
    if sum(s >= CLUSTER_SHARE for s in shares) >= 2:
        reasons.append("clusters")
    if excess > EXTENT_FACTOR:
        reasons.append("extent")
    if "scale" in reg.at_bound and reg.scale < 1.0:
        reasons.append("scale_at_lower_bound")
    return Detection(bool(reasons), tuple(reasons), shares, excess, reg)


@dataclass(frozen=True, eq=False)
class SegmentPart:
    """One bundle of a segmented file: its ``name`` (the atlas bundle's, ``unassigned_<k>``, or the
    file's own when it is one bundle), its streamlines' ``indices`` in the file (ascending), the atlas
    bundle that claimed it (None otherwise), the mean MDF of its streamlines to that bundle's nearest
    centroid in mm (nan otherwise) and ``matrix``, the file -> model space transform segmentation used."""

    name: str
    indices: np.ndarray
    atlas_bundle: str | None
    distance_mm: float
    matrix: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        d = self.distance_mm
        return {"name": self.name, "streamlines": int(len(self.indices)), "atlas_bundle": self.atlas_bundle,
                "distance_mm": None if not math.isfinite(d) else round(d, 3)}


@dataclass(frozen=True, eq=False)
class Segmentation:
    """A partition of a file's streamlines into named parts (every streamline in exactly one).

    ``method``: "recobundles" (segmented), "single" (detected as one bundle) or "off" (not segmented);
    ``matrix`` the file -> model space transform of the whole file (identity unless segmented);
    ``registration`` the bounded SLR's numbers (scale, rotation, residuals, ``at_bound``).
    """

    parts: tuple[SegmentPart, ...]
    detection: Detection
    method: str
    n_streamlines: int
    matrix: np.ndarray = field(default_factory=lambda: np.eye(4))
    registration: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_parts(self) -> list[tuple[str, np.ndarray]]:
        """``[(name, indices)]``, the form `vqdiff.subject.subject_parts` takes."""
        return [(p.name, p.indices) for p in self.parts]

    def owner(self) -> np.ndarray:
        """(N,) the index of each streamline's part."""
        out = np.full(self.n_streamlines, -1, np.int64)
        for k, p in enumerate(self.parts):
            out[p.indices] = k
        return out

    def warnings(self) -> list[dict[str, Any]]:
        """``multi_bundle`` when the file was detected as several bundles (what was done about it), and
        ``registration_at_bound`` when the whole-file transform segmentation used sits at a bound."""
        out = []
        det = self.detection
        if det.multi:
            why = ", ".join(det.reasons)
            if self.method == "recobundles":
                named = [p for p in self.parts if p.atlas_bundle]
                rest = sum(len(p.indices) for p in self.parts if not p.atlas_bundle)
                what = (f"segmented into {len(self.parts)} bundles: {len(named)} recognised ("
                        f"{', '.join(p.name for p in named) or 'none'}) and {rest} streamlines no atlas bundle "
                        f"claims in {len(self.parts) - len(named)} unnamed bundle(s)")
            else:
                what = ("encoded as one bundle as given (segmentation off): its registration and reconstruction "
                        "may be poor")
            out.append({"code": "multi_bundle", "message": f"the file holds several bundles ({why}); {what}",
                        "segmentation": self.method, "parts": [p.to_dict() for p in self.parts],
                        **det.to_dict()})
        if self.registration.get("at_bound"):
            out.append({"code": "registration_at_bound",
                        "message": f"the file's registration onto the atlas for segmentation stopped at its bounds "
                                   f"({', '.join(self.registration['at_bound'])}; scale "
                                   f"{self.registration['scale']:.2f}): the best transform the bounded similarity "
                                   "allows", "stage": "segmentation", **self.registration})
        return out

    def record(self, subject):
        """``subject`` (`vqdiff.subject.Subject` of these parts) with this provenance in its source."""
        subject.source["segmentation"] = self.to_dict()
        return subject

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready provenance (what a subject file records about how its parts were found)."""
        return {"method": self.method, "n_streamlines": self.n_streamlines, "matrix": self.matrix.tolist(),
                "registration": dict(self.registration), "detection": self.detection.to_dict(),
                "parts": [p.to_dict() for p in self.parts], "claim_rule": "nearest atlas centroid (MDF)",
                "params": {"pruning_mm": PRUNING_MM, "reduction_mm": REDUCTION_MM, "neighbourhood_mm": NEIGHBOURHOOD_MM,
                           "unassigned_mm": UNASSIGNED_MM,
                           "min_part": MIN_PART}}


def atlas_registration(streamlines: Sequence[np.ndarray], templates: Templates) -> tuple[np.ndarray, dict[str, Any]]:
    """The file -> model space transform for segmentation: its centroids (`ATLAS_CENTROIDS`) registered
    onto all the atlas centroids by the bounded similarity SLR; identity unless that lowers the
    residual by `vqdiff.registration.MIN_GAIN`. Returns (4x4, its numbers)."""
    cents, _ = bundle_centroids(streamlines, **{**templates.centroid_params(), **ATLAS_CENTROIDS})
    atlas = np.concatenate([templates.centroids[n] for n in templates.names])
    ident = residual(cents, atlas)
    f = fit(cents, atlas)
    if f.residual_mm > (1 - MIN_GAIN) * ident:
        return np.eye(4), {"method": "identity", "residual_mm": round(ident, 3), "scale": 1.0,
                           "rotation_deg": 0.0, "at_bound": []}
    return f.matrix, {"method": "similarity", "residual_mm": round(f.residual_mm, 3),
                      "identity_residual_mm": round(ident, 3), "scale": round(f.scale, 4),
                      "rotation_deg": round(f.rotation_deg, 2), "at_bound": list(f.at_bound)}


def claims(moved: Sequence[np.ndarray], templates: Templates, *, local_slr: bool = True) -> np.ndarray:
    """(N, B) each streamline's MDF (mm) to the nearest centroid of each atlas bundle that claims it
    (inf where it does not): RecoBundles' neighbourhood of the bundle (its reduction, then pruning at
    `NEIGHBOURHOOD_MM`), registered onto the bundle's centroids when ``local_slr`` (the bounded
    similarity of `vqdiff.slr.fit` on the neighbourhood's centroids, kept when it lowers the residual),
    then pruned at `PRUNING_MM`. dipy's own local SLR (finite differences) took 11.4 s of CPU on AFQ's
    4,992 streamlines where this takes 0.5 s, with as many streamlines of the matching AFQ bundles named
    (IFOF, ILF, forceps minor 0.91-1.00 either way; corticospinal 0.79 / 0.84 vs 0.83 / 0.52)."""
    from dipy.segment.bundles import RecoBundles
    from dipy.tracking.streamline import Streamlines

    n_points = int(templates.params.get("n_points", 20))
    rb = RecoBundles(Streamlines([np.asarray(s, np.float32) for s in moved]), greater_than=0, clust_thr=15,
                     nb_pts=n_points, rng=np.random.default_rng(SEED), verbose=False)
    dist = np.full((len(moved), len(templates)), np.inf)
    for j, name in enumerate(templates.names):
        static = templates.centroids[name]
        _, labels = rb.recognize(Streamlines(list(static.astype(np.float32))), 1.25, reduction_thr=REDUCTION_MM,
                                 slr=False, pruning_thr=NEIGHBOURHOOD_MM, num_threads=1)
        labels = np.asarray(labels, np.int64)
        if labels.size == 0:
            continue
        near = [moved[i] for i in labels.tolist()]
        if local_slr and labels.size >= 2:
            cents, _ = bundle_centroids(near, **templates.centroid_params())
            f = fit(cents, static)
            if f.residual_mm < residual(cents, static):
                near = transform(near, f.matrix)
        d = mdf_matrix(_resampled(near, n_points), static).min(1)
        keep = d <= PRUNING_MM
        dist[labels[keep], j] = d[keep]
    return dist


def unassigned_clusters(moved: Sequence[np.ndarray], indices: np.ndarray) -> list[np.ndarray]:
    """The streamlines ``indices`` of ``moved`` in QuickBundles clusters at `UNASSIGNED_MM`, each under
    `MIN_PART` joined to the nearest larger one when its centroid lies within `UNASSIGNED_MM` of that
    one's (all in one when none is larger), largest first. A far small cluster stays a part of its
    own: joined to a distant one (the left and right cingulum's hippocampal parts, 30 and 33
    streamlines of AFQ), it cost that part's streamlines up to 1.8 mm of mean MDF."""
    if indices.size == 0:
        return []
    clusters = list(_qb([moved[i] for i in indices.tolist()], UNASSIGNED_MM))
    members = [indices[np.asarray(c.indices, np.int64)] for c in clusters]
    big = [k for k, m in enumerate(members) if len(m) >= MIN_PART]
    if not big:
        return [np.sort(indices)]
    cents = np.array([c.centroid for c in clusters], np.float64)
    dist = mdf_matrix(cents, cents[big])
    near = np.where(dist.min(1) <= UNASSIGNED_MM, np.array(big)[dist.argmin(1)], np.arange(len(members)))
    out = [np.sort(np.concatenate([members[k] for k in range(len(members)) if near[k] == b])) for b in np.unique(near)]
    return sorted(out, key=lambda m: (-len(m), int(m[0])))


def segment(streamlines: Sequence[np.ndarray], templates: Templates, *, mode: str = "auto", name: str = "",
            registration: Registration | None = None) -> Segmentation:
    """Cut a file of several bundles into bundles (module doc); one part (named ``name``, or "bundle")
    when ``mode`` is "off" or, with "auto", the file is one bundle. ``mode="on"`` segments whatever
    `detect` says. ``registration``: the file's own, when the caller has it (for `detect`)."""
    if mode not in MODES:
        raise ValueError(f"segmentation mode must be one of {MODES}, got {mode!r}")
    t0 = time.perf_counter()
    det = detect(streamlines, templates, registration=registration)
    n = len(streamlines)
    if mode == "off" or (mode == "auto" and not det.multi):
        whole = SegmentPart(name or "bundle", np.arange(n, dtype=np.int64), None, float("nan"), np.eye(4))
        return Segmentation((whole,), det, "off" if mode == "off" else "single", n,
                            seconds=time.perf_counter() - t0)
    matrix, reg = atlas_registration(streamlines, templates)
    moved = transform(streamlines, matrix)
    dist = claims(moved, templates, local_slr=reg["method"] != "identity")
    claimed = np.isfinite(dist).any(1)
    owner = np.where(claimed, dist.argmin(1), -1)
    parts = []
    for j, atlas_name in enumerate(templates.names):
        idx = np.flatnonzero(owner == j)
        if idx.size:
            parts.append(SegmentPart(atlas_name, idx, atlas_name, float(dist[idx, j].mean()), matrix))
    taken = {p.name for p in parts}
    k = 0
    for idx in unassigned_clusters(moved, np.flatnonzero(~claimed)):
        k += 1
        while f"{UNASSIGNED}_{k}" in taken:
            k += 1
        parts.append(SegmentPart(f"{UNASSIGNED}_{k}", idx, None, float("nan"), matrix))
    return Segmentation(tuple(parts), det, "recobundles", n, matrix, reg, time.perf_counter() - t0)


def file_parts(bundle, templates: Templates | None, *, mode: str = "auto"
               ) -> tuple[list[tuple[str, np.ndarray]] | None, Segmentation | None]:
    """How `Codec.encode_file` encodes a read file: (parts, segmentation) - a TRX's groups
    (`vqdiff.subject.group_parts`, no segmentation), the parts of a file of several bundles
    (`segment`), or ``(None, None)`` for one bundle, encoded as always. The segmentation's warnings
    are logged (``multi_bundle`` also when ``mode="off"`` encodes such a file as one bundle). A model
    without templates has no atlas: files are then encoded as given (``mode="on"`` is refused)."""
    from .subject import group_parts

    if mode not in MODES:
        raise ValueError(f"segmentation mode must be one of {MODES}, got {mode!r}")
    if bundle.groups:
        return group_parts(bundle), None
    if templates is None:
        if mode == "on":
            raise ValueError("segment='on' needs a model with templates (its atlas); this one has none: use 'auto' or 'off'")
        return None, None
    bundle.validate()
    seg = segment(bundle.streamlines, templates, mode=mode, name=bundle.name)
    for w in seg.warnings():
        log.warning("%s: %s", bundle.name or "file", w["message"])
    return (seg.to_parts(), seg) if seg.method == "recobundles" else (None, None)


def segmenter(templates: Templates, *, mode: str = "auto"):
    """``bundle -> [(name, indices)]``: `segment` as the callable `vqdiff.subject.subject_parts` takes."""
    if mode not in MODES:
        raise ValueError(f"segmentation mode must be one of {MODES}, got {mode!r}")

    def parts(bundle) -> list[tuple[str, np.ndarray]]:
        return segment(bundle.streamlines, templates, mode=mode, name=bundle.name).to_parts()

    return parts
