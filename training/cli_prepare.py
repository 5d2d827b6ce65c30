"""Prepare a training dataset: bundle files -> canonical shards + manifest (hashes, counts, split, seed).

IN_DIR is either a TractoInferno tree (``sub-XXXX/tractography/sub-XXXX__BUNDLE.trk``) or a flat
folder of ``BUNDLE.trk`` files (the folder name is then the subject). Three splits: train,
validation (model selection: ``best/``, early stopping) and test (never seen in training; what
``vqdiff-evaluate`` reports by default). With several subjects they are by subject; with one, by
canonical group of 64 streamlines (a bundle of 2 groups gets a validation group and no test group).
Shards mark each streamline's split: 0 train, 1 validation, 2 test.

Examples::

    vqdiff-prepare ../shared/data/subject01 runs/data --val-fraction 0.1 --test-fraction 0.1 --seed 0
    vqdiff-prepare ../shared/data/subject01 runs/default-data --test-fraction 0   # no test split (format 1's)
"""

from __future__ import annotations

import argparse
import json

from vqdiff.cli.common import add_overwrite_arg, add_verbose_arg, check_outputs, run_main, setup_logging


def _build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_dir", help="Folder of bundle files (.trk, .tck, .trx).")
    p.add_argument("out_dir", help="Output dataset folder (shards/ + manifest.json).")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="Share of groups (subjects) for validation: model selection [%(default)s].")
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="Share of groups (subjects) for test: never seen in training [%(default)s].")
    p.add_argument("--seed", type=int, default=0, help="Split seed [%(default)s].")
    p.add_argument("--balance", action="store_true", help="Sample every bundle equally often in training (paper).")
    p.add_argument("--bundles", nargs="+", help="Only these bundle names (default: all).")
    p.add_argument("--reference", help="NIfTI/TRK reference for .tck inputs.")
    add_overwrite_arg(p)
    add_verbose_arg(p)
    return p


def main(argv=None) -> None:
    parser = _build_arg_parser()
    args = parser.parse_args(argv)
    setup_logging(max(args.verbose, 1))
    if not (0 <= args.val_fraction < 1 and 0 <= args.test_fraction < 1
            and args.val_fraction + args.test_fraction < 1):
        parser.error("--val-fraction and --test-fraction must be in [0, 1) with a sum below 1")

    def work():
        from .data import prepare_dataset

        check_outputs(parser, [args.out_dir], args.overwrite, remove=True)
        m = prepare_dataset(args.in_dir, args.out_dir, val_fraction=args.val_fraction,
                            test_fraction=args.test_fraction, seed=args.seed, balance=args.balance,
                            bundles=args.bundles, reference=args.reference)
        keys = ("split_by", "val_fraction", "test_fraction", "bundles", "subjects", "val_subjects", "test_subjects",
                "sha256")
        summary = {k: m[k] for k in keys}
        summary["streamlines"] = sum(e["streamlines"] for e in m["shards"])
        summary["groups"] = sum(e["groups"] for e in m["shards"])
        summary["train_streamlines"] = sum(e["train_streamlines"] for e in m["shards"])
        summary["val_groups"] = sum(e["val_groups"] for e in m["shards"])
        summary["test_groups"] = sum(e["test_groups"] for e in m["shards"])
        summary["failed"] = len(m["failed"])
        print(json.dumps(summary, indent=2))
        return 1 if m["failed"] else 0

    run_main(work)


if __name__ == "__main__":
    main()
