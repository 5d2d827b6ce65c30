"""The codec core: every encode and decode of vqdiff runs these steps, and only these (torch-free).

>>> from vqdiff import Codec
>>> codec = Codec.default()                                   # $VQDIFF_MODEL or models/default (torch)
>>> lat = codec.encode_file("IFOF_R.trk")                     # Latents; lat.save("IFOF_R.vqlat")
>>> bundle = codec.decode(lat)                                # same order, direction and space

Encode: bundle -> `Pipeline.prepare_encode` (register into model space and recognise the bundle
against the model's templates, `vqdiff.registration`; canonicalise, normalise, model layout; range
and recognition warnings) -> engine -> `Pipeline.assemble_latents` (the self-describing `Latents`,
transform included). Decode: `Latents` -> `Pipeline.prepare_decode` (the one model-identity check)
-> engine -> `Pipeline.assemble_bundle` (denormalise, un-pad, un-permute, un-flip, the inverse
transform; the input's header). `Codec` runs the steps around any
`vqdiff.engine.Engine` in one call; the HTTP gateway (whose engine is the remote model service) and
batch encoding (whose engine calls are shared between files) run the same steps around their own
engine calls, so every path writes the same bytes for the same input and model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, SpatialHeader, validate_streamlines
from .canonical import canonicalise, uncanonicalise
from .engine import Engine, encode_with_indices
from .errors import BundleFormatError, CheckpointError, LatentsFormatError, ModelMismatchError
from .geometry import model_to_groups
from .latents import Latents
from .normalise import Normalisation

log = logging.getLogger(__name__)

MODEL_ENV = "VQDIFF_MODEL"
TEMPLATES_FILE = "templates.safetensors"  # in checkpoint and export directories
REGISTER_MODES = "'auto' (register and recognise), 'off' (encode as given) or a template name"
OOD_MARGIN = 0.25  # fraction of the training extent added on each side before warning


def default_model_dir() -> Path:
    """The model used when none is given: ``$VQDIFF_MODEL`` or the repository's ``models/default``."""
    env = os.environ.get(MODEL_ENV)
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "models" / "default"
    if not path.is_dir():
        raise CheckpointError(
            f"no model at {path}; set {MODEL_ENV} to a checkpoint directory "
            "(model.safetensors + config.json) or an export directory, or train one with `vqdiff-train`"
        )
    return path


def load_templates(model_dir: str | os.PathLike):
    """The registration templates stored with a model (checkpoint or export directory), or None."""
    from .templates import Templates

    path = Path(model_dir) / TEMPLATES_FILE
    return Templates.load(path) if path.is_file() else None


def to_input_space(streamlines: list[np.ndarray], matrix: np.ndarray) -> list[np.ndarray]:
    """Model space -> the input's space: the inverse of the recorded input -> model ``matrix``."""
    if np.array_equal(matrix, np.eye(4)):
        return streamlines
    from .registration import transform

    return transform(streamlines, np.linalg.inv(np.asarray(matrix, np.float64)))


def engine_provenance(engine) -> dict[str, Any]:
    """What made the numbers: the engine's backend, its variant / precision (fp32, int8, fp16...) and,
    for an engine chosen by measurement, why (`vqdiff.engine.engine_info`)."""
    from .engine import engine_info

    return engine_info(engine)


def provenance(engine_info: dict[str, Any]) -> dict[str, Any]:
    """The provenance every latents file records: the engine, and the versions of vqdiff and of the
    canonicalisation rules. Batch encoding re-encodes a file when any of it changes."""
    from . import __version__
    from .canonical import CANONICAL_VERSION

    return {"engine": dict(engine_info), "vqdiff": __version__, "canonicalisation": CANONICAL_VERSION}


def same_provenance(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two provenances describe the same numbers: equal except for the measured ``selection`` figures
    (groups/s vary from start to start; the backend and variant they chose are compared)."""
    def key(p: dict[str, Any]) -> dict[str, Any]:
        p = dict(p)
        p["engine"] = {k: v for k, v in dict(p.get("engine") or {}).items() if k != "selection"}
        return p

    return key(a) == key(b)


def check_model(made_by: dict[str, Any], model_info: dict[str, Any]) -> None:
    """The one model-identity check: refuse latents ``made_by`` another model than ``model_info``
    (compared by the sha256 of the weights, the same for every backend of one model)."""
    theirs, ours = made_by.get("sha256"), model_info.get("sha256")
    if theirs and ours and theirs != ours:
        raise ModelMismatchError(
            f"these latents were made by model {made_by.get('id')!r} ({theirs[:12]}), not by "
            f"{model_info.get('id')!r} ({ours[:12]}); decode them with that model"
        )


def model_input(groups: np.ndarray, normalisation: Normalisation) -> np.ndarray:
    """Oriented groups (G, S, P, 3) RAS mm -> normalised model input (G, 3, S, P) float32, one axis at a
    time: the same numbers as ``groups_to_model(normalisation.apply(groups))`` without the temporaries."""
    g, s, p, _ = groups.shape
    x = np.empty((g, 3, s, p), np.float32)
    center = np.asarray(normalisation.center, np.float64)
    for a in range(3):
        x[:, a] = (groups[..., a].astype(np.float64) - center[a]) / normalisation.scale
    return x


def range_warnings(x: np.ndarray, groups: np.ndarray, normalisation: Normalisation,
                   real: np.ndarray | None = None) -> list[dict[str, Any]]:
    """A warning with the numbers when the points leave the model's training range.

    ``x`` is the model input (G, 3, S, P) (its per-channel extremes give the bounding box cheaply),
    ``groups`` the same points in RAS mm (G, S, P, 3), ``real`` the mask of real slots (pads copy real
    streamlines, so they never widen the box).
    """
    lo, hi = np.asarray(normalisation.data_min), np.asarray(normalisation.data_max)
    pad = OOD_MARGIN * (hi - lo)
    center, scale = np.asarray(normalisation.center), normalisation.scale
    box_lo = np.array([x[:, a].min() for a in range(3)], np.float64) * scale + center
    box_hi = np.array([x[:, a].max() for a in range(3)], np.float64) * scale + center
    if (box_lo >= lo - pad).all() and (box_hi <= hi + pad).all():
        return []  # the bounding box is inside: skip the per-point statistics
    pts = groups.reshape(-1, groups.shape[2], 3)
    info = normalisation.out_of_range(pts if real is None else pts[real], margin=OOD_MARGIN)
    if info is None:
        return []
    return [{"code": "out_of_training_range",
             "message": f"{_percent(info['fraction_points_outside'])} of the points lie outside the model's "
                        f"training range (widened by {100 * OOD_MARGIN:.0f}% of its extent on each side); the "
                        "reconstruction may be poor. Is the bundle in RAS mm of a comparable space?", **info}]


def _percent(fraction: float) -> str:
    """``0.0004`` -> ``"0.04%"``, ``0.05`` -> ``"5.0%"``, below 0.01% ``"<0.01%"`` (never a "0.0%" that warns)."""
    pct = 100 * float(fraction)
    return f"{pct:.1f}%" if pct >= 1 else f"{pct:.2f}%" if pct >= 0.01 else "<0.01%"


@dataclass
class EncodeState:
    """What `Pipeline.assemble_latents` needs besides the engine's output (no point data)."""

    order: np.ndarray  # (G*64,) int64
    pad_mask: np.ndarray  # (G*64,) bool
    flipped: np.ndarray  # (N,) bool
    n_points: np.ndarray  # (N,) int64
    header: SpatialHeader
    source: dict[str, Any]
    warnings: list[dict[str, Any]] = field(default_factory=list)
    transform: np.ndarray | None = None  # (4, 4) input -> model space; None: encoded as given
    registration: dict[str, Any] = field(default_factory=dict)

    @property
    def n_streamlines(self) -> int:
        return int(self.flipped.shape[0])


class Pipeline:
    """The codec's steps around an engine, for one model (its normalisation and identity).

    Parameters
    ----------
    normalisation : Normalisation
        The model's, recorded in every `Latents`.
    model_info : dict
        ``{"id", "kind", "sha256"}`` (plus provenance the caller adds), recorded in every `Latents`.
    templates : vqdiff.templates.Templates, optional
        The model's bundle templates in model space (`load_templates`): with them, bundles of any
        subject and space are registered into model space and recognised before encoding.
    """

    def __init__(self, normalisation: Normalisation, model_info: dict[str, Any], templates=None,
                 engine_info: dict[str, Any] | None = None):
        self.normalisation = normalisation
        self.model_info = dict(model_info)
        self.templates = templates
        self.provenance = provenance(engine_info or {"backend": "unknown", "variant": "unknown"})

    def register(self, bundle: Bundle, mode: str = "auto"):
        """The bundle's `vqdiff.registration.Registration` into model space (None when the model has no
        templates or ``mode="off"``); the bundle's name narrows recognition when it names a template."""
        if mode == "off":
            return None
        if self.templates is None:
            if mode != "auto":
                raise ValueError(f"register={mode!r} needs a model with registration templates "
                                 f"({TEMPLATES_FILE}); this one has none: use 'auto' or 'off'")
            return None
        from .registration import register

        return register(bundle.streamlines, self.templates, mode=mode, hint=bundle.name or None)

    def prepare_encode(self, bundle: Bundle, *, input_sha256: str | None = None,
                       register: str = "auto") -> tuple[np.ndarray, EncodeState]:
        """Register, canonicalise and normalise ``bundle`` -> (engine input (G, 3, 64, 64) float32, state).

        ``register``: 'auto' (register and recognise), 'off' (encode as given) or a template name. Raises `BundleFormatError` for bundles that cannot be encoded (reasons
        as the readers', plus ``degenerate_bundle`` and ``coordinates_too_large``) and ValueError for
        an unknown ``register``.
        """
        validated = None
        if self.templates is not None and register != "off":  # registration needs valid input first
            validated = validate_streamlines(bundle.streamlines)  # (points, counts): not validated twice
        reg = self.register(bundle, register)
        if reg is not None:  # all points moved in one product (the same array for the identity)
            validated = (reg.apply_points(validated[0]), validated[1])
        try:
            canon = canonicalise(bundle.streamlines, validated=validated)
        except (np.linalg.LinAlgError, FloatingPointError) as exc:
            raise BundleFormatError(f"the bundle cannot be canonicalised ({exc})", reason="degenerate_bundle") from exc
        x = model_input(canon.groups, self.normalisation)
        if not np.isfinite(x).all():
            raise BundleFormatError("coordinates overflow float32 once resampled and normalised; expected "
                                    "coordinates in mm of a brain-sized space", reason="coordinates_too_large")
        warnings = range_warnings(x, canon.groups, self.normalisation, canon.pad_mask)
        registration = {"method": "off" if register == "off" else "none"}
        if reg is not None:
            registration = {k: v for k, v in reg.to_dict().items() if k not in ("matrix", "seconds")}
            if (w := reg.warning()) is not None:
                warnings.insert(0, w)
        source = {"format": bundle.source_format, "name": bundle.name}
        if input_sha256:
            source["input_sha256"] = input_sha256
        state = EncodeState(canon.order, canon.pad_mask, canon.flipped, canon.n_points, bundle.header, source,
                            warnings, None if reg is None else reg.matrix, registration)
        return x, state

    def assemble_latents(self, state: EncodeState, latents: np.ndarray, indices: np.ndarray | None) -> Latents:
        """The self-describing `Latents` of an encoded bundle."""
        return Latents(latents=latents, order=state.order, pad_mask=state.pad_mask, flipped=state.flipped,
                       n_points=state.n_points, header=state.header, model=self.model_info,
                       normalisation=self.normalisation.to_dict(), source=state.source, indices=indices,
                       transform=state.transform, registration=state.registration, provenance=self.provenance)

    def prepare_decode(self, latents: Latents, *, strict: bool = True) -> np.ndarray:
        """The engine input of a decode (the latents), after the model-identity check (``strict``)."""
        if strict:
            check_model(latents.model, self.model_info)
        return latents.latents

    @staticmethod
    def assemble_bundle(latents: Latents, groups: np.ndarray, *, restore_points: bool = False) -> Bundle:
        """Decoder output (G, 3, 64, 64) -> the bundle in the input's order, direction, header and space.

        ``restore_points`` resamples each streamline to its original point count (otherwise 64).
        """
        try:
            norm = Normalisation.from_dict(latents.normalisation)
        except (KeyError, TypeError, ValueError) as exc:
            raise LatentsFormatError(f"the latents' normalisation is invalid ({exc})") from exc
        streamlines = uncanonicalise(norm.invert(model_to_groups(groups)), latents.order, latents.pad_mask,
                                     latents.flipped, n_points=latents.n_points if restore_points else None)
        streamlines = to_input_space(streamlines, latents.matrix)
        header = latents.header if isinstance(latents.header, SpatialHeader) else SpatialHeader.identity()
        return Bundle(streamlines=streamlines, header=header, source_format="memory",
                      name=latents.source.get("name", ""))


class Codec:
    """Bundles in, latents out, and back: the `Pipeline` steps around an engine.

    Parameters
    ----------
    engine : Engine
        Group-level backend (`vqdiff.torch_engine.TorchEngine`, or an ONNX Runtime / TensorRT engine
        from `vqdiff.export.runtime`).
    normalisation : Normalisation
    model_info : dict
        ``{"id", "kind", "sha256"}`` recorded in every `Latents`; `decode` refuses latents from
        another model.
    templates : vqdiff.templates.Templates, optional
        The model's registration templates (`load_templates`); without them bundles are encoded as given.
    """

    def __init__(self, engine: Engine, normalisation: Normalisation, model_info: dict[str, Any], templates=None):
        self.engine = engine
        self.pipeline = Pipeline(normalisation, model_info, templates, engine_provenance(engine))

    @classmethod
    def from_checkpoint(cls, path, *, device: str = "cpu", batch_size: int = 256) -> Codec:
        """A checkpoint directory (or a loaded `Checkpoint`, or an export directory whose source checkpoint
        is here: `export_source_checkpoint`) on the torch engine."""
        from .checkpoint import Checkpoint, export_source_checkpoint, load_checkpoint
        from .torch_engine import TorchEngine

        ckpt = path if isinstance(path, Checkpoint) else load_checkpoint(export_source_checkpoint(path))
        templates = load_templates(ckpt.path) if ckpt.path is not None else None
        return cls(TorchEngine(ckpt.model, device=device, batch_size=batch_size), ckpt.normalisation, ckpt.model_info,
                   templates)

    @classmethod
    def default(cls, **kwargs: Any) -> Codec:
        return cls.from_checkpoint(default_model_dir(), **kwargs)

    @property
    def normalisation(self) -> Normalisation:
        return self.pipeline.normalisation

    @property
    def model_info(self) -> dict[str, Any]:
        return self.pipeline.model_info

    @property
    def model_id(self) -> str:
        return self.model_info.get("id", "")

    @property
    def model_hash(self) -> str:
        return self.model_info.get("sha256", "")

    # ------------------------------------------------------------------ group level
    def encode_groups(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Normalised groups (G, 3, 64, 64) -> (latents (G, D, 16, 16), code indices (G, 16, 16) | None)."""
        return encode_with_indices(self.engine, x)

    def decode_groups(self, latents: np.ndarray) -> np.ndarray:
        """Latents (G, D, 16, 16) -> normalised groups (G, 3, 64, 64)."""
        return self.engine.decode_groups(latents)

    # ------------------------------------------------------------------ bundle level
    def encode(self, bundle: Bundle, *, register: str = "auto", input_sha256: str | None = None) -> Latents:
        """Register into model space, canonicalise, normalise and encode a bundle.

        ``register``: "auto" (recognise the bundle among the model's templates and register it; the
        bundle's name may narrow the choice), "off" (the bundle is in model space already) or a
        template name (register onto it). ``input_sha256``: recorded as its source file's.
        """
        x, state = self.pipeline.prepare_encode(bundle, input_sha256=input_sha256, register=register)
        for w in state.warnings:
            log.warning("%s: %s", bundle.name or "bundle", w["message"])
        return self.pipeline.assemble_latents(state, *self.encode_groups(x))

    def encode_file(self, path: str | os.PathLike, *, reference=None, register: str = "auto") -> Latents:
        """Read a .trk / .tck (``reference``) / .trx file and encode it, recording the file's sha256."""
        from .fileio import file_sha256
        from .io import load_bundle

        return self.encode(load_bundle(path, reference=reference), register=register, input_sha256=file_sha256(path))

    def decode(self, latents: Latents, *, restore_points: bool = False, strict: bool = True) -> Bundle:
        """Decode latents back to a bundle in the original order, direction and space.

        ``restore_points`` resamples each streamline to its original point count (otherwise 64).
        ``strict`` refuses latents made by another model (compared by weights hash).
        """
        groups = self.decode_groups(self.pipeline.prepare_decode(latents, strict=strict))
        return self.pipeline.assemble_bundle(latents, groups, restore_points=restore_points)

    def reconstruct(self, bundle: Bundle) -> Bundle:
        return self.decode(self.encode(bundle))


def encode(bundle: Bundle, *, model: str | os.PathLike | Codec | None = None) -> Latents:
    """Encode ``bundle`` with ``model`` (a checkpoint path or a `Codec`; default: the bundled model)."""
    return _codec(model).encode(bundle)


def decode(latents: Latents, *, model: str | os.PathLike | Codec | None = None, **kwargs: Any) -> Bundle:
    """Decode ``latents`` with ``model`` (default: the bundled model)."""
    return _codec(model).decode(latents, **kwargs)


def _codec(model) -> Codec:
    if isinstance(model, Codec):
        return model
    return Codec.default() if model is None else Codec.from_checkpoint(model)
