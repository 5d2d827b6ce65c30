"""The Python API: ``encode(bundle) -> Latents`` and ``decode(latents) -> Bundle`` (torch backend).

>>> from vqdiff import Codec, load_bundle
>>> codec = Codec.from_checkpoint("models/default")          # or Codec.default()
>>> lat = codec.encode(load_bundle("IFOF_R.trk"))            # Latents, lat.save("IFOF_R.vqlat")
>>> bundle = codec.decode(lat)                               # same order, direction and space
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .bundle import Bundle, SpatialHeader
from .canonical import canonicalise, uncanonicalise
from .checkpoint import Checkpoint, load_checkpoint
from .engine import Engine, TorchEngine
from .errors import CheckpointError, ModelMismatchError
from .latents import Latents
from .normalise import Normalisation

MODEL_ENV = "VQDIFF_MODEL"


def default_model_dir() -> Path:
    """The model used when none is given: ``$VQDIFF_MODEL`` or the repository's ``models/default``."""
    env = os.environ.get(MODEL_ENV)
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "models" / "default"
    if not path.is_dir():
        raise CheckpointError(
            f"no model at {path}; set {MODEL_ENV} to a checkpoint directory "
            "(model.safetensors + config.json) or train one with `vqdiff-train`"
        )
    return path


def groups_to_model(groups: np.ndarray) -> np.ndarray:
    """(G, S, P, 3) streamline groups -> (G, 3, S, P) model layout (channels = xyz)."""
    return np.ascontiguousarray(np.asarray(groups).transpose(0, 3, 1, 2))


def model_to_groups(x: np.ndarray) -> np.ndarray:
    """(G, 3, S, P) model layout -> (G, S, P, 3)."""
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


class Codec:
    """Bundles in, latents out, and back: canonicalisation + normalisation around an engine.

    Parameters
    ----------
    engine : Engine
        Group-level backend (`vqdiff.engine.TorchEngine`, or an ONNX Runtime / TensorRT engine
        from `vqdiff.export.runtime`).
    normalisation : Normalisation
    model_info : dict
        ``{"id", "kind", "sha256"}`` recorded in every `Latents`; `decode` refuses latents from
        another model.
    """

    def __init__(self, engine: Engine, normalisation: Normalisation, model_info: dict):
        self.engine = engine
        self.normalisation = normalisation
        self.model_info = dict(model_info)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | Checkpoint, *, device: str = "cpu",
                        batch_size: int = 256) -> Codec:
        ckpt = path if isinstance(path, Checkpoint) else load_checkpoint(path)
        info = {"id": ckpt.model_id, "kind": ckpt.model.kind, "sha256": ckpt.model_hash}
        return cls(TorchEngine(ckpt.model, device=device, batch_size=batch_size), ckpt.normalisation, info)

    @classmethod
    def default(cls, **kwargs) -> Codec:
        return cls.from_checkpoint(default_model_dir(), **kwargs)

    @property
    def model_id(self) -> str:
        return self.model_info.get("id", "")

    @property
    def model_hash(self) -> str:
        return self.model_info.get("sha256", "")

    # ------------------------------------------------------------------ group level
    def encode_groups(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Normalised groups (G, 3, 64, 64) -> (latents (G, D, 16, 16), code indices (G, 16, 16) | None)."""
        if hasattr(self.engine, "encode_with_indices"):
            return self.engine.encode_with_indices(x)
        return self.engine.encode_groups(x), self.engine.code_indices(x)

    def decode_groups(self, latents: np.ndarray) -> np.ndarray:
        """Latents (G, D, 16, 16) -> normalised groups (G, 3, 64, 64)."""
        return self.engine.decode_groups(latents)

    # ------------------------------------------------------------------ bundle level
    def encode(self, bundle: Bundle) -> Latents:
        """Canonicalise, normalise and encode a bundle."""
        canon = canonicalise(bundle.streamlines)
        x = groups_to_model(self.normalisation.apply(canon.groups))
        latents, indices = self.encode_groups(x)
        return Latents(
            latents=latents,
            order=canon.order,
            pad_mask=canon.pad_mask,
            flipped=canon.flipped,
            n_points=canon.n_points,
            header=bundle.header,
            model=self.model_info,
            normalisation=self.normalisation.to_dict(),
            source={"format": bundle.source_format, "name": bundle.name},
            indices=indices,
        )

    def decode(self, latents: Latents, *, restore_points: bool = False, strict: bool = True) -> Bundle:
        """Decode latents back to a bundle in the original order, direction and space.

        ``restore_points`` resamples each streamline to its original point count (otherwise 64).
        ``strict`` refuses latents made by another model (compared by weights hash).
        """
        theirs = latents.model.get("sha256")
        if strict and self.model_hash and theirs and theirs != self.model_hash:
            raise ModelMismatchError(
                f"these latents were made by model {latents.model.get('id')!r} ({theirs[:12]}), not by "
                f"{self.model_id!r} ({self.model_hash[:12]}); decode them with that model"
            )
        groups = model_to_groups(self.decode_groups(latents.latents))
        norm = Normalisation.from_dict(latents.normalisation)
        streamlines = uncanonicalise(
            norm.invert(groups),
            latents.order,
            latents.pad_mask,
            latents.flipped,
            n_points=latents.n_points if restore_points else None,
        )
        return Bundle(
            streamlines=streamlines,
            header=latents.header if isinstance(latents.header, SpatialHeader) else SpatialHeader.identity(),
            source_format="memory",
            name=latents.source.get("name", ""),
        )

    def reconstruct(self, bundle: Bundle) -> Bundle:
        return self.decode(self.encode(bundle))


def encode(bundle: Bundle, *, model: str | os.PathLike | Codec | None = None) -> Latents:
    """Encode ``bundle`` with ``model`` (a checkpoint path or a `Codec`; default: the bundled model)."""
    return _codec(model).encode(bundle)


def decode(latents: Latents, *, model: str | os.PathLike | Codec | None = None, **kwargs) -> Bundle:
    """Decode ``latents`` with ``model`` (default: the bundled model)."""
    return _codec(model).decode(latents, **kwargs)


def _codec(model) -> Codec:
    if isinstance(model, Codec):
        return model
    return Codec.default() if model is None else Codec.from_checkpoint(model)
