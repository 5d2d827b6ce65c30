"""Export and serving runtimes: ONNX export with a parity check, TensorRT engines, and one runtime
interface over TensorRT -> ONNX Runtime CUDA -> ONNX Runtime CPU -> torch.

``vqdiff.export.onnx_export.export_checkpoint``  checkpoint -> export directory (``vqdiff-export``)
``vqdiff.export.runtime.load_engine``            export / checkpoint directory -> Engine
``vqdiff.export.runtime.make_codec``             ... -> `vqdiff.codec.Codec` (auto: ``select_engine``)
``vqdiff.export.select.select_engine``           the fastest variant that passes the quality gate here
``vqdiff.export.tensorrt_build``                 TensorRT engines of an export
``vqdiff.export.quantize``                       int8 CPU variant, kept only when it wins
``vqdiff.export.gate``                           the one quality gate (export --int8 and the selection)
``vqdiff.export.bento_store``                    BentoML model store registration

Modules, each importing only those listed before it (no cycles)::

    manifest          the export directory contract (file names, manifest.json, checks)
    data              real groups for parity, calibration and benchmarks
    gate              the one quality gate (limits, quality, judge, gate data) of export and selection
    layer_policy      which layers run int8 per layer policy; the measured per-layer error budget
    engine_base       BackendUnavailable, the batching base of every engine, the batch buckets
    ort_backend       ONNX Runtime sessions and OrtEngine (torch-free)
    openvino_backend  OpenVinoEngine: the export's graphs on OpenVINO's CPU plugin (optional package)
    torch_backend     TorchBackendEngine (torch; fp32 / bf16 autocast + channels_last)
    torch_cuda        CudaGraphEngine: autocast, channels_last, CUDA graphs, pinned overlapped copies
    tensorrt_runtime  TensorRTEngine and the TensorRT version policy (tensorrt, torch CUDA)
    onnx_tools        check / describe / fp16-convert ONNX files (onnx)
    parity            a backend against torch on real groups
    graphs            encoder / decoder graphs and their torch.onnx export (torch)
    quantize          the int8 CPU variant
    tensorrt_build    TensorRT engine builds, checked by parity
    onnx_export       export_checkpoint: the whole export
    engine_cache      where a selection is kept (key: model x CPU flags x library versions)
    variants          the engine variants (`vqdiff.engine.SPECS`), how each opens, export / int8 artefacts
    select            select_engine: measure, gate, choose, cache; VQDIFF_ENGINE forces a variant
    runtime           backend selection: load_engine, make_codec (torch-free for ONNX Runtime)
    cli_export, bento_store

Submodules are imported lazily (``import vqdiff.export`` loads neither torch nor onnxruntime), and
the ONNX Runtime path (``load_engine(path, backend="ort-cpu")``) never imports torch.
"""

from __future__ import annotations

_LAZY = {
    "export_checkpoint": "vqdiff.export.onnx_export",
    "load_engine": "vqdiff.export.runtime",
    "select_engine": "vqdiff.export.select",
    "make_codec": "vqdiff.export.runtime",
    "BackendUnavailable": "vqdiff.export.runtime",
    "read_manifest": "vqdiff.export.manifest",
    "ExportError": "vqdiff.export.manifest",
    "ParityError": "vqdiff.export.manifest",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vqdiff.export' has no attribute {name!r}")
