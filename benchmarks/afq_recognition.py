"""Recognition of another subject's bundles: every AFQ bundle (cross-subject VALIDATION data, never
trained on) registered against the model's templates with its file name as the hint; prints, per bundle,
the known flag, the template, the residual and the template's unknown threshold (JSON lines, then a
count). Usage: ``python benchmarks/afq_recognition.py [AFQ_DIR]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vqdiff.codec import default_model_dir, load_templates
from vqdiff.io import load_bundle
from vqdiff.registration import register


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[2] / "shared/data/crosssubject/afq_browser"
    templates = load_templates(default_model_dir())
    known = 0
    for path in sorted(root.glob("*.trk")):
        reg = register(load_bundle(path).streamlines, templates, hint=path.stem)
        known += reg.known
        print(json.dumps({"bundle": path.stem, "known": reg.known, "template": reg.template,
                          "residual_mm": round(reg.residual_mm, 2), "threshold_mm": round(reg.threshold_mm, 2),
                          "scale": round(reg.scale, 3), "reason": reg.reason}))
    print(f"known: {known} of {len(list(root.glob('*.trk')))}")


if __name__ == "__main__":
    main()
