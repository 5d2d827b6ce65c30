"""The group-level engine interface every backend implements (torch: `vqdiff.torch_engine`; ONNX
Runtime and TensorRT: `vqdiff.export`). Torch-free.

An engine maps *normalised* groups (B, 3, 64, 64) float32 to latents (B, D, 16, 16) float32 and
back. It knows nothing of files, canonicalisation or normalisation; `vqdiff.codec` does that.

Optional attributes beyond the protocol: ``variant`` / ``precision`` (what the numbers were computed
in: "fp32", "int8", "bf16", "fp16") and ``selection`` (set by `vqdiff.export.select` on an engine it
chose: the candidates' measured groups/s and quality-gate results). `engine_info` turns them into
the provenance every latents file records.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

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


def engine_info(engine) -> dict[str, Any]:
    """What made the numbers, as latents record it: ``backend``, ``variant`` (its precision: fp32, int8,
    bf16, fp16) and, for an engine chosen by measurement (`vqdiff.export.select`, mode "auto" or
    "fallback"), ``selection``: the variant, why, and each candidate's groups/s and gate result. An
    engine asked for by name records no ``selection`` (the same engine gives the same provenance)."""
    info: dict[str, Any] = {
        "backend": getattr(engine, "backend", None) or "unknown",
        "variant": getattr(engine, "variant", None) or getattr(engine, "precision", None) or "fp32",
    }
    selection = getattr(engine, "selection", None)
    if isinstance(selection, dict) and selection.get("mode") in ("auto", "fallback"):
        info["selection"] = selection.get("summary") or {"mode": selection["mode"], "reason": selection.get("reason")}
    return info
