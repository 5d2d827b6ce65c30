"""Benchmark: segmentation of multi-bundle files without groups (`vqdiff.segment`).

For each data set, its bundles are concatenated into one file in memory (file order; each
streamline remembers its source bundle), then:

1. detection (`detect`: multi or not, which signals) and segmentation (`segment`, mode "on") with
   their time, and the check that the parts are a partition (every streamline exactly once);
2. the assignment table: per source bundle, the share of its streamlines in each part found (the
   three largest);
3. unless ``--skip-codec``: the bundled model (``Codec.default()``) encodes each part as a bundle
   with its name, decodes it, and the per-streamline MDF in the input's mm (`vqdiff.quality`) is
   averaged per source bundle, beside the same figure for each source bundle's own file encoded
   alone (the target: within 0.1 mm), and the whole file encoded as one bundle (``--as-given``).

Data: ``<data>/subject01`` (the model's training subject, model space: within-subject) and
``<data>/crosssubject/afq_browser`` (another subject in its own space: cross-subject validation).

    nice -n 10 python benchmarks/bench_segment.py [--data ../shared/data] [--sets subject01 afq]
        [--skip-codec] [--as-given] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LoadWatch  # noqa: E402

SETS = {"subject01": "subject01", "afq": "crosssubject/afq_browser"}


def concatenated(folder: Path):
    from vqdiff.bundle import Bundle
    from vqdiff.io import load_bundle

    files = sorted(folder.glob("*.trk"))
    bundles = [load_bundle(p) for p in files]
    streamlines = [s for b in bundles for s in b.streamlines]
    source = np.concatenate([np.full(len(b), i) for i, b in enumerate(bundles)])
    return files, bundles, Bundle(streamlines, bundles[0].header, "memory", folder.name), source


def assignment(seg, source: np.ndarray, names: list[str]) -> dict:
    owner = seg.owner()
    table = {}
    for i, name in enumerate(names):
        mine = owner[source == i]
        counts = np.bincount(mine, minlength=len(seg.parts))
        top = np.argsort(-counts)[:3]
        table[name] = {seg.parts[k].name: round(counts[k] / len(mine), 3) for k in top if counts[k]}
    return table


def part_mdf(codec, whole, seg) -> np.ndarray:
    """Per streamline of the file: its MDF (mm) after its part's encode and decode."""
    from vqdiff.bundle import Bundle
    from vqdiff.quality import streamline_mdf

    out = np.full(len(whole), np.nan)
    for p in seg.parts:
        part = Bundle([whole.streamlines[i] for i in p.indices.tolist()], whole.header, "memory", p.name)
        out[p.indices] = streamline_mdf(part, codec.decode(codec.encode(part)))
    return out


def run_set(label: str, folder: Path, codec, *, as_given: bool) -> dict:
    from vqdiff.codec import default_model_dir, load_templates
    from vqdiff.quality import streamline_mdf
    from vqdiff.segment import detect, segment

    templates = load_templates(default_model_dir())
    files, bundles, whole, source = concatenated(folder)
    names = [f.stem for f in files]
    t = time.perf_counter()
    det = detect(whole.streamlines, templates)
    t_detect = time.perf_counter() - t
    t = time.perf_counter()
    seg = segment(whole.streamlines, templates, mode="on")
    t_segment = time.perf_counter() - t
    counts = np.bincount(np.concatenate([p.indices for p in seg.parts]), minlength=len(whole))
    res = {"set": label, "folder": str(folder), "streamlines": len(whole), "bundles": len(names),
           "detection": det.to_dict(), "detect_s": round(t_detect, 3), "segment_s": round(t_segment, 3),
           "partition_complete": bool((counts == 1).all()), "registration": seg.registration,
           "parts": [p.to_dict() for p in seg.parts], "assignment": assignment(seg, source, names)}
    print(f"\n== {label}: {len(whole)} streamlines of {len(names)} bundles; detect {t_detect:.2f} s "
          f"({det.multi}, {det.reasons}), segment {t_segment:.2f} s, {len(seg.parts)} parts, partition complete: "
          f"{res['partition_complete']}; registration {seg.registration}")
    if codec is not None:
        mdf = part_mdf(codec, whole, seg)
        own = {}
        for f, b in zip(files, bundles, strict=True):
            own[f.stem] = float(streamline_mdf(b, codec.decode(codec.encode_file(f))).mean())
        res["mdf"] = {n: {"parts_mm": round(float(mdf[source == i].mean()), 3), "own_file_mm": round(own[n], 3),
                          "diff_mm": round(float(mdf[source == i].mean()) - own[n], 3)} for i, n in enumerate(names)}
        res["mdf_all"] = {"parts_mm": round(float(mdf.mean()), 3),
                          "own_files_mm": round(float(np.average([own[n] for n in names],
                                                                  weights=[len(b) for b in bundles])), 3)}
        if as_given:
            res["mdf_all"]["as_given_mm"] = round(float(streamline_mdf(whole, codec.decode(codec.encode(whole))).mean()), 3)
    print(f"{'source bundle':28s} {'parts (share of its streamlines)':62s}" + (" parts_mm own_mm diff" if codec else ""))
    for n in names:
        row = ", ".join(f"{k} {v:.2f}" for k, v in res["assignment"][n].items())
        extra = "" if codec is None else " {parts_mm:7.3f} {own_file_mm:6.3f} {diff_mm:+.3f}".format(**res["mdf"][n])
        print(f"{n:28s} {row:62s}{extra}")
    if codec is not None:
        print("all:", res["mdf_all"])
    return res


def main(argv=None) -> None:
    repo = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("VQDIFF_SHARED_DATA", str(repo.parent / "shared" / "data")))
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--skip-codec", action="store_true", help="segmentation only (no encode / decode)")
    p.add_argument("--as-given", action="store_true", help="also encode each whole file as one bundle")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    watch = LoadWatch(cores_used=1)
    codec = None
    if not args.skip_codec:
        from vqdiff import Codec

        codec = Codec.default()
    results = [run_set(s, Path(args.data) / SETS[s], codec, as_given=args.as_given) for s in args.sets]
    info = watch.finish()
    out = {"results": results, "load": info}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps({"load": info}))


if __name__ == "__main__":
    main()
