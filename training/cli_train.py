"""Train a model of any kind (ae, vae, vq, vq_ema, vq_diff) on a prepared dataset.

Runs on CUDA when present (bf16 autocast, channels_last, optional torch.compile), else on the
CPU (bf16 autocast). Re-running with the same OUT_DIR resumes exactly from ``OUT_DIR/last``.
Multi-GPU / multi-node: ``torchrun --nproc-per-node N -m vqdiff.training.cli_train ...``.

Example::

    vqdiff-train runs/data runs/vq_diff --kind vq_diff --steps 6000 --batch-size 32 --lr 2e-3
"""

from __future__ import annotations

import argparse
import json

from vqdiff.bottlenecks import KINDS
from vqdiff.cli.common import add_verbose_arg, run_main, setup_logging

from .train import SCHEDULES, TrainConfig


def _build_arg_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_data", help="Dataset folder written by vqdiff-prepare.")
    p.add_argument("out_dir", help="Run folder: last/, best/ checkpoints and log.jsonl (resumed if present).")
    p.add_argument("--kind", choices=KINDS, default=d.kind, help="Model kind [%(default)s].")
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
    p.add_argument("--rotate-deg", type=float, default=d.rotate_deg, help="Random rotation augmentation [%(default)s].")
    p.add_argument("--translate-mm", type=float, default=d.translate_mm, help="Random shift augmentation [%(default)s].")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="Validate + checkpoint every N steps [%(default)s].")
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

    def work():
        import torch

        from .train import Trainer

        if args["threads"]:
            torch.set_num_threads(args["threads"])
        run = {k: args.pop(k) for k in ("in_data", "out_dir", "device", "threads", "progress", "fresh")}
        cfg = TrainConfig(**args)
        result = Trainer(cfg, run["in_data"], run["out_dir"], device=run["device"], progress=run["progress"],
                         resume=not run["fresh"]).run()
        print(json.dumps(result, indent=2))

    run_main(work)


if __name__ == "__main__":
    main()
