"""Put a checkpoint (or export) directory into the BentoML model store, to serve it by tag.

    python -m vqdiff.service.store models/default --name vqdiff      # prints e.g. vqdiff:7cz3...
    VQDIFF_MODEL_TAG=vqdiff:latest bentoml serve                     # serve it (and pack it at build)

Export directories go through `vqdiff.export.bento_store.register` (files checked against the
manifest, labels from it); checkpoint directories (the bundled ``models/default``) are copied as
they are. No pickle, no framework wrapper: the model service reads the stored directory like a
path given in ``VQDIFF_MODEL``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

log = logging.getLogger("vqdiff.service")


def import_model(path: str | Path, name: str = "vqdiff") -> str:
    """Copy ``path`` into the BentoML model store as ``name:<version>``; returns the tag."""
    import bentoml

    path = Path(path)
    if (path / "manifest.json").is_file():
        from vqdiff.export.bento_store import register

        return register(path, name)
    config = path / "config.json"
    if not config.is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} is neither a checkpoint directory (model.safetensors + config.json) "
                                "nor an export directory (manifest.json)")
    info = json.loads(config.read_text())
    metadata = {"source": path.name, "kind": "checkpoint", "model_id": str(info.get("model_id", path.name))}
    with bentoml.models.create(name, labels={"project": "vqdiff"}, metadata=metadata) as model:
        shutil.copytree(path, model.path, dirs_exist_ok=True)
    return str(model.tag)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="checkpoint directory (model.safetensors + config.json) or export directory")
    p.add_argument("--name", default="vqdiff", help="model name in the store (default: vqdiff)")
    args = p.parse_args(argv)
    print(import_model(args.path, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
