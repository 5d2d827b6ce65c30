"""How close a reconstruction is to its input, as `vqdiff-roundtrip` and ``POST /reconstruct`` report it:
MDF in mm (mean, median, p95, max) and BUAN at threshold 5 mm over file-order groups of 64.

Both sides at 64 points: the input resampled by arc length (dipy), the reconstruction taken at the
64 fractions of its point index (`vqdiff.canonical.at_fractions`): the model's own 64 points, or,
for a reconstruction brought back to the input's point counts (`/reconstruct`, `vqdiff-roundtrip`),
points on the same polyline within its corner cutting (0.439 vs 0.445 mm on AFQ Right_ILF).
Re-resampling a reconstruction by its own, irregular, arc length would slide its points along the
track and count that as error (+0.32 mm there); `vqdiff-evaluate` reports the same figures."""

from __future__ import annotations

from typing import Any

import numpy as np

from .bundle import Bundle
from .geometry import GROUP_SIZE


def at_model_points(original: Bundle, recon: Bundle) -> tuple[np.ndarray, np.ndarray]:
    """(input, reconstruction), each (N, 64, 3): the two sides the figures compare (module doc)."""
    from .canonical import NUM_POINTS, at_fractions, resample

    x = resample(original.streamlines)
    counts = np.fromiter((len(s) for s in recon.streamlines), np.int64, len(recon.streamlines))
    if len(counts) != len(x):
        raise ValueError(f"the reconstruction has {len(counts)} streamlines, the input {len(x)}")
    y = np.empty_like(x)
    for k in np.unique(counts).tolist():  # one vectorised call per point count
        idx = np.flatnonzero(counts == k)
        y[idx] = at_fractions(np.stack([recon.streamlines[i] for i in idx.tolist()]), NUM_POINTS)
    return x, y


def streamline_mdf(original: Bundle, recon: Bundle) -> np.ndarray:
    """Per streamline (N,): the MDF in mm between the input and its reconstruction (module doc)."""
    from .metrics import mdf

    x, y = at_model_points(original, recon)
    ok = np.isfinite(x).all(axis=(1, 2)) & np.isfinite(y).all(axis=(1, 2))
    d = np.full(len(x), np.inf)  # a streamline that comes back non-finite (an input far out of range) is infinitely off
    if ok.any():
        d[ok] = mdf(x[ok][None], y[ok][None])[0]
    return d


def reconstruction_quality(original: Bundle, recon: Bundle) -> dict[str, Any]:
    """Figures of ``recon`` against ``original`` (same streamlines in the same order)."""
    from .metrics import buan_score, mdf

    x, y = at_model_points(original, recon)
    d = mdf(x[None], y[None])[0]
    n = len(x) // GROUP_SIZE * GROUP_SIZE
    if n:
        groups = n // GROUP_SIZE
        shape = (groups, GROUP_SIZE, *x.shape[1:])
        buan = float(np.mean(buan_score(x[:n].reshape(shape), y[:n].reshape(shape))))
    else:  # fewer than 64 streamlines: the bundle is one group
        buan, groups = float(buan_score(x, y)), 1
    return {"mean_mdf_mm": round(float(d.mean()), 4), "median_mdf_mm": round(float(np.median(d)), 4),
            "p95_mdf_mm": round(float(np.percentile(d, 95)), 4), "max_mdf_mm": round(float(d.max()), 4),
            "buan_t5": round(buan, 4), "buan_groups": groups}


# What `fidelity` calls poor when the model records no test figures: 3 x the bundled model's within-subject
# test mean MDF (0.597 mm, models/default/metrics.json ``mdf_mm``) for the mean, twice that for the p95.
POOR_FACTOR = 3.0
P95_OVER_MEAN = 2.0  # p95 limit / mean limit when the model records no test p95
DEFAULT_TEST_MDF_MM = 0.5967
METRICS_FILE = "metrics.json"


def poor_limits(model_dir=None) -> dict[str, Any]:
    """The limits above which an encoding's measured fidelity is ``poor_reconstruction``: ``POOR_FACTOR``
    times the model's own test MDF (``metrics.json`` in ``model_dir``: ``mdf_mm``, and ``mdf_p95_mm`` when
    recorded, else ``P95_OVER_MEAN`` times the mean limit), with their origin; the bundled model's figure
    when ``model_dir`` has no ``metrics.json``."""
    import json
    from pathlib import Path

    metrics, origin = {}, "vqdiff's default (the bundled model's within-subject test mean MDF 0.597 mm)"
    path = Path(model_dir) / METRICS_FILE if model_dir is not None else None
    if path is not None and path.is_file():
        try:
            metrics = json.loads(path.read_text())
            origin = f"the model's {metrics.get('split_label') or metrics.get('split', 'test')} figures ({METRICS_FILE})"
        except (OSError, ValueError):
            metrics = {}
    mean = float(metrics.get("mdf_mm") or DEFAULT_TEST_MDF_MM)
    p95 = metrics.get("mdf_p95_mm")
    p95_limit = POOR_FACTOR * float(p95) if p95 else P95_OVER_MEAN * POOR_FACTOR * mean
    return {"mean_mdf_mm": round(POOR_FACTOR * mean, 4), "p95_mdf_mm": round(p95_limit, 4),
            "origin": f"{POOR_FACTOR:g} x test mean MDF {mean:.4f} mm" + (
                f", {POOR_FACTOR:g} x test p95 {float(p95):.4f} mm" if p95 else
                f"; p95 limit {P95_OVER_MEAN:g} x the mean limit (no test p95 recorded)") + f": {origin}"}


def fidelity(original: Bundle, recon: Bundle, limits: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an encoding records of its own reconstruction: MDF in the input's mm (module doc), mean,
    p95 and max, and ``poor`` when the mean or the p95 exceeds ``limits`` (`poor_limits`)."""
    d = streamline_mdf(original, recon)
    bad, f = int((~np.isfinite(d)).sum()), d[np.isfinite(d)]  # figures over the finite ones, the others counted
    out = {k: round(float(fn(f)), 4) if len(f) else None for k, fn in (
        ("mean_mdf_mm", np.mean), ("p95_mdf_mm", lambda v: np.percentile(v, 95)), ("max_mdf_mm", np.max))}
    out["streamlines"] = int(len(d))
    if bad:
        out["non_finite_streamlines"] = bad
    if limits:
        out["limits"] = dict(limits)
        out["poor"] = bool(bad or out["mean_mdf_mm"] > limits["mean_mdf_mm"] or out["p95_mdf_mm"] > limits["p95_mdf_mm"])
    return out


def fidelity_warning(fid: dict[str, Any], name: str = "") -> dict[str, Any] | None:
    """The ``poor_reconstruction`` warning of a `fidelity` record (None when it is not poor)."""
    if not fid.get("poor"):
        return None
    lim = fid["limits"]
    return {"code": "poor_reconstruction",
            "message": f"{name or 'the bundle'} comes back at mean MDF {fid['mean_mdf_mm'] or 0:.2f} mm, p95 "
                       f"{fid['p95_mdf_mm'] or 0:.2f} mm" + (f" and {fid['non_finite_streamlines']} streamline(s) "
                       "not finite" if fid.get("non_finite_streamlines") else "") + " (measured on this encoding), above the limits "
                       f"{lim['mean_mdf_mm']:.2f} / {lim['p95_mdf_mm']:.2f} mm ({lim['origin']})",
            "mean_mdf_mm": fid["mean_mdf_mm"], "p95_mdf_mm": fid["p95_mdf_mm"], "limits": lim}
