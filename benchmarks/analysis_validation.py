"""Validation of the latent analysis (issue 24): stability, cross-subject identification, norms on
synthetic subjects, synthetic lesions, AFQ false positives, timings. Writes one JSON of numbers.

Data and labels (say them with every number):

- **subject01**: the 12 real bundles of the training subject (model space; within-subject).
- **AFQ**: the 20 real bundles of another subject (its own space; cross-subject VALIDATION only).
- **synthetic subjects**: subject01 under the training augmentations of models/default (one draw per
  subject, applied to all its bundles coherently: the mirror image about the mid-sagittal plane with
  probability ``--mirror-prob`` (0.5, as in training; left and right names swap), similarity
  (rotation, scale, translation), small anisotropy and shear, elastic field, jitter;
  `vqdiff.training.augment`), encoded with the default model (registration on). The first
  ``--norm-subjects`` build the norms; the rest are held out as the healthy negatives and as the
  bundles that get lesions. The mirror image is a second real instance of every tract (the other
  hemisphere's, tracked by the same pipeline); the norms' calibration holds out each instance
  (``source``: subject01 or its mirror) as a whole (``--group-by source``), so its held-out
  distances are those of an individual the model has not seen.

Encodings are cached under ``runs/analysis/`` (gitignored). Run niced::

    nice -n 10 .venv/bin/python benchmarks/analysis_validation.py --out runs/analysis/validation.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def load_dir(folder: Path) -> dict[str, list[np.ndarray]]:
    from vqdiff.io import load_bundle

    return {p.stem: list(load_bundle(p).streamlines) for p in sorted(folder.glob("*.trk"))}


def synthetic_subject(bundles, aug, rng):
    """One draw of ``aug`` applied to all of a subject's bundles at once (module doc) -> (bundles by
    name, mirrored). A mirrored subject's bundles take the mirror names (``PYT_L`` <-> ``PYT_R``)."""
    from vqdiff.training.augment import mid_sagittal_x, mirror_name, transform

    names = list(bundles)
    lens = [np.array([len(s) for s in bundles[n]]) for n in names]
    pts = np.concatenate([np.concatenate(bundles[n]) for n in names]).astype(np.float64)
    d = aug.draw(rng, shape=(len(pts), 1, 3))
    mx = mid_sagittal_x({n: np.concatenate(bundles[n]) for n in names})[0] if d.mirrored else 0.0
    moved = transform(pts[:, None, :], d, mirror_x=mx)[0][:, 0].astype(np.float32)
    out, at = {}, 0
    for n, ln in zip(names, lens, strict=True):
        flat = moved[at:at + ln.sum()]
        at += ln.sum()
        out[mirror_name(n) if d.mirrored else n] = np.split(flat, np.cumsum(ln)[:-1])
    return out, bool(d.mirrored)


def encode(codec, streamlines, name):
    from vqdiff.bundle import Bundle, SpatialHeader

    return codec.encode(Bundle(streamlines=list(streamlines), header=SpatialHeader.identity(), name=name))


def cached(path: Path, make):
    from vqdiff.latents import Latents

    if path.is_file():
        return Latents.load(path)
    lat = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    lat.save(path, overwrite=True)
    return lat


def auc(neg, pos) -> float:
    neg, pos = np.asarray(neg), np.asarray(pos)
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def cosine(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def counterpart_key(name: str):
    from vqdiff.tract_names import name_words, tract_family

    w = name_words(name)
    fam = tract_family(w)
    side = "L" if {"l", "left"} & set(w) else "R" if {"r", "right"} & set(w) else ""
    return (fam[0], side) if fam else None


def compare_metrics(emb: dict) -> dict:
    """Identification (AFQ <-> subject01, bundles with a counterpart) under candidate distances: the
    correct count and the median margin d(counterpart) / d(nearest other tract) (lower is better)."""
    keys = list(emb)
    x = np.stack([emb[k] for k in keys])
    n_nodes = 16
    per_node = x.reshape(len(x), n_nodes, -1)
    variants = {
        "euclidean": x,
        "l2_normalised": x / np.linalg.norm(x, axis=1, keepdims=True),  # Euclidean on these = cosine
        "per_node_l2": (per_node / np.linalg.norm(per_node, axis=2, keepdims=True)).reshape(len(x), -1),
        "cohort_standardised": (x - x.mean(0)) / (x.std(0) + 1e-12),
    }
    out = {}
    for name, v in variants.items():
        ok = total = 0
        margins = []
        for i, (s, n) in enumerate(keys):
            other = "subject01" if s == "afq" else "afq"
            cand = [j for j, (s2, _) in enumerate(keys) if s2 == other]
            if counterpart_key(n) is None or not any(counterpart_key(keys[j][1]) == counterpart_key(n) for j in cand):
                continue
            d = np.linalg.norm(v[cand] - v[i], axis=1)
            right = [d[k] for k, j in enumerate(cand) if counterpart_key(keys[j][1]) == counterpart_key(n)]
            wrong = [d[k] for k, j in enumerate(cand) if counterpart_key(keys[j][1]) != counterpart_key(n)]
            total += 1
            ok += int(min(right) < min(wrong))
            margins.append(min(right) / min(wrong))
        out[name] = {"correct": ok, "total": total, "median_margin": round(float(np.median(margins)), 3)}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "runs" / "analysis" / "validation.json"))
    p.add_argument("--cache", default=str(REPO / "runs" / "analysis"))
    p.add_argument("--subjects", type=int, default=30)
    p.add_argument("--norm-subjects", type=int, default=20)
    p.add_argument("--elastic-mm", type=float, default=2.0)
    p.add_argument("--elastic-wavelength-mm", type=float, default=40.0)
    p.add_argument("--aniso-scale", type=float, default=0.05)
    p.add_argument("--shear", type=float, default=0.03)
    p.add_argument("--mirror-prob", type=float, default=0.5)
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--lesions-per-bundle", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from vqdiff.analysis.embedding import embedding, features
    from vqdiff.analysis.lesions import KINDS, lesion, model_node
    from vqdiff.analysis.scoring import ALPHA, fit_table, score_latents
    from vqdiff.analysis.tables import build_tables
    from vqdiff.codec import Codec
    from vqdiff.training.augment import Augmentation

    t_start = time.time()
    cache = Path(args.cache)
    codec = Codec.default()
    s01, afq = load_dir(DATA / "subject01"), load_dir(DATA / "crosssubject" / "afq_browser")
    res: dict = {"load_average_start": [round(x, 2) for x in os.getloadavg()]}

    # --- real bundles: encoded as given (subject01) and registered (AFQ), as vqdiff-encode-batch does
    real = {("subject01", n): cached(cache / "real" / "subject01" / f"{n}.vqlat", lambda s=s, n=n: encode(codec, s, n))
            for n, s in s01.items()}
    real.update({("afq", n): cached(cache / "real" / "afq" / f"{n}.vqlat", lambda s=s, n=n: encode(codec, s, n))
                 for n, s in afq.items()})

    # --- identification: nearest Euclidean embedding across subjects, bundles with a counterpart
    emb = {k: embedding(v) for k, v in real.items()}
    ident = []
    for qs, ts in (("afq", "subject01"), ("subject01", "afq")):
        for (s, n), e in emb.items():
            if s != qs or counterpart_key(n) is None:
                continue
            targets = [(t, emb[(ts2, t)]) for (ts2, t) in emb if ts2 == ts]
            if not any(counterpart_key(t) == counterpart_key(n) for t, _ in targets):
                continue
            best = min(targets, key=lambda te, e=e: float(np.linalg.norm(te[1] - e)))[0]
            ident.append({"query": f"{qs}/{n}", "nearest": f"{ts}/{best}",
                          "correct": counterpart_key(best) == counterpart_key(n)})
    res["identification"] = {"correct": sum(r["correct"] for r in ident), "total": len(ident), "pairs": ident,
                             "metrics": compare_metrics(emb)}
    print("identification", res["identification"]["correct"], "/", len(ident), res["identification"]["metrics"],
          flush=True)

    # --- stability: random half of the streamlines, re-encoded (--draws 0 skips it)
    rng = np.random.default_rng(args.seed)
    stab = {}
    for label, bundles in (("subject01", s01), ("afq", afq)) if args.draws else ():
        sims = {}
        for n, s in bundles.items():
            full = emb[(label, n)]
            vals = []
            for _ in range(args.draws):
                half = rng.choice(len(s), size=max(2, len(s) // 2), replace=False)
                vals.append(cosine(full, embedding(encode(codec, [s[i] for i in half], n))))
            sims[n] = float(np.median(vals))
        all_median = float(np.median(list(sims.values())))
        stab[label] = {"median_cosine": all_median, "min_bundle_median": min(sims.values()), "per_bundle": sims}
        print("stability", label, round(all_median, 4), "min", round(min(sims.values()), 4), flush=True)
    res["stability"] = stab

    # --- synthetic subjects (cached encodings)
    aug = Augmentation(rotate_deg=10.0, translate_mm=5.0, scale_range=(0.9, 1.1), aniso_scale=args.aniso_scale, shear=args.shear,
                       mirror_prob=args.mirror_prob, elastic_mm=args.elastic_mm,
                       elastic_wavelength_mm=args.elastic_wavelength_mm, jitter_mm=0.2)
    tag = (f"synth-e{args.elastic_mm:g}-w{args.elastic_wavelength_mm:g}-a{args.aniso_scale:g}-h{args.shear:g}"
           f"{f'-m{args.mirror_prob:g}' if args.mirror_prob else ''}-s{args.seed}")
    synth_dirs, synth_bundles, source = [], {}, {}
    t0 = time.perf_counter()
    for i in range(args.subjects):
        subj = f"synth{i:02d}"
        sb, mirrored = synthetic_subject(s01, aug, np.random.default_rng([args.seed, i]))
        synth_bundles[subj] = sb
        source[subj] = "subject01-mirrored" if mirrored else "subject01"
        for n, s in sb.items():
            cached(cache / tag / subj / f"{n}.vqlat", lambda s=s, n=n: encode(codec, s, n))
        synth_dirs.append(cache / tag / subj)
    res["synthetic_encode_s"] = round(time.perf_counter() - t0, 2)

    norm_dirs, held = synth_dirs[:args.norm_subjects], synth_dirs[args.norm_subjects:]
    table = build_tables(norm_dirs)["wide"]
    table["source"] = table["subject"].map(source)
    res["reference_sources"] = table.groupby("source")["subject"].nunique().to_dict()
    res["synthetic_sources"] = source  # subject -> the individual it is a copy of (the norms' --group-by source)
    res["heldout_sources"] = {k: sum(source[d.name] == k for d in held) for k in sorted(set(source.values()))}
    group_by = "source" if table["source"].nunique() > 1 else None
    models = {"shrinkage": fit_table(table, "wide", group_by=group_by),
              "diagonal": fit_table(table, "wide", lam=1.0, group_by=group_by),
              "shrinkage_loo": fit_table(table, "wide")}
    res["calibration"] = {m: next(iter(n.tracts.values())).calibration["held_out"] for m, n in models.items()}
    res["shrinkage_lambda"] = {t: round(n.lam, 3) for t, n in models["shrinkage"].tracts.items()}

    from vqdiff.analysis.records import iter_records

    held_recs = list(iter_records(held))
    afq_known = [(n, lat) for (s, n), lat in real.items() if s == "afq" and lat.registration.get("known")]
    out_models = {}
    for mname, norms in models.items():
        r: dict = {}
        neg = [score_latents(rec.latents, norms, bundle=rec.bundle) for rec in held_recs]
        afq_scores = [score_latents(lat, norms, bundle=n) for n, lat in afq_known]
        s01_scores = [score_latents(lat, norms, bundle=n) for (s, n), lat in real.items() if s == "subject01"]
        r["heldout_synthetic_flagged"] = f"{sum(x.flagged for x in neg)}/{len(neg)}"
        r["afq_flagged"] = f"{sum(x.flagged for x in afq_scores)}/{len(afq_scores)}"
        r["afq"] = {x.bundle: {"tract": x.tract, "p": round(x.p_value, 5), "peak_z": round(x.peak_z, 2)}
                    for x in afq_scores}
        r["subject01_flagged"] = f"{sum(x.flagged for x in s01_scores)}/{len(s01_scores)}"
        r["heldout_p_quantiles"] = np.quantile([x.p_value for x in neg], [0.05, 0.25, 0.5]).round(4).tolist()
        out_models[mname] = (r, neg, afq_scores)
    # --- lesions of held-out synthetic subjects' bundles and of AFQ's known bundles
    lrng = np.random.default_rng([args.seed, 99])
    lesioned = {k: [] for k in KINDS}  # (source, bundle, node_model, latents)
    t0 = time.perf_counter()
    for kind in KINDS:
        for rec in held_recs:
            s = synth_bundles[rec.subject][rec.bundle]
            for j in range(args.lesions_per_bundle):
                les, node = lesion(s, kind, lrng)
                lat = cached(cache / tag / "lesions" / kind / rec.subject / f"{rec.bundle}-{j}.vqlat",
                             lambda les=les, n=rec.bundle: encode(codec, les, n))
                lesioned[kind].append(("synthetic", rec.bundle, model_node(node, lat.flipped), lat))
        for n, _ in afq_known:
            for j in range(3):
                les, node = lesion(afq[n], kind, lrng)
                lat = cached(cache / "afq-lesions" / kind / f"{n}-{j}.vqlat", lambda les=les, n=n: encode(codec, les, n))
                lesioned[kind].append(("afq", n, model_node(node, lat.flipped), lat))
    res["lesion_encode_s"] = round(time.perf_counter() - t0, 2)
    for mname, norms in models.items():
        r, neg, afq_scores = out_models[mname]
        r["lesions"] = {}
        for kind in KINDS:
            kr = {}
            for src, negs in (("synthetic", neg), ("afq", afq_scores)):
                items = [(b, node, lat) for s, b, node, lat in lesioned[kind] if s == src]
                sc = [(score_latents(lat, norms, bundle=b), node) for b, node, lat in items]
                kr[src] = {
                    "n": len(sc),
                    "auc": round(auc([x.d2 for x in negs], [x.d2 for x, _ in sc]), 3),
                    "flagged": round(float(np.mean([x.flagged for x, _ in sc])), 3),
                    "peak_within_2": round(float(np.mean([abs(x.peak_node - nd) <= 2 for x, nd in sc])), 3),
                }
            kr["negatives"] = {"synthetic": len(neg), "afq": len(afq_scores)}
            r["lesions"][kind] = kr
        res[mname] = r
        print(mname, json.dumps({k: v for k, v in r.items() if k != "afq"}), flush=True)

    # --- timings: vqdiff-embed on 120 bundles (10 held-out synthetic subjects x 12), scoring one subject
    out_table = cache / "timing_table.parquet"
    cmd = [str(Path(sys.executable).parent / "vqdiff-embed"), *map(str, held), str(out_table), "-f"]
    n_files = sum(1 for d in held for _ in d.glob("*.vqlat"))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    res["embed_cli"] = {"bundles": n_files, "seconds": round(time.perf_counter() - t0, 3), "command": " ".join(cmd)}
    recs = list(iter_records([held[0]]))
    from vqdiff.analysis.scoring import score_records

    norms = models["shrinkage"]
    score_records(recs, norms)
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        score_records(recs, norms)
    res["score_subject_ms"] = {"bundles": len(recs), "ms": round(1000 * (time.perf_counter() - t0) / reps, 2),
                               "note": "latents already loaded; loading adds the files' read time"}
    t0 = time.perf_counter()
    for _ in range(5):
        score_records(list(iter_records([held[0]])), norms)
    res["score_subject_with_load_ms"] = round(1000 * (time.perf_counter() - t0) / 5, 2)
    res["alpha"] = ALPHA
    res["features_example"] = features(real[("afq", "Left_Corticospinal")]).registration
    res["config"] = vars(args)
    res["seconds"] = round(time.time() - t_start, 1)
    res["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, default=float) + "\n")
    print(json.dumps({k: res[k] for k in ("embed_cli", "score_subject_ms", "score_subject_with_load_ms", "seconds",
                                          "load_average_end")}))


if __name__ == "__main__":
    main()
