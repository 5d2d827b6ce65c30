"""Export and serving runtimes: ONNX export with a parity check, TensorRT engines, and one runtime
interface over TensorRT -> ONNX Runtime CUDA -> ONNX Runtime CPU -> torch.

``vqdiff.export.onnx_export.export_checkpoint``  checkpoint -> export directory (``vqdiff-export``)
``vqdiff.export.runtime.load_engine``            export / checkpoint directory -> Engine
``vqdiff.export.runtime.make_codec``             ... -> `vqdiff.api.Codec`
``vqdiff.export.tensorrt``                       TensorRT build and runtime
``vqdiff.export.quantize``                       int8 CPU variant, kept only when it wins
``vqdiff.export.bento_store``                    BentoML model store registration

Submodules are imported lazily (``import vqdiff.export`` loads neither torch nor onnxruntime).
"""

from __future__ import annotations

_LAZY = {
    "export_checkpoint": "vqdiff.export.onnx_export",
    "load_engine": "vqdiff.export.runtime",
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
