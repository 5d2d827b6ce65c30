"""Keep exports in the BentoML model store (``$BENTOML_HOME/models``), addressed by tag.

>>> from vqdiff.export.bento_store import register, export_path
>>> tag = register("exports/default")              # 'vqdiff:<version>'
>>> engine = load_engine(export_path(tag))          # the stored copy is a plain export directory

    vqdiff-model-store models/default --name vqdiff     # a checkpoint or export directory; prints the tag
    VQDIFF_MODEL_TAG=vqdiff:latest bentoml serve        # serve it (and pack it at build)

`register` copies the export's files (those listed in ``manifest.json``, checked by sha256, and the
manifest) into a new model of the store, with labels (model id, kind, weights hash, opset) and
metadata (normalisation, parity, source checkpoint) taken from the manifest. The original export
directory is left as it is and stays usable on its own. ``bentoml`` is imported only here, lazily.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from .manifest import MANIFEST, ExportError, read_manifest


def _bentoml():
    try:
        import bentoml
    except ImportError as e:
        raise ExportError("bentoml is not installed (pip install 'vqdiff[serve]' or pip install bentoml)") from e
    return bentoml


def labels_and_metadata(manifest: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    m = manifest["model"]
    labels = {
        "model_id": str(m["id"]),
        "kind": str(m["kind"]),
        "weights_sha256": str(m["sha256"][:12]),
        "opset": str(manifest["opset"]),
        "format": f"{manifest['format']}-v{manifest['format_version']}",
        "tensorrt": "yes" if manifest.get("tensorrt") else "no",
    }
    parity = manifest.get("parity", {})
    metadata = {
        "model_sha256": m["sha256"],
        "model_config": m["config"],
        "normalisation": manifest["normalisation"],
        "source_checkpoint": manifest.get("source", {}).get("checkpoint", ""),
        "created": manifest.get("created", ""),
        "parity_max_abs_error": parity.get("max_abs_error", {}),
        "parity_groups": parity.get("groups", 0),
        "files": {k: v["sha256"] for k, v in manifest["files"].items()},
    }
    return labels, metadata


def register(export_dir: str | os.PathLike, name: str = "vqdiff") -> str:
    """Copy export ``export_dir`` into the BentoML model store as a new version of ``name``; return its tag."""
    bentoml = _bentoml()
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir, verify=True)
    labels, metadata = labels_and_metadata(manifest)
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        dst = Path(model.path)
        for fname in [*manifest["files"], MANIFEST]:
            shutil.copy2(export_dir / fname, dst / fname)
    read_manifest(dst, verify=True)  # the stored copy is complete and intact
    return str(model.tag)


def export_path(tag: str) -> Path:
    """The directory of a stored export (a plain export directory: `load_engine` takes it)."""
    bentoml = _bentoml()
    path = Path(bentoml.models.get(tag).path)
    if not (path / MANIFEST).is_file():
        raise ExportError(f"BentoML model {tag!r} is not a vqdiff export (no {MANIFEST} in {path})")
    return path


def load_engine_from_store(tag: str, **kwargs: Any):
    """`vqdiff.export.runtime.load_engine` on a stored export."""
    from .runtime import load_engine

    return load_engine(export_path(tag), **kwargs)


def import_model(path: str | os.PathLike, name: str = "vqdiff") -> str:
    """A checkpoint directory (copied as it is) or an export directory (`register`) into the store as
    ``name:<version>``; returns the tag. The service reads the stored directory like ``VQDIFF_MODEL``."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return register(path, name)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} is neither a checkpoint directory (model.safetensors + config.json) "
                                f"nor an export directory ({MANIFEST})")
    info = json.loads((path / "config.json").read_text())
    metadata = {"source": path.name, "kind": "checkpoint", "model_id": str(info.get("model_id", path.name))}
    with _bentoml().models.create(name, labels={"project": "vqdiff"}, metadata=metadata) as model:
        shutil.copytree(path, model.path, dirs_exist_ok=True)
    return str(model.tag)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Put a checkpoint or export directory into the BentoML model store "
                                "(serve it with VQDIFF_MODEL_TAG=<tag>); prints its tag.")
    p.add_argument("in_model", help="checkpoint directory (model.safetensors + config.json) or export directory")
    p.add_argument("--name", default="vqdiff", help="model name in the store (default: vqdiff)")
    args = p.parse_args(argv)
    print(import_model(args.in_model, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
