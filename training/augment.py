"""Augmentations of training groups that mimic other subjects and other spaces (numpy, RAS mm).

`GroupSampler` applies them to every drawn group (64, 64, 3) in the training data's RAS mm, before
normalisation, in this order (each step only when switched on; all are off by default, and a step
that is off draws nothing from the random generator, so runs without it are unchanged):

1. **Mirror** (probability ``mirror_prob``): ``x -> 2 cx - x`` about the subject's mid-sagittal plane
   ``x = cx`` (`mid_sagittal_x`: the mean, over left/right bundle pairs, of the midpoint of the two
   bundles' mean x; the midrange of the subject's x without pairs). Not the normalisation center:
   that is the midrange of all training points, which lies near the midline only when the bundles
   extend equally far on both sides (subject01: center -26.95, pairs' midline -27.8 +- 0.5), and an
   imported checkpoint's center (0, 0, 0) is 28 mm off subject01's midline. A left bundle then looks
   like another subject's right one; its name swaps ``_L`` / ``_R`` (`mirror_name`), which matters
   only where bundle labels are used (`GroupSampler.sample_with_names` returns the names).
2. **Affine** about the group's centroid: rotation uniform in +-``rotate_deg`` about each axis
   (``Rx @ Ry @ Rz``), isotropic scale log-uniform in ``scale_range``, anisotropic per-axis scale
   ``exp(U(-aniso_scale, aniso_scale))``, shear (the three upper off-diagonal terms uniform in
   +-``shear``), translation uniform in +-``translate_mm`` per axis. Rotation, translation and the
   isotropic scale stay within the bounds of the registration's similarity SLR
   (`vqdiff.slr.ROTATION_DEG`, ``TRANSLATION_MM``, ``SCALE_RANGE``): the between-subject
   variation that registration is built to take out, so its imperfect recovery is what the model
   learns to tolerate. Anisotropy and shear, which a similarity registration cannot undo, are
   kept small (`MAX_ANISO_SCALE`, `MAX_SHEAR`).
3. **Elastic**: a random smooth displacement field, the sum of `ELASTIC_WAVES` plane sinusoids
   ``u(p) = sum_k a_k sin(2 pi n_k . p / lambda_k + phi_k)`` with ``sum_k |a_k| = elastic_mm`` and
   wavelengths ``lambda_k`` in [``elastic_wavelength_mm``, 2 x that]: ``|u| <= elastic_mm``
   everywhere and its Lipschitz constant is at most ``2 pi elastic_mm / elastic_wavelength_mm``,
   which must stay below `MAX_ELASTIC_STRAIN` (< 1: ``p + u(p)`` is invertible, no folding).
   The field lives in absolute coordinates, so all streamlines of a group move coherently.
4. **Jitter**: independent Gaussian noise of ``jitter_mm`` (standard deviation) on every point.
5. **Canonical order again**: the whole group is reversed when the transform turned the bundle's
   orientation axis so that canonical orientation (`vqdiff.canonical`, rule 2: the axis' largest
   component positive) would run it the other way, then it is re-sorted along its own first
   principal component (`vqdiff.canonical.sort_group`), as `canonicalise` would order the
   transformed bundle.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import numpy as np

from vqdiff.canonical import principal_axis, sort_group
from vqdiff.slr import ROTATION_DEG, SCALE_RANGE, TRANSLATION_MM

MAX_ANISO_SCALE = 0.15  # per-axis log-scale: factors within exp(+-0.15) = 0.86-1.16
MAX_SHEAR = 0.15
MAX_ELASTIC_STRAIN = 0.5  # bound on the field's Lipschitz constant 2 pi amplitude / wavelength
MAX_JITTER_MM = 5.0
ELASTIC_WAVES = 4


def mirror(points: np.ndarray, cx: float) -> np.ndarray:
    """``x -> 2 cx - x`` (the plane x = cx), other coordinates unchanged; same dtype as ``points``."""
    out = np.array(points, dtype=np.float64, copy=True)
    out[..., 0] = 2.0 * cx - out[..., 0]
    return out.astype(np.asarray(points).dtype, copy=False)


_SIDE = re.compile(r"(?<![A-Za-z])(L|R|l|r|Left|Right|left|right|LH|RH|lh|rh)$")
_SWAP = {"L": "R", "R": "L", "l": "r", "r": "l", "Left": "Right", "Right": "Left", "left": "right",
         "right": "left", "LH": "RH", "RH": "LH", "lh": "rh", "rh": "lh"}


def mirror_name(name: str) -> str:
    """The bundle name of the mirror image: ``IFOF_L`` <-> ``IFOF_R``; midline names (``MCP``) unchanged."""
    return _SIDE.sub(lambda m: _SWAP[m.group(1)], name)


def mid_sagittal_x(bundles: dict[str, np.ndarray]) -> tuple[float, str]:
    """(x of one subject's mid-sagittal plane, how it was found) from its bundles (name -> points (..., 3) mm).

    The mean over left/right pairs (``IFOF_L`` and ``IFOF_R``, ...) of the midpoint of the two bundles'
    mean x; without a pair, the midrange of all x.
    """
    pairs = sorted({tuple(sorted((n, mirror_name(n)))) for n in bundles if mirror_name(n) != n
                    and mirror_name(n) in bundles})
    if pairs:
        mids = [(float(np.mean(bundles[a][..., 0])) + float(np.mean(bundles[b][..., 0]))) / 2 for a, b in pairs]
        return float(np.mean(mids)), f"mean of {len(pairs)} left/right pair midpoints"
    x = np.concatenate([np.ravel(p[..., 0]) for p in bundles.values()])
    return float((x.min() + x.max()) / 2), "midrange of x (no left/right pair)"


def rotation_matrix(angles_rad) -> np.ndarray:
    """``Rx(a) @ Ry(b) @ Rz(c)`` (3, 3) for ``angles_rad = (a, b, c)``."""
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    return (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))


@dataclass(frozen=True)
class ElasticField:
    """``u(p) = sum_k amplitudes[k] * sin(wavevectors[k] . p + phases[k])`` (mm)."""

    wavevectors: np.ndarray  # (K, 3) rad/mm: 2 pi n_k / lambda_k
    phases: np.ndarray  # (K,)
    amplitudes: np.ndarray  # (K, 3) mm

    @classmethod
    def random(cls, rng: np.random.Generator, amplitude: float, wavelength: float,
               waves: int = ELASTIC_WAVES) -> ElasticField:
        n = rng.normal(size=(waves, 3))
        n /= np.linalg.norm(n, axis=1, keepdims=True)
        lam = wavelength * rng.uniform(1.0, 2.0, size=waves)
        phases = rng.uniform(0, 2 * np.pi, size=waves)
        d = rng.normal(size=(waves, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        w = rng.uniform(0.1, 1.0, size=waves)
        return cls(2 * np.pi * n / lam[:, None], phases, amplitude * (w / w.sum())[:, None] * d)

    @property
    def bound_mm(self) -> float:
        """Upper bound of ``|u(p)|`` over all p."""
        return float(np.linalg.norm(self.amplitudes, axis=1).sum())

    @property
    def lipschitz(self) -> float:
        """Upper bound of ``|u(p) - u(q)| / |p - q|``."""
        return float((np.linalg.norm(self.amplitudes, axis=1) * np.linalg.norm(self.wavevectors, axis=1)).sum())

    def displacement(self, points: np.ndarray) -> np.ndarray:
        p = np.asarray(points, np.float64)
        return np.sin(p @ self.wavevectors.T + self.phases) @ self.amplitudes


@dataclass(frozen=True)
class Draw:
    """The random parameters of one group's augmentation (what `Augmentation.draw` picked)."""

    mirrored: bool = False
    linear: np.ndarray | None = None  # (3, 3) about the group centroid, None = identity
    translation: np.ndarray | None = None  # (3,) mm
    scale: float = 1.0  # the isotropic part of ``linear``
    elastic: ElasticField | None = None
    jitter: np.ndarray | None = None  # (S, P, 3) mm


@dataclass(frozen=True)
class Augmentation:
    """Which augmentations, how strong; `apply` one to a group. See the module doc."""

    rotate_deg: float = 0.0
    scale_range: tuple[float, float] = (1.0, 1.0)
    aniso_scale: float = 0.0
    shear: float = 0.0
    translate_mm: float = 0.0
    mirror_prob: float = 0.0
    elastic_mm: float = 0.0
    elastic_wavelength_mm: float = 80.0
    jitter_mm: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "scale_range", tuple(float(s) for s in self.scale_range))
        problems = check(self)
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_config(cls, cfg) -> Augmentation:
        """From any object with these attribute names (a `TrainConfig`)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    @property
    def affine(self) -> bool:
        return (self.rotate_deg > 0 or self.scale_range != (1.0, 1.0) or self.aniso_scale > 0 or self.shear > 0
                or self.translate_mm > 0)

    @property
    def active(self) -> bool:
        return self.affine or self.mirror_prob > 0 or self.elastic_mm > 0 or self.jitter_mm > 0

    def draw(self, rng: np.random.Generator, shape=(64, 64, 3)) -> Draw:
        """The random parameters of one group, drawn from ``rng`` in a fixed order (switched-off steps draw nothing)."""
        mirrored = bool(self.mirror_prob > 0 and rng.random() < self.mirror_prob)
        linear = translation = None
        scale = 1.0
        if self.affine:
            linear = np.eye(3)
            if self.rotate_deg > 0:
                r = math.radians(self.rotate_deg)
                linear = rotation_matrix(rng.uniform(-r, r, size=3))
            if self.scale_range != (1.0, 1.0):
                lo, hi = np.log(self.scale_range)
                scale = float(np.exp(rng.uniform(lo, hi)))
            if self.aniso_scale > 0:
                linear = linear @ np.diag(np.exp(rng.uniform(-self.aniso_scale, self.aniso_scale, size=3)))
            if self.shear > 0:
                sh = np.eye(3)
                sh[np.triu_indices(3, 1)] = rng.uniform(-self.shear, self.shear, size=3)
                linear = linear @ sh
            linear = scale * linear
            translation = (rng.uniform(-self.translate_mm, self.translate_mm, size=3) if self.translate_mm > 0
                           else np.zeros(3))
        elastic = (ElasticField.random(rng, self.elastic_mm, self.elastic_wavelength_mm) if self.elastic_mm > 0
                   else None)
        jitter = rng.normal(0.0, self.jitter_mm, size=shape) if self.jitter_mm > 0 else None
        return Draw(mirrored, linear, translation, scale, elastic, jitter)

    def apply(self, group: np.ndarray, rng: np.random.Generator, *, mirror_x: float = 0.0,
              axis: np.ndarray | None = None) -> tuple[np.ndarray, Draw]:
        """Augment ``group`` (S, P, 3) mm -> (the group in canonical order, float32; the `Draw`).

        ``mirror_x``: the mirror plane x = mirror_x; ``axis``: the bundle's canonical orientation axis
        (`orientation_axis`; default: the group's own), to re-orient the group as `canonicalise` would.
        """
        d = self.draw(rng, group.shape)
        return apply_draw(group, d, mirror_x=mirror_x, axis=axis), d


def check(a: Augmentation) -> list[str]:
    """What is out of bounds in ``a`` (empty when it is fine)."""
    out = []
    lo, hi = a.scale_range
    if not 0 <= a.rotate_deg <= ROTATION_DEG:
        out.append(f"rotate_deg {a.rotate_deg} must be in [0, {ROTATION_DEG}] (the registration's rotation bound)")
    if not 0 <= a.translate_mm <= TRANSLATION_MM:
        out.append(f"translate_mm {a.translate_mm} must be in [0, {TRANSLATION_MM}] (the registration's bound)")
    if not SCALE_RANGE[0] <= lo <= hi <= SCALE_RANGE[1]:
        out.append(f"scale_range {a.scale_range} must satisfy {SCALE_RANGE[0]} <= low <= high <= {SCALE_RANGE[1]} "
                   "(the registration's scale bounds)")
    if not 0 <= a.aniso_scale <= MAX_ANISO_SCALE:
        out.append(f"aniso_scale {a.aniso_scale} must be in [0, {MAX_ANISO_SCALE}]")
    if not 0 <= a.shear <= MAX_SHEAR:
        out.append(f"shear {a.shear} must be in [0, {MAX_SHEAR}]")
    if not 0 <= a.mirror_prob <= 1:
        out.append(f"mirror_prob {a.mirror_prob} must be in [0, 1]")
    if a.elastic_wavelength_mm <= 0:
        out.append(f"elastic_wavelength_mm {a.elastic_wavelength_mm} must be > 0")
    elif not 0 <= 2 * math.pi * a.elastic_mm / a.elastic_wavelength_mm <= MAX_ELASTIC_STRAIN:
        out.append(f"elastic_mm {a.elastic_mm} with elastic_wavelength_mm {a.elastic_wavelength_mm} gives a strain "
                   f"2 pi A / lambda = {2 * math.pi * a.elastic_mm / a.elastic_wavelength_mm:.2f}; it must be in "
                   f"[0, {MAX_ELASTIC_STRAIN}] (lower the amplitude or raise the wavelength)")
    if not 0 <= a.jitter_mm <= MAX_JITTER_MM:
        out.append(f"jitter_mm {a.jitter_mm} must be in [0, {MAX_JITTER_MM}]")
    return out


def orientation_axis(streamlines: np.ndarray) -> np.ndarray:
    """The canonical orientation axis (3,) of oriented streamlines (N, P, 3): the principal axis of
    ``last - first``, sign fixed so that its largest-magnitude component is positive (canonical rule 2)."""
    return principal_axis(np.asarray(streamlines[:, -1], np.float64) - streamlines[:, 0])


def transform(group: np.ndarray, d: Draw, *, mirror_x: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The drawn augmentation ``d`` applied to the points of ``group`` (S, P, 3) mm, order kept ->
    (points float64, the linear part (3, 3) that acted on directions: mirror and affine)."""
    x = np.asarray(group, np.float64)
    lin = np.eye(3)
    if d.mirrored:
        x = mirror(x, mirror_x)
        lin = np.diag([-1.0, 1.0, 1.0])
    if d.linear is not None:
        c = x.reshape(-1, 3).mean(axis=0)
        x = (x - c) @ d.linear.T + c + d.translation
        lin = d.linear @ lin
    if d.elastic is not None:
        x = x + d.elastic.displacement(x)
    if d.jitter is not None:
        x = x + d.jitter
    return x, lin


def canonical_again(x: np.ndarray, linear: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """A transformed group (S, P, 3) in canonical order again (float32): reversed as a whole when
    ``linear`` turned the bundle's orientation ``axis`` so that canonical orientation would run it
    the other way (its largest component negative), then sorted along its own PC1 (`sort_group`)."""
    moved = linear @ np.asarray(axis, np.float64)
    if moved[np.argmax(np.abs(moved))] < 0:
        x = x[:, ::-1]
    return sort_group(np.ascontiguousarray(x, np.float32))


def apply_draw(group: np.ndarray, d: Draw, *, mirror_x: float = 0.0, axis: np.ndarray | None = None) -> np.ndarray:
    """Apply the drawn augmentation ``d`` to ``group`` (S, P, 3) mm; re-orient and re-sort it (float32).
    ``axis``: the bundle's `orientation_axis` (default: the group's own)."""
    x, lin = transform(group, d, mirror_x=mirror_x)
    return canonical_again(x, lin, orientation_axis(np.asarray(group)) if axis is None else axis)
