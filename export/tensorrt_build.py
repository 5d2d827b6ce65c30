"""TensorRT engines from an export's ONNX graphs, checked against torch and recorded in the manifest.

Build (``vqdiff-export CKPT OUT --tensorrt`` or `add_tensorrt_engines`): one optimisation profile over
the batch axis (min 1, opt 64, max 512 by default), an fp32 engine (TF32 off, so that it matches
torch) and an fp16 engine per graph, a shared timing cache (``timing.cache``, reused when it exists);
serialised to ``{encoder,decoder}.{fp32,fp16}.plan`` and recorded in the manifest with the TensorRT
version, GPU and a parity report against torch on the export's real groups.

Precision:

* TensorRT 10 (weakly typed networks; ``BuilderFlag.FP16`` exists): the fp16 engine is built from the
  fp32 ONNX graph with ``BuilderFlag.FP16``; the bottleneck (distances to the codebook, softmax,
  argmax, the codebook: every layer that does not compute the encoder output ``z``) is pinned to fp32 with layer precision
  constraints (``OBEY_PRECISION_CONSTRAINTS``), because fp16 distances of magnitude ~1e2 lose the
  resolution the soft assignment needs.
* TensorRT >= 11 (strongly typed only; no ``BuilderFlag.FP16``): precision must live in the graph.
  The fp16 engine is built from an fp16 ONNX graph (``{encoder,decoder}.fp16.onnx``, converted by
  `vqdiff.export.onnx_tools.make_fp16_onnx` keeping inputs/outputs and the bottleneck nodes in fp32)
  on a network created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``. If that conversion is
  not available the build refuses with a message saying what to install.

The plans run with `vqdiff.export.tensorrt_runtime.TensorRTEngine`. Nothing here runs without
``tensorrt`` and a CUDA GPU; the tests are marked ``tensorrt``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import DEC_INPUT, DECODER, ENC_INPUT, ENCODER, ExportError, ParityError, file_entry
from .onnx_tools import BOTTLENECK_FROM, make_fp16_onnx
from .parity import failure_message, run_parity
from .tensorrt_runtime import PlanPair, import_tensorrt, require_cuda, strongly_typed_only

PROFILE = {"min": 1, "opt": 64, "max": 512}
TIMING_CACHE = "timing.cache"
PRECISIONS = ("fp32", "fp16")
FP32_ATOL = 1e-3  # TensorRT fp32 (TF32 off) against torch
FP16_ATOL = 5e-2  # fp16 engines: recorded, and dropped (not fatal) above this


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, *, input_name: str,
                 precision: str = "fp32", profile: dict[str, int] | None = None,
                 timing_cache: str | os.PathLike | None = None, workspace_bytes: int = 2 << 30,
                 keep_fp32_from: str | None = None, strongly_typed: bool | None = None) -> dict[str, Any]:
    """Build and serialise one engine. ``onnx_path`` must already be fp16 for strongly typed fp16 builds."""
    trt = import_tensorrt()
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; accepted: {list(PRECISIONS)}")
    profile = {**PROFILE, **(profile or {})}
    strongly = strongly_typed_only(trt) if strongly_typed is None else strongly_typed
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as f:
        if not parser.parse(f.read()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: parity with torch / ORT
    opt_profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    if inp.name != input_name:
        raise ExportError(f"{onnx_path}: first input is {inp.name!r}, expected {input_name!r}")
    tail = tuple(inp.shape)[1:]
    opt_profile.set_shape(input_name, (profile["min"], *tail), (profile["opt"], *tail), (profile["max"], *tail))
    config.add_optimization_profile(opt_profile)

    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    pinned = 0
    if precision == "fp16" and not strongly:
        config.set_flag(trt.BuilderFlag.FP16)
        if keep_fp32_from:
            pinned = _pin_fp32(trt, network, keep_fp32_from)
            if pinned:
                config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    with open(plan_path, "wb") as f:
        f.write(memoryview(plan))
    if timing_cache:
        with open(timing_cache, "wb") as f:
            f.write(memoryview(config.get_timing_cache().serialize()))
    return {"precision": precision, "strongly_typed": strongly, "fp32_pinned_layers": pinned,
            "profile": profile}


def _pin_fp32(trt, network, tensor: str) -> int:
    """Constrain every float layer that does not contribute to network tensor ``tensor`` (the encoder
    output ``z``) to fp32: the bottleneck and its codebook constants. Returns how many were pinned."""
    producer = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = i
    needed, stack = set(), [tensor]
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in needed:
            continue
        needed.add(i)
        layer = network.get_layer(i)
        stack.extend(layer.get_input(k).name for k in range(layer.num_inputs) if layer.get_input(k) is not None)
    floats = (trt.DataType.FLOAT, trt.DataType.HALF)
    pinned = 0
    for i in range(network.num_layers):
        if i in needed:
            continue
        layer = network.get_layer(i)
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if outs and all(t.dtype in floats for t in outs):
            layer.precision = trt.DataType.FLOAT
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.DataType.FLOAT)
            pinned += 1
    return pinned


def _build_precision(export_dir: Path, manifest: dict[str, Any], precision: str, strongly: bool,
                     profile: dict[str, int], cache: Path, workspace_bytes: int) -> dict[str, Any]:
    """The encoder and decoder plans of one precision (and, strongly typed fp16, their fp16 graphs)."""
    entry: dict[str, Any] = {}
    for graph, onnx_name, input_name in (("encoder", ENCODER, ENC_INPUT), ("decoder", DECODER, DEC_INPUT)):
        src = export_dir / onnx_name
        keep = BOTTLENECK_FROM if graph == "encoder" else None
        if precision == "fp16" and strongly:
            fp16_name = onnx_name.replace(".onnx", ".fp16.onnx")
            make_fp16_onnx(src, export_dir / fp16_name, keep_fp32_from=keep)
            manifest["files"][fp16_name] = file_entry(export_dir / fp16_name, f"{graph}-onnx-fp16",
                                                      precision="fp16")
            src = export_dir / fp16_name
        plan_name = f"{graph}.{precision}.plan"
        build = build_engine(src, export_dir / plan_name, input_name=input_name, precision=precision,
                             profile=profile, timing_cache=cache, workspace_bytes=workspace_bytes,
                             keep_fp32_from=keep, strongly_typed=strongly)
        manifest["files"][plan_name] = file_entry(export_dir / plan_name, f"{graph}-tensorrt", precision=precision)
        entry[graph] = plan_name
        entry[f"{graph}_build"] = build
    return entry


def add_tensorrt_engines(export_dir: str | os.PathLike, manifest: dict[str, Any], *, model=None,
                         x: np.ndarray | None = None, ref: dict | None = None,
                         precisions=PRECISIONS, profile: dict[str, int] | None = None, device: str = "cuda:0",
                         timing_cache: str | os.PathLike | None = None, workspace_bytes: int = 2 << 30,
                         fp32_atol: float = FP32_ATOL, fp16_atol: float = FP16_ATOL) -> dict[str, Any]:
    """Build the engines of an export (in place), check them against torch, record them in ``manifest``.

    ``timing_cache`` is a cache file to start from (copied into the export as ``timing.cache``).
    ``model``/``x``/``ref`` (torch model, normalised parity groups, `torch_reference` of them) are
    those of the ONNX parity check; without them only the build is done and recorded.
    """
    import shutil

    import torch

    trt = import_tensorrt()
    dev = require_cuda(device)
    export_dir = Path(export_dir)
    strongly = strongly_typed_only(trt)
    cache = export_dir / TIMING_CACHE
    if timing_cache and Path(timing_cache).is_file():
        shutil.copyfile(timing_cache, cache)
    profile = {**PROFILE, **(profile or {})}
    props = torch.cuda.get_device_properties(dev)
    info: dict[str, Any] = {
        "version": trt.__version__,
        "strongly_typed": strongly,
        "fp16_method": (
            "fp16 ONNX graph (onnxruntime.transformers.float16; bottleneck and I/O fp32), strongly typed network"
            if strongly else "BuilderFlag.FP16 on the fp32 graph; bottleneck layers pinned to fp32"
        ),
        "device": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "profile": profile,
        "timing_cache": TIMING_CACHE,
        "plans": {},
        "default_precision": "fp32",
    }
    for precision in precisions:
        entry = _build_precision(export_dir, manifest, precision, strongly, profile, cache, workspace_bytes)
        info["plans"][precision] = entry
        if model is not None and x is not None:
            runner = PlanPair(export_dir, entry, dev)
            atol = fp32_atol if precision == "fp32" else fp16_atol
            report = run_parity(model, None, None, x, atol=atol, ref=ref, run_encoder=runner.encode_full,
                                run_decoder=runner.decode, label=f"tensorrt-{precision}")
            if precision == "fp16":
                report["checks"]["indices"] = True  # fp16 may flip near-ties: reported, not gated
                report["passed"] = all(report["checks"].values())
            entry["parity"] = report
            entry["kept"] = report["passed"]
            if precision == "fp32" and not report["passed"]:
                raise ParityError(failure_message(report), report)
        else:
            entry["kept"] = True
    manifest["files"][TIMING_CACHE] = file_entry(cache, "tensorrt-timing-cache")
    manifest["tensorrt"] = info
    return info
