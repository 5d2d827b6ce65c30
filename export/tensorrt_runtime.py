"""Run an export's TensorRT plans: `TensorRTEngine`, plus the TensorRT import and version policy.

`TensorRTEngine` deserialises the plans, one execution context per graph, torch CUDA tensors as
buffers, ``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` on a non-default CUDA
stream. It implements the `vqdiff.engine.Engine` protocol like every backend of
`vqdiff.export.runtime`. The plans are built by `vqdiff.export.tensorrt_build`.

Nothing here runs without ``tensorrt`` and a CUDA GPU (torch is imported when an engine is opened);
the tests are marked ``tensorrt``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .engine_base import DEFAULT_BATCH, BackendUnavailable, _GroupEngine
from .manifest import DEC_INPUT, ENC_INPUT, model_info, read_manifest, verify_files


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


def require_cuda(device: str):
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable(f"TensorRT needs a CUDA GPU; torch sees none (device={device!r})")
    return torch.device(device)


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


class PlanPair:
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
                 device: str = "cuda:0", precision: str | None = None, batch_size: int = DEFAULT_BATCH):
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
        dev = require_cuda(device)
        super().__init__(normalisation=Normalisation.from_dict(manifest["normalisation"]),
                         model_info=model_info(manifest), manifest=manifest, batch_size=batch_size)
        self.pair = PlanPair(export_dir, entry, dev)
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
