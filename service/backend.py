"""Open the served model: one engine (`vqdiff.export.runtime.load_engine`) + its card.

`open_engine` is the only place that chooses how the model runs; `model_card` is what
``GET /model`` shows about it. Nothing here is imported at module level by the services, so the
gateway never loads torch and ``bentoml build`` never needs the runtime packages.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

log = logging.getLogger("vqdiff.service")

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


def open_engine(path: Path, *, backend: str = "auto", device: str | None = None, threads: int | None = None):
    """An engine with ``.normalisation``, ``.model_info``, ``.backend`` and ``.provider``, warmed up.

    ``backend="auto"`` (``VQDIFF_BACKEND`` unset): the fastest engine variant that passes the quality
    gate on this machine, chosen at the first start and cached (`vqdiff.export.select`;
    ``VQDIFF_ENGINE=torch-fp32|torch-bf16|ort-fp32|ort-int8|...`` forces one). Another backend name
    opens that backend as `vqdiff.export.runtime.load_engine` does.
    """
    from vqdiff.export import runtime

    return runtime.open_engine(path, backend=backend, device=device, threads=threads, warmup=True)


def warm_up(engine, sizes=(1, 8)) -> float:
    """Run dummy batches through encoder and decoder (allocations, kernels, caches); seconds taken."""
    import time

    import numpy as np

    t0 = time.perf_counter()
    for n in sizes:
        x = np.zeros((n, 3, 64, 64), np.float32)
        engine.decode_groups(engine.encode_groups(x))
    return time.perf_counter() - t0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("vqdiff", "bentoml", "numpy", "torch", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def model_card(path: Path, engine) -> dict[str, Any]:
    """Model id/kind/hash, config, normalisation, training summary, card text, backend, versions."""
    config: dict[str, Any] = {}
    for name in ("config.json", "manifest.json"):
        if (path / name).is_file():
            try:
                config[name.split(".")[0]] = json.loads((path / name).read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                log.warning("cannot read %s: %s", path / name, exc)
    card = next((path / n for n in CARD_NAMES if (path / n).is_file()), None)
    latent_shape = None
    if engine is not None:
        import numpy as np

        latent_shape = list(engine.encode_groups(np.zeros((1, 3, 64, 64), np.float32)).shape[1:])
    from vqdiff.codec import TEMPLATES_FILE, engine_provenance

    templates = path / TEMPLATES_FILE
    return {
        "model": dict(getattr(engine, "model_info", {}) or {}),
        # the registration templates, for the gateway's codec core (GET /model shows only their names)
        "templates_b64": base64.b64encode(templates.read_bytes()).decode() if templates.is_file() else None,
        "model_dir": path.name,
        "normalisation": engine.normalisation.to_dict() if engine is not None else None,
        "latent_shape": latent_shape,
        "group_shape": [3, 64, 64],
        "backend": getattr(engine, "backend", None),
        "engine": engine_provenance(engine),  # recorded in every latents file
        "backend_name": getattr(engine, "name", None),
        "provider": getattr(engine, "provider", None),
        # which variant runs, in what precision, and why (every candidate's groups/s and gate result)
        "engine_variant": getattr(engine, "variant_name", None),
        "precision": getattr(engine, "precision", None) or getattr(engine, "variant", None),
        "selection": _selection(engine),
        "fallback_reasons": list(getattr(engine, "fallback_reasons", []) or []),
        "config": config,
        "card": card.read_text(errors="replace")[:_CARD_LIMIT] if card else None,
        "versions": _versions(),
        "pid": os.getpid(),
    }


def _selection(engine) -> dict[str, Any] | None:
    sel = getattr(engine, "selection", None)
    if not isinstance(sel, dict):
        return None
    return {k: v for k, v in sel.items() if k not in ("summary", "key", "cache_dir")}
