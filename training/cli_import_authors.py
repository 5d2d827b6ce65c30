"""Import the VQ-Diff authors' released weights (ae.pt, vq.pt, vq_ema.pt, vq_diff.pt) as a checkpoint.

Reads the file with ``torch.load(weights_only=True)`` only, maps every layer onto vqdiff's
architecture by name and shape (anything that does not fit is refused), and writes a normal
checkpoint directory: model.safetensors + config.json (normalisation of the authors' space:
centre 0, scale 100 in subject01's units), registration templates (from ``--templates``, default
``subject01`` next to the weights or under $VQDIFF_SHARED_DATA), MODEL_CARD.md with provenance
(source repository, commit, file sha256) and the authors' MIT licence.

Example::

    vqdiff-import-authors ../shared/authors/vq_diff.pt out/authors-vq_diff --kind vq_diff
    vqdiff-evaluate out/authors-vq_diff runs/default-data out/authors-vq_diff-eval
"""

from __future__ import annotations

import argparse
import json

from vqdiff.cli.common import add_overwrite_arg, add_verbose_arg, check_outputs, run_main, setup_logging


def _build_arg_parser() -> argparse.ArgumentParser:
    from .authors import KINDS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_weights", help="The authors' .pt state_dict.")
    p.add_argument("out_checkpoint", help="Checkpoint directory to write.")
    p.add_argument("--kind", choices=KINDS,
                   help="Model kind of the file (optional for the released files, known by their sha256).")
    p.add_argument("--templates", help="Folder of bundles in the authors' space x 100 for the registration "
                   "templates [subject01 next to the weights].")
    add_overwrite_arg(p)
    add_verbose_arg(p)
    return p


def main(argv=None) -> None:
    parser = _build_arg_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def work():
        from .authors import import_authors

        check_outputs(parser, [args.out_checkpoint], args.overwrite)
        s = import_authors(args.in_weights, args.out_checkpoint, kind=args.kind, templates_dir=args.templates,
                           overwrite=args.overwrite)
        print(json.dumps(s, indent=2))

    run_main(work)


if __name__ == "__main__":
    main()
