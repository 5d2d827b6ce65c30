"""`TorchEngine`: a `StreamlineAutoencoder` behind the `vqdiff.engine.Engine` interface (imports torch).

``precision`` "fp32" (default: the model as trained, bit for bit), "bf16" or "fp16" runs the encoder
and the decoder under autocast; the bottleneck (codebook distances, softmax, argmax) always runs in
fp32 on fp32 ``z``, so the codes are chosen at full precision. ``channels_last`` stores weights and
activations NHWC (oneDNN's and cuDNN's preferred layout for these convolutions). Outputs are fp32.

``layers`` is the layer policy (`vqdiff.engine.LAYER_POLICIES`): "all" runs every convolution in
``precision``; "trunk" keeps the first convolution, the last transposed convolution and the two
convolutions beside the bottleneck in fp32 (`edge_layers`), each wrapped in an fp32 `Island`. The
CUDA graph engine runs the same `TorchEngine`, so the same policy. `layer_names` / `with_islands`
also serve the per-layer error budget (one layer in reduced precision at a time).
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch

from .models import StreamlineAutoencoder

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TORCH_LAYERS = ("all", "trunk")  # the layer policies the torch engines run


class Island(torch.nn.Module):
    """``inner`` run under its own autocast: ``dtype`` None = fp32 (autocast off, input cast to fp32),
    else autocast to ``dtype``; the output is fp32 either way (the next layer casts as it needs)."""

    def __init__(self, inner: torch.nn.Module, dtype: torch.dtype | None):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            out = self.inner(x.float() if self.dtype is None else x)
        return out.float()


def layer_names(model: StreamlineAutoencoder) -> list[str]:
    """Every convolution of the encoder and the decoder, in the order they run (qualified names)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)
            and n.startswith(("encoder.", "decoder."))]


def edge_layers(model: StreamlineAutoencoder) -> list[str]:
    """The layers the "trunk" policy keeps fp32: the encoder's first and last convolutions (input,
    bottleneck side) and the decoder's first and last (bottleneck side, output)."""
    names = layer_names(model)
    enc = [n for n in names if n.startswith("encoder.")]
    dec = [n for n in names if n.startswith("decoder.")]
    return [enc[0], enc[-1], dec[0], dec[-1]]


def with_islands(model: StreamlineAutoencoder, names, dtype: torch.dtype | None) -> StreamlineAutoencoder:
    """``model`` with each layer of ``names`` wrapped in an `Island` of ``dtype`` (in place)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Island(getattr(parent, child), dtype))
    return model


class TorchEngine:
    """Runs a `StreamlineAutoencoder` in eval mode with torch, ``batch_size`` groups per call."""

    backend = "torch"

    def __init__(self, model: StreamlineAutoencoder, *, device: str | torch.device = "cpu", batch_size: int = 256,
                 precision: str = "fp32", channels_last: bool = False, layers: str = "all"):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; accepted: {list(PRECISIONS)}")
        if layers not in TORCH_LAYERS or (layers != "all" and precision == "fp32"):
            raise ValueError(f"unknown torch layer policy {layers!r} for {precision}; accepted: "
                             f"{list(TORCH_LAYERS)} (a policy only with a reduced precision)")
        self.device = torch.device(device)
        if layers == "trunk":
            model = with_islands(copy.deepcopy(model), edge_layers(model), None)
        self.layers = layers
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.provider = str(self.device)
        self.precision = precision
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._plain = precision == "fp32" and not self.channels_last  # the trained model's own calls
        self.autocast_cache = True  # False while CUDA graphs are captured (cached casts must not leak)

    def _batches(self, arr: np.ndarray):
        for start in range(0, len(arr), self.batch_size):
            yield torch.from_numpy(np.ascontiguousarray(arr[start : start + self.batch_size], np.float32)).to(
                self.device)

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype, cache_enabled=self.autocast_cache)

    def _layout(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    def encode_batch(self, b: torch.Tensor):
        """One batch on the device -> the bottleneck output (fp32 latents, indices or None)."""
        if self._plain:
            return self.model.encode(b)
        with self._autocast():
            z = self.model.encoder(self._layout(b))
        return self.model.bottleneck(z.float())  # codes chosen in fp32

    def decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        """One batch of latents on the device -> groups (fp32, NCHW)."""
        if self._plain:
            return self.model.decode(latents)
        with self._autocast():
            out = self.model.decoder(self._layout(latents))
        return out.float().contiguous()

    @torch.inference_mode()
    def encode_groups(self, x: np.ndarray) -> np.ndarray:
        return self.encode_with_indices(x)[0]

    @torch.inference_mode()
    def decode_groups(self, latents: np.ndarray) -> np.ndarray:
        return np.concatenate([self.decode_batch(b).float().cpu().numpy() for b in self._batches(latents)])

    @torch.inference_mode()
    def code_indices(self, x: np.ndarray) -> np.ndarray | None:
        return self.encode_with_indices(x)[1]

    @torch.inference_mode()
    def encode_with_indices(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        lat, idx = [], []
        for b in self._batches(x):
            out = self.encode_batch(b)
            lat.append(out.latents.float().cpu().numpy())
            if out.indices is not None:
                idx.append(out.indices.cpu().numpy())
        return np.concatenate(lat), (np.concatenate(idx) if idx else None)
