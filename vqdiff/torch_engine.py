"""`TorchEngine`: a `StreamlineAutoencoder` behind the `vqdiff.engine.Engine` interface (imports torch)."""

from __future__ import annotations

import numpy as np
import torch

from .models import StreamlineAutoencoder


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
        return self.encode_with_indices(x)[0]

    @torch.inference_mode()
    def decode_groups(self, latents: np.ndarray) -> np.ndarray:
        return np.concatenate([self.model.decode(b).float().cpu().numpy() for b in self._batches(latents)])

    @torch.inference_mode()
    def code_indices(self, x: np.ndarray) -> np.ndarray | None:
        return self.encode_with_indices(x)[1]

    @torch.inference_mode()
    def encode_with_indices(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        lat, idx = [], []
        for b in self._batches(x):
            out = self.model.encode(b)
            lat.append(out.latents.float().cpu().numpy())
            if out.indices is not None:
                idx.append(out.indices.cpu().numpy())
        return np.concatenate(lat), (np.concatenate(idx) if idx else None)
