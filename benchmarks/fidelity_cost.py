"""What measuring an encoding's fidelity costs: per bundle, the encode (read excluded: register, canonicalise,
encoder) and the fidelity step (decoder pass, reconstruction in the input's space, MDF), one run each, on
subject01 (the training subject) and AFQ (another subject, validation data). Prints JSON lines, the totals
and the load average. Usage: ``python benchmarks/fidelity_cost.py [SHARED_DATA]``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from vqdiff.codec import Codec
from vqdiff.io import load_bundle
from vqdiff.quality import fidelity


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    data = Path(argv[0]) if argv else Path(__file__).resolve().parents[2] / "shared/data"
    codec = Codec.default()
    pipe = codec.pipeline
    print(f"load average before: {Path('/proc/loadavg').read_text().strip()}")
    for label, folder in (("subject01 (within-subject)", data / "subject01"),
                          ("AFQ (cross-subject validation)", data / "crosssubject/afq_browser")):
        enc_total = fid_total = 0.0
        for path in sorted(folder.glob("*.trk")):
            bundle = load_bundle(path)
            t0 = time.perf_counter()
            x, state = pipe.prepare_encode(bundle)
            latents, indices = codec.encode_groups(x)
            lat = pipe.assemble_latents(state, latents, indices)
            t1 = time.perf_counter()
            recon = pipe.assemble_bundle(lat, codec.decode_groups(latents), carry=False)
            fid = fidelity(bundle, recon, pipe.limits)
            t2 = time.perf_counter()
            enc_total, fid_total = enc_total + (t1 - t0), fid_total + (t2 - t1)
            print(json.dumps({"data": label, "bundle": path.stem, "streamlines": len(bundle),
                              "encode_s": round(t1 - t0, 3), "fidelity_s": round(t2 - t1, 3),
                              "share": round((t2 - t1) / (t2 - t0), 3), "mean_mdf_mm": fid["mean_mdf_mm"],
                              "p95_mdf_mm": fid["p95_mdf_mm"], "poor": fid["poor"]}))
        print(f"{label}: encode {enc_total:.2f} s, fidelity {fid_total:.2f} s, "
              f"fidelity share of the encode with it {fid_total / (enc_total + fid_total):.1%}")
    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
