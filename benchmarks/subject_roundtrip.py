"""A subject TRX built from a folder of per-bundle files (their streamlines shuffled together, one group per
file), encoded with `Codec.encode_file` (a `Subject`) and decoded back: are the group names, members and the
streamline order kept, and how does each group's mean MDF compare with encoding that bundle's own file?
Prints JSON lines per group and a summary. Usage: ``python benchmarks/subject_roundtrip.py FOLDER [LABEL]``
(e.g. ../shared/data/subject01 "within-subject", ../shared/data/crosssubject/afq_browser "AFQ validation")."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vqdiff.bundle import Bundle
from vqdiff.codec import Codec
from vqdiff.io import load_bundle, save_bundle
from vqdiff.quality import reconstruction_quality
from vqdiff.subject import load_latents


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    folder, label = Path(argv[0]), argv[1] if len(argv) > 1 else ""
    codec = Codec.default()
    bundles = [load_bundle(p) for p in sorted(folder.glob("*.trk"))]
    lines = [s for b in bundles for s in b.streamlines]
    perm = np.random.default_rng(0).permutation(len(lines))
    where = np.empty_like(perm)
    where[perm] = np.arange(len(perm))
    starts = np.cumsum([0] + [len(b) for b in bundles])
    groups = {b.name: np.sort(where[starts[i]:starts[i + 1]]) for i, b in enumerate(bundles)}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "subject.trx"
        save_bundle(Bundle([lines[i] for i in perm], bundles[0].header, "trx", "subject", groups=groups), src)
        original = load_bundle(src)
        t0 = time.perf_counter()
        subject = codec.encode_file(src)
        subject.save(Path(tmp) / "s.vqlat")
        save_bundle(codec.decode(load_latents(Path(tmp) / "s.vqlat"), restore_points=True), Path(tmp) / "r.trx")
        seconds = time.perf_counter() - t0
        recon = load_bundle(Path(tmp) / "r.trx")
    kept = {"names": list(recon.groups) == list(groups),
            "members": all(np.array_equal(recon.groups[k], groups[k]) for k in groups),
            "order_point_counts": [len(s) for s in recon.streamlines] == [len(s) for s in original.streamlines]}
    gaps = []
    for b in bundles:
        idx = groups[b.name]
        part = reconstruction_quality(Bundle([original.streamlines[i] for i in idx], original.header),
                                      Bundle([recon.streamlines[i] for i in idx], original.header))
        own = reconstruction_quality(b, codec.decode(codec.encode(b, fidelity=False), restore_points=True))
        reg = subject[b.name].registration
        gaps.append(abs(part["mean_mdf_mm"] - own["mean_mdf_mm"]))
        print(json.dumps({"data": label, "group": b.name, "streamlines": len(idx), "template": reg.get("template"),
                          "known": reg.get("known"), "group_mean_mdf_mm": part["mean_mdf_mm"],
                          "own_file_mean_mdf_mm": own["mean_mdf_mm"], "gap_mm": round(gaps[-1], 4),
                          "fidelity_mean_mm": subject.fidelity[b.name]["mean_mdf_mm"]}))
    whole = reconstruction_quality(original, recon)
    print(json.dumps({"data": label, "streamlines": len(original), "groups": len(groups), "kept": kept,
                      "whole_file_mean_mdf_mm": whole["mean_mdf_mm"], "max_gap_mm": round(max(gaps), 4),
                      "encode_save_decode_write_s": round(seconds, 2),
                      "loadavg": Path("/proc/loadavg").read_text().split()[:3]}))


if __name__ == "__main__":
    main()
