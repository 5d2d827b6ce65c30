"""The quality gate: one module, one threshold, for every reduced-precision engine.

A variant's reconstruction (encode + decode) of held-out real groups (RAS mm) must change the mean MDF
by at most `MAX_MDF_CHANGE_MM` (0.05 mm) and the mean BUAN (5 mm) by at most `MAX_BUAN_CHANGE`
(0.002) against the fp32 model's reconstruction of the same groups (`quality`, on `vqdiff.metrics`).
The engine selection (`vqdiff.export.select`) and ``vqdiff-export --int8`` (`vqdiff.export.quantize`)
both judge with `judge` / `gate` and the limits of `gate_limits`; no other module holds a threshold
(``tests/test_engines.py`` fails if one appears). On synthetic stand-in groups (no real data on the
machine) the limits are halved (`SYNTHETIC_STRICTNESS`): they judge reduced precision a little more
leniently than real groups.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .manifest import ExportError

MAX_MDF_CHANGE_MM = 0.05
MAX_BUAN_CHANGE = 0.002
SYNTHETIC_STRICTNESS = 0.5  # groups from templates stand in for real ones: the gate's limits are halved
GATE_ENV = "VQDIFF_GATE_DATA"  # a folder of tractograms or a .npy of groups (G, 64, 64, 3) in mm
GATE_FILE = "gate_groups.npy"  # optional, in a model or export directory
GATE_GROUPS = 48  # held-out groups each variant is judged (and timed) on
CALIB_GROUPS = 32  # groups the int8 variant is calibrated on (never judged on)


def quality(groups_mm: np.ndarray, recon_model: np.ndarray, normalisation) -> dict[str, float]:
    """BUAN (T = 5 mm) and mean MDF (mm) of a reconstruction in model layout against the original."""
    from vqdiff.geometry import model_to_groups
    from vqdiff.metrics import buan_score, mean_mdf

    recon_mm = normalisation.invert(model_to_groups(recon_model))
    return {"buan": float(np.mean(buan_score(groups_mm, recon_mm))),
            "mean_mdf_mm": float(np.mean(mean_mdf(groups_mm, recon_mm)))}


def judge(q: dict[str, float], reference: dict[str, float] | None,
          limits: tuple[float, float] | None = None) -> dict[str, Any]:
    """``q`` (`quality`) against the fp32 ``reference`` quality: the changes and whether they pass."""
    limits = limits or gate_limits(False)
    if reference is None:
        return {**q, "mdf_change_mm": 0.0, "buan_change": 0.0, "passed": True}
    dm, db = q["mean_mdf_mm"] - reference["mean_mdf_mm"], q["buan"] - reference["buan"]
    return {**q, "mdf_change_mm": dm, "buan_change": db,
            "passed": bool(abs(dm) <= limits[0] and abs(db) <= limits[1])}


class GateData(NamedTuple):
    """Groups to calibrate and gate the variants on, both (G, 64, 64, 3) mm, disjoint."""

    calibration: np.ndarray
    held_out: np.ndarray
    where: str  # where they came from (a path, or what the stand-in groups are)
    synthetic: bool = False  # bundle-like stand-ins from the model's templates, not real groups


def gate_groups(src, gate_data: str | os.PathLike | None = None) -> GateData | None:
    """`GateData`: calibration and held-out groups, where they came from, whether they are synthetic.

    From ``gate_data`` / ``$VQDIFF_GATE_DATA`` (a folder of tractograms or a .npy), else the model's
    ``gate_groups.npy``, else the shared real data (``$VQDIFF_SHARED_DATA/subject01``). None when
    there is none: then only the fp32 reference may run.
    """
    from .data import default_data_dir, load_groups, split_groups

    source = gate_data or os.environ.get(GATE_ENV)
    candidates = [Path(source)] if source else [src.path / GATE_FILE, default_data_dir()]
    for c in candidates:
        if c.is_file() and c.suffix == ".npy":
            groups = np.load(c).astype(np.float32)
        elif c.is_dir():
            try:
                groups = load_groups(c)
            except ExportError:
                continue
        else:
            continue
        if groups.ndim != 4 or groups.shape[1:] != (64, 64, 3) or len(groups) < 2:
            raise ValueError(f"gate data {c}: expected groups (G >= 2, 64, 64, 3) in mm, got {groups.shape}")
        calib, held = split_groups(groups, 0.5, seed=0)
        return GateData(_spread(calib, CALIB_GROUPS), _spread(held, GATE_GROUPS),
                        f"{c} ({len(groups)} groups, half held out)")
    groups = template_groups(src.path, CALIB_GROUPS + GATE_GROUPS)
    if groups is not None:  # no real data here (a user's machine): bundle-like groups from the model's templates
        return GateData(groups[:CALIB_GROUPS], groups[CALIB_GROUPS:], f"synthetic: {len(groups)} groups drawn from "
                        "the model's registration templates (no real data found)", synthetic=True)
    return None


def template_groups(model_dir: Path, n: int, *, seed: int = 0) -> np.ndarray | None:
    """(n, 64, 64, 3) groups in model space built from the model's templates (QuickBundles centroids of
    its training bundles): per group, 64 centroids of one bundle drawn with replacement, resampled to
    64 points, each moved by a random offset (<= 2 mm) and point jitter (0.3 mm), then sorted as the
    codec sorts a group. A stand-in for real groups where none are present; None without templates."""
    from vqdiff.canonical import GROUP_SIZE, orientation_flips, resample, sort_group
    from vqdiff.codec import load_templates

    templates = load_templates(model_dir)
    if templates is None or not templates.names:
        return None
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cents = resample(list(templates.centroids[templates.names[i % len(templates.names)]]))  # (K, 64, 3)
        g = cents[rng.integers(0, len(cents), GROUP_SIZE)]
        g = g + rng.uniform(-2.0, 2.0, (GROUP_SIZE, 1, 3)) + rng.normal(0.0, 0.3, g.shape)
        flips = orientation_flips(g.astype(np.float32))
        g[flips] = g[flips, ::-1]
        out.append(sort_group(g.astype(np.float32)))
    return np.stack(out)


def _spread(groups: np.ndarray, n: int) -> np.ndarray:
    if len(groups) <= n:
        return groups
    return groups[np.unique(np.linspace(0, len(groups) - 1, n).round().astype(int))]


def gate_limits(synthetic: bool) -> tuple[float, float]:
    """(max mean-MDF change in mm, max BUAN change): stricter on ``synthetic`` stand-in groups
    (`GateData.synthetic`), which judge reduced precision a little more leniently than real ones."""
    f = SYNTHETIC_STRICTNESS if synthetic else 1.0
    return MAX_MDF_CHANGE_MM * f, MAX_BUAN_CHANGE * f


def gate(groups_mm: np.ndarray, recon_model: np.ndarray, normalisation, reference: dict | None,
         limits: tuple[float, float] | None = None) -> dict[str, Any]:
    """Quality of a reconstruction (model layout) and, against ``reference`` quality, whether it passes."""
    return judge(quality(groups_mm, recon_model, normalisation), reference, limits)
