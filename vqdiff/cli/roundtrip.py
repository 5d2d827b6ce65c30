"""Encode a bundle (or a subject: a TRX with groups) with a model, save the latents, decode them back
and report the error.

A TRX with groups is encoded group by group into one subject latents file (`vqdiff.subject`) and
decoded back to a TRX with the same groups, every streamline in its original order; a file without
groups that holds several bundles is segmented into bundles first and encoded the same way
(`vqdiff.segment`; ``--segment``). The report then gives each bundle's figures too. Per-point data come back (the decode restores the point counts).

Examples::

    vqdiff-roundtrip ../shared/data/subject01/IFOF_R.trk out/IFOF_R.vqlat out/IFOF_R_recon.trk
    vqdiff-roundtrip subject.trx out/subject.vqlat out/recon.trx
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
    p.add_argument("--segment", choices=("auto", "on", "off"), default="auto",
                   help="A file without groups that holds several bundles: segment it into bundles (auto: when "
                        "detected; on: always) or encode it as one bundle (off) [%(default)s].")
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
        from vqdiff.quality import reconstruction_quality
        from vqdiff.segment import file_parts
        from vqdiff.subject import Subject, load_latents

        check_outputs(parser, [args.out_latents, args.out_bundle], args.overwrite)
        codec = Codec.from_checkpoint(args.model) if args.model else Codec.default()
        bundle = load_bundle(args.in_bundle, reference=args.reference)
        t0 = time.perf_counter()
        sha = file_sha256(args.in_bundle)  # warnings (range, recognition, fidelity) are logged
        parts, seg = file_parts(bundle, codec.pipeline.templates, mode=args.segment)  # groups, segments or None
        lat = codec.encode(bundle, input_sha256=sha) if parts is None else codec.encode_subject(
            bundle, parts=parts, input_sha256=sha)
        lat = lat if seg is None else seg.record(lat)
        lat.save(args.out_latents, overwrite=args.overwrite)
        out = codec.decode(load_latents(args.out_latents), restore_points=True)
        elapsed = time.perf_counter() - t0
        save_bundle(out, args.out_bundle, overwrite=args.overwrite)
        figures = reconstruction_quality(bundle, out)
        parts = lat.parts if isinstance(lat, Subject) else []
        report = {
            "model": codec.model_info,
            "streamlines_in": len(bundle),
            "streamlines_out": len(out),
            "groups": sum(p.latents.n_groups for p in parts) if parts else lat.n_groups,
            "latents_shape": [list(p.latents.latents.shape) for p in parts] if parts else list(lat.latents.shape),
            "mean_mdf_mm": figures["mean_mdf_mm"],
            "buan_t5": figures["buan_t5"],
            "seconds": round(elapsed, 3),
        }
        if parts:
            report["bundles"] = {p.name: {"streamlines": len(p.members), "template": p.latents.registration.get(
                "template"), "known": p.latents.registration.get("known"), "fidelity": p.latents.fidelity}
                for p in parts}
        else:
            report["fidelity"] = lat.fidelity
        print(json.dumps(report, indent=2))

    run_main(work)


if __name__ == "__main__":
    main()
