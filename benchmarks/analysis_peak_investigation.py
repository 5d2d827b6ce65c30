"""Why is the peak node of `remove` / `truncate` lesions not at the lesion? (issue 24, investigation)

Replays the lesions of `benchmarks/analysis_validation.py` (same seeds, same order; its encodings
cached under ``runs/analysis/<tag>/lesions``; run it first with the same options) and, for every
lesion of a held-out synthetic bundle, measures where along the tract things change:

- ``geometry``: the node where the bundle's mean trajectory (mean over streamlines of each node's
  points, model space by the healthy bundle's transform) moves most (mm);
- ``profile_own`` / ``profile_fixed``: the node where the latent profile changes most (Euclidean,
  against the healthy bundle's profile), the lesioned bundle registered on its own (as encoded) or
  mapped by the healthy bundle's transform (one transform for the subject: no re-registration);
- ``z_own`` / ``z_fixed``: the node of the peak z-score against the norms (as scored);
- the median distance (mm) between the lesioned bundle's points under its own and the healthy
  transform.

Data: SYNTHETIC subjects (subject01 under the training augmentations), lesions as in the validation.
Run niced::

    nice -n 10 .venv/bin/python benchmarks/analysis_peak_investigation.py --out runs/analysis/peak.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from analysis_validation import DATA, REPO, load_dir, synthetic_subject  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=str(REPO / "runs" / "analysis"))
    p.add_argument("--out", default=str(REPO / "runs" / "analysis" / "peak_investigation.json"))
    p.add_argument("--subjects", type=int, default=30)
    p.add_argument("--norm-subjects", type=int, default=20)
    p.add_argument("--mirror-prob", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from vqdiff.analysis.embedding import profile
    from vqdiff.analysis.lesions import KINDS, lesion, model_node, oriented
    from vqdiff.analysis.records import iter_records
    from vqdiff.analysis.scoring import fit_table, score_latents
    from vqdiff.analysis.tables import build_tables
    from vqdiff.bundle import Bundle, SpatialHeader
    from vqdiff.codec import Codec
    from vqdiff.latents import Latents
    from vqdiff.registration import transform
    from vqdiff.training.augment import Augmentation

    cache = Path(args.cache)
    tag = f"synth-e2-w40-a0.05-h0.03{f'-m{args.mirror_prob:g}' if args.mirror_prob else ''}-s{args.seed}"
    aug = Augmentation(rotate_deg=10.0, translate_mm=5.0, scale_range=(0.9, 1.1), aniso_scale=0.05, shear=0.03,
                       mirror_prob=args.mirror_prob, elastic_mm=2.0, elastic_wavelength_mm=40.0, jitter_mm=0.2)
    s01, afq = load_dir(DATA / "subject01"), load_dir(DATA / "crosssubject" / "afq_browser")
    dirs = [cache / tag / f"synth{i:02d}" for i in range(args.subjects)]
    sources = {}
    synth = {}
    for i in range(args.subjects):
        synth[f"synth{i:02d}"], mirrored = synthetic_subject(s01, aug, np.random.default_rng([args.seed, i]))
        sources[f"synth{i:02d}"] = "subject01-mirrored" if mirrored else "subject01"
    table = build_tables(dirs[:args.norm_subjects])["wide"]
    table["source"] = table["subject"].map(sources)
    norms = fit_table(table, "wide", group_by="source" if table["source"].nunique() > 1 else None)
    held = list(iter_records(dirs[args.norm_subjects:]))
    afq_known = [n for n in sorted(afq) if Latents.load(cache / "real" / "afq" / f"{n}.vqlat").registration.get("known")]
    codec = Codec.default()
    lrng = np.random.default_rng([args.seed, 99])
    rows = []
    for kind in KINDS:
        for rec in held:
            les, node = lesion(synth[rec.subject][rec.bundle], kind, lrng)
            if kind == "displace":
                continue
            own = Latents.load(cache / tag / "lesions" / kind / rec.subject / f"{rec.bundle}-0.vqlat")
            m = rec.latents.matrix
            fixed = codec.encode(Bundle(streamlines=transform(les, m), header=SpatialHeader.identity(), name=rec.bundle),
                                 register="off", fidelity=False)

            def mean_trajectory(x, m=m):
                pts = x.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
                return pts.reshape(len(x), 16, 4, 3).mean(axis=(0, 2))

            geo = np.linalg.norm(mean_trajectory(np.stack(les).astype(np.float64))
                                 - mean_trajectory(oriented(synth[rec.subject][rec.bundle])), axis=1)
            healthy = profile(rec.latents)
            z_own = score_latents(own, norms, bundle=rec.bundle)
            z_fix = score_latents(fixed, norms, bundle=rec.bundle)
            pts = np.concatenate(les)[::7].astype(np.float64)
            shift = np.linalg.norm((pts @ m[:3, :3].T + m[:3, 3]) - (pts @ own.matrix[:3, :3].T + own.matrix[:3, 3]),
                                   axis=1)
            rows.append({"kind": kind, "subject": rec.subject, "bundle": rec.bundle,
                         "node": model_node(node, own.flipped), "node_fixed": model_node(node, fixed.flipped),
                         "geometry": model_node(int(np.argmax(geo)), own.flipped),
                         "profile_own": int(np.argmax(np.linalg.norm(profile(own) - healthy, axis=1))),
                         "profile_fixed": int(np.argmax(np.linalg.norm(profile(fixed) - healthy, axis=1))),
                         "z_own": z_own.peak_node, "z_fixed": z_fix.peak_node,
                         "registration_shift_mm": float(np.median(shift))})
        for n in afq_known:
            for _ in range(3):
                lesion(afq[n], kind, lrng)
    summary = {}
    for kind in ("remove", "truncate"):
        r = [x for x in rows if x["kind"] == kind]

        def within(key, ref="node", r=r):
            return round(float(np.mean([abs(x[key] - x[ref]) <= 2 for x in r])), 3)
        summary[kind] = {"n": len(r), "within_2_of_lesion": {k: within(k) for k in ("geometry", "profile_own", "z_own")}
                         | {k: within(k, "node_fixed") for k in ("profile_fixed", "z_fixed")},
                         "z_own_within_2_of_geometry_peak": within("z_own", "geometry"),
                         "registration_shift_mm_median": round(float(np.median([x["registration_shift_mm"] for x in r])), 2)}
    print(json.dumps(summary, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows, "config": vars(args), "tag": tag}, indent=1))


if __name__ == "__main__":
    main()
