"""Encode every bundle of a folder tree into latents, resumably, locally or on Ray.

IN_DIR is a TractoInferno tree (sub-X/tractography/sub-X__B.trk) or flat folders
(<subject>/<bundle>.trk); outputs mirror it: OUT_DIR/<subject>/<bundle>.vqlat (with --per-subject,
one OUT_DIR/<subject>.vqlat per subject). Each latents file records its measured fidelity
(--no-fidelity skips the measurement). Files whose output
already records the same input sha256 and model are skipped, so re-running resumes an interrupted
job. Bad files are reported and skipped; the exit status is 1 when any failed. The run ends with
OUT_DIR/index.jsonl (one JSON line per file) and OUT_DIR/summary.json; a --shard K/N run writes
index.shard-K-of-N.jsonl instead, and one unsharded run after all shards (nothing left to do) writes
the whole index.jsonl.

Examples::

    vqdiff-encode-batch tractoinferno/derivatives latents/
    vqdiff-encode-batch in/ out/ --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT
    vqdiff-encode-batch in/ out/ && vqdiff-encode-batch in/ out/     # the second run does nothing
    vqdiff-encode-batch in/ out/ --ray                  # join the Ray cluster ($RAY_ADDRESS or local)
    vqdiff-encode-batch in/ out/ --ray local            # start a Ray on this machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vqdiff.cli.common import add_overwrite_arg, add_verbose_arg, run_main, setup_logging

THROTTLE_ENV = "VQDIFF_BATCH_THROTTLE"  # seconds slept after each written file (crash-safety tests)


def add_batch_args(p: argparse.ArgumentParser) -> None:
    """Options shared by vqdiff-encode-batch and vqdiff-decode-batch."""
    p.add_argument("--model", help="Checkpoint or export directory (default: $VQDIFF_MODEL or models/default).")
    p.add_argument("--backend", default="auto",
                   help="Engine backend: auto (tensorrt > ort-cuda > ort-cpu > torch, first that runs), "
                        "tensorrt, ort-cuda, ort-cpu (export directory) or torch [%(default)s].")
    p.add_argument("--device", help="Engine device, e.g. cpu, cuda, cuda:1 [backend's default].")
    p.add_argument("--threads", type=int, help="Engine threads (CPU) [library default].")
    p.add_argument("--batch-size", type=int, default=64,
                   help="Groups per engine call, concatenated across files [%(default)s].")
    p.add_argument("--workers", type=int, default=2, help="Threads reading and canonicalising files [%(default)s].")
    p.add_argument("--processes", action="store_true",
                   help="Prepare in --workers processes instead of threads: no shared interpreter lock, faster for "
                        "other subjects' bundles (registration is mostly Python) and on many cores; slower for "
                        "bundles already in the model's space on few cores.")
    p.add_argument("--shard", default="0/1", metavar="K/N",
                   help="Process shard K of N (0 <= K < N): the files whose path hashes to K (stable as files are added), e.g. "
                        "$SLURM_ARRAY_TASK_ID/N or $JOB_COMPLETION_INDEX/N [%(default)s].")
    p.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="Run on Ray Data: no value joins $RAY_ADDRESS or a running local cluster (else "
                        "starts one), 'local' starts a fresh local Ray, or give ray://host:10001.")
    p.add_argument("--ray-actors", type=int, help="Engine actors on Ray [one per GPU, else 1].")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    add_overwrite_arg(p)
    add_verbose_arg(p)


def run_batch_cli(parser: argparse.ArgumentParser, args: argparse.Namespace, kind: str, **options) -> None:
    setup_logging(args.verbose)

    def work() -> int:
        from vqdiff.batch.job import run_batch
        from vqdiff.batch.tasks import parse_shard

        summary = run_batch(kind, args.in_dir, args.out_dir, model=args.model, shard=parse_shard(args.shard),
                            ray=args.ray, backend=args.backend, device=args.device, threads=args.threads,
                            batch_size=args.batch_size, workers=args.workers, processes=args.processes,
                            overwrite=args.overwrite,
                            progress=not args.no_progress, ray_actors=args.ray_actors,
                            throttle=float(os.environ.get(THROTTLE_ENV, 0) or 0), **options)
        print(summary["message"], file=sys.stderr)
        for f in summary["failures"]:
            print(f"failed: {f['input']}: {f['error']}", file=sys.stderr)
        print(json.dumps(summary, indent=2))
        return 1 if summary["failures"] else 0

    run_main(work)


def _build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_dir", help="Folder tree of bundles (.trk; .tck with --reference; .trx).")
    p.add_argument("out_dir", help="Output folder: <subject>/<bundle>.vqlat, index.jsonl, summary.json.")
    p.add_argument("--reference", help="NIfTI or TRK giving the space of every .tck input.")
    p.add_argument("--per-subject", action="store_true",
                   help="Write one subject latents file per subject folder, OUT_DIR/<subject>.vqlat, holding every "
                        "bundle of the subject (vqdiff-decode-batch writes it back as one file, a TRX with a "
                        "group per bundle with --format trx).")
    p.add_argument("--no-fidelity", action="store_true",
                   help="Do not measure each encoding's reconstruction (saves one decoder pass per bundle; the "
                        "latents then record no fidelity and no poor_reconstruction warning is given).")
    p.add_argument("--segment", choices=("auto", "on", "off"), default="auto",
                   help="A file without groups that holds several bundles: segment it into bundles, one subject "
                        "latents file (auto: when detected; on: always) or encode it as one bundle (off) "
                        "[%(default)s].")
    add_batch_args(p)
    return p


def main(argv=None) -> None:
    parser = _build_arg_parser()
    args = parser.parse_args(argv)
    run_batch_cli(parser, args, "encode", reference=args.reference, fidelity=not args.no_fidelity,
                  per_subject=args.per_subject, segment=args.segment)


if __name__ == "__main__":
    main()
