"""The group-level engine interface every backend implements (torch: `vqdiff.torch_engine`; ONNX
Runtime, OpenVINO and TensorRT: `vqdiff.export`), and the one name of an engine. Torch-free.

An engine maps *normalised* groups (B, 3, 64, 64) float32 to latents (B, D, 16, 16) float32 and
back. It knows nothing of files, canonicalisation or normalisation; `vqdiff.codec` does that.

`EngineSpec` names an engine: backend, device, precision and layer policy (which layers run in the
reduced precision). `SPECS` is the table of every spec by name (``torch-fp32``, ``ort-int8``...);
the variants table (`vqdiff.export.variants`), ``load_engine``, the selection, ``$VQDIFF_ENGINE``,
the export manifest and the provenance of every latents file (`engine_info`) all use these names.

Optional attributes beyond the protocol: ``spec`` (its `EngineSpec`), ``variant`` / ``precision``
and ``selection`` (set by `vqdiff.export.select` on an engine it chose: the candidates' measured
groups/s and quality-gate results). `engine_info` turns them into the provenance every latents file
records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Engine(Protocol):
    backend: str  # "torch", "onnxruntime", "tensorrt"
    provider: str  # what really runs it, e.g. "cpu", "cuda:0", "CPUExecutionProvider"

    def encode_groups(self, x: np.ndarray) -> np.ndarray: ...  # (B, 3, 64, 64) -> (B, D, 16, 16)

    def decode_groups(self, latents: np.ndarray) -> np.ndarray: ...  # (B, D, 16, 16) -> (B, 3, 64, 64)

    def code_indices(self, x: np.ndarray) -> np.ndarray | None: ...  # (B, 3, 64, 64) -> (B, 16, 16)


ENGINE_ENV = "VQDIFF_ENGINE"  # "auto" or a spec name

# layer policies: which layers run in the spec's precision (the codebook bottleneck is always fp32)
LAYER_POLICIES = {
    "all": "every convolution",
    "trunk": "all but the first convolution, the last (transposed) convolution and the two convolutions "
             "beside the bottleneck (the encoder's last, the decoder's first), which stay fp32",
    "encoder": "the encoder's trunk only (the decoder stays fp32)",
    "decoder": "the decoder's trunk only (the encoder stays fp32)",
    "safe": "the trunk less the layers measured most sensitive (`vqdiff.export.layer_policy.SENSITIVE`)",
}


@dataclass(frozen=True)
class EngineSpec:
    """One engine: ``backend`` (torch, onnxruntime, openvino, tensorrt), ``device`` (cpu, cuda),
    ``precision`` (fp32, bf16, fp16, int8) and ``layers`` (a key of `LAYER_POLICIES`)."""

    name: str
    backend: str
    device: str
    precision: str
    layers: str = "all"

    def __post_init__(self):
        if self.layers not in LAYER_POLICIES:
            raise ValueError(f"unknown layer policy {self.layers!r}; accepted: {', '.join(LAYER_POLICIES)}")
        if self.precision == "fp32" and self.layers != "all":
            raise ValueError(f"{self.name}: an fp32 spec has no layer policy")

    @property
    def variant(self) -> str:
        """What latents have always recorded as ``variant`` (precision, and the graph for one-graph int8)."""
        return _RECORDED_VARIANT.get(self.name, self.precision if self.layers == "all"
                                     else f"{self.precision}-{self.layers}")

    def record(self) -> dict[str, str]:
        """The provenance of latents made by this engine: ``backend``, ``variant`` (as before) and ``engine``."""
        return {"backend": self.backend, "variant": self.variant, "engine": self.name}


def _specs(*rows: tuple[str, ...]) -> dict[str, EngineSpec]:
    return {r[0]: EngineSpec(*r) for r in rows}


SPECS: dict[str, EngineSpec] = _specs(
    ("torch-fp32", "torch", "cpu", "fp32"),
    ("torch-bf16", "torch", "cpu", "bf16"),
    ("torch-bf16-trunk", "torch", "cpu", "bf16", "trunk"),
    ("ort-fp32", "onnxruntime", "cpu", "fp32"),
    ("ort-int8", "onnxruntime", "cpu", "int8", "trunk"),
    ("ort-int8-encoder", "onnxruntime", "cpu", "int8", "encoder"),
    ("ort-int8-decoder", "onnxruntime", "cpu", "int8", "decoder"),
    ("ort-int8-safe", "onnxruntime", "cpu", "int8", "safe"),
    ("openvino-fp32", "openvino", "cpu", "fp32"),
    ("openvino-bf16", "openvino", "cpu", "bf16"),
    ("openvino-int8", "openvino", "cpu", "int8", "safe"),
    ("cuda-fp32", "torch", "cuda", "fp32"),
    ("cuda-bf16", "torch", "cuda", "bf16"),
    ("cuda-bf16-trunk", "torch", "cuda", "bf16", "trunk"),
    ("cuda-fp16", "torch", "cuda", "fp16"),
    ("ort-cuda", "onnxruntime", "cuda", "fp32"),
    ("tensorrt-fp32", "tensorrt", "cuda", "fp32"),
    ("tensorrt-fp16", "tensorrt", "cuda", "fp16"),
)
# variants recorded before specs had names keep their recorded value (existing latents and caches)
_RECORDED_VARIANT = {"ort-int8": "int8", "ort-int8-encoder": "int8-encoder", "ort-int8-decoder": "int8-decoder"}


def engine_spec(name: str, *, what: str = "engine") -> EngineSpec:
    """The spec called ``name``; an unknown name raises ValueError listing every valid one."""
    key = str(name).strip().lower()
    if key not in SPECS:
        raise ValueError(f"unknown {what} {name!r}; accepted: auto, {', '.join(SPECS)}")
    return SPECS[key]


def engine_choice(value: str | None = None) -> str:
    """``value``, else ``$VQDIFF_ENGINE``, else "auto": "auto" or a spec name (ValueError otherwise,
    listing the valid names)."""
    import os

    raw = value if value is not None else os.environ.get(ENGINE_ENV)
    name = (raw or "auto").strip().lower()
    if name == "auto":
        return name
    return engine_spec(name, what=f"engine ({ENGINE_ENV})" if value is None else "engine").name


def spec_from_record(record: dict[str, Any]) -> EngineSpec | None:
    """The spec of an engine provenance record, new (``engine`` name) or old (``backend`` + ``variant``,
    as latents recorded before specs had names: the CPU spec of that backend and variant); None if unknown."""
    if record.get("engine") in SPECS:
        return SPECS[record["engine"]]
    backend, variant = record.get("backend"), record.get("variant")
    for s in SPECS.values():  # the table is ordered CPU first
        if s.backend == backend and s.variant == variant:
            return s
    return None


def spec_of(engine) -> EngineSpec | None:
    """The spec of an engine: its ``spec``, else derived from its backend, device and precision."""
    spec = getattr(engine, "spec", None)
    if isinstance(spec, EngineSpec):
        return spec
    backend = getattr(engine, "backend", None)
    precision = getattr(engine, "precision", None) or getattr(engine, "variant", None) or "fp32"
    device = "cuda" if "cuda" in str(getattr(engine, "provider", "")).lower() else "cpu"
    if backend == "onnxruntime" and device == "cuda":
        return SPECS["ort-cuda"] if precision == "fp32" else None
    for s in SPECS.values():
        if (s.backend, s.device, s.variant) == (backend, device, precision):
            return s
    return None


def encode_with_indices(engine: Engine, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Latents and code indices of ``x``, in one engine run where the engine offers it."""
    if hasattr(engine, "encode_with_indices"):
        return engine.encode_with_indices(x)
    return engine.encode_groups(x), engine.code_indices(x)


def engine_info(engine) -> dict[str, Any]:
    """What made the numbers, as latents record it: ``backend``, ``variant`` (its precision: fp32, int8,
    bf16, fp16, as recorded before specs had names), ``engine`` (its spec name, `SPECS`) and, for an engine chosen by measurement (`vqdiff.export.select`, mode "auto" or
    "fallback"), ``selection``: the variant, why, and each candidate's groups/s and gate result. An
    engine asked for by name records no ``selection`` (the same engine gives the same provenance)."""
    spec = spec_of(engine)
    info: dict[str, Any] = spec.record() if spec is not None else {
        "backend": getattr(engine, "backend", None) or "unknown",
        "variant": getattr(engine, "variant", None) or getattr(engine, "precision", None) or "fp32",
    }
    selection = getattr(engine, "selection", None)
    if isinstance(selection, dict) and selection.get("mode") in ("auto", "fallback"):
        info["selection"] = selection.get("summary") or {"mode": selection["mode"], "reason": selection.get("reason")}
    return info
