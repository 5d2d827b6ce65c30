"""The engine variants a machine may run and how each is opened: one `vqdiff.engine.EngineSpec` each.

The names and specs live in `vqdiff.engine.SPECS` (torch-free: latents record them); this module
adds what a variant needs here: which ones ``auto`` measures per device (`CANDIDATES`), the fp32
reference the gate compares with, the int8 artefacts, and `open_variant`.

=====================  ===========  ======  =========  =========================================================
variant                backend      device  precision  layers in that precision (`vqdiff.engine.LAYER_POLICIES`)
=====================  ===========  ======  =========  =========================================================
``torch-fp32``         torch        CPU     fp32       the checkpoint's model as trained (the CPU reference)
``torch-bf16``         torch        CPU     bf16       all: autocast + channels_last (oneDNN AVX512-BF16 / AMX)
``torch-bf16-trunk``   torch        CPU     bf16       trunk: first / last and bottleneck-side convs fp32
``ort-fp32``           onnxruntime  CPU     fp32       the export's fp32 graphs (parity <= 1e-4 with torch)
``ort-int8``           onnxruntime  CPU     int8       trunk: static QDQ, per-channel, both graphs (`quantize`)
``ort-int8-encoder``   onnxruntime  CPU     int8       encoder trunk only
``ort-int8-decoder``   onnxruntime  CPU     int8       decoder trunk only
``ort-int8-safe``      onnxruntime  CPU     int8       safe: the trunk less the sensitive layers (`layer_policy`)
``openvino-fp32``      openvino     CPU     fp32       the export's fp32 graphs on OpenVINO's CPU plugin
``openvino-bf16``      openvino     CPU     bf16       the same, inference precision hint bf16 (native bf16 only)
``openvino-int8``      openvino     CPU     int8       the ``ort-int8-safe`` QDQ graphs on OpenVINO
``cuda-fp32``          torch        CUDA    fp32       CUDA graphs, TF32 off (the GPU reference)
``cuda-bf16``          torch        CUDA    bf16       all: autocast + channels_last + CUDA graphs (`torch_cuda`)
``cuda-bf16-trunk``    torch        CUDA    bf16       trunk: the CPU policy on the CUDA graph engine
``cuda-fp16``          torch        CUDA    fp16       all
``ort-cuda``           onnxruntime  CUDA    fp32       the export's fp32 graphs on the CUDA provider
``tensorrt-fp32/fp16`` tensorrt     CUDA    fp32/fp16  the export's TensorRT plans (``vqdiff-export --tensorrt``)
=====================  ===========  ======  =========  =========================================================

The gate each reduced-precision variant must pass is `vqdiff.export.gate` (one module, one threshold).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqdiff.engine import SPECS, EngineSpec, engine_spec

from .engine_base import DEFAULT_BATCH, BackendUnavailable, _GroupEngine, cuda_device
from .gate import (  # noqa: F401 (re-exported: the gate's names as they were imported from here)
    CALIB_GROUPS,
    GATE_ENV,
    GATE_FILE,
    GATE_GROUPS,
    MAX_BUAN_CHANGE,
    MAX_MDF_CHANGE_MM,
    GateData,
    gate,
    gate_groups,
    gate_limits,
    template_groups,
)
from .manifest import DECODER, ENCODER, ExportError, file_entry, is_export_dir, read_manifest, write_manifest

log = logging.getLogger(__name__)


# name -> (backend, device kind, precision): the spec table's view kept for callers of the old tuple
VARIANTS: dict[str, tuple[str, str, str]] = {n: (s.backend, s.device, s.precision) for n, s in SPECS.items()}
CANDIDATES = {  # what auto measures, per device kind
    "cpu": ("ort-int8", "ort-int8-safe", "ort-int8-encoder", "ort-int8-decoder", "openvino-int8", "openvino-bf16",
            "openvino-fp32", "ort-fp32", "torch-bf16", "torch-bf16-trunk", "torch-fp32"),
    "cuda": ("tensorrt-fp16", "tensorrt-fp32", "cuda-bf16", "cuda-bf16-trunk", "cuda-fp16", "cuda-fp32", "ort-cuda"),
}
REFERENCE = {"cpu": "torch-fp32", "cuda": "cuda-fp32"}  # the fp32 model the gate compares with
INT8_FILES = {"ort-int8": ("encoder.int8.onnx", "decoder.int8.onnx"),
              "ort-int8-encoder": ("encoder.int8.onnx", DECODER), "ort-int8-decoder": (ENCODER, "decoder.int8.onnx"),
              "ort-int8-safe": ("encoder.int8-safe.onnx", "decoder.int8-safe.onnx")}
# the manifest's variant key of an ONNX variant ("int8", "int8-safe"...): its spec name less the backend
EXPORT_VARIANT = {n: n.split("-", 1)[1] for n in INT8_FILES} | {"openvino-int8": "int8-safe"}


@dataclass
class ModelSource:
    """What a model directory offers: a checkpoint (torch variants) and / or an export (ONNX variants)."""

    path: Path
    checkpoint: Path | None
    export: Path | None
    model_sha256: str


def model_source(path: str | os.PathLike) -> ModelSource:
    path = Path(path)
    if is_export_dir(path):
        m = read_manifest(path)
        ck = Path(m["source"]["checkpoint"])
        ok = (ck / "model.safetensors").is_file() and _weights_sha(ck) == m["model"]["sha256"]
        return ModelSource(path, ck if ok else None, path, m["model"]["sha256"])
    if (path / "model.safetensors").is_file():
        return ModelSource(path, path, None, _weights_sha(path))
    raise BackendUnavailable(f"{path} is neither an export directory (manifest.json) nor a checkpoint "
                             "directory (model.safetensors)")


def _weights_sha(ckpt_dir: Path) -> str:
    from vqdiff.fileio import file_sha256

    return file_sha256(ckpt_dir / "model.safetensors")


# ---------------------------------------------------------------------------------------- artefacts
def ensure_export(src: ModelSource, folder: Path, parity_mm: np.ndarray | None) -> Path:
    """An export directory of the model this cache entry may write into (int8 files go there)."""
    if src.export is not None and os.access(src.export, os.W_OK) and _has_int8(src.export):
        return src.export
    out = folder / "export"
    if (out / "manifest.json").is_file():
        try:
            read_manifest(out)
            return out
        except ExportError as exc:
            log.warning("cached export %s is damaged (%s); rebuilding it", out, exc)
    if out.exists():
        shutil.rmtree(out)
    if src.export is not None:  # copy the model's graphs (a few MB): the int8 files are added beside them
        tmp = folder / ".export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src.export, tmp, ignore=shutil.ignore_patterns("*.plan", "timing.cache"))
        os.replace(tmp, out)
        return out
    if parity_mm is None:
        raise BackendUnavailable("the ONNX variants need an export of the checkpoint, and its parity check needs "
                                 "real groups; none found (set VQDIFF_GATE_DATA or VQDIFF_SHARED_DATA)")
    from .onnx_export import export_checkpoint

    try:  # the TorchScript exporter takes ~2 s here, the dynamo one ~6 s: start-up time matters
        return export_checkpoint(src.checkpoint, out, parity_groups=parity_mm, exporter="torchscript")
    except Exception as exc:  # noqa: BLE001 - an exporter that cannot run here: the other one
        log.info("torchscript export failed (%s); using the default exporter", exc)
        return export_checkpoint(src.checkpoint, out, parity_groups=parity_mm, overwrite=True)


def _has_int8(export_dir: Path) -> bool:
    v = read_manifest(export_dir, verify=False).get("variants", {})
    return all(EXPORT_VARIANT[k] in v for k in INT8_FILES)


def ensure_int8(export_dir: Path, calib_mm: np.ndarray, normalisation) -> None:
    """Static int8 QDQ graphs (`quantize.quantize_graph`, its recipe) calibrated on ``calib_mm``,
    registered as the export's ``int8`` / ``int8-encoder`` / ``int8-decoder`` variants (layer policy
    trunk), and ``int8-safe`` (`layer_policy.INT8_SAFE`; not kept for an architecture it was not
    measured on, with that reason)."""
    import onnx

    from vqdiff.geometry import groups_to_model

    from .layer_policy import int8_nodes
    from .manifest import DEC_INPUT, ENC_INPUT
    from .ort_backend import ort_session
    from .quantize import quantize_graph

    if _has_int8(export_dir):
        return
    manifest = read_manifest(export_dir)
    calib = groups_to_model(normalisation.apply(calib_mm))
    step = min(16, len(calib))
    batches = [calib[s : s + step] for s in range(0, len(calib) - step + 1, step)]
    enc32 = ort_session(export_dir / ENCODER)
    lat_batches = [enc32.run(["latents"], {ENC_INPUT: b})[0] for b in batches]
    data = {"encoder": (ENCODER, batches, ENC_INPUT, "z"), "decoder": (DECODER, lat_batches, DEC_INPUT, None)}
    variants = manifest.setdefault("variants", {})
    for graph, (src, cal, inp, excl) in data.items():
        quantize_graph(export_dir / src, export_dir / f"{graph}.int8.onnx", cal, inp, exclude_from=excl,
                       fp32_edges=True, op_types=["Conv"])
        name = f"{graph}.int8.onnx"
        manifest["files"][name] = file_entry(export_dir / name, f"{graph}-int8", precision="int8")
    common = {"calibration_groups": int(len(calib_mm)), "judged_by": "the engine selection's gate (vqdiff.export.gate)"}
    for variant in ("ort-int8", "ort-int8-encoder", "ort-int8-decoder"):
        enc, dec = INT8_FILES[variant]
        variants[EXPORT_VARIANT[variant]] = {
            "kept": True, "encoder": enc, "decoder": dec, "layers": SPECS[variant].layers, **common,
            "method": "onnxruntime static QDQ, per-channel int8 weights / uint8 activations, minmax, Conv only; "
                      "bottleneck, first and last conv fp32"}
    try:
        for graph, (src, cal, inp, _) in data.items():
            nodes = int8_nodes(onnx.load(str(export_dir / src)), graph)
            name = f"{graph}.int8-safe.onnx"
            quantize_graph(export_dir / src, export_dir / name, cal, inp, op_types=["Conv", "ConvTranspose"],
                           nodes=nodes or ["-"])  # an empty list would quantise every node
            manifest["files"][name] = file_entry(export_dir / name, f"{graph}-int8-safe", precision="int8")
        enc, dec = INT8_FILES["ort-int8-safe"]
        variants["int8-safe"] = {"kept": True, "encoder": enc, "decoder": dec, "layers": "safe", **common,
                                 "method": "onnxruntime static QDQ, per-channel int8 weights / uint8 activations, "
                                           "minmax; only the layers of vqdiff.export.layer_policy.INT8_SAFE"}
    except ValueError as exc:
        variants["int8-safe"] = {"kept": False, "reason": str(exc)}
    write_manifest(export_dir, manifest)


# ---------------------------------------------------------------------------------------- opening
def device_kind(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def open_variant(name: str | EngineSpec, src: ModelSource, export_dir: Path | None, *, device: str = "cpu",
                 threads: int | None = None) -> _GroupEngine:
    """An engine running the spec ``name`` (`vqdiff.engine.SPECS`); `BackendUnavailable` where it cannot run."""
    spec = name if isinstance(name, EngineSpec) else engine_spec(name, what="engine variant")
    name, backend, kind, precision = spec.name, spec.backend, spec.device, spec.precision
    cuda = cuda_device(device)
    if backend == "torch":
        if src.checkpoint is None:
            raise BackendUnavailable(f"{name} needs the model's checkpoint (model.safetensors), which is not here")
        from .torch_backend import TorchBackendEngine, open_torch_engine

        if kind == "cuda":
            engine = open_torch_engine(src.checkpoint, None, cuda, threads, None, precision=precision, graphs=True,
                                       layers=spec.layers)
        else:
            engine = TorchBackendEngine(src.checkpoint, device="cpu", threads=threads, batch_size=DEFAULT_BATCH,
                                        precision=precision, layers=spec.layers)
    else:
        if export_dir is None:
            raise BackendUnavailable(f"{name} needs an export directory (vqdiff-export)")
        if backend == "tensorrt":
            from .tensorrt_runtime import TensorRTEngine

            engine = TensorRTEngine(export_dir, device=cuda, precision=precision)
        elif backend == "openvino":
            from .openvino_backend import OpenVinoEngine

            engine = OpenVinoEngine(export_dir, precision=precision, variant=EXPORT_VARIANT.get(name),
                                    threads=threads)
        else:
            from .ort_backend import OrtEngine

            engine = OrtEngine(export_dir, device=cuda if kind == "cuda" else "cpu", threads=threads,
                               variant=EXPORT_VARIANT.get(name))
    engine.spec = spec
    engine.variant_name = name
    engine.precision = precision
    return engine
