"""The engine variants a machine may run, how each is opened, and the quality gate each must pass.

=====================  ===========  =========  ==========================================================
variant                backend      device     what runs
=====================  ===========  =========  ==========================================================
``torch-fp32``         torch        CPU        the checkpoint's model as trained (the CPU reference)
``torch-bf16``         torch        CPU        bf16 autocast + channels_last (oneDNN AVX-512 BF16 / AMX)
``ort-fp32``           onnxruntime  CPU        the export's fp32 graphs (parity <= 1e-4 with torch)
``ort-int8``           onnxruntime  CPU        int8 static QDQ, both graphs (`quantize`; VNNI kernels)
``ort-int8-encoder``   onnxruntime  CPU        int8 encoder, fp32 decoder
``ort-int8-decoder``   onnxruntime  CPU        fp32 encoder, int8 decoder
``cuda-fp32``          torch        CUDA       CUDA graphs, TF32 off (the GPU reference)
``cuda-bf16``          torch        CUDA       bf16 autocast + channels_last + CUDA graphs (`torch_cuda`)
``cuda-fp16``          torch        CUDA       fp16 autocast + channels_last + CUDA graphs
``ort-cuda``           onnxruntime  CUDA       the export's fp32 graphs on the CUDA provider
``tensorrt-fp32/fp16``  tensorrt    CUDA       the export's TensorRT plans (``vqdiff-export --tensorrt``)
=====================  ===========  =========  ==========================================================

The gate: on held-out real groups (RAS mm), the variant's reconstruction (encode + decode) must
change the mean MDF by at most `MAX_MDF_CHANGE_MM` (0.05 mm) and the mean BUAN (5 mm) by at most
`MAX_BUAN_CHANGE` (0.002) against the fp32 model's (`quantize.quality`, `vqdiff.metrics`).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .engine_base import DEFAULT_BATCH, BackendUnavailable, _GroupEngine, cuda_device
from .manifest import DECODER, ENCODER, ExportError, file_entry, is_export_dir, read_manifest, write_manifest

log = logging.getLogger(__name__)

MAX_MDF_CHANGE_MM = 0.05
MAX_BUAN_CHANGE = 0.002
SYNTHETIC_STRICTNESS = 0.5  # groups from templates stand in for real ones: the gate's limits are halved
GATE_ENV = "VQDIFF_GATE_DATA"  # a folder of tractograms or a .npy of groups (G, 64, 64, 3) in mm
GATE_FILE = "gate_groups.npy"  # optional, in a model or export directory
GATE_GROUPS = 48  # held-out groups each variant is judged (and timed) on
CALIB_GROUPS = 32  # groups the int8 variant is calibrated on (never judged on)

# name -> (backend, device kind, precision)
VARIANTS: dict[str, tuple[str, str, str]] = {
    "torch-fp32": ("torch", "cpu", "fp32"), "torch-bf16": ("torch", "cpu", "bf16"),
    "ort-fp32": ("onnxruntime", "cpu", "fp32"), "ort-int8": ("onnxruntime", "cpu", "int8"),
    "ort-int8-encoder": ("onnxruntime", "cpu", "int8"), "ort-int8-decoder": ("onnxruntime", "cpu", "int8"),
    "cuda-fp32": ("torch", "cuda", "fp32"), "cuda-bf16": ("torch", "cuda", "bf16"),
    "cuda-fp16": ("torch", "cuda", "fp16"), "ort-cuda": ("onnxruntime", "cuda", "fp32"),
    "tensorrt-fp32": ("tensorrt", "cuda", "fp32"), "tensorrt-fp16": ("tensorrt", "cuda", "fp16"),
}
CANDIDATES = {  # what auto measures, per device kind
    "cpu": ("ort-int8", "ort-int8-encoder", "ort-int8-decoder", "ort-fp32", "torch-bf16", "torch-fp32"),
    "cuda": ("tensorrt-fp16", "tensorrt-fp32", "cuda-bf16", "cuda-fp16", "cuda-fp32", "ort-cuda"),
}
REFERENCE = {"cpu": "torch-fp32", "cuda": "cuda-fp32"}  # the fp32 model the gate compares with
INT8_FILES = {"ort-int8": ("encoder.int8.onnx", "decoder.int8.onnx"),
              "ort-int8-encoder": ("encoder.int8.onnx", DECODER), "ort-int8-decoder": (ENCODER, "decoder.int8.onnx")}


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


# ---------------------------------------------------------------------------------------- gate data
class GateData(NamedTuple):
    """Groups to calibrate and gate the variants on, both (G, 64, 64, 3) mm, disjoint."""

    calibration: np.ndarray
    held_out: np.ndarray
    where: str  # where they came from (a path, or what the stand-in groups are)
    synthetic: bool = False  # bundle-like stand-ins from the model's templates, not real groups


def gate_groups(src: ModelSource, gate_data: str | os.PathLike | None = None) -> GateData | None:
    """`GateData`: calibration and held-out groups, where they came from, whether they are synthetic.

    From ``gate_data`` / ``$VQDIFF_GATE_DATA`` (a folder of tractograms or a .npy), else the model's
    ``gate_groups.npy``, else the shared real data (``$VQDIFF_SHARED_DATA/subject01``). None when
    there is none: then only the fp32 reference may run.
    """
    from .data import default_data_dir, load_groups, split_groups

    source = gate_data or os.environ.get(GATE_ENV)
    candidates = [Path(source)] if source else [src.path / GATE_FILE, default_data_dir()]
    for c in candidates:
        if c.is_file() and c.suffix == ".npy":
            groups = np.load(c).astype(np.float32)
        elif c.is_dir():
            try:
                groups = load_groups(c)
            except ExportError:
                continue
        else:
            continue
        if groups.ndim != 4 or groups.shape[1:] != (64, 64, 3) or len(groups) < 2:
            raise ValueError(f"gate data {c}: expected groups (G >= 2, 64, 64, 3) in mm, got {groups.shape}")
        calib, held = split_groups(groups, 0.5, seed=0)
        return GateData(_spread(calib, CALIB_GROUPS), _spread(held, GATE_GROUPS),
                        f"{c} ({len(groups)} groups, half held out)")
    groups = template_groups(src.path, CALIB_GROUPS + GATE_GROUPS)
    if groups is not None:  # no real data here (a user's machine): bundle-like groups from the model's templates
        return GateData(groups[:CALIB_GROUPS], groups[CALIB_GROUPS:], f"synthetic: {len(groups)} groups drawn from "
                        "the model's registration templates (no real data found)", synthetic=True)
    return None


def template_groups(model_dir: Path, n: int, *, seed: int = 0) -> np.ndarray | None:
    """(n, 64, 64, 3) groups in model space built from the model's templates (QuickBundles centroids of
    its training bundles): per group, 64 centroids of one bundle drawn with replacement, resampled to
    64 points, each moved by a random offset (<= 2 mm) and point jitter (0.3 mm), then sorted as the
    codec sorts a group. A stand-in for real groups where none are present; None without templates."""
    from vqdiff.canonical import GROUP_SIZE, orientation_flips, resample, sort_group
    from vqdiff.codec import load_templates

    templates = load_templates(model_dir)
    if templates is None or not templates.names:
        return None
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cents = resample(list(templates.centroids[templates.names[i % len(templates.names)]]))  # (K, 64, 3)
        g = cents[rng.integers(0, len(cents), GROUP_SIZE)]
        g = g + rng.uniform(-2.0, 2.0, (GROUP_SIZE, 1, 3)) + rng.normal(0.0, 0.3, g.shape)
        flips = orientation_flips(g.astype(np.float32))
        g[flips] = g[flips, ::-1]
        out.append(sort_group(g.astype(np.float32)))
    return np.stack(out)


def _spread(groups: np.ndarray, n: int) -> np.ndarray:
    if len(groups) <= n:
        return groups
    return groups[np.unique(np.linspace(0, len(groups) - 1, n).round().astype(int))]


def gate_limits(synthetic: bool) -> tuple[float, float]:
    """(max mean-MDF change in mm, max BUAN change): stricter on ``synthetic`` stand-in groups
    (`GateData.synthetic`), which judge reduced precision a little more leniently than real ones."""
    f = SYNTHETIC_STRICTNESS if synthetic else 1.0
    return MAX_MDF_CHANGE_MM * f, MAX_BUAN_CHANGE * f


def gate(groups_mm: np.ndarray, recon_model: np.ndarray, normalisation, reference: dict | None,
         limits: tuple[float, float] = (MAX_MDF_CHANGE_MM, MAX_BUAN_CHANGE)) -> dict[str, Any]:
    """Quality of a reconstruction (model layout) and, against ``reference`` quality, whether it passes."""
    from .quantize import quality

    q = quality(groups_mm, recon_model, normalisation)
    if reference is None:
        return {**q, "mdf_change_mm": 0.0, "buan_change": 0.0, "passed": True}
    dm, db = q["mean_mdf_mm"] - reference["mean_mdf_mm"], q["buan"] - reference["buan"]
    return {**q, "mdf_change_mm": dm, "buan_change": db,
            "passed": bool(abs(dm) <= limits[0] and abs(db) <= limits[1])}


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
    return all(v.get(k.removeprefix("ort-"), {}).get("kept") for k in INT8_FILES)


def ensure_int8(export_dir: Path, calib_mm: np.ndarray, normalisation) -> None:
    """Static int8 QDQ graphs (`quantize.quantize_graph`, its recipe) calibrated on ``calib_mm``,
    registered as the export's ``int8`` / ``int8-encoder`` / ``int8-decoder`` variants."""
    from vqdiff.geometry import groups_to_model

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
    quantize_graph(export_dir / ENCODER, export_dir / "encoder.int8.onnx", batches, ENC_INPUT, exclude_from="z",
                   fp32_edges=True, op_types=["Conv"])
    quantize_graph(export_dir / DECODER, export_dir / "decoder.int8.onnx", lat_batches, DEC_INPUT,
                   fp32_edges=True, op_types=["Conv"])
    for graph in ("encoder", "decoder"):
        name = f"{graph}.int8.onnx"
        manifest["files"][name] = file_entry(export_dir / name, f"{graph}-int8", precision="int8")
    for variant, (enc, dec) in INT8_FILES.items():
        manifest.setdefault("variants", {})[variant.removeprefix("ort-")] = {
            "kept": True, "encoder": enc, "decoder": dec, "calibration_groups": int(len(calib_mm)),
            "method": "onnxruntime static QDQ, per-channel int8 weights / uint8 activations, minmax, Conv only; "
                      "bottleneck, first and last conv fp32; judged by the engine selection's gate"}
    write_manifest(export_dir, manifest)


# ---------------------------------------------------------------------------------------- opening
def device_kind(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def open_variant(name: str, src: ModelSource, export_dir: Path | None, *, device: str = "cpu",
                 threads: int | None = None) -> _GroupEngine:
    """An engine running variant ``name`` (`VARIANTS`); raises `BackendUnavailable` where it cannot run."""
    if name not in VARIANTS:
        raise ValueError(f"unknown engine variant {name!r}; accepted: {', '.join(VARIANTS)}")
    backend, kind, precision = VARIANTS[name]
    cuda = cuda_device(device)
    if backend == "torch":
        if src.checkpoint is None:
            raise BackendUnavailable(f"{name} needs the model's checkpoint (model.safetensors), which is not here")
        from .torch_backend import TorchBackendEngine, open_torch_engine

        if kind == "cuda":
            engine = open_torch_engine(src.checkpoint, None, cuda, threads, None, precision=precision, graphs=True)
        else:
            engine = TorchBackendEngine(src.checkpoint, device="cpu", threads=threads, batch_size=DEFAULT_BATCH,
                                        precision=precision)
    else:
        if export_dir is None:
            raise BackendUnavailable(f"{name} needs an export directory (vqdiff-export)")
        if backend == "tensorrt":
            from .tensorrt_runtime import TensorRTEngine

            engine = TensorRTEngine(export_dir, device=cuda, precision=precision)
        else:
            from .ort_backend import OrtEngine

            variant = None if name in ("ort-fp32", "ort-cuda") else name.removeprefix("ort-")
            engine = OrtEngine(export_dir, device=cuda if kind == "cuda" else "cpu", threads=threads,
                               variant=variant)
    engine.variant_name = name
    engine.precision = precision
    return engine
