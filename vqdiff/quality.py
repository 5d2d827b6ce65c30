"""How close a reconstruction is to its input, as `vqdiff-roundtrip` and ``POST /reconstruct`` report it:
MDF in mm (mean, median, p95, max) and BUAN at threshold 5 mm over file-order groups of 64."""

from __future__ import annotations

from typing import Any

import numpy as np

from .bundle import Bundle
from .geometry import GROUP_SIZE


def reconstruction_quality(original: Bundle, recon: Bundle) -> dict[str, Any]:
    """Figures of ``recon`` against ``original`` (same streamlines in the same order)."""
    from .canonical import resample
    from .metrics import buan_score, mdf

    x, y = resample(original.streamlines), resample(recon.streamlines)
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
