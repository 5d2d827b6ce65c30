"""Decode a folder tree of latents (the output of vqdiff-encode-batch) back to bundles.

Every IN_DIR/<subject>/<bundle>.vqlat becomes OUT_DIR/<subject>/<bundle>.<format> in the input
bundle's original space (its header is in the latents), with every streamline in its original order
and direction, resampled back to its original point count unless --no-restore-points. Outputs
recorded in OUT_DIR/index.jsonl with the same input sha256, model and format are skipped, so
re-running resumes. Bad files are reported and skipped; the exit status is 1 when any failed.
A subject latents file (vqdiff-encode-batch --per-subject) becomes one file with every streamline
of the subject, a group per bundle (--format trx keeps the groups; TRK/TCK cannot and say so).

Examples::

    vqdiff-decode-batch latents/ recon/
    vqdiff-decode-batch latents/ recon/ --format trx --shard 2/8
"""

from __future__ import annotations

import argparse

from vqdiff.batch.cli_encode import add_batch_args, run_batch_cli


def _build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_dir", help="Folder tree of latents files (*.vqlat).")
    p.add_argument("out_dir", help="Output folder: <subject>/<bundle>.<format>, index.jsonl, summary.json.")
    p.add_argument("--format", default="trk", choices=("trk", "trx", "tck"), help="Output format [%(default)s].")
    p.add_argument("--no-restore-points", action="store_true",
                   help="Keep 64 points per streamline instead of resampling to the original counts.")
    add_batch_args(p)
    return p


def main(argv=None) -> None:
    parser = _build_arg_parser()
    args = parser.parse_args(argv)
    run_batch_cli(parser, args, "decode", format=args.format, restore_points=not args.no_restore_points)


if __name__ == "__main__":
    main()
