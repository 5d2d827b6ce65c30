"""Registration into model space and recognition of the bundle, for bundles of any subject and space.

>>> from vqdiff.registration import register
>>> from vqdiff.templates import Templates
>>> reg = register(bundle.streamlines, Templates.load("templates.safetensors"), hint="sub-01__IFOF_L")
>>> reg.template, reg.known, reg.residual_mm         # ('IFOF_L', True, 6.7)
>>> moved = reg.apply(bundle.streamlines)            # input RAS mm -> model space; encode these
>>> back = reg.invert(decoded.streamlines)           # model space -> the input's mm

Steps (``mode="auto"``), all on QuickBundles centroids (`vqdiff.templates.bundle_centroids`):

1. Identity: an input already in model space (a training bundle, or part of one) lies within its
   template's ``identity_mm`` without any transform; it gets exactly ``np.eye(4)`` and no SLR.
2. Coarse recognition against every template: centres and sizes matched, no rotation, so the
   comparison sees the input's orientation in RAS (what tells left from right and a pyramidal tract
   from a fronto- or parieto-pontine one); a few hundred microseconds for 12 templates. Shortlist:
   the templates within `SHORTLIST_RATIO` of the best coarse residual, at most `SHORTLIST`.
3. One bounded similarity SLR per shortlisted template (`vqdiff.slr.fit`; only the first when the
   bundle's name says a tract the model has no template of: `register`); the lowest residual wins.
   When the winner's mirror partner is shortlisted too, a rotation may be imitating the mirror
   image of a flat bundle, so that choice is made on the residual times
   ``1 + (rotation / MIRROR_PRIOR_DEG)**2``: a prior that inputs come in RAS within a few tens of
   degrees of the model's axes. A partner the coarse step did not shortlist is not fitted (the
   orientation-aware comparison already ruled it out). Picking by the lowest SLR cost alone over
   all templates confuses sides and neighbours (the SLR can rotate an ILF_L onto ILF_R).
4. ``known`` is False when the residual exceeds the template's ``unknown_mm`` (1.5 times the residual
   a mirrored second instance of that bundle gives) or the scale sits on its bound; `warning` has
   the numbers. The matrix is the registration either way (registered reconstructions of unknown
   bundles were still far better than as-is ones). Identity is kept when registering does not
   lower the residual by `MIN_GAIN` (a fifth). A transform with any parameter at its bound (scale,
   rotation, translation: ``at_bound``) is never returned unsaid: `Registration.warnings` adds
   ``registration_at_bound`` with the numbers, for every bundle, known or not.

Deterministic: the same streamlines give the same matrix (strided subsample, QuickBundles in input
order, single-threaded kernel), so every entry point encodes the same bytes.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .geometry import map_points
from .slr import (
    ROTATION_DEG,
    SCALE_RANGE,
    TRANSLATION_MM,
    Fit,
    apply_matrix,
    centre_radius,
    coarse_matrix,
)
from .templates import Templates, bundle_centroids, residual, shared_fit
from .tract_names import contains_words, name_words, tokens, tract_family

SHORTLIST = 3
SHORTLIST_RATIO = 1.5
MIRROR_PRIOR_DEG = 30.0
MIN_GAIN = 0.2
MODEL = "similarity"
_LEFT, _RIGHT = {"l", "left", "lh", "lt"}, {"r", "right", "rh", "rt"}


@dataclass(frozen=True, eq=False)  # eq=False: the matrix is an array; compare to_dict() instead
class Registration:
    """The transform of one bundle into model space and what it was recognised as.

    ``matrix`` (4, 4) float64 maps input RAS mm -> model space (exactly ``np.eye(4)`` for inputs
    already there); ``template`` the recognised bundle (None when ``mode="off"`` or the input is
    degenerate); ``residual_mm`` the centroid BMD to that template after the transform (model mm);
    ``method`` "identity" | "similarity" (`MODEL`); ``candidates`` the templates compared, the pick
    first, each with its residual in mm (lower is better); ``known`` False when the bundle is not
    one the model knows (``reason`` says why, `warning` gives the numbers).
    """

    matrix: np.ndarray
    template: str | None
    residual_mm: float
    method: str
    candidates: tuple[tuple[str, float], ...] = ()
    known: bool = True
    seconds: float = 0.0
    threshold_mm: float = float("nan")  # the template's unknown_mm
    identity_residual_mm: float = float("nan")  # the residual without any transform
    scale: float = 1.0
    rotation_deg: float = 0.0
    reason: str = ""  # why known is False
    details: dict[str, Any] = field(default_factory=dict, compare=False)
    at_bound: tuple[str, ...] = ()  # the similarity's parameters that ended at a bound (`vqdiff.slr.PARAMETERS`)

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.matrix, np.eye(4)))

    @property
    def inverse(self) -> np.ndarray:
        return np.eye(4) if self.is_identity else np.linalg.inv(self.matrix)

    def apply(self, streamlines: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Input space -> model space (the same arrays when the matrix is the identity)."""
        return transform(streamlines, self.matrix) if not self.is_identity else list(streamlines)

    def apply_points(self, points: np.ndarray) -> np.ndarray:
        """`apply` for points (M, 3) concatenated: one product for the whole bundle."""
        return points if self.is_identity else _transform_points(points, self.matrix)

    def invert(self, streamlines: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Model space -> input space."""
        return transform(streamlines, self.inverse) if not self.is_identity else list(streamlines)

    def warning(self) -> dict[str, Any] | None:
        """A warning with the numbers when the bundle is not one the model knows (else None)."""
        if self.known:
            return None
        nums = {"template": self.template, "residual_mm": _r(self.residual_mm),
                "threshold_mm": _r(self.threshold_mm), "scale": _r(self.scale),
                "rotation_deg": _r(self.rotation_deg), "reason": self.reason,
                "candidates": [list(c) for c in self.candidates]}
        what = f"closest to {self.template}" if self.template else "not recognised"
        return {"code": "unknown_bundle",
                "message": f"the bundle is not one the model knows ({self.reason}; {what}, residual "
                           f"{self.residual_mm:.1f} mm against a threshold of {self.threshold_mm:.1f} mm): its "
                           "name and latent codes are not comparable with that template's (the reconstruction's "
                           "quality is measured separately: see fidelity and poor_reconstruction)", **nums}

    def bound_warning(self) -> dict[str, Any] | None:
        """A ``registration_at_bound`` warning with the numbers when the transform sits at a bound of the
        similarity (`vqdiff.slr`: scale 0.6-1.4, rotation 30 degrees per axis, translation 35 mm), else
        None. Said for any bundle, known or not: the best transform within the bounds is returned, and
        a bound it reached may be one a good fit needed to cross (a file of several bundles is shrunk
        to the scale's lower bound, `vqdiff.segment`)."""
        if not self.at_bound:
            return None
        lo, hi = SCALE_RANGE
        what = [f"scale {self.scale:.2f} (bounds {lo}-{hi})" if p.startswith("scale") else
                f"rotation about {p[-1]} at {ROTATION_DEG:.0f} degrees" if p.startswith("rotation") else
                f"translation along {p[-1]} at {TRANSLATION_MM:.0f} mm" for p in self.at_bound]
        return {"code": "registration_at_bound",
                "message": f"the registration onto {self.template} stopped at its bounds ({'; '.join(what)}): the "
                           "transform is the best the bounded similarity allows, not an unconstrained fit; is the "
                           "file one bundle, in RAS mm?",
                "template": self.template, "at_bound": list(self.at_bound), "scale": _r(self.scale),
                "rotation_deg": _r(self.rotation_deg), "residual_mm": _r(self.residual_mm),
                "scale_range": list(SCALE_RANGE), "rotation_bound_deg": ROTATION_DEG,
                "translation_bound_mm": TRANSLATION_MM}

    def warnings(self) -> list[dict[str, Any]]:
        """Every warning of this registration: `warning` (unknown bundle), then `bound_warning`."""
        return [w for w in (self.warning(), self.bound_warning()) if w is not None]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready provenance (the matrix in full float64 precision); deterministic, so without
        ``seconds``: the same input gives the same dict, hence the same latents bytes."""
        return {"matrix": self.matrix.tolist(), "template": self.template, "residual_mm": _r(self.residual_mm),
                "method": self.method, "candidates": [list(c) for c in self.candidates], "known": self.known,
                "threshold_mm": _r(self.threshold_mm),
                "identity_residual_mm": _r(self.identity_residual_mm), "scale": _r(self.scale, 6),
                "rotation_deg": _r(self.rotation_deg), "reason": self.reason, "at_bound": list(self.at_bound)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Registration:
        matrix = np.asarray(d["matrix"], dtype=np.float64)
        if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
            raise ValueError(f"registration matrix must be a finite 4x4, got shape {matrix.shape}")
        nan = float("nan")
        return cls(matrix=matrix, template=d.get("template"), residual_mm=_f(d.get("residual_mm")),
                   method=str(d.get("method", "identity")),
                   candidates=tuple((str(n), float(s)) for n, s in d.get("candidates", [])),
                   known=bool(d.get("known", True)),
                   threshold_mm=_f(d.get("threshold_mm", nan)),
                   identity_residual_mm=_f(d.get("identity_residual_mm", nan)),
                   scale=_f(d.get("scale", 1.0)), rotation_deg=_f(d.get("rotation_deg", 0.0)),
                   reason=str(d.get("reason", "")), at_bound=tuple(str(p) for p in d.get("at_bound", ())))


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


def _f(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Points (M, 3) mapped by the 4x4 ``matrix`` (float64 arithmetic, their dtype kept)."""
    points = np.asarray(points)
    if points.dtype == np.float32:  # bundles: one pass per axis, no 3 x 3 matrix product
        return map_points(points, matrix)
    return apply_matrix(matrix, points.astype(np.float64)).astype(points.dtype, copy=False)


def transform(streamlines: Sequence[np.ndarray], matrix: np.ndarray) -> list[np.ndarray]:
    """``streamlines`` mapped by the 4x4 ``matrix`` (float64 arithmetic, the input's dtype kept): all
    points in one pass, returned as views of one array."""
    arrays = [np.asarray(s) for s in streamlines]
    if not arrays:
        return []
    if any(a.ndim != 2 or a.shape[1] != 3 for a in arrays):
        bad = next(i for i, a in enumerate(arrays) if a.ndim != 2 or a.shape[1] != 3)
        raise ValueError(f"streamlines must be (N, 3) point arrays; streamline {bad} has shape {arrays[bad].shape}")
    if len({a.dtype for a in arrays}) > 1:
        return [_transform_points(a, matrix) for a in arrays]
    lengths = [len(a) for a in arrays]
    moved = _transform_points(np.concatenate(arrays), matrix)
    bounds = np.cumsum(lengths).tolist()
    return [moved[a:b] for a, b in zip([0, *bounds[:-1]], bounds, strict=True)]


# ---------------------------------------------------------------------------------------- hints
def _split_side(words: list[str]) -> tuple[list[str], str | None]:
    left, right = any(t in _LEFT for t in words), any(t in _RIGHT for t in words)
    side = "L" if left and not right else "R" if right and not left else None
    return [t for t in words if t not in _LEFT | _RIGHT], side


@functools.lru_cache(maxsize=4096)
def _spelling_family(spelling: str) -> str | None:
    """The tract family id a template's name or alias spells (cached: names repeat for every bundle)."""
    fam = tract_family(_split_side(tokens(spelling))[0])
    return None if fam is None else fam[0]


def _template_family(name: str, templates: Templates) -> str | None:
    for spelling in [name, *templates.aliases.get(name, [])]:
        if (fam := _spelling_family(spelling)) is not None:
            return fam
    return None


def resolve_hint(hint: str | None, templates: Templates) -> tuple[list[str], tuple[str, str] | None]:
    """What a bundle's name says: (the templates it names, the tract family it names that none of
    the templates belongs to, else None).

    A template is named by its own name or an alias ("IFOF_L", "sub-01__IFOF_L", "Left_IFOF", "IFOF"
    -> both sides), else through the field's names of its tract family (`vqdiff.tract_names`:
    "Right_Corticospinal" -> PYT_R). ``([], None)`` when the name says nothing known (it is then
    ignored). A name of a family whose templates are all of the other side counts as a family without
    template ("Right_FPT" for a model with only FPT_L: no template can be registered onto it, as
    registration never mirrors).
    """
    if not hint:
        return [], None
    words, side = _split_side(name_words(hint))
    if not words:
        return [], None
    found = []
    for name in templates.names:
        base, tside = _split_side(tokens(name))
        spellings = [base] + [_split_side(tokens(a))[0] for a in templates.aliases.get(name, [])]
        if tside and side and tside != side:
            continue
        if any(sp and contains_words(words, tuple(sp)) for sp in spellings):
            found.append(name)
    if found:
        return found, None
    family = tract_family(words)
    if family is None:
        return [], None
    members = [n for n in templates.names if _template_family(n, templates) == family[0]]
    same_side = [n for n in members if not side or _split_side(tokens(n))[1] in (None, side)]
    if same_side:
        return same_side, None
    return [], family if not members else (family[0], f"{family[1]} ({'left' if side == 'L' else 'right'} side)")


def hint_candidates(hint: str | None, templates: Templates) -> list[str]:
    """The templates a hint names (`resolve_hint`); [] when it names none."""
    return resolve_hint(hint, templates)[0]


# ---------------------------------------------------------------------------------------- register
def register(streamlines: Sequence[np.ndarray], templates: Templates, *, mode: str = "auto",
             hint: str | None = None) -> Registration:
    """Recognise the bundle among ``templates`` and register it into model space.

    ``mode``: "auto" (recognise among all templates, or those ``hint`` - the bundle's name - names),
    "off" (identity, no recognition) or a template name (register onto that one; the name is then
    not read). With "auto", a name of a tract the model has no template of (`resolve_hint`) makes the
    bundle unknown, whatever its residual; it is still registered, onto its closest template by the
    coarse comparison alone (one SLR instead of up to `SHORTLIST`: the name has settled recognition;
    on the 12 such AFQ bundles this took their registration from 45-65 to 10-20 cost evaluations,
    reconstructions as close as before, see `benchmarks/bench_registration.py`). Raises
    ValueError for an empty bundle, non-finite coordinates or an unknown mode.
    """
    named, foreign = resolve_hint(hint, templates) if mode == "auto" else ([], None)
    reg = _register(streamlines, templates, mode, named, shortlist=1 if foreign is not None else SHORTLIST)
    if foreign is not None and reg.template is not None:
        why = f"its name {hint!r} says {foreign[1]}, a bundle this model has no template for"
        reg = replace(reg, known=False, reason=why if reg.known or not reg.reason else f"{why}; {reg.reason}")
    return reg


def _register(streamlines: Sequence[np.ndarray], templates: Templates, mode: str, named: list[str], *,
              shortlist: int = SHORTLIST) -> Registration:
    t0 = time.perf_counter()
    eye = np.eye(4)
    if mode == "off":
        return Registration(eye, None, float("nan"), "identity", seconds=time.perf_counter() - t0)
    if mode == "auto":
        names = named or list(templates.names)
    else:
        forced = [n for n in templates.names if n.lower() == str(mode).lower()]
        if not forced:
            raise ValueError(f"mode must be 'auto', 'off' or a template name {templates.names}, got {mode!r}")
        names = forced
    if len(streamlines) == 0:
        raise ValueError("an empty bundle cannot be registered")
    cents, _ = bundle_centroids(streamlines, **templates.centroid_params())
    if not np.isfinite(cents).all():
        raise ValueError("the bundle has non-finite coordinates")
    size = float(np.sqrt(((cents.reshape(-1, 3) - cents.reshape(-1, 3).mean(0)) ** 2).sum(1).mean()))
    if size < 1e-6:
        return Registration(eye, None, float("nan"), "identity", known=False, reason="degenerate bundle",
                            seconds=time.perf_counter() - t0)

    # 1. already in model space?
    ident = {n: residual(cents, templates.centroids[n]) for n in names}
    best_id = min(ident, key=ident.get)
    if ident[best_id] <= templates.calibration[best_id]["identity_mm"]:
        cal = templates.calibration[best_id]
        return Registration(eye, best_id, ident[best_id], "identity", _top(ident), True,
                            time.perf_counter() - t0, cal["unknown_mm"], ident[best_id])

    # 2. coarse recognition (no rotation), 3. bounded SLR on the shortlist
    mine = centre_radius(cents)
    coarse = {n: residual(apply_matrix(coarse_matrix(mine, templates.centre_radius(n)), cents), templates.centroids[n])
              for n in names}
    ranked = sorted(coarse, key=coarse.get)
    fits: dict[str, Fit] = {n: shared_fit(cents, templates.centroids[n], model=MODEL)
                            for n in ranked[:shortlist] if coarse[n] <= SHORTLIST_RATIO * coarse[ranked[0]]}
    pick = min(fits, key=lambda n: fits[n].residual_mm)
    partner = templates.partner.get(pick, pick)
    if partner != pick and partner in fits:  # a rotation can imitate the mirror image: prefer the lesser one
        prior = {n: fits[n].residual_mm * (1 + (fits[n].rotation_deg / MIRROR_PRIOR_DEG) ** 2) for n in (pick, partner)}
        pick = min(prior, key=prior.get)
    best = fits[pick]
    cal = templates.calibration[pick]
    scores = {n: f.residual_mm for n, f in fits.items()}
    candidates = _top(scores, first=pick)
    details = {"coarse_mm": {n: round(coarse[n], 3) for n in ranked[:SHORTLIST + 1]},
               "evaluations": sum(f.evaluations for f in fits.values())}

    # 4. known? keep identity unless registering helps
    lo, hi = SCALE_RANGE
    pinned = min(best.scale - lo, hi - best.scale) < 1e-3
    reason = ("scale at its bound" if pinned else
              "residual above the template's threshold" if best.residual_mm > cal["unknown_mm"] else "")
    if pick in ident and best.residual_mm > (1 - MIN_GAIN) * ident[pick]:
        return Registration(eye, pick, ident[pick], "identity", candidates, ident[pick] <= cal["unknown_mm"],
                            time.perf_counter() - t0, cal["unknown_mm"], ident[pick],
                            reason="" if ident[pick] <= cal["unknown_mm"] else "residual above the template's threshold",
                            details=details)
    return Registration(best.matrix, pick, best.residual_mm, MODEL, candidates, not reason, time.perf_counter() - t0,
                        cal["unknown_mm"], ident.get(pick, float("nan")), best.scale, best.rotation_deg, reason,
                        details, best.at_bound + (("scale",) if pinned and "scale" not in best.at_bound else ()))


def _top(scores: dict[str, float], k: int = SHORTLIST, first: str | None = None) -> tuple[tuple[str, float], ...]:
    order = sorted(scores, key=lambda n: (n != first, scores[n]))[:k]
    return tuple((n, round(float(scores[n]), 3)) for n in order)
