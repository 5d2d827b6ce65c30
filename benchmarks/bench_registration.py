"""Benchmark: registration into model space and bundle recognition (`vqdiff.registration`).

Builds `vqdiff.templates.Templates` from ``<data>/subject01`` (the bundled model's training space)
and measures, printing a table per part and a final JSON line (CPU model and load average before
and after):

1. recognition: the AFQ bundles of ``<data>/crosssubject/afq_browser`` with a counterpart (Left_/
   Right_ Corticospinal -> PYT_L/R, IFOF -> IFOF_L/R, ILF -> ILF_L/R, Callosum_Forceps_Minor ->
   CC_Fr_1; RAS: Left = _L), what it says for the other 13 AFQ bundles (``known`` should be False),
   each twice: unnamed (the residual alone) and with its file name as the hint, as the codec runs it
   (``afq_named`` / ``afq_other_named``: a name of a tract without template makes it unknown),
   subject01 bundles mirrored (x -> -x; expect the other side's name) and randomly transformed
   (similarity: rotations up to 15 and up to 30 degrees per axis, the registration's bound; scale
   0.7-1.4; translation up to 50 mm; expect the same name and the inverse matrix);
2. reconstruction with the bundled model (``Codec.default()``), per AFQ bundle: MDF (mean, p95;
   both sides resampled to 64 points as `vqdiff.quality`) in the input's mm, encoded as-is vs
   registered (``transform_streamlines(s, reg.matrix)``, decode, map back with the inverse); the
   codec's own registration is turned off (``register="off"``) where it has one;
3. time: `register` (recognition included) vs the end-to-end ``encode_file`` (without registration)
   of a 2,000-streamline bundle (IFOF_R of subject01 moved by a similarity, so that it is not in
   model space: three candidate templates to fit), interleaved medians, wall and CPU time;
4. dipy's ``tracks300.trk`` (voxel-like coordinates, in the dipy wheel): what `register` says.

    python benchmarks/bench_registration.py [--data ../shared/data] [--repeats 5] [--skip-codec]

AFQ is validation data: the registration's settings were chosen with it in view (see the report),
so these figures are not an independent test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import LoadWatch

REPO = Path(__file__).resolve().parents[1]
AFQ_KNOWN = {"Left_Corticospinal": "PYT_L", "Right_Corticospinal": "PYT_R", "Left_IFOF": "IFOF_L",
             "Right_IFOF": "IFOF_R", "Left_ILF": "ILF_L", "Right_ILF": "ILF_R", "Callosum_Forceps_Minor": "CC_Fr_1"}
TARGETS = ("Left_Corticospinal", "Right_Corticospinal", "Left_IFOF", "Right_IFOF", "Left_ILF", "Right_ILF")


def cpu_summary() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
                break
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count()}


def random_similarity(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    from vqdiff.slr import compose44

    x = np.r_[rng.uniform(-50, 50, 3), rng.uniform(-max_deg, max_deg, 3), np.exp(rng.uniform(np.log(0.7), np.log(1.4)))]
    return compose44(x)


def moved(streamlines, matrix) -> list[np.ndarray]:
    from dipy.tracking.streamline import transform_streamlines

    return [np.asarray(s, dtype=np.float32) for s in transform_streamlines(list(streamlines), matrix)]


def recognition(templates, subject: dict, afq: dict, rng: np.random.Generator) -> dict:
    from vqdiff.registration import register

    rows, out = [], {}
    for name, sl in afq.items():
        expect = AFQ_KNOWN.get(name)
        rows.append(("afq" if expect else "afq_other", name, expect, register(sl, templates), None))
        # as the codec runs it: the file's name is the hint (vqdiff.tract_names)
        rows.append(("afq_named" if expect else "afq_other_named", name, expect,
                     register(sl, templates, hint=name), None))
    for name, sl in subject.items():
        rows.append(("mirrored", name, templates.partner[name],
                     register([s * np.float32([-1, 1, 1]) for s in sl], templates), None))
    for deg in (15, 30):
        for name, sl in subject.items():
            for _ in range(2):
                m = random_similarity(rng, deg)
                pts = np.concatenate(sl[::10]).astype(np.float64)
                reg = register(moved(sl, m), templates)
                back = pts @ (reg.matrix @ m)[:3, :3].T + (reg.matrix @ m)[:3, 3]
                rows.append((f"similarity_{deg}deg", name, name, reg, float(np.linalg.norm(back - pts, axis=1).mean())))
    print(f"\n{'set':18s} {'bundle':28s} {'expected':9s} {'got':9s} {'known':5s} {'resid':>6s} {'thr':>5s} "
          f"{'scale':>5s} {'rot':>4s} {'ms':>6s}  candidates")
    for kind, name, expect, reg, err in rows:
        ok = reg.template == expect
        if kind.startswith("afq") or not ok:
            cands = ", ".join(f"{n} {s:.1f}" for n, s in reg.candidates)
            print(f"{kind:18s} {name:28s} {str(expect):9s} {str(reg.template):9s} {str(reg.known):5s} "
                  f"{reg.residual_mm:6.2f} {reg.threshold_mm:5.1f} {reg.scale:5.2f} {reg.rotation_deg:4.0f} "
                  f"{1e3 * reg.seconds:6.1f}  {cands}")
        s = out.setdefault(kind, {"n": 0, "right": 0, "known": 0, "recovery_mm": []})
        s["n"] += 1
        s["right"] += int(ok)
        s["known"] += int(reg.known)
        if err is not None:
            s["recovery_mm"].append(err)
    for s in out.values():
        rec = s.pop("recovery_mm")
        if rec:
            s["recovery_mm_median"], s["recovery_mm_max"] = round(float(np.median(rec)), 3), round(max(rec), 3)
    print("\nrecognition: " + "; ".join(
        f"{k} {v['right']}/{v['n']} right, {v['known']} known"
        + (f", transform recovered to {v['recovery_mm_median']} mm (max {v['recovery_mm_max']})"
           if "recovery_mm_median" in v else "") for k, v in out.items()))
    out["afq_other"]["right"] = out["afq_other_named"]["right"] = None  # no expected name
    out["per_afq_bundle"] = {name: {"template": reg.template, "known": reg.known, "residual_mm": round(reg.residual_mm, 3),
                                    "threshold_mm": round(reg.threshold_mm, 3)}
                             for kind, name, _, reg, _ in rows if kind in ("afq", "afq_other")}
    out["per_afq_bundle_named"] = {name: {"template": reg.template, "known": reg.known, "reason": reg.reason}
                                   for kind, name, _, reg, _ in rows if kind.endswith("_named")}
    return out


def no_registration(method) -> dict:
    """``{"register": "off"}`` where the codec registers by itself (this benchmark does it), else {}."""
    import inspect

    return {"register": "off"} if "register" in inspect.signature(method).parameters else {}


def errors_as_is_and_registered(codec, sl, reg) -> tuple[np.ndarray, np.ndarray]:
    """Per-streamline MDF (input mm; both sides resampled to 64 points) of the reconstruction of
    ``sl`` encoded as-is, and registered with ``reg`` then mapped back with its inverse."""
    from vqdiff.bundle import Bundle, SpatialHeader
    from vqdiff.canonical import resample
    from vqdiff.metrics import mdf

    def roundtrip(s) -> list[np.ndarray]:
        b = Bundle(streamlines=list(s), header=SpatialHeader.identity(), source_format="memory", name="x")
        return list(codec.decode(codec.encode(b, **no_registration(codec.encode))).streamlines)

    def error(recon) -> np.ndarray:
        return mdf(resample(sl)[None], resample(recon)[None])[0]

    return error(roundtrip(sl)), error(moved(roundtrip(moved(sl, reg.matrix)), np.linalg.inv(reg.matrix)))


def reconstruction(templates, afq: dict, codec) -> dict:
    from vqdiff.registration import register

    out = {}
    print(f"\n{'AFQ bundle':28s} {'template':9s} {'known':5s} {'as-is mean':>10s} {'p95':>6s} {'registered mean':>15s} {'p95':>6s}")
    for name, sl in afq.items():
        reg = register(sl, templates)
        as_is, regd = errors_as_is_and_registered(codec, sl, reg)
        out[name] = {"template": reg.template, "known": reg.known,
                     "as_is_mean_mm": round(float(as_is.mean()), 3), "as_is_p95_mm": round(float(np.percentile(as_is, 95)), 3),
                     "registered_mean_mm": round(float(regd.mean()), 3),
                     "registered_p95_mm": round(float(np.percentile(regd, 95)), 3)}
        r = out[name]
        print(f"{name:28s} {str(reg.template):9s} {str(reg.known):5s} {r['as_is_mean_mm']:10.2f} {r['as_is_p95_mm']:6.2f} "
              f"{r['registered_mean_mm']:15.2f} {r['registered_p95_mm']:6.2f}")
    tgt = [out[n] for n in TARGETS if n in out]
    summary = {"targets_all_better": all(r["registered_mean_mm"] < r["as_is_mean_mm"] for r in tgt),
               "targets_median_registered_mm": round(float(np.median([r["registered_mean_mm"] for r in tgt])), 3),
               "targets_median_as_is_mm": round(float(np.median([r["as_is_mean_mm"] for r in tgt])), 3)}
    print(f"Corticospinal/IFOF/ILF: registered better for every one: {summary['targets_all_better']}; median mean MDF "
          f"{summary['targets_median_as_is_mm']} mm as-is -> {summary['targets_median_registered_mm']} mm registered "
          "(target <= 2.5)")
    return {"per_bundle": out, **summary}


def timing(templates, subject: dict, repeats: int, codec) -> dict:
    from vqdiff.bundle import Bundle, SpatialHeader
    from vqdiff.io import load_bundle, save_bundle
    from vqdiff.registration import register

    rng = np.random.default_rng(11)
    m = random_similarity(rng, 15)
    sl = moved(subject["IFOF_R"][:2000], m)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "IFOF_R_moved.trk"
        save_bundle(Bundle(streamlines=sl, header=SpatialHeader.identity(), source_format="trk", name="IFOF_R_moved"),
                    path)
        off = no_registration(codec.encode_file)
        codec.encode_file(path, **off)  # warm-up
        loaded = list(load_bundle(path).streamlines)
        register(loaded, templates)
        enc, reg_t, enc_cpu, reg_cpu = [], [], [], []
        for _ in range(repeats):  # interleaved, so that both see the same load
            t0, c0 = time.perf_counter(), time.process_time()
            codec.encode_file(path, **off)
            enc.append(time.perf_counter() - t0)
            enc_cpu.append(time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.thread_time()
            reg = register(loaded, templates)
            reg_t.append(time.perf_counter() - t0)
            reg_cpu.append(time.thread_time() - c0)
    e, r = float(np.median(enc)), float(np.median(reg_t))
    ec, rc = float(np.median(enc_cpu)), float(np.median(reg_cpu))
    print(f"\ntime, 2,000 streamlines (median of {repeats}, interleaved): encode_file {1e3 * e:.0f} ms wall "
          f"({1e3 * ec:.0f} ms CPU, all threads), register {1e3 * r:.1f} ms wall ({1e3 * rc:.1f} ms CPU, one thread; "
          f"recognised {reg.template}, {reg.method}, {reg.details.get('evaluations')} cost evaluations) = "
          f"{100 * r / e:.1f}% of the encode's wall time, {100 * rc / ec:.1f}% of its CPU time (target <= 15%)")
    return {"encode_ms": round(1e3 * e, 1), "register_ms": round(1e3 * r, 2), "share": round(r / e, 4),
            "encode_cpu_ms": round(1e3 * ec, 1), "register_cpu_ms": round(1e3 * rc, 2), "cpu_share": round(rc / ec, 4),
            "template": reg.template, "torch_threads": _torch_threads()}


def _torch_threads() -> int | None:
    try:
        import torch

        return int(torch.get_num_threads())
    except ImportError:  # pragma: no cover
        return None


def voxel_like(templates, codec=None) -> dict:
    import dipy

    from vqdiff.io import load_bundle
    from vqdiff.registration import register

    path = Path(dipy.__file__).parent / "data" / "files" / "tracks300.trk"
    if not path.is_file():
        print("\ntracks300.trk: not in this dipy wheel; skipped")
        return {"found": False}
    bundle = load_bundle(path)
    sl = list(bundle.streamlines)
    pts = np.concatenate(sl)
    reg = register(sl, templates)
    w = reg.warning()
    out = {"found": True, "streamlines": len(sl), "extent_mm": np.round(pts.max(0) - pts.min(0), 1).tolist(),
           "template": reg.template, "known": reg.known, "residual_mm": round(reg.residual_mm, 3),
           "scale": round(reg.scale, 3), "warning": w["message"] if w else None}
    print(f"\ntracks300.trk (dipy wheel; {len(sl)} streamlines, extent {out['extent_mm']} mm, header "
          f"{bundle.header.dimensions} grid): template {reg.template}, known {reg.known}, residual "
          f"{reg.residual_mm:.1f} mm, scale {reg.scale:.2f}; warning: {w['message'] if w else None}")
    if codec is not None:
        as_is, regd = errors_as_is_and_registered(codec, sl, reg)
        out.update(as_is_mean_mm=round(float(as_is.mean()), 3), registered_mean_mm=round(float(regd.mean()), 3))
        print(f"  reconstruction mean MDF: as-is {as_is.mean():.2f} mm, registered {regd.mean():.2f} mm")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("VQDIFF_SHARED_DATA", REPO.parent / "shared" / "data")))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-codec", action="store_true", help="recognition only (no model runs)")
    ap.add_argument("--model", type=Path, default=None,
                    help="model whose templates.safetensors to use (default: $VQDIFF_MODEL or models/default); "
                         "without templates there, they are built from <data>/subject01")
    args = ap.parse_args(argv)

    from vqdiff.io import load_bundle
    from vqdiff.templates import Templates

    cpu = cpu_summary()
    print(f"CPU: {cpu['model']} ({cpu['cores']} cores)")
    watch = LoadWatch(os.cpu_count())  # the encodes use every core; register one
    subj_dir, afq_dir = args.data / "subject01", args.data / "crosssubject" / "afq_browser"
    if not subj_dir.is_dir() or not afq_dir.is_dir():
        print(f"no data under {args.data}", file=sys.stderr)
        return 1
    subject = {p.stem: list(load_bundle(p).streamlines) for p in sorted(subj_dir.glob("*.trk"))}
    afq = {p.stem: list(load_bundle(p).streamlines) for p in sorted(afq_dir.glob("*.trk"))}
    from vqdiff.codec import default_model_dir, load_templates

    t0 = time.perf_counter()
    model_dir = args.model or default_model_dir()
    templates = load_templates(model_dir)  # the shipped model's own templates (its training split)
    print(f"templates: {'those of ' + str(model_dir) if templates else 'built from ' + str(subj_dir)}")
    templates = templates or Templates.from_bundles(subject)
    build_s = time.perf_counter() - t0
    size = len(templates.to_bytes())
    print(f"templates: {len(templates)} bundles, {sum(len(c) for c in templates.centroids.values())} centroids, "
          f"{size / 1024:.1f} KB, built in {build_s:.1f} s; mirror partners {templates.partner}")
    results = {"templates": {"bytes": size, "build_s": round(build_s, 2), "calibration": templates.calibration}}
    results["recognition"] = recognition(templates, subject, afq, np.random.default_rng(5))
    codec = None
    if not args.skip_codec:
        import logging

        from vqdiff.codec import Codec

        logging.getLogger("vqdiff").setLevel(logging.ERROR)  # the range warnings of as-is inputs
        codec = Codec.default()
        results["reconstruction"] = reconstruction(templates, afq, codec)
        results["time"] = timing(templates, subject, args.repeats, codec)
    results["tracks300"] = voxel_like(templates, codec)
    load = watch.finish()
    print(json.dumps({"cpu": cpu, "load_before": load["load_avg_before"], "load_after": load["load_avg_after"],
                      "contended": load["contended"], **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
