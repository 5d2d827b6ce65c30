"""Write a model's registration templates (templates.safetensors) into a checkpoint directory.

`vqdiff-train` writes them itself; this command is for checkpoints trained elsewhere or before
templates existed. IN_DATA is the model's training data: a dataset made by `vqdiff-prepare` (its
training split is used, the validation split is not) or a folder of bundle files in model space
(every streamline is used; bundle name = file stem).

Example::

    vqdiff-templates runs/default-data models/default
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vqdiff.cli.common import add_overwrite_arg, add_verbose_arg, check_outputs, run_main, setup_logging


def _build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_data", help="Dataset folder (manifest.json from vqdiff-prepare) or folder of bundle files.")
    p.add_argument("out_checkpoint", help="Checkpoint directory to write templates.safetensors into.")
    add_overwrite_arg(p)
    add_verbose_arg(p)
    return p


def main(argv=None) -> None:
    parser = _build_arg_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def work():
        from vqdiff.checkpoint import read_config
        from vqdiff.codec import TEMPLATES_FILE
        from vqdiff.templates import Templates

        from .data import MANIFEST, load_dataset
        from .train import training_templates

        read_config(args.out_checkpoint)  # a checkpoint directory, or a clear error
        out = Path(args.out_checkpoint) / TEMPLATES_FILE
        check_outputs(parser, [out], args.overwrite)
        if (Path(args.in_data) / MANIFEST).is_file():
            templates = training_templates(load_dataset(args.in_data)[1])
        else:
            templates = Templates.from_folder(args.in_data)
        templates.save(out)
        print(json.dumps({"templates": str(out), "bundles": templates.names, "bytes": out.stat().st_size}))

    run_main(work)


if __name__ == "__main__":
    main()
