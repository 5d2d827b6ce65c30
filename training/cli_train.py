"""Train a model of any kind (ae, vae, vq, vq_ema, vq_diff) on a prepared dataset.

Runs on CUDA when present (bf16 autocast, channels_last, optional torch.compile), else on the
CPU (bf16 autocast). Re-running with the same OUT_DIR resumes exactly from ``OUT_DIR/last``.
Multi-GPU / multi-node: ``torchrun --nproc-per-node N -m vqdiff.training.cli_train ...``.

The validation split selects ``best/`` (and ``--patience`` stops early); the test split is never
read here (``vqdiff-evaluate --split test`` reports it).

Augmentations (all off by default; recorded in every checkpoint's ``training`` config) mimic other
subjects and spaces: ``--rotate-deg``, ``--scale-range``, ``--translate-mm`` (within the bounds
of the registration's similarity SLR, `vqdiff.templates`), ``--aniso-scale``, ``--shear``,
``--mirror-prob`` (x -> -x about each subject's mid-sagittal plane, from its left/right bundle
pairs, or ``--mirror-x``), ``--elastic-mm`` / ``--elastic-wavelength-mm`` (smooth displacement field) and
``--jitter-mm`` (noise per point). See `vqdiff.training.augment`.

Fine-tuning: ``--init-from CKPT_DIR`` starts from that checkpoint's weights and adopts its kind,
architecture and normalisation (no refit); ``--kind`` may be left out, ``--model`` is refused.

Examples::

    vqdiff-train runs/data runs/vq_diff --kind vq_diff --steps 6000 --batch-size 32 --lr 2e-3
    vqdiff-train runs/data runs/vq_diff-aug --rotate-deg 15 --scale-range 0.9 1.1 --translate-mm 5 \\
        --aniso-scale 0.05 --shear 0.05 --mirror-prob 0.5 --elastic-mm 3 --jitter-mm 0.3
    vqdiff-train runs/data runs/finetune --init-from models/authors-vq_diff --steps 2000 --lr 5e-4
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from vqdiff.bottlenecks import KINDS
from vqdiff.cli.common import add_verbose_arg, run_main, setup_logging
from vqdiff.slr import ROTATION_DEG, SCALE_RANGE, TRANSLATION_MM

from .augment import MAX_ANISO_SCALE, MAX_ELASTIC_STRAIN, MAX_SHEAR, Augmentation
from .train import SCHEDULES, TrainConfig


def _build_arg_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_data", help="Dataset folder written by vqdiff-prepare.")
    p.add_argument("out_dir", help="Run folder: last/, best/ checkpoints and log.jsonl (resumed if present).")
    p.add_argument("--kind", choices=KINDS, help=f"Model kind [{d.kind}; with --init-from: the checkpoint's].")
    p.add_argument("--bottleneck", type=json.loads, default={}, help='Bottleneck options as JSON, e.g. \'{"tau": 10}\'.')
    p.add_argument("--model", type=json.loads, default={}, help='Encoder/decoder options as JSON, e.g. \'{"hidden": 128}\'.')
    p.add_argument("--steps", type=int, default=d.steps, help="Total optimiser steps [%(default)s].")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="Groups per step per process [%(default)s].")
    p.add_argument("--lr", type=float, default=d.lr, help="Peak learning rate [%(default)s].")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="LR schedule [%(default)s].")
    p.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction, help="[%(default)s]")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="[%(default)s]")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=d.precision, help="[%(default)s]")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", action="store_true", help="torch.compile the model.")
    p.add_argument("--balance", action="store_true", help="Sample bundles uniformly.")
    p.add_argument("--max-extra", type=int, default=d.max_extra, help="Window slack when drawing groups [%(default)s].")
    a = p.add_argument_group("augmentations (per training group, before normalisation; all off by default)")
    a.add_argument("--rotate-deg", type=float, default=d.rotate_deg,
                   help=f"Rotation uniform in +- this about each axis, at most {ROTATION_DEG:g} [%(default)s].")
    a.add_argument("--scale-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=d.scale_range,
                   help=f"Isotropic scale, log-uniform, within {SCALE_RANGE[0]:g}-{SCALE_RANGE[1]:g} [%(default)s].")
    a.add_argument("--aniso-scale", type=float, default=d.aniso_scale,
                   help=f"Per-axis scale exp(U(+-this)), at most {MAX_ANISO_SCALE:g} [%(default)s].")
    a.add_argument("--shear", type=float, default=d.shear, help=f"Shear terms U(+-this), at most {MAX_SHEAR:g} [%(default)s].")
    a.add_argument("--translate-mm", type=float, default=d.translate_mm,
                   help=f"Shift uniform in +- this per axis, at most {TRANSLATION_MM:g} [%(default)s].")
    a.add_argument("--mirror-prob", type=float, default=d.mirror_prob,
                   help="Probability of a left-right mirror about the mid-sagittal plane [%(default)s].")
    a.add_argument("--mirror-x", type=float,
                   help="x (mm) of that plane [each subject's, from its left/right bundle pairs].")
    a.add_argument("--elastic-mm", type=float, default=d.elastic_mm,
                   help="Amplitude bound of a smooth random displacement field [%(default)s].")
    a.add_argument("--elastic-wavelength-mm", type=float, default=d.elastic_wavelength_mm,
                   help=f"Shortest wavelength of that field; 2 pi amplitude / wavelength <= {MAX_ELASTIC_STRAIN:g} [%(default)s].")
    a.add_argument("--jitter-mm", type=float, default=d.jitter_mm, help="Gaussian noise per point (std) [%(default)s].")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="Validate + checkpoint every N steps [%(default)s].")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="Stop after N validations without a better validation MDF; 0 = never [%(default)s].")
    p.add_argument("--init-from", metavar="CKPT_DIR",
                   help="Fine-tune: start from this checkpoint's weights, architecture and normalisation.")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--time-limit", type=float, dest="time_limit_s", help="Stop after this many seconds (checkpointed).")
    p.add_argument("--device", help="Force a device (cpu, cuda, cuda:1).")
    p.add_argument("--threads", type=int, help="torch CPU threads.")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--fresh", action="store_true",
                   help="Start from step 0 even though OUT_DIR has checkpoints (they are replaced as training goes).")
    add_verbose_arg(p)
    return p


def main(argv=None) -> None:
    parser = _build_arg_parser()
    args = vars(parser.parse_args(argv))
    setup_logging(max(args.pop("verbose"), 1))
    try:
        Augmentation(**{f.name: args[f.name] for f in fields(Augmentation)})
    except ValueError as e:
        parser.error(f"augmentation out of bounds: {e}")

    def work():
        import torch

        from vqdiff.checkpoint import read_config

        from .train import Trainer

        if args["threads"]:
            torch.set_num_threads(args["threads"])
        if args["init_from"] and args["kind"] is None:  # adopt the checkpoint's kind (a clear error if none)
            args["kind"] = read_config(args["init_from"])["model"]["kind"]
        args["kind"] = args["kind"] or TrainConfig.kind
        run = {k: args.pop(k) for k in ("in_data", "out_dir", "device", "threads", "progress", "fresh")}
        cfg = TrainConfig(**args)
        result = Trainer(cfg, run["in_data"], run["out_dir"], device=run["device"], progress=run["progress"],
                         resume=not run["fresh"]).run()
        print(json.dumps(result, indent=2))

    run_main(work)


if __name__ == "__main__":
    main()
