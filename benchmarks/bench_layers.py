"""Benchmark: the per-layer error budget of reduced precision (the table in docs/engines.md).

Each convolution of the model alone in reduced precision, the rest fp32; the change of the mean MDF
(mm) and of the mean BUAN on the gate's held-out real groups (`vqdiff.export.gate.gate_groups`:
subject01, 48 held-out groups, seed 0) against the fp32 model. bf16: torch, that layer in an autocast
`vqdiff.torch_engine.Island`. int8: ONNX Runtime static QDQ of that one node (per-channel int8
weights, uint8 activations, MinMax on the 32 calibration groups), on the model's export. Then the
layer policies (`torch-bf16`, `torch-bf16-trunk`, and the int8 ``safe`` set of `layer_policy`).

    python benchmarks/bench_layers.py [--model DIR] [--data DIR] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=REPO / "models" / "default")
    p.add_argument("--data", type=Path, default=None, help="gate data (default: the shared subject01)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import onnx
    import torch

    from vqdiff.checkpoint import load_checkpoint
    from vqdiff.export.gate import gate_groups, judge, quality
    from vqdiff.export.layer_policy import conv_nodes, int8_nodes
    from vqdiff.export.manifest import DEC_INPUT, DECODER, ENC_INPUT, ENCODER
    from vqdiff.export.onnx_export import export_checkpoint
    from vqdiff.export.ort_backend import ort_session
    from vqdiff.export.quantize import quantize_graph, roundtrip
    from vqdiff.export.variants import model_source
    from vqdiff.geometry import groups_to_model
    from vqdiff.torch_engine import TorchEngine, layer_names, with_islands

    torch.set_num_threads(args.threads)
    ck = load_checkpoint(args.model)
    data = gate_groups(model_source(args.model), args.data)
    if data is None or data.synthetic:
        sys.exit("no real groups to measure on (pass --data or set VQDIFF_SHARED_DATA)")
    held, norm = data.held_out, ck.normalisation
    x = groups_to_model(norm.apply(held))
    print(f"# per-layer error budget: {ck.model_id}, {data.where}; load average {os.getloadavg()}")

    def torch_rec(e):
        lat, _ = e.encode_with_indices(x)
        return e.decode_groups(lat)

    ref = quality(held, torch_rec(TorchEngine(ck.model)), norm)
    out = {"reference": ref, "groups": len(held), "where": data.where, "bf16": {}, "int8": {}, "policies": {}}
    print(f"fp32: mean MDF {ref['mean_mdf_mm']:.4f} mm, BUAN {ref['buan']:.5f}\n")
    for name in layer_names(ck.model):
        e = TorchEngine(with_islands(copy.deepcopy(ck.model), [name], torch.bfloat16))
        out["bf16"][name] = judge(quality(held, torch_rec(e), norm), ref)
    for pol in ("all", "trunk"):
        e = TorchEngine(ck.model, precision="bf16", channels_last=True, layers=pol)
        out["policies"][f"torch-bf16 ({pol})"] = judge(quality(held, torch_rec(e), norm), ref)

    with tempfile.TemporaryDirectory(prefix="bench-layers-") as tmp:
        ex = export_checkpoint(args.model, Path(tmp) / "export", parity_groups=data.calibration, exporter="torchscript")
        calib = groups_to_model(norm.apply(data.calibration))
        batches = [calib[s : s + 16] for s in range(0, len(calib) - 15, 16)]
        enc, dec = ort_session(ex / ENCODER, threads=args.threads), ort_session(ex / DECODER, threads=args.threads)
        lat_b = [enc.run(["latents"], {ENC_INPUT: b})[0] for b in batches]
        ref8 = quality(held, roundtrip(enc, dec, x), norm)
        graphs = {"encoder": (ENCODER, batches, ENC_INPUT), "decoder": (DECODER, lat_b, DEC_INPUT)}
        names = iter(layer_names(ck.model))
        for graph, (f, cal, inp) in graphs.items():
            nodes = conv_nodes(onnx.load(str(ex / f)))
            for node in nodes + ["safe"]:
                dst = Path(tmp) / f"{graph}.one.onnx"
                chosen = int8_nodes(onnx.load(str(ex / f)), graph) if node == "safe" else [node]
                quantize_graph(ex / f, dst, cal, inp, op_types=["Conv", "ConvTranspose"], nodes=chosen or ["-"])
                s8 = ort_session(dst, threads=args.threads)
                r = roundtrip(s8, dec, x) if graph == "encoder" else roundtrip(enc, s8, x)
                key = f"int8 safe ({graph})" if node == "safe" else next(names)
                (out["policies"] if node == "safe" else out["int8"])[key] = judge(quality(held, r, norm), ref8)

    print("| layer | int8 Δ mean MDF (mm) / Δ BUAN | bf16 Δ mean MDF (mm) / Δ BUAN |\n|---|---|---|")
    for name in layer_names(ck.model):
        i8, b16 = out["int8"][name], out["bf16"][name]
        print(f"| {name} | {i8['mdf_change_mm']:+.4f} / {i8['buan_change']:+.5f} | "
              f"{b16['mdf_change_mm']:+.4f} / {b16['buan_change']:+.5f} |")
    print("\n| policy | Δ mean MDF (mm) | Δ BUAN | gate |\n|---|---|---|---|")
    for k, g in out["policies"].items():
        print(f"| {k} | {g['mdf_change_mm']:+.4f} | {g['buan_change']:+.5f} | {'pass' if g['passed'] else 'FAIL'} |")
    print(f"\nload average after: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
