"""The OpenVINO backend (CPU plugin): the export's ONNX graphs compiled by OpenVINO (torch-free).

``openvino-fp32`` compiles ``encoder.onnx`` / ``decoder.onnx`` with the inference precision hint
f32; ``openvino-bf16`` with the hint bf16, only where the CPU plugin reports native bf16
(``OPTIMIZATION_CAPABILITIES`` has BF16: AVX512-BF16 or AMX), since elsewhere OpenVINO silently
runs f32 and the variant would be a mislabelled copy of fp32; ``openvino-int8`` compiles the
``int8-safe`` QDQ graphs of the export (`variants.ensure_int8`), which OpenVINO runs as int8.
The package is optional (``pip install vqdiff[openvino]``); without it the variants are
unavailable with that reason. The performance hint is LATENCY (one stream, ``threads`` threads).

Two measured choices (`compile_graph`; docs/engines.md, "AVX512-BF16"): the encoder's ONNX ``ArgMax``
(first index on ties) reaches OpenVINO as ``TopK(k=1, sort=value, stable=True)``, whose stable
value sort took 0.64 of 2.6 ms per group on one AVX512-BF16 core; with k = 1 there is nothing to
sort, so `argmax_without_sort` asks for ``sort=index`` (same element, same tie rule: bit-identical
indices and latents, tested) at 1/17 of the cost. And each graph is compiled twice: with the full
chunk's static shape (``batch_size`` groups: the kernels OpenVINO picks for a static shape, TopK 12x
faster than with a dynamic batch) for full chunks, and with the exported dynamic batch for the rest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .engine_base import BackendUnavailable, _GroupEngine
from .manifest import DEC_INPUT, ENC_INPUT, model_info, read_manifest
from .ort_backend import ORT_CPU_BATCH, _variant_files

OV_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8 comes from the QDQ graph, not the hint


def openvino_core():
    """An `openvino.Core`; `BackendUnavailable` naming the package when it is not installed."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise BackendUnavailable(f"the openvino package is not installed ({exc}); pip install 'vqdiff[openvino]'") \
            from exc
    return ov.Core()


def argmax_without_sort(model) -> int:
    """Turn every ``TopK`` with k = 1 and ``sort=value`` of ``model`` (an ``openvino.Model``; ONNX
    ``ArgMax`` becomes one) into ``sort=index``: one element needs no sort, ties keep the stable rule
    (first index), and OpenVINO's CPU TopK is much faster without the stable value sort. Returns the
    number of nodes changed."""
    changed = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "TopK" or op.get_attributes().get("sort") != "value":
            continue
        k = op.input_value(1).get_node()
        if k.get_type_name() == "Constant" and int(np.asarray(k.get_data()).reshape(-1)[0]) == 1:
            op.set_attribute("sort", "index")
            changed += 1
    return changed


def compile_graph(core, path: Path, config: dict[str, str], static_batch: int | None):
    """(compiled model for ``static_batch`` groups or None, compiled model with the dynamic batch) of
    one ONNX graph, each with `argmax_without_sort` applied."""
    def read():
        model = core.read_model(str(path))
        argmax_without_sort(model)
        return model

    dynamic = core.compile_model(read(), "CPU", config)
    if not static_batch:
        return None, dynamic
    model = read()
    inp = model.inputs[0]
    shape = [static_batch, *[d.get_length() for d in list(inp.get_partial_shape())[1:]]]
    model.reshape({inp.get_any_name(): shape})
    return core.compile_model(model, "CPU", config), dynamic


def cpu_capabilities(core) -> list[str]:
    return [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


class OpenVinoEngine(_GroupEngine):
    """Runs an export's encoder / decoder graphs (or a variant's) with OpenVINO on the CPU."""

    backend = "openvino"
    name = "openvino-cpu"

    def __init__(self, export_dir: str | os.PathLike, manifest: dict[str, Any] | None = None, *,
                 precision: str = "fp32", variant: str | None = None, threads: int | None = None,
                 batch_size: int = ORT_CPU_BATCH):
        from vqdiff.normalise import Normalisation

        if precision not in OV_HINT:
            raise ValueError(f"unknown OpenVINO precision {precision!r}; accepted: {list(OV_HINT)}")
        core = openvino_core()
        caps = cpu_capabilities(core)
        if precision == "bf16" and "BF16" not in caps:
            raise BackendUnavailable(f"OpenVINO's CPU plugin has no native bf16 on this CPU (capabilities {caps}); "
                                     "a bf16 hint would run fp32")
        export_dir = Path(export_dir)
        manifest = manifest if manifest is not None else read_manifest(export_dir)
        super().__init__(normalisation=Normalisation.from_dict(manifest["normalisation"]),
                         model_info=model_info(manifest), manifest=manifest, batch_size=batch_size)
        enc_file, dec_file = _variant_files(manifest, variant)
        config = {"INFERENCE_PRECISION_HINT": OV_HINT[precision], "PERFORMANCE_HINT": "LATENCY",
                  "NUM_STREAMS": "1"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(int(threads))
        enc_static, self.encoder = compile_graph(core, export_dir / enc_file, config, self.batch_size)
        dec_static, self.decoder = compile_graph(core, export_dir / dec_file, config, self.batch_size)
        self._enc_req, self._dec_req = self.encoder.create_infer_request(), self.decoder.create_infer_request()
        self._enc_full = enc_static.create_infer_request() if enc_static is not None else None
        self._dec_full = dec_static.create_infer_request() if dec_static is not None else None
        self._enc_static, self._dec_static = enc_static, dec_static
        outs = [o.get_names() for o in self.encoder.outputs]  # a tensor may carry several names
        self.has_indices = any("indices" in n for n in outs)
        self._lat = next(i for i, n in enumerate(outs) if "latents" in n)
        self._idx = next(i for i, n in enumerate(outs) if "indices" in n) if self.has_indices else None
        self.precision, self.variant, self.threads = precision, variant or precision, threads
        self.provider = f"openvino {core.get_versions('CPU')['CPU'].build_number} CPU ({','.join(caps)})"

    def runtime_precisions(self) -> dict[str, list[str]]:
        """What the plugin really runs: the runtime precision of each convolution of the encoder and the
        decoder graphs, in graph order ("bf16", "f32", "u8"...; from the compiled runtime model). The
        bf16 hint lets the plugin choose per layer (on AVX512-BF16 without AMX it keeps the transposed
        convolutions f32), so the roof of a variant (`benchmarks/_roof.py`) is computed from this."""
        out = {}
        for graph, compiled in (("encoder", self._enc_static or self.encoder),
                                ("decoder", self._dec_static or self.decoder)):
            precs = []
            for op in compiled.get_runtime_model().get_ordered_ops():
                info = op.get_rt_info()
                if "layerType" in info and info["layerType"].astype(str) in ("Convolution", "Deconvolution"):
                    precs.append(info["runtimePrecision"].astype(str).lower())
            out[graph] = precs
        return out

    def _run_encoder(self, x):
        full = len(x) == self.batch_size and self._enc_full is not None
        req, graph = (self._enc_full, self._enc_static) if full else (self._enc_req, self.encoder)
        res = req.infer({ENC_INPUT: x}, share_inputs=True)
        lat = res[graph.outputs[self._lat]].copy()
        return lat, (res[graph.outputs[self._idx]].copy() if self.has_indices else None)

    def _run_decoder(self, latents):
        full = len(latents) == self.batch_size and self._dec_full is not None
        req, graph = (self._dec_full, self._dec_static) if full else (self._dec_req, self.decoder)
        res = req.infer({DEC_INPUT: latents}, share_inputs=True)
        return res[graph.outputs[0]].copy()
