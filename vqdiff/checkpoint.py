"""Self-describing checkpoints: a directory with ``model.safetensors`` and ``config.json``.

``config.json`` holds the format name and version, the model config (enough to rebuild the
model alone), the normalisation, and optional training config, data manifest hash and metrics.
Weights are safetensors; nothing is ever unpickled. Reading the config is torch-free; torch is
imported when weights are saved or loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError
from .fileio import file_sha256, read_versioned_json, replace_dir
from .geometry import check_geometry, geometry
from .normalise import Normalisation

if TYPE_CHECKING:  # torch is imported only when weights are saved or loaded
    from .models import StreamlineAutoencoder

FORMAT = "vqdiff-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@dataclass
class Checkpoint:
    model: StreamlineAutoencoder
    normalisation: Normalisation
    model_id: str
    model_hash: str  # sha256 of model.safetensors
    info: dict[str, Any] = field(default_factory=dict)  # the whole config.json
    path: Path | None = None  # the directory it was loaded from

    @property
    def short_hash(self) -> str:
        return self.model_hash[:12]

    @property
    def model_info(self) -> dict[str, str]:
        """``{"id", "kind", "sha256"}``: the identity recorded in every latents file."""
        return {"id": self.model_id, "kind": self.model.kind, "sha256": self.model_hash}


def save_checkpoint(
    path: str | os.PathLike,
    model: StreamlineAutoencoder,
    normalisation: Normalisation,
    *,
    model_id: str | None = None,
    extra: dict[str, Any] | None = None,
    files: dict[str, bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``path/`` atomically (a temp dir renamed into place). ``extra`` adds top-level keys
    (e.g. ``training``, ``data_manifest_sha256``, ``metrics``, ``state``) to config.json; ``files``
    adds files written inside the same swap (registration templates, the training state), so a
    crash never leaves a checkpoint without them."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: -f) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_id": model_id or path.name,
            "model": model.config.to_dict(),
            "geometry": geometry(),
            "normalisation": normalisation.to_dict(),
            **(extra or {}),
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        for name, data in (files or {}).items():
            if Path(name).name != name or name in (WEIGHTS, CONFIG):
                raise ValueError(f"extra checkpoint file name {name!r} must be a plain name other than {WEIGHTS}/{CONFIG}")
            (tmp / name).write_bytes(data)
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``config.json`` of checkpoint ``path`` (no weights loaded)."""
    path = Path(path)
    cfg_path = path / CONFIG
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory (expected {WEIGHTS} and {CONFIG} inside)")
    if not cfg_path.is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path} must contain both {WEIGHTS} and {CONFIG}")
    config = read_versioned_json(cfg_path, FORMAT, FORMAT_VERSION, CheckpointError)
    return config


def load_checkpoint(path: str | os.PathLike, *, device: str = "cpu") -> Checkpoint:
    """Rebuild model and normalisation from checkpoint directory ``path`` alone; model in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import ModelConfig, StreamlineAutoencoder

    path = Path(path)
    config = read_config(path)
    try:
        check_geometry(config.get("geometry"), str(path))
        model_config = ModelConfig.from_dict(config["model"])
        normalisation = Normalisation.from_dict(config["normalisation"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG}: invalid model or normalisation entry: {e}") from e
    model = StreamlineAutoencoder.from_config(model_config)
    try:
        state = load_file(str(path / WEIGHTS), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path / WEIGHTS} is not a readable safetensors file: {e}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path / WEIGHTS} does not match the model in {CONFIG}: {e}") from e
    model.to(device).eval()
    return Checkpoint(model, normalisation, str(config.get("model_id", path.name)), file_sha256(path / WEIGHTS), config,
                      path)


def export_source_checkpoint(path):
    """``path`` itself, or for an export directory (``manifest.json``, `vqdiff.export.manifest`) the
    checkpoint it was exported from, when that is here with the same weights (sha256); the torch engine
    runs it, with the same numbers as the export's graphs (parity 1e-4). An export whose checkpoint is
    not here runs on ONNX Runtime: `vqdiff.export.runtime.make_codec` (the core has no ONNX Runtime)."""
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file() or (Path(path) / "model.safetensors").is_file():
        return path
    m = read_versioned_json(manifest, "vqdiff-export", 1, CheckpointError)
    src = Path(m.get("source", {}).get("checkpoint", ""))
    if (src / "model.safetensors").is_file() and file_sha256(src / "model.safetensors") == m["model"]["sha256"]:
        return src
    raise CheckpointError(f"{path} is an export directory whose source checkpoint ({src}) is not here with the "
                          "same weights; open it with vqdiff.export.runtime.make_codec(path) (ONNX Runtime), or "
                          "set VQDIFF_MODEL to the checkpoint directory")
