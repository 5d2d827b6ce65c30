"""TensorRT engines from an export's ONNX graphs, and a runtime that runs them.

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
  The fp16 engine is built from an fp16 ONNX graph (``{encoder,decoder}.fp16.onnx``, converted with
  ``onnxruntime.transformers.float16`` keeping inputs/outputs and the bottleneck nodes in fp32) on a
  network created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``. If that conversion is not
  available the build refuses with a message saying what to install.

Runtime (`TensorRTEngine`): deserialises the plans, one execution context per graph, torch CUDA
tensors as buffers, ``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` on a non-default
CUDA stream. It implements the `vqdiff.engine.Engine` protocol like every backend of
`vqdiff.export.runtime`.

Nothing here runs without ``tensorrt`` and a CUDA GPU; the tests are marked ``tensorrt``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import (
    DEC_INPUT,
    DECODER,
    ENC_INPUT,
    ENCODER,
    ExportError,
    ParityError,
    file_entry,
    model_info,
    read_manifest,
    verify_files,
)
from .runtime import BackendUnavailable, _GroupEngine

log = logging.getLogger(__name__)

PROFILE = {"min": 1, "opt": 64, "max": 512}
TIMING_CACHE = "timing.cache"
PRECISIONS = ("fp32", "fp16")
FP32_ATOL = 1e-3  # TensorRT fp32 (TF32 off) against torch
FP16_ATOL = 5e-2  # fp16 engines: recorded, and dropped (not fatal) above this
_BOTTLENECK_FROM = "z"  # the encoder output whose consumers form the bottleneck


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable(
            "TensorRT is not installed (pip install tensorrt, from NVIDIA's index, with a CUDA GPU)"
        ) from e
    return trt


def tensorrt_version(trt=None) -> tuple[int, ...]:
    trt = trt or import_tensorrt()
    return tuple(int(p) for p in trt.__version__.split(".")[:3] if p.isdigit())


def strongly_typed_only(trt) -> bool:
    """TensorRT >= 11 removed weak typing (``BuilderFlag.FP16`` and friends)."""
    return tensorrt_version(trt)[0] >= 11 or not hasattr(trt.BuilderFlag, "FP16")


def _require_cuda(device: str):
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable(f"TensorRT needs a CUDA GPU; torch sees none (device={device!r})")
    return torch.device(device)


# ----------------------------------------------------------------------------- fp16 ONNX (TensorRT >= 11)
def bottleneck_nodes(model, tensor: str = _BOTTLENECK_FROM) -> list[str]:
    """Names of the ONNX nodes that do not contribute to ``tensor`` (the encoder output ``z``): the
    bottleneck (distances, softmax, argmax) and its codebook branch."""
    producer = {o: n for n in model.graph.node for o in n.output}
    needed, stack = set(), [tensor]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in needed:
            continue
        needed.add(node.name)
        stack.extend(node.input)
    return [n.name for n in model.graph.node if n.name not in needed]


def make_fp16_onnx(src: str | os.PathLike, dst: str | os.PathLike, *, keep_fp32_from: str | None = None) -> Path:
    """Write an fp16 copy of ONNX graph ``src`` with fp32 inputs/outputs.

    Nodes that do not contribute to tensor ``keep_fp32_from`` (the encoder's bottleneck) stay fp32.
    """
    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as e:
        raise ExportError(
            "an fp16 ONNX graph is needed (TensorRT >= 11 builds strongly typed networks only) but "
            "onnxruntime.transformers.float16 is not importable; install onnxruntime (or onnxruntime-gpu) "
            "or convert the graph with NVIDIA ModelOpt AutoCast"
        ) from e
    model = onnx.load(str(src))
    block = bottleneck_nodes(model, keep_fp32_from) if keep_fp32_from else []
    fp16 = convert_float_to_float16(model, keep_io_types=True, node_block_list=block)
    _topological_sort(fp16.graph)  # the converter appends its input casts at the end
    onnx.checker.check_model(fp16)
    onnx.save(fp16, str(dst))
    return Path(dst)


def _topological_sort(graph) -> None:
    """Reorder ``graph.node`` in place so that every node follows the producers of its inputs."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"graph has a cycle or a missing input near node {rest[0].name!r}")
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered, strict=True):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


# ----------------------------------------------------------------------------- build
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

    from .onnx_export import run_parity

    trt = import_tensorrt()
    dev = _require_cuda(device)
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
        entry: dict[str, Any] = {}
        for graph, onnx_name, input_name in (("encoder", ENCODER, ENC_INPUT), ("decoder", DECODER, DEC_INPUT)):
            src = export_dir / onnx_name
            if precision == "fp16" and strongly:
                fp16_name = onnx_name.replace(".onnx", ".fp16.onnx")
                make_fp16_onnx(src, export_dir / fp16_name,
                               keep_fp32_from=_BOTTLENECK_FROM if graph == "encoder" else None)
                manifest["files"][fp16_name] = file_entry(export_dir / fp16_name, f"{graph}-onnx-fp16",
                                                          precision="fp16")
                src = export_dir / fp16_name
            plan_name = f"{graph}.{precision}.plan"
            build = build_engine(src, export_dir / plan_name, input_name=input_name, precision=precision,
                                 profile=profile, timing_cache=cache, workspace_bytes=workspace_bytes,
                                 keep_fp32_from=_BOTTLENECK_FROM if graph == "encoder" else None,
                                 strongly_typed=strongly)
            manifest["files"][plan_name] = file_entry(export_dir / plan_name, f"{graph}-tensorrt",
                                                      precision=precision)
            entry[graph] = plan_name
            entry[f"{graph}_build"] = build
        info["plans"][precision] = entry
        if model is not None and x is not None:
            runner = _PlanPair(export_dir, entry, dev)
            atol = fp32_atol if precision == "fp32" else fp16_atol
            report = run_parity(model, None, None, x, atol=atol, ref=ref, run_encoder=runner.encode_full,
                                run_decoder=runner.decode, label=f"tensorrt-{precision}")
            if precision == "fp16":
                report["checks"]["indices"] = True  # fp16 may flip near-ties: reported, not gated
                report["passed"] = all(report["checks"].values())
            entry["parity"] = report
            entry["kept"] = report["passed"]
            if precision == "fp32" and not report["passed"]:
                from .onnx_export import _failure_message

                raise ParityError(_failure_message(report), report)
        else:
            entry["kept"] = True
    manifest["files"][TIMING_CACHE] = file_entry(cache, "tensorrt-timing-cache")
    manifest["tensorrt"] = info
    return info


# ----------------------------------------------------------------------------- runtime
def _torch_dtype(trt, dtype):
    import torch

    table = {}
    for name, tdt in (("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16),
                      ("INT32", torch.int32), ("INT64", torch.int64), ("INT8", torch.int8),
                      ("UINT8", torch.uint8), ("BOOL", torch.bool)):
        if hasattr(trt.DataType, name):  # not every type exists in every TensorRT version
            table[getattr(trt.DataType, name)] = tdt
    try:
        return table[dtype]
    except KeyError:
        raise BackendUnavailable(f"unsupported TensorRT tensor type {dtype}") from None


class TrtGraph:
    """One deserialised engine + execution context; runs on the given CUDA stream."""

    def __init__(self, runtime, plan: bytes, device):
        trt = import_tensorrt()
        self.trt = trt
        self.device = device
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendUnavailable("TensorRT could not deserialise the plan (built by another TensorRT "
                                     "version or for another GPU?); rebuild it with vqdiff-export --tensorrt")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2][0])

    def run(self, feeds: dict, stream) -> dict:
        """``feeds``: name -> CUDA tensor. Returns name -> CUDA tensor (valid once ``stream`` is synced)."""
        import torch

        keep = {}
        for name in self.inputs:
            t = feeds[name].to(self.device, self.dtypes[name]).contiguous()
            keep[name] = t
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"TensorRT refused input shape {tuple(t.shape)} for {name!r} "
                                 f"(profile batch range 1..{self.max_batch})")
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            t = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, t.data_ptr())
            outs[name] = t
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        self._keep = keep  # inputs must outlive the asynchronous run
        return outs


class _PlanPair:
    """Encoder + decoder plans on one device and stream (used by the engine and by the build check)."""

    def __init__(self, export_dir: Path, entry: dict[str, str], device):
        import torch

        trt = import_tensorrt()
        self.device = device
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with torch.cuda.device(device):
            self.stream = torch.cuda.Stream(device=device)  # non-default stream
            self.enc = TrtGraph(self.runtime, (export_dir / entry["encoder"]).read_bytes(), device)
            self.dec = TrtGraph(self.runtime, (export_dir / entry["decoder"]).read_bytes(), device)
        self.max_batch = min(self.enc.max_batch, self.dec.max_batch)

    def _host(self, outs: dict) -> dict[str, np.ndarray]:
        res = {k: v.to("cpu", non_blocking=False) for k, v in outs.items()}
        return {k: v.numpy() for k, v in res.items()}

    def encode_torch(self, x):
        import torch

        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            outs = self.enc.run({ENC_INPUT: x}, self.stream)
        return outs

    def encode_full(self, x: np.ndarray):
        import torch

        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            xt = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device, non_blocking=True)
            outs = self.enc.run({ENC_INPUT: xt}, self.stream)
            res = {k: v.float() if v.is_floating_point() else v.long() for k, v in outs.items()}
            host = self._host(res)
            self.stream.synchronize()
        return host["latents"], host["z"], host.get("indices")

    def decode(self, latents: np.ndarray) -> np.ndarray:
        import torch

        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            lt = torch.from_numpy(np.ascontiguousarray(latents, np.float32)).to(self.device, non_blocking=True)
            outs = self.dec.run({DEC_INPUT: lt}, self.stream)
            host = self._host({k: v.float() for k, v in outs.items()})
            self.stream.synchronize()
        return next(iter(host.values()))


class TensorRTEngine(_GroupEngine):
    """The `vqdiff.engine.Engine` of an export's TensorRT plans."""

    backend = "tensorrt"
    name = "tensorrt"

    def __init__(self, export_dir: str | os.PathLike, manifest: dict[str, Any] | None = None, *,
                 device: str = "cuda:0", precision: str | None = None, batch_size: int = 256):
        from vqdiff.normalise import Normalisation

        export_dir = Path(export_dir)
        manifest = manifest if manifest is not None else read_manifest(export_dir)
        info = manifest.get("tensorrt")
        if not info:
            raise BackendUnavailable(f"{export_dir} has no TensorRT engines; export with --tensorrt on a GPU machine")
        trt = import_tensorrt()
        if info["version"] != trt.__version__:
            raise BackendUnavailable(f"the plans were built with TensorRT {info['version']}, this is "
                                     f"{trt.__version__}; rebuild them (vqdiff-export --tensorrt)")
        precision = precision or info.get("default_precision", "fp32")
        entry = info["plans"].get(precision)
        if not entry or not entry.get("kept", True):
            raise BackendUnavailable(f"no kept TensorRT {precision} engine in {export_dir}; "
                                     f"available: {[p for p, e in info['plans'].items() if e.get('kept', True)]}")
        verify_files(export_dir, manifest, [entry["encoder"], entry["decoder"]])
        dev = _require_cuda(device)
        super().__init__(normalisation=Normalisation.from_dict(manifest["normalisation"]),
                         model_info=model_info(manifest), manifest=manifest, batch_size=batch_size)
        self.pair = _PlanPair(export_dir, entry, dev)
        self.batch_size = min(self.batch_size, self.pair.max_batch)
        self.precision = precision
        self.provider = str(dev)
        self.has_indices = "indices" in self.pair.enc.outputs

    def _run_encoder(self, x):
        lat, _, idx = self.pair.encode_full(x)
        return lat, idx

    def _run_decoder(self, latents):
        return self.pair.decode(latents)

    def encode_torch(self, x):
        """GPU in, GPU out: (B, 3, 64, 64) CUDA tensor -> dict of CUDA tensors (no host copies)."""
        outs = self.pair.encode_torch(x)
        self.pair.stream.synchronize()
        return outs
