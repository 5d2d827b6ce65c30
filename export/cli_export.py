"""Export a checkpoint to ONNX (encoder.onnx, decoder.onnx, manifest.json), checked against torch.

The encoder maps groups (B, 3, 64, 64) to latents (B, 64, 16, 16) with the deterministic inference
bottleneck inside, and also outputs the pre-bottleneck encoding ``z`` and, for kinds with a
codebook, the argmax code ``indices`` (B, 16, 16); the decoder maps latents back to groups. The
batch axis is dynamic. ONNX Runtime (CPU) must reproduce torch on real groups (max abs error
<= 1e-4, equal indices up to exact ties) or nothing is written.

Examples::

    vqdiff-export models/default exports/default
    vqdiff-export runs/vq/best exports/vq --int8 -f            # also try an int8 CPU variant
    vqdiff-export models/default exports/default --tensorrt -f # + TensorRT engines (GPU machine)
"""

from __future__ import annotations

import argparse
import json

from vqdiff.cli.common import add_overwrite_arg, add_verbose_arg, check_outputs, run_main, setup_logging


def _build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_checkpoint", help="Checkpoint directory (model.safetensors + config.json).")
    p.add_argument("out_dir", help="Output export directory.")
    p.add_argument("--parity-data",
                   help="Folder of real tractograms for the parity check "
                        "(default: $VQDIFF_SHARED_DATA/subject01 or ../shared/data/subject01).")
    p.add_argument("--parity-groups", type=int, default=128,
                   help="Number of real groups checked (evenly spread over the bundles) [%(default)s].")
    p.add_argument("--parity-bundles", nargs="+", metavar="NAME",
                   help="Only these bundles (file names without extension) of --parity-data.")
    p.add_argument("--atol", type=float, default=1e-4, help="Max abs error allowed [%(default)s].")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17) [%(default)s].")
    p.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                   help="torch.onnx exporter; auto = dynamo when onnxscript is installed [%(default)s].")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads for the checks (default: all cores).")
    p.add_argument("--int8", action="store_true",
                   help="Also try an int8 static-QDQ CPU variant; kept only if >= 1.10x faster and it "
                        "passes the engines' quality gate on held-out groups (vqdiff.export.gate: "
                        "|mean MDF change| <= 0.05 mm, |BUAN change| <= 0.002).")
    g = p.add_argument_group("TensorRT (needs tensorrt and a CUDA GPU)")
    g.add_argument("--tensorrt", action="store_true", help="Also build TensorRT engines (fp32 and fp16).")
    g.add_argument("--trt-batch", type=int, nargs=3, metavar=("MIN", "OPT", "MAX"), default=(1, 64, 512),
                   help="Optimisation profile over the batch axis [%(default)s].")
    g.add_argument("--timing-cache", help="TensorRT timing cache to start from (reused across builds).")
    g.add_argument("--device", default="cuda:0", help="CUDA device for the build [%(default)s].")
    add_overwrite_arg(p)
    add_verbose_arg(p)
    return p


def main(argv=None) -> None:
    parser = _build_arg_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.opset < 17:
        parser.error("--opset must be >= 17")
    if args.parity_groups < 1:
        parser.error("--parity-groups must be >= 1")

    def work():
        from .manifest import read_manifest
        from .onnx_export import export_checkpoint

        check_outputs(parser, [args.out_dir], args.overwrite)
        trt_opts = {
            "profile": dict(zip(("min", "opt", "max"), args.trt_batch, strict=True)),
            "timing_cache": args.timing_cache,
            "device": args.device,
        }
        out = export_checkpoint(
            args.in_checkpoint, args.out_dir, overwrite=args.overwrite, opset=args.opset, exporter=args.exporter,
            parity_data=args.parity_data, parity_max_groups=args.parity_groups, parity_bundles=args.parity_bundles,
            atol=args.atol,
            threads=args.threads, int8=args.int8, tensorrt=args.tensorrt, tensorrt_options=trt_opts,
        )
        m = read_manifest(out)
        summary = {
            "export": str(out),
            "model": m["model"]["id"],
            "kind": m["model"]["kind"],
            "opset": m["opset"],
            "files": {k: v["bytes"] for k, v in m["files"].items()},
            "parity": {"groups": m["parity"]["groups"], "max_abs_error": m["parity"]["max_abs_error"],
                       "indices": m["parity"]["indices"], "passed": m["parity"]["passed"]},
        }
        if m.get("variants", {}).get("int8"):
            v = m["variants"]["int8"]
            summary["int8"] = {"kept": v["kept"], "keep": v["keep"],
                               "combinations": {k: {kk: round(vv, 4) for kk, vv in c.items() if isinstance(vv, float)}
                                                for k, c in v["combinations"].items()}}
        if m.get("tensorrt"):
            summary["tensorrt"] = {p: e.get("kept") for p, e in m["tensorrt"]["plans"].items()}
        print(json.dumps(summary, indent=2))

    run_main(work)


if __name__ == "__main__":
    main()
