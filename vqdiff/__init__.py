"""vqdiff: VQ-Diff, a differentiable VQ-VAE for whole bundles of white-matter streamlines.

Heavy modules are imported lazily so that ``import vqdiff`` stays fast.
"""

from __future__ import annotations

__version__ = "0.2.0"

_LAZY = {
    "Bundle": "vqdiff.bundle",
    "SpatialHeader": "vqdiff.bundle",
    "Codec": "vqdiff.codec",
    "Pipeline": "vqdiff.codec",
    "encode": "vqdiff.codec",
    "decode": "vqdiff.codec",
    "Latents": "vqdiff.latents",
    "Subject": "vqdiff.subject",
    "load_latents": "vqdiff.subject",
    "load_bundle": "vqdiff.io",
    "save_bundle": "vqdiff.io",
    "load_checkpoint": "vqdiff.checkpoint",
    "save_checkpoint": "vqdiff.checkpoint",
    "ModelConfig": "vqdiff.models",
    "StreamlineAutoencoder": "vqdiff.models",
    "Normalisation": "vqdiff.normalise",
    "canonicalise": "vqdiff.canonical",
    "uncanonicalise": "vqdiff.canonical",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vqdiff' has no attribute {name!r}")
