"""Encode a bundle with a model, save the latents, decode them back and report the error.

Example::

    vqdiff-roundtrip ../shared/data/subject01/IFOF_R.trk out/IFOF_R.vqlat out/IFOF_R_recon.trk
"""

from __future__ import annotations

import argparse
import json
import time

from vqdiff.cli.common import add_overwrite_arg, add_verbose_arg, check_outputs, run_main, setup_logging


def _build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_bundle", help="Input bundle (.trk, .tck with --reference, .trx).")
    p.add_argument("out_latents", help="Output latents file (.vqlat).")
    p.add_argument("out_bundle", help="Output reconstructed bundle (.trk, .tck, .trx).")
    p.add_argument("--model", help="Checkpoint directory (default: $VQDIFF_MODEL or the bundled models/default).")
    p.add_argument("--reference", help="NIfTI or TRK giving the space of a .tck input.")
    add_overwrite_arg(p)
    add_verbose_arg(p)
    return p


def main(argv=None) -> None:
    parser = _build_arg_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def work():
        from vqdiff.codec import Codec
        from vqdiff.fileio import file_sha256
        from vqdiff.io import load_bundle, save_bundle
        from vqdiff.latents import Latents
        from vqdiff.quality import reconstruction_quality

        check_outputs(parser, [args.out_latents, args.out_bundle], args.overwrite)
        codec = Codec.from_checkpoint(args.model) if args.model else Codec.default()
        bundle = load_bundle(args.in_bundle, reference=args.reference)
        t0 = time.perf_counter()
        lat = codec.encode(bundle, input_sha256=file_sha256(args.in_bundle))  # range warnings are logged
        lat.save(args.out_latents, overwrite=args.overwrite)
        out = codec.decode(Latents.load(args.out_latents), restore_points=True)
        elapsed = time.perf_counter() - t0
        save_bundle(out, args.out_bundle, overwrite=args.overwrite)
        figures = reconstruction_quality(bundle, out)
        report = {
            "model": codec.model_info,
            "streamlines_in": len(bundle),
            "streamlines_out": len(out),
            "groups": lat.n_groups,
            "latents_shape": list(lat.latents.shape),
            "mean_mdf_mm": figures["mean_mdf_mm"],
            "buan_t5": figures["buan_t5"],
            "seconds": round(elapsed, 3),
        }
        print(json.dumps(report, indent=2))

    run_main(work)


if __name__ == "__main__":
    main()
