"""Group-level engines: the one interface every backend implements (torch here; ONNX Runtime and
TensorRT in `vqdiff.export.runtime`).

An engine maps *normalised* groups (B, 3, 64, 64) float32 to latents (B, 64, 16, 16) float32 and
back. It knows nothing of files, canonicalisation or normalisation; `vqdiff.api.Codec` does that.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .models import StreamlineAutoencoder


@runtime_checkable
class Engine(Protocol):
    backend: str  # "torch", "onnxruntime", "tensorrt"
    provider: str  # what really runs it, e.g. "cpu", "cuda:0", "CPUExecutionProvider"

    def encode_groups(self, x: np.ndarray) -> np.ndarray: ...  # (B, 3, 64, 64) -> (B, D, 16, 16)

    def decode_groups(self, latents: np.ndarray) -> np.ndarray: ...  # (B, D, 16, 16) -> (B, 3, 64, 64)

    def code_indices(self, x: np.ndarray) -> np.ndarray | None: ...  # (B, 3, 64, 64) -> (B, 16, 16)


class TorchEngine:
    """Runs a `StreamlineAutoencoder` in eval mode with torch, ``batch_size`` groups per call."""

    backend = "torch"

    def __init__(self, model: StreamlineAutoencoder, *, device: str | torch.device = "cpu", batch_size: int = 256):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.provider = str(self.device)

    def _batches(self, arr: np.ndarray):
        for start in range(0, len(arr), self.batch_size):
            yield torch.from_numpy(np.ascontiguousarray(arr[start : start + self.batch_size], np.float32)).to(
                self.device)

    @torch.inference_mode()
    def encode_groups(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([self.model.encode(b).latents.float().cpu().numpy() for b in self._batches(x)])

    @torch.inference_mode()
    def decode_groups(self, latents: np.ndarray) -> np.ndarray:
        return np.concatenate([self.model.decode(b).float().cpu().numpy() for b in self._batches(latents)])

    @torch.inference_mode()
    def code_indices(self, x: np.ndarray) -> np.ndarray | None:
        out = [self.model.encode(b).indices for b in self._batches(x)]
        return None if out[0] is None else np.concatenate([i.cpu().numpy() for i in out])

    @torch.inference_mode()
    def encode_with_indices(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        lat, idx = [], []
        for b in self._batches(x):
            out = self.model.encode(b)
            lat.append(out.latents.float().cpu().numpy())
            if out.indices is not None:
                idx.append(out.indices.cpu().numpy())
        return np.concatenate(lat), (np.concatenate(idx) if idx else None)
