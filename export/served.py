"""The served model (the service's workers open it at start-up): its directory and codec (`open_codec`), a
warm-up through every step (`warm_up`) and its card for ``GET /model`` (`model_card`: model id/kind/hash,
config, normalisation, templates, card text, the engine (variant and why it was chosen), versions)."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def open_codec(model_path: str | None, bento_model: Any = None, *, device: str | None = None,
               threads: int | None = None):
    """(model directory, `vqdiff.codec.Codec`): the BentoML store model (``VQDIFF_MODEL_TAG``) first, then
    ``VQDIFF_MODEL``, then the bundled ``models/default``; the engine is warm (``VQDIFF_ENGINE`` forces one)."""
    from vqdiff.codec import default_model_dir
    from vqdiff.export.runtime import make_codec

    path = Path(bento_model.path) if bento_model is not None else Path(model_path) if model_path else default_model_dir()
    if not path.is_dir():
        raise FileNotFoundError(f"VQDIFF_MODEL={model_path} is not a directory; expected a checkpoint directory "
                                "(model.safetensors + config.json) or an export directory")
    return path, make_codec(path, backend="auto", device=device, threads=threads)


def warm_up(codec) -> float:
    """One synthetic bundle through parsing, registration, the codec, writing and the figures (imports,
    caches, dipy's slow first calls); seconds."""
    import numpy as np

    from vqdiff.bundle import Bundle, SpatialHeader
    from vqdiff.io import bundle_to_bytes, load_bundle_bytes
    from vqdiff.quality import reconstruction_quality

    t0 = time.perf_counter()
    lines = np.cumsum(np.random.default_rng(0).normal(0.0, 1.0, (70, 30, 3)), axis=1).astype(np.float32) + 10
    data = bundle_to_bytes(Bundle(list(lines), SpatialHeader.identity(), "memory", "warmup"), format="trk")
    bundle = load_bundle_bytes(data, format="trk", name="warmup")
    recon = codec.decode(codec.encode(bundle), restore_points=True)
    bundle_to_bytes(recon, format="trk")
    reconstruction_quality(bundle, recon)
    return time.perf_counter() - t0


def _versions() -> dict[str, str]:
    from importlib.metadata import distributions

    pkgs = {"vqdiff", "bentoml", "numpy", "torch", "onnxruntime", "onnxruntime-gpu", "tensorrt"}
    found = {d.metadata["Name"].lower(): d.version for d in distributions() if d.metadata["Name"].lower() in pkgs}
    return {"python": platform.python_version(), **dict(sorted(found.items()))}


def model_card(path: Path, codec) -> dict[str, Any]:
    """Model id/kind/hash, config, normalisation, templates, card text, engine (variant and why), versions."""
    import numpy as np

    from vqdiff.codec import engine_provenance

    engine, pipe = codec.engine, codec.pipeline
    config: dict[str, Any] = {}
    for name in ("config.json", "manifest.json"):
        try:
            if (path / name).is_file():
                config[name.split(".")[0]] = json.loads((path / name).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            log.warning("cannot read %s: %s", path / name, exc)
    card = next((path / n for n in ("MODEL_CARD.md", "README.md") if (path / n).is_file()), None)
    latents, indices = engine.encode_with_indices(np.zeros((1, 3, 64, 64), np.float32))
    sel = getattr(engine, "selection", None)
    return {
        "model": dict(pipe.model_info), "model_dir": path.name, "normalisation": pipe.normalisation.to_dict(),
        "templates": list(pipe.templates.names) if pipe.templates is not None else None,
        "latent_shape": list(latents.shape[1:]), "has_indices": indices is not None, "group_shape": [3, 64, 64],
        "backend": getattr(engine, "backend", None), "backend_name": getattr(engine, "name", None),
        "provider": getattr(engine, "provider", None),
        "engine": engine_provenance(engine),  # recorded in every latents file
        # which variant runs, in what precision, and why (every candidate's groups/s and gate result)
        "engine_variant": getattr(engine, "variant_name", None),
        "precision": getattr(engine, "precision", None) or getattr(engine, "variant", None),
        "selection": {k: v for k, v in sel.items() if k not in ("summary", "key", "cache_dir")}
        if isinstance(sel, dict) else None,
        "fallback_reasons": list(getattr(engine, "fallback_reasons", []) or []),
        "config": config, "card": card.read_text(errors="replace")[:20_000] if card else None,
        "versions": _versions(), "pid": os.getpid(),
    }
