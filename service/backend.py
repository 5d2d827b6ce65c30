"""The served model: which directory, its codec (the engine `vqdiff.export.runtime` chooses, with the
model's templates) and its card for ``GET /model``. Called in each worker's start-up, never at import."""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

log = logging.getLogger("bentoml.vqdiff")

CARD_NAMES = ("MODEL_CARD.md", "README.md")
_CARD_LIMIT = 20_000


def resolve_model_dir(model_path: str | None, bento_model: Any = None) -> Path:
    """The directory to serve: a BentoML store model (by tag) first, then ``VQDIFF_MODEL``, then
    the repository's bundled ``models/default``."""
    if bento_model is not None:
        return Path(bento_model.path)
    if model_path:
        path = Path(model_path)
        if not path.is_dir():
            raise FileNotFoundError(f"VQDIFF_MODEL={model_path} is not a directory; expected a checkpoint "
                                    "directory (model.safetensors + config.json) or an export directory")
        return path
    from vqdiff.codec import default_model_dir

    return default_model_dir()


def open_codec(path: Path, *, device: str | None = None, threads: int | None = None):
    """A `vqdiff.codec.Codec` on the engine variant `vqdiff.export.select` chose for this machine
    (``VQDIFF_ENGINE`` forces one), warmed up, with the model's registration templates."""
    from vqdiff.export.runtime import make_codec

    return make_codec(path, backend="auto", device=device, threads=threads)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("vqdiff", "bentoml", "numpy", "torch", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def model_card(path: Path, codec) -> dict[str, Any]:
    """Model id/kind/hash, config, normalisation, templates, card text, engine, versions."""
    import numpy as np

    from vqdiff.codec import engine_provenance

    engine = codec.engine
    config: dict[str, Any] = {}
    for name in ("config.json", "manifest.json"):
        if (path / name).is_file():
            try:
                config[name.split(".")[0]] = json.loads((path / name).read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                log.warning("cannot read %s: %s", path / name, exc)
    card = next((path / n for n in CARD_NAMES if (path / n).is_file()), None)
    latents, indices = engine.encode_with_indices(np.zeros((1, 3, 64, 64), np.float32))
    sel = getattr(engine, "selection", None)
    templates = codec.pipeline.templates
    return {
        "model": dict(codec.pipeline.model_info),
        "model_dir": path.name,
        "normalisation": codec.pipeline.normalisation.to_dict(),
        "templates": list(templates.names) if templates is not None else None,
        "latent_shape": list(latents.shape[1:]),
        "has_indices": indices is not None,
        "group_shape": [3, 64, 64],
        "backend": getattr(engine, "backend", None),
        "engine": engine_provenance(engine),  # recorded in every latents file
        "backend_name": getattr(engine, "name", None),
        "provider": getattr(engine, "provider", None),
        # which variant runs, in what precision, and why (every candidate's groups/s and gate result)
        "engine_variant": getattr(engine, "variant_name", None),
        "precision": getattr(engine, "precision", None) or getattr(engine, "variant", None),
        "selection": {k: v for k, v in sel.items() if k not in ("summary", "key", "cache_dir")}
        if isinstance(sel, dict) else None,
        "fallback_reasons": list(getattr(engine, "fallback_reasons", []) or []),
        "config": config,
        "card": card.read_text(errors="replace")[:_CARD_LIMIT] if card else None,
        "versions": _versions(),
        "pid": os.getpid(),
    }
