"""The ONNX Runtime backend (CPU and CUDA): `ort_session` and `OrtEngine`.

torch-free: opening an export with ONNX Runtime imports onnxruntime and numpy only. `ort_session`
is also the session of the export's parity check and of the int8 variant's timings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .engine_base import DEFAULT_BATCH, BackendUnavailable, _GroupEngine
from .manifest import DEC_INPUT, DECODER, ENC_INPUT, ENCODER, model_info, read_manifest

# ONNX Runtime on the CPU runs fastest on small chunks: the activations of a few groups stay in cache
# (measured on the 2-core AVX-512 machine: ~460 groups/s in chunks of 4-8 against ~250 in chunks of 64)
ORT_CPU_BATCH = 8
_LEVELS = ("disable", "basic", "extended", "all")


def ort_session(path: str | os.PathLike, *, device: str = "cpu", threads: int | None = None,
                inter_threads: int | None = None, level: str = "all", spinning: bool | None = None):
    """An `onnxruntime.InferenceSession` on ``device`` ("cpu" or "cuda[:N]"), provider asserted.

    ONNX Runtime silently falls back to the CPU when the CUDA provider cannot be created (it only logs
    a warning); here that raises `BackendUnavailable`. ``spinning`` (busy-waiting intra-op threads)
    defaults to off on the CPU: measured 2x faster at batch 1 on the shared 2-core machine.
    """
    import onnxruntime as ort

    if level not in _LEVELS:
        raise ValueError(f"unknown graph optimisation level {level!r}; accepted: {list(_LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # a chain of convs: no inter-op parallelism to use
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = int(inter_threads or 1)
    if spinning is None and not device.startswith("cuda"):
        spinning = False  # busy-waiting threads only steal CPU from the rest of a (shared) machine
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    if device.startswith("cuda"):
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailable(
                f"ONNX Runtime has no CUDAExecutionProvider here (available: {available}); "
                "install onnxruntime-gpu instead of onnxruntime"
            )
        device_id = int(device.split(":")[1]) if ":" in device else 0
        providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        want = "CUDAExecutionProvider"
    else:
        providers = ["CPUExecutionProvider"]
        want = "CPUExecutionProvider"
    sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    active = sess.get_providers()
    if not active or active[0] != want:
        raise BackendUnavailable(f"asked ONNX Runtime for {want} but the session runs on {active} "
                                 "(the CUDA provider failed to load: check CUDA / cuDNN libraries)")
    return sess


class OrtEngine(_GroupEngine):
    """Runs ``encoder.onnx`` / ``decoder.onnx`` (or a variant) of an export with ONNX Runtime."""

    backend = "onnxruntime"

    def __init__(self, export_dir: str | os.PathLike, manifest: dict[str, Any] | None = None, *,
                 device: str = "cpu", threads: int | None = None, inter_threads: int | None = None,
                 level: str = "all", variant: str | None = None, batch_size: int | None = None,
                 spinning: bool | None = None):
        from vqdiff.normalise import Normalisation

        export_dir = Path(export_dir)
        manifest = manifest if manifest is not None else read_manifest(export_dir)
        cpu = not device.startswith("cuda")
        if batch_size is None:
            batch_size = ORT_CPU_BATCH if cpu else DEFAULT_BATCH
        super().__init__(normalisation=Normalisation.from_dict(manifest["normalisation"]),
                         model_info=model_info(manifest), manifest=manifest, batch_size=batch_size)
        enc_file, dec_file = _variant_files(manifest, variant)
        self.variant = variant or "fp32"
        self.device = device
        self.name = "ort-cuda" if device.startswith("cuda") else "ort-cpu"
        kw = dict(device=device, threads=threads, inter_threads=inter_threads, level=level, spinning=spinning)
        self.encoder = ort_session(export_dir / enc_file, **kw)
        self.decoder = ort_session(export_dir / dec_file, **kw)
        self.provider = self.encoder.get_providers()[0]
        self._enc_outputs = [o.name for o in self.encoder.get_outputs()]
        self.has_indices = "indices" in self._enc_outputs
        # only fetch what is returned: z stays inside the session
        self._fetch = ["latents", "indices"] if self.has_indices else ["latents"]
        self.threads = threads

    def _run_encoder(self, x):
        out = self.encoder.run(self._fetch, {ENC_INPUT: x})
        return out[0], (out[1] if self.has_indices else None)

    def _run_decoder(self, latents):
        return self.decoder.run(None, {DEC_INPUT: latents})[0]

    def encode_full(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every encoder output (``latents``, ``z``, ``indices``) of one batch."""
        x = self._check(x, 4, "groups (B, 3, 64, 64)")
        return dict(zip(self._enc_outputs, self.encoder.run(None, {ENC_INPUT: x}), strict=True))


def _variant_files(manifest: dict[str, Any], variant: str | None) -> tuple[str, str]:
    if variant in (None, "fp32"):
        return ENCODER, DECODER
    entry = manifest.get("variants", {}).get(variant)
    if not entry or not entry.get("kept"):
        kept = ["fp32"] + [k for k, v in manifest.get("variants", {}).items() if v.get("kept")]
        raise BackendUnavailable(f"this export has no kept variant {variant!r}; available: {kept}")
    return entry["encoder"], entry["decoder"]
