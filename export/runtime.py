"""One runtime interface over every backend: TensorRT -> ONNX Runtime CUDA -> ONNX Runtime CPU -> torch.

>>> from vqdiff.export.runtime import load_engine, make_codec
>>> engine = load_engine("exports/default")                   # best available backend
>>> engine.backend, engine.provider, engine.name               # ('onnxruntime', 'CPUExecutionProvider', 'ort-cpu')
>>> codec = make_codec("exports/default", backend="ort-cpu")   # a vqdiff.codec.Codec on that engine

Every engine implements `vqdiff.engine.Engine` (``backend``, ``provider``, ``encode_groups``,
``decode_groups``, ``code_indices``) plus ``encode_with_indices`` (latents and indices in one run),
``normalisation`` and ``model_info`` (``{"id", "kind", "sha256"}``, the sha256 being that of the
source checkpoint's weights, so latents made by one backend decode with any other backend of the
same model, torch included).

``path`` is an export directory (with ``manifest.json``) or a checkpoint directory. A checkpoint
directory only has the torch backend (ONNX Runtime and TensorRT need an export: ``vqdiff-export``);
the torch backend of an export directory needs its source checkpoint (recorded in the manifest,
checked by sha256).

This module only selects backends: the ONNX Runtime one (`ort_backend`) is torch-free; the torch
(`torch_backend`) and TensorRT (`tensorrt_runtime`) ones are imported only when tried.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from vqdiff.engine import SPECS

from .engine_base import DEFAULT_BATCH, BackendUnavailable, _GroupEngine, cuda_device
from .manifest import is_export_dir, read_manifest
from .ort_backend import ORT_CPU_BATCH, OrtEngine

__all__ = ["BACKENDS", "DEFAULT_BATCH", "ORT_CPU_BATCH", "BackendUnavailable", "OrtEngine", "load_engine",
           "make_codec"]

log = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "ort-cuda", "ort-cpu", "torch")  # the auto order
_OPTIONS = {"ort": {"level", "variant", "inter_threads", "spinning"}, "tensorrt": {"precision"},
            "torch": {"precision", "channels_last", "graphs", "buckets"}}


def _cuda_device(device: str | None) -> str | None:
    """The CUDA device to try for GPU backends, or None when the caller wants the CPU."""
    d = "cuda" if device is None else str(device)
    if d == "cuda" or d.startswith("cuda:"):
        return cuda_device(d)
    if d == "cpu":
        return None
    raise ValueError(f"unknown device {device!r}; accepted: None, 'cpu', 'cuda', 'cuda:N'")


def _check_options(kwargs: dict) -> None:
    known = set().union(*_OPTIONS.values()) | {"batch_size"}
    unknown = set(kwargs) - known
    if unknown:
        raise ValueError(f"unknown engine option(s) {sorted(unknown)}; accepted: {sorted(known)}")


def _build(name: str, path: Path, manifest: dict | None, device: str | None, threads, kw) -> _GroupEngine:
    batch_size = kw.pop("batch_size", None)
    group = "ort" if name.startswith("ort") else name
    kw = {k: v for k, v in kw.items() if k in _OPTIONS[group]}  # options of the other backends do not apply
    if name == "torch":
        from .torch_backend import open_torch_engine

        return open_torch_engine(path, manifest, device, threads, batch_size, **kw)
    if manifest is None:
        raise BackendUnavailable(
            f"{path} is a checkpoint directory: backend {name!r} needs an export directory "
            "(encoder.onnx, decoder.onnx, manifest.json); create one with `vqdiff-export CHECKPOINT OUT_DIR`"
        )
    if name == "ort-cpu":
        if device is not None and str(device) != "cpu":
            raise ValueError(f"backend 'ort-cpu' runs on the CPU; device {device!r} contradicts it")
        return OrtEngine(path, manifest, device="cpu", threads=threads, batch_size=batch_size, **kw)
    cuda = _cuda_device(device)
    if cuda is None:
        raise BackendUnavailable(f"backend {name!r} needs a CUDA device, but device={device!r}")
    if name == "ort-cuda":
        return OrtEngine(path, manifest, device=cuda, threads=threads, batch_size=batch_size, **kw)
    if name == "tensorrt":
        from .tensorrt_runtime import TensorRTEngine

        return TensorRTEngine(path, manifest, device=cuda, batch_size=batch_size or DEFAULT_BATCH, **kw)
    raise AssertionError(name)


def _auto_order(device: str | None, manifest: dict | None) -> tuple[str, ...]:
    if device is not None and str(device) == "cpu":
        order = ("ort-cpu", "torch")
    elif device is not None and str(device).startswith("cuda"):
        order = ("tensorrt", "ort-cuda", "torch")
    else:
        order = BACKENDS
    return order if manifest is not None else tuple(b for b in order if b == "torch")


def load_engine(path: str | os.PathLike, *, backend: str = "auto", device: str | None = None,
                threads: int | None = None, warmup: bool = True, **kwargs: Any) -> _GroupEngine:
    """Open the best (``backend="auto"``) or the named backend for an export or checkpoint directory.

    Parameters
    ----------
    path : export directory (``manifest.json``; its files are checked against their sha256) or
        checkpoint directory (``model.safetensors`` + ``config.json``; torch only).
    backend : ``"auto"`` (TensorRT -> ORT-CUDA -> ORT-CPU -> torch, first that works), one of
        ``"tensorrt"``, ``"ort-cuda"``, ``"ort-cpu"``, ``"torch"``, or an engine spec name
        (`vqdiff.engine.SPECS`: ``"ort-int8-safe"``, ``"openvino-fp32"``, ``"torch-bf16-trunk"``...),
        opened as the selection opens it (`variants.open_variant`; the backend options do not apply).
    device : None (GPU backends try ``cuda:0``), ``"cpu"`` (CPU backends only), ``"cuda[:N]"``.
    threads : intra-op threads (ONNX Runtime) / torch threads; None keeps the library default.
    warmup : run one group through encoder and decoder before returning.
    kwargs : backend options: ``batch_size`` (groups per run: any number of groups can be passed, the
        engine runs them in chunks of this size; default 8 for ONNX Runtime on the CPU, 256 otherwise);
        ONNX Runtime: ``level`` ("disable", "basic", "extended", "all"; default "all"), ``variant`` (e.g.
        "int8" if the export kept it), ``inter_threads``, ``spinning`` (default off on the CPU);
        TensorRT: ``precision`` ("fp32", "fp16"); torch: ``precision`` ("fp32", "bf16", "fp16" autocast),
        ``channels_last``, and on CUDA ``graphs`` (default True: `torch_cuda.CudaGraphEngine`) and
        ``buckets`` (its captured batch sizes). Options of other backends are ignored.

    Raises
    ------
    ValueError : unknown backend name or contradictory device.
    BackendUnavailable : the named backend (or, for auto, every backend) cannot run here.
    """
    if backend != "auto" and backend not in BACKENDS and backend not in SPECS:
        raise ValueError(f"unknown backend {backend!r}; accepted: 'auto', {', '.join(repr(b) for b in BACKENDS)} "
                         f"or an engine spec name: {', '.join(SPECS)}")
    _check_options(kwargs)
    path = Path(path)
    if not path.is_dir():
        raise BackendUnavailable(f"{path} is not a directory: expected an export or a checkpoint directory")
    manifest = read_manifest(path) if is_export_dir(path) else None
    if manifest is None and not (path / "model.safetensors").is_file():
        raise BackendUnavailable(
            f"{path} is neither an export directory (manifest.json) nor a checkpoint directory (model.safetensors)"
        )
    if backend in SPECS and backend not in BACKENDS:  # a spec name: exactly that engine
        from .variants import model_source, open_variant

        engine = open_variant(backend, model_source(path), path if manifest is not None else None,
                              device=device or SPECS[backend].device, threads=threads)
    elif backend != "auto":
        engine = _build(backend, path, manifest, device, threads, dict(kwargs))
    else:
        reasons = []
        engine = None
        for name in _auto_order(device, manifest):
            if name == "tensorrt" and not (manifest and manifest.get("tensorrt")):
                reasons.append("tensorrt: the export has no TensorRT engines")
                continue
            try:
                engine = _build(name, path, manifest, device, threads, dict(kwargs))
                break
            except (BackendUnavailable, ImportError, OSError, RuntimeError) as e:
                reasons.append(f"{name}: {e}")
                log.info("backend %s unavailable: %s", name, e)
        if engine is None:
            raise BackendUnavailable(f"no backend can run {path}: " + "; ".join(reasons))
        engine.fallback_reasons = reasons
    if warmup:
        engine.warmup()
    log.info("loaded %r", engine)
    return engine


def make_codec(path: str | os.PathLike, *, backend: str = "auto", **kwargs: Any):
    """A `vqdiff.codec.Codec` on the engine batch encoding and the API run (torch-free unless it is torch).

    ``backend="auto"``: the fastest variant that passes the quality gate on this machine, chosen once
    and cached (`vqdiff.export.select.select_engine`; ``$VQDIFF_ENGINE`` forces one); each variant
    runs at the chunk size it was measured with, so ``batch_size`` does not apply. Another
    ``backend``: ``load_engine(path, backend=backend, **kwargs)``.
    """
    from vqdiff.codec import Codec, load_templates
    from vqdiff.quality import poor_limits

    engine = open_engine(path, backend=backend, **kwargs)
    return Codec(engine, engine.normalisation, engine.model_info, load_templates(path), poor_limits(path))


def open_engine(path: str | os.PathLike, *, backend: str = "auto", **kwargs: Any) -> _GroupEngine:
    """The engine batch encoding, the API and the service run: ``backend="auto"``, the variant
    `vqdiff.export.select.select_engine` chose for this machine (``$VQDIFF_ENGINE``: auto or a spec
    name; already run: it is warm); a spec name (`vqdiff.engine.SPECS`), that variant through the
    selection (its artefacts built in the cache, ``mode`` forced); another ``backend``,
    ``load_engine(path, backend=backend, **kwargs)``."""
    if backend == "auto" or (backend in SPECS and backend not in BACKENDS):
        from .select import select_engine

        _check_options({k: v for k, v in kwargs.items() if k not in ("device", "threads", "warmup")})
        return select_engine(path, engine=None if backend == "auto" else backend, device=kwargs.get("device"),
                             threads=kwargs.get("threads"))
    return load_engine(path, backend=backend, **kwargs)
