"""The model a batch job runs: a directory (default: the bundled model) opened on the best backend."""

from __future__ import annotations

import os
from pathlib import Path

from .stages import DEFAULT_BATCH
from .tasks import BatchError


def load_codec(model: str | os.PathLike | None = None, *, backend: str = "auto", device: str | None = None,
               threads: int | None = None, batch_size: int = DEFAULT_BATCH):
    """The `vqdiff.codec.Codec` a batch job runs (`vqdiff.export.runtime.make_codec`: ONNX Runtime /
    TensorRT / torch, export or checkpoint directory)."""
    from vqdiff.export.runtime import BackendUnavailable, make_codec

    try:
        return make_codec(resolve_model(model), backend=backend, device=device, threads=threads,
                          batch_size=batch_size)
    except (ValueError, BackendUnavailable) as exc:  # unknown backend, contradictory device, files missing
        raise BatchError(str(exc)) from exc


def resolve_model(model: str | os.PathLike | None) -> Path:
    from vqdiff.codec import default_model_dir

    return Path(model).resolve() if model else default_model_dir().resolve()
