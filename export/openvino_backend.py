"""The OpenVINO backend (CPU plugin): the export's ONNX graphs compiled by OpenVINO (torch-free).

``openvino-fp32`` compiles ``encoder.onnx`` / ``decoder.onnx`` with the inference precision hint
f32; ``openvino-bf16`` with the hint bf16, only where the CPU plugin reports native bf16
(``OPTIMIZATION_CAPABILITIES`` has BF16: AVX512-BF16 or AMX), since elsewhere OpenVINO silently
runs f32 and the variant would be a mislabelled copy of fp32; ``openvino-int8`` compiles the
``int8-safe`` QDQ graphs of the export (`variants.ensure_int8`), which OpenVINO runs as int8.
The package is optional (``pip install vqdiff[openvino]``); without it the variants are
unavailable with that reason. The performance hint is LATENCY (one stream, ``threads`` threads).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
        self.encoder = core.compile_model(str(export_dir / enc_file), "CPU", config)
        self.decoder = core.compile_model(str(export_dir / dec_file), "CPU", config)
        self._enc_req, self._dec_req = self.encoder.create_infer_request(), self.decoder.create_infer_request()
        outs = [o.get_names() for o in self.encoder.outputs]  # a tensor may carry several names
        self.has_indices = any("indices" in n for n in outs)
        self._lat = next(i for i, n in enumerate(outs) if "latents" in n)
        self._idx = next(i for i, n in enumerate(outs) if "indices" in n) if self.has_indices else None
        self.precision, self.variant, self.threads = precision, variant or precision, threads
        self.provider = f"openvino {core.get_versions('CPU')['CPU'].build_number} CPU ({','.join(caps)})"

    def _run_encoder(self, x):
        res = self._enc_req.infer({ENC_INPUT: x}, share_inputs=True)
        lat = res[self.encoder.outputs[self._lat]].copy()
        return lat, (res[self.encoder.outputs[self._idx]].copy() if self.has_indices else None)

    def _run_decoder(self, latents):
        res = self._dec_req.infer({DEC_INPUT: latents}, share_inputs=True)
        return res[self.decoder.outputs[0]].copy()
