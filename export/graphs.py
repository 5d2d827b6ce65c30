"""The two exported graphs as torch modules, and their export with ``torch.onnx``.

``encoder.onnx``  ``groups`` (B, 3, 64, 64) float32 -> ``latents`` (B, D, 16, 16) float32 (the
                  deterministic inference bottleneck inside), ``z`` (B, D, 16, 16) float32 (the
                  pre-bottleneck encoding) and, for kinds with a codebook, ``indices`` (B, 16, 16)
                  int64 (the argmax code per position; ``ae`` / ``vae`` have no such output).
``decoder.onnx``  ``latents`` (B, D, 16, 16) float32 -> ``groups`` (B, 3, 64, 64) float32.

Dynamic batch axis ``batch``, one file each, no external data, opset >= 17. Needs torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vqdiff.bottlenecks import uses_codebook
from vqdiff.geometry import GROUP_SIZE, NUM_POINTS

from .manifest import BATCH_AXIS, DEC_INPUT, DEC_OUTPUT, DECODER, ENC_INPUT, ENC_OUTPUTS, ENCODER
from .onnx_tools import finalise_onnx, graph_io

DEFAULT_OPSET = 18
MIN_OPSET = 17


class EncoderGraph(nn.Module):
    """groups -> (latents, z[, indices]) with the model's own eval-mode bottleneck."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = model.encoder
        self.bottleneck = model.bottleneck
        self.with_indices = uses_codebook(model.config.bottleneck)

    def forward(self, groups: torch.Tensor):
        z = self.encoder(groups)
        out = self.bottleneck(z)
        if self.with_indices:
            return out.latents, z, out.indices
        return out.latents, z


class DecoderGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)


def resolve_exporter(exporter: str = "auto") -> str:
    """``dynamo`` (torch.export based, needs onnxscript) or ``torchscript`` (the legacy tracer)."""
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"unknown exporter {exporter!r}; accepted: 'auto', 'dynamo', 'torchscript'")
    if exporter != "auto":
        return exporter
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return "torchscript"
    return "dynamo"


def _export_one(module: nn.Module, example: torch.Tensor, path: Path, input_name: str,
                output_names: list[str], opset: int, exporter: str) -> None:
    module = module.eval()
    # the dynamo exporter logs one warning per torchvision op it cannot register: noise here
    reg_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = reg_log.level
    reg_log.setLevel(logging.ERROR)
    try:
        _export_call(module, example, path, input_name, output_names, opset, exporter)
    finally:
        reg_log.setLevel(level)


def _export_call(module, example, path, input_name, output_names, opset, exporter) -> None:
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        if exporter == "dynamo":
            batch = torch.export.Dim(BATCH_AXIS, min=1)
            torch.onnx.export(
                module, (example,), str(path), dynamo=True, opset_version=opset, input_names=[input_name],
                output_names=output_names, dynamic_shapes=({0: batch},), external_data=False,
                optimize=True, verbose=False,
            )
        else:
            # the training-only loss terms (dead code at inference) trip shape-check warnings while tracing
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            axes = {n: {0: BATCH_AXIS} for n in [input_name, *output_names]}
            torch.onnx.export(
                module, (example,), str(path), dynamo=False, opset_version=opset, input_names=[input_name],
                output_names=output_names, dynamic_axes=axes, do_constant_folding=True,
            )


def export_graphs(model: nn.Module, out_dir: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                  exporter: str = "auto", metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``encoder.onnx`` and ``decoder.onnx`` of ``model`` (eval mode) into ``out_dir``."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old; use >= {MIN_OPSET}")
    exporter = resolve_exporter(exporter)
    out_dir = Path(out_dir)
    model = model.eval()
    cfg = model.config
    enc = EncoderGraph(model)
    enc_out = list(ENC_OUTPUTS if enc.with_indices else ENC_OUTPUTS[:2])
    x = torch.zeros(2, cfg.in_channels, GROUP_SIZE, NUM_POINTS)
    with torch.no_grad():
        lat = model.encoder(x)
    _export_one(enc, x, out_dir / ENCODER, ENC_INPUT, enc_out, opset, exporter)
    _export_one(DecoderGraph(model), torch.zeros_like(lat), out_dir / DECODER, DEC_INPUT, [DEC_OUTPUT], opset,
                exporter)
    for name in (ENCODER, DECODER):
        finalise_onnx(out_dir / name, {**(metadata or {}), "vqdiff.graph": name.split(".")[0]})
    return {
        "exporter": exporter,
        "encoder": {"file": ENCODER, **graph_io(out_dir / ENCODER)},
        "decoder": {"file": DECODER, **graph_io(out_dir / DECODER)},
        "indices": enc.with_indices,
    }
