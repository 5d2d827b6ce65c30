#!/usr/bin/env python3
"""Encode and decode a bundle through a running vqdiff container and compare with the local round trip.

Used by scripts/container-check.sh. The container is asked which engine it chose (``GET /model``);
the local round trip (`Codec.encode_file` then `Codec.decode` with the points restored, as the
container's /encode and /decode) runs the same model directory on that same engine, so the two must agree to float rounding: the largest point difference must be at most ``--tol`` mm (1e-3).
The int8 variants are calibrated where they are built, on real
groups when there are any and on groups drawn from the model's templates otherwise (an image has no
real data): the local run is made under the container's conditions (a fresh engine cache, the same
calibration source). Prints one JSON line (engine, streamlines, largest difference, encode / decode seconds) and exits 1
when the check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import bentoml
import nibabel as nib
import numpy as np

from vqdiff.export.runtime import make_codec
from vqdiff.io.write import save_bundle


def max_point_difference(a: Path, b: Path) -> tuple[int, float]:
    """Streamline count and the largest per-point distance (mm) between two tractograms that must hold
    the same streamlines in the same order with the same point counts (ValueError otherwise)."""
    sa, sb = nib.streamlines.load(str(a)).streamlines, nib.streamlines.load(str(b)).streamlines
    if len(sa) != len(sb):
        raise ValueError(f"{len(sa)} streamlines from the container, {len(sb)} from the local round trip")
    worst = 0.0
    for i, (x, y) in enumerate(zip(sa, sb, strict=True)):
        if len(x) != len(y):
            raise ValueError(f"streamline {i}: {len(x)} points from the container, {len(y)} locally")
        worst = max(worst, float(np.sqrt(((np.asarray(x) - np.asarray(y)) ** 2).sum(axis=1)).max()))
    return len(sa), worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="the container's address, e.g. http://localhost:3000")
    p.add_argument("bundle", help="a real bundle (.trk)")
    p.add_argument("model", help="the model directory the image serves (checkpoint or export directory)")
    p.add_argument("--tol", type=float, default=1e-3, help="largest allowed point difference, mm [1e-3]")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, bentoml.SyncHTTPClient(args.url, timeout=300) as client:
        tmp = Path(tmp)
        with urllib.request.urlopen(f"{args.url}/model", timeout=30) as r:  # a mounted route, not an API
            info = json.load(r)
        engine, gate = info["engine_variant"], str(info["selection"].get("gate", {}).get("data", ""))
        # the same conditions here: a fresh engine cache, and the int8 variants calibrated on the same
        # groups (the image has no real data: the model's templates, unless VQDIFF_GATE_DATA was given)
        os.environ["VQDIFF_ENGINE_CACHE"] = str(tmp / "engines")
        os.environ.pop("VQDIFF_GATE_DATA", None)
        if gate.startswith("synthetic"):
            os.environ["VQDIFF_SHARED_DATA"] = str(tmp / "no-real-data")
        t0 = time.perf_counter()
        latents = client.encode(file=[Path(args.bundle)])
        t1 = time.perf_counter()
        recon = client.decode(file=latents, restore_points=True)
        t2 = time.perf_counter()
        remote = tmp / f"container{Path(recon).suffix}"
        remote.write_bytes(Path(recon).read_bytes())
        codec = make_codec(args.model, backend=engine)  # the container's engine, on this machine
        save_bundle(codec.decode(codec.encode_file(args.bundle), restore_points=True), tmp / "local.trk")
        n, worst = max_point_difference(remote, tmp / "local.trk")
    ok = worst <= args.tol
    print(json.dumps({"engine": engine, "gate_data": gate, "streamlines": n, "max_point_difference_mm": worst, "tol_mm": args.tol,
                      "encode_s": round(t1 - t0, 2), "decode_s": round(t2 - t1, 2), "passed": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
