"""Keep exports in the BentoML model store (``$BENTOML_HOME/models``), addressed by tag.

>>> from vqdiff.export.bento_store import register, export_path
>>> tag = register("exports/default")              # 'vqdiff:<version>'
>>> engine = load_engine(export_path(tag))          # the stored copy is a plain export directory

`register` copies the export's files (those listed in ``manifest.json``, checked by sha256, and the
manifest) into a new model of the store, with labels (model id, kind, weights hash, opset) and
metadata (normalisation, parity, source checkpoint) taken from the manifest. The original export
directory is left as it is and stays usable on its own. ``bentoml`` is imported only here, lazily.
"""

from __future__ import annotations

import os
import shutil
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
