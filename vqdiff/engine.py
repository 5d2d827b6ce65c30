"""The group-level engine interface every backend implements (torch: `vqdiff.torch_engine`; ONNX
Runtime and TensorRT: `vqdiff.export`). Torch-free.

An engine maps *normalised* groups (B, 3, 64, 64) float32 to latents (B, D, 16, 16) float32 and
back. It knows nothing of files, canonicalisation or normalisation; `vqdiff.codec` does that.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Engine(Protocol):
    backend: str  # "torch", "onnxruntime", "tensorrt"
    provider: str  # what really runs it, e.g. "cpu", "cuda:0", "CPUExecutionProvider"

    def encode_groups(self, x: np.ndarray) -> np.ndarray: ...  # (B, 3, 64, 64) -> (B, D, 16, 16)

    def decode_groups(self, latents: np.ndarray) -> np.ndarray: ...  # (B, D, 16, 16) -> (B, 3, 64, 64)

    def code_indices(self, x: np.ndarray) -> np.ndarray | None: ...  # (B, 3, 64, 64) -> (B, 16, 16)


def encode_with_indices(engine: Engine, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Latents and code indices of ``x``, in one engine run where the engine offers it."""
    if hasattr(engine, "encode_with_indices"):
        return engine.encode_with_indices(x)
    return engine.encode_groups(x), engine.code_indices(x)
