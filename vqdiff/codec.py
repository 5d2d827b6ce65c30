"""The codec core: every encode and decode of vqdiff runs these steps, and only these (torch-free).

>>> from vqdiff import Codec
>>> codec = Codec.default()                                   # $VQDIFF_MODEL or models/default (torch)
>>> lat = codec.encode_file("IFOF_R.trk")                     # Latents; lat.save("IFOF_R.vqlat")
>>> bundle = codec.decode(lat)                                # same order, direction and space

Encode: bundle -> `Pipeline.prepare_encode` (register into model space and recognise the bundle against
the model's templates, `vqdiff.registration`; canonicalise, normalise, model layout; range and recognition
warnings) -> engine -> `Pipeline.assemble_latents` (the self-describing `Latents`, transform and measured
fidelity included). Decode: `Latents` -> `Pipeline.prepare_decode` (the one model-identity check) -> engine
-> `Pipeline.assemble_bundle` (denormalise, un-pad, un-permute, un-flip, the inverse transform; the input's
header). `Codec` runs the steps around any `vqdiff.engine.Engine` in one call; the HTTP gateway and batch
encoding run the same steps around their own engine calls, so every path writes the same bytes for the
same input and model. A file with groups or several bundles is a `vqdiff.subject.Subject` (`Codec.encode_file`).
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
from .normalise import Normalisation, model_input, range_warnings

log = logging.getLogger(__name__)

MODEL_ENV = "VQDIFF_MODEL"
TEMPLATES_FILE = "templates.safetensors"  # in checkpoint and export directories
REGISTER_MODES = "'auto' (register and recognise), 'off' (encode as given) or a template name"


def default_model_dir() -> Path:
    """The model used when none is given: ``$VQDIFF_MODEL`` or the repository's ``models/default``."""
    env = os.environ.get(MODEL_ENV)
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "models" / "default"
    if not path.is_dir():
        raise CheckpointError(f"no model at {path}; set {MODEL_ENV} to a checkpoint directory "
                              "(model.safetensors + config.json) or an export directory, "
                              "or train one with `vqdiff-train`")
    return path


def load_templates(model_dir: str | os.PathLike):
    """The registration templates stored with a model (checkpoint or export directory), or None."""
    from .templates import Templates

    path = Path(model_dir) / TEMPLATES_FILE
    return Templates.load(path) if path.is_file() else None


def to_input_space(streamlines: list[np.ndarray], matrix: np.ndarray) -> list[np.ndarray]:
    """Model space -> the input's space: the inverse of the recorded input -> model ``matrix``."""
    from .registration import transform

    return streamlines if np.array_equal(matrix, np.eye(4)) else transform(streamlines, np.linalg.inv(matrix))


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


@dataclass
class EncodeState:
    """What `Pipeline.assemble_latents` needs besides the engine's output (the input only to measure fidelity)."""

    order: np.ndarray  # (G*64,) int64
    pad_mask: np.ndarray  # (G*64,) bool
    flipped: np.ndarray  # (N,) bool
    n_points: np.ndarray  # (N,) int64
    header: SpatialHeader
    source: dict[str, Any]
    warnings: list[dict[str, Any]] = field(default_factory=list)
    transform: np.ndarray | None = None  # (4, 4) input -> model space; None: encoded as given
    registration: dict[str, Any] = field(default_factory=dict)
    carried: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # the file's groups, dps, dpv
    bundle: Bundle | None = field(default=None, repr=False)  # the input, for the fidelity measurement

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
                 engine_info: dict[str, Any] | None = None, limits: dict[str, Any] | None = None):
        from .quality import poor_limits

        self.normalisation = normalisation
        self.model_info = dict(model_info)
        self.templates = templates
        self.provenance = provenance(engine_info or {"backend": "unknown", "variant": "unknown"})
        self.limits = limits or poor_limits(None)  # poor_reconstruction (`vqdiff.quality.poor_limits`)

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
        from .carried import check_carried

        check_carried(bundle)
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
            warnings[:0] = reg.warnings()
        source = {"format": bundle.source_format, "name": bundle.name}
        if input_sha256:
            source["input_sha256"] = input_sha256
        carried = {k: dict(getattr(bundle, k)) for k in ("groups", "dps", "dpv") if getattr(bundle, k)}
        state = EncodeState(canon.order, canon.pad_mask, canon.flipped, canon.n_points, bundle.header, source,
                            warnings, None if reg is None else reg.matrix, registration, carried, bundle)
        return x, state

    def assemble_latents(self, state: EncodeState, latents: np.ndarray, indices: np.ndarray | None,
                         decoded: np.ndarray | None = None) -> Latents:
        """The self-describing `Latents` of an encoded bundle; with ``decoded`` (the decoder's output for
        ``latents``) it records the measured fidelity and adds ``poor_reconstruction`` to ``state.warnings``."""
        lat = Latents(latents=latents, order=state.order, pad_mask=state.pad_mask, flipped=state.flipped,
                      n_points=state.n_points, header=state.header, model=self.model_info,
                      normalisation=self.normalisation.to_dict(), source=state.source, indices=indices,
                      transform=state.transform, registration=state.registration, provenance=self.provenance,
                      carried=state.carried)
        if decoded is not None and state.bundle is not None:
            from .quality import fidelity, fidelity_warning

            recon = self.assemble_bundle(lat, decoded, carry=False)
            lat.fidelity = fidelity(state.bundle, recon, self.limits)
            if (w := fidelity_warning(lat.fidelity, state.source.get("name", ""))) is not None:
                state.warnings.append(w)
        state.bundle = None  # the input's points are not kept past the encoding
        return lat

    def prepare_decode(self, latents: Latents, *, strict: bool = True) -> np.ndarray:
        """The engine input of a decode (the latents), after the model-identity check (``strict``)."""
        if strict:
            check_model(latents.model, self.model_info)
        return latents.latents

    @staticmethod
    def assemble_bundle(latents: Latents, groups: np.ndarray, *, restore_points: bool = False,
                        carry: bool = True) -> Bundle:
        """Decoder output (G, 3, 64, 64) -> the bundle in the input's order, direction, header and space.

        ``restore_points`` resamples each streamline to its original point count (otherwise 64). The
        carried groups and dps come back (``carry``), the dpv with ``restore_points`` (else a warning
        names them).
        """
        try:
            norm = Normalisation.from_dict(latents.normalisation)
        except (KeyError, TypeError, ValueError) as exc:
            raise LatentsFormatError(f"the latents' normalisation is invalid ({exc})") from exc
        streamlines = uncanonicalise(norm.invert(model_to_groups(groups)), latents.order, latents.pad_mask,
                                     latents.flipped, n_points=latents.n_points if restore_points else None)
        streamlines = to_input_space(streamlines, latents.matrix)
        header = latents.header if isinstance(latents.header, SpatialHeader) else SpatialHeader.identity()
        c = latents.carried if carry else {}
        if c.get("dpv") and not restore_points:
            log.warning("per-point data %s not restored: the decoded streamlines have 64 points, the data the "
                        "original counts; decode with restore_points", ", ".join(map(repr, c["dpv"])))
        return Bundle(streamlines=streamlines, header=header, source_format="memory",
                      name=latents.source.get("name", ""), groups=dict(c.get("groups", {})),
                      dps=dict(c.get("dps", {})), dpv=dict(c.get("dpv", {})) if restore_points else {})


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

    def __init__(self, engine: Engine, normalisation: Normalisation, model_info: dict[str, Any], templates=None,
                 limits: dict[str, Any] | None = None):
        self.engine = engine
        self.pipeline = Pipeline(normalisation, model_info, templates, engine_provenance(engine), limits)

    @classmethod
    def from_checkpoint(cls, path, *, device: str = "cpu", batch_size: int = 256) -> Codec:
        """A checkpoint directory (or a loaded `Checkpoint`, or an export directory whose source checkpoint
        is here: `export_source_checkpoint`) on the torch engine."""
        from .checkpoint import Checkpoint, export_source_checkpoint, load_checkpoint
        from .quality import poor_limits
        from .torch_engine import TorchEngine

        ckpt = path if isinstance(path, Checkpoint) else load_checkpoint(export_source_checkpoint(path))
        templates = load_templates(ckpt.path) if ckpt.path is not None else None
        return cls(TorchEngine(ckpt.model, device=device, batch_size=batch_size), ckpt.normalisation, ckpt.model_info,
                   templates, poor_limits(ckpt.path))

    @classmethod
    def default(cls, **kwargs: Any) -> Codec:
        return cls.from_checkpoint(default_model_dir(), **kwargs)

    normalisation = property(lambda self: self.pipeline.normalisation)
    model_info = property(lambda self: self.pipeline.model_info)

    model_id = property(lambda self: self.model_info.get("id", ""))
    model_hash = property(lambda self: self.model_info.get("sha256", ""))

    # ------------------------------------------------------------------ group level
    def encode_groups(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Normalised groups (G, 3, 64, 64) -> (latents (G, D, 16, 16), code indices (G, 16, 16) | None)."""
        return encode_with_indices(self.engine, x)

    def decode_groups(self, latents: np.ndarray) -> np.ndarray:
        """Latents (G, D, 16, 16) -> normalised groups (G, 3, 64, 64)."""
        return self.engine.decode_groups(latents)

    # ------------------------------------------------------------------ bundle level
    def encode(self, bundle: Bundle, *, register: str = "auto", input_sha256: str | None = None,
               fidelity: bool = True) -> Latents:
        """Register into model space, canonicalise, normalise and encode a bundle (one `Latents`, whatever
        groups it has: they are carried as data; `encode_subject` encodes them group by group).

        ``register``: "auto" (recognise the bundle among the model's templates and register it; its name may
        narrow the choice), "off" (the bundle is in model space already) or a template name (register onto
        it). ``input_sha256``: recorded as its source file's. ``fidelity``: decode the latents and record
        the reconstruction's MDF (`Latents.fidelity`; ``poor_reconstruction`` above the model's limits).
        """
        x, state = self.pipeline.prepare_encode(bundle, input_sha256=input_sha256, register=register)
        latents, indices = self.encode_groups(x)
        decoded = self.decode_groups(latents) if fidelity else None
        lat = self.pipeline.assemble_latents(state, latents, indices, decoded)
        for w in state.warnings:
            log.warning("%s: %s", bundle.name or "bundle", w["message"])
        return lat

    def encode_subject(self, bundle: Bundle, *, parts=None, register: str = "auto", input_sha256: str | None = None,
                       fidelity: bool = True):
        """Encode a file part by part into a `vqdiff.subject.Subject`: ``parts`` ``[(name, indices)]``, by
        default `vqdiff.subject.subject_parts` (its groups, else the whole file); each part registered,
        recognised by its name and encoded on its own; the file's groups, dps and dpv carried."""
        from .subject import assemble_subject, prepare_subject

        x, state = prepare_subject(self.pipeline, bundle, parts=parts, input_sha256=input_sha256, register=register)
        latents, indices = self.encode_groups(x)
        decoded = self.decode_groups(latents) if fidelity else None
        subject = assemble_subject(self.pipeline, state, latents, indices, decoded)
        for name, w in state.warnings:
            log.warning("%s: %s", name, w["message"])
        return subject

    def encode_file(self, path: str | os.PathLike, *, reference=None, register: str = "auto", fidelity: bool = True,
                    segment: str = "auto"):
        """Read a .trk / .tck (``reference``) / .trx file and encode it, recording the file's sha256: `Latents`
        for a file of one bundle (as always), a `vqdiff.subject.Subject` for a file of several encoded part by
        part (`encode_subject`): a TRX's groups, or the bundles a segmentation finds in a file without groups
        (`vqdiff.segment.file_parts`; ``segment``: "auto" when detected, "on", "off": as one bundle)."""
        from .fileio import file_sha256
        from .io import load_bundle
        from .segment import file_parts
        from .templates import shared_centroids

        bundle, kw = load_bundle(path, reference=reference), dict(register=register, fidelity=fidelity)
        with shared_centroids():  # the file is clustered once for detection and both registrations
            parts, seg = file_parts(bundle, self.pipeline.templates, mode=segment)  # (None, None): one bundle
            if parts is None:
                return self.encode(bundle, input_sha256=file_sha256(path), **kw)
            subject = self.encode_subject(bundle, parts=parts, input_sha256=file_sha256(path), **kw)
        return subject if seg is None else seg.record(subject)

    def decode(self, latents, *, restore_points: bool = False, strict: bool = True):
        """Decode latents back to a bundle in the original order, direction and space.

        ``restore_points`` resamples each streamline to its original point count (otherwise 64) and
        brings back per-point data. ``strict`` refuses latents made by another model (compared by
        weights hash). A `vqdiff.subject.Subject` decodes to the whole file as one `Bundle` (every
        streamline at its place, its groups, dps and dpv); `decode_subject` gives the bundles by name.
        """
        from .subject import Subject, assemble_file

        if isinstance(latents, Subject):
            bundles = self.decode_subject(latents, restore_points=restore_points, strict=strict)
            return assemble_file(latents, bundles, restore_points=restore_points)
        groups = self.decode_groups(self.pipeline.prepare_decode(latents, strict=strict))
        return self.pipeline.assemble_bundle(latents, groups, restore_points=restore_points)

    def decode_subject(self, subject, *, restore_points: bool = False, strict: bool = True) -> dict[str, Bundle]:
        """A subject's bundles by name, each in its own order and the file's space (one decoder pass)."""
        from .subject import assemble_bundles, decode_input

        groups = self.decode_groups(decode_input(self.pipeline, subject, strict=strict))
        return assemble_bundles(self.pipeline, subject, groups, restore_points=restore_points)

    def reconstruct(self, bundle: Bundle) -> Bundle:
        return self.decode(self.encode(bundle, fidelity=False))


def encode(bundle: Bundle, *, model: str | os.PathLike | Codec | None = None) -> Latents:
    """Encode ``bundle`` with ``model`` (a checkpoint path or a `Codec`; default: the bundled model)."""
    return _codec(model).encode(bundle)


def decode(latents: Latents, *, model: str | os.PathLike | Codec | None = None, **kwargs: Any) -> Bundle:
    """Decode ``latents`` with ``model`` (default: the bundled model)."""
    return _codec(model).decode(latents, **kwargs)


def _codec(model) -> Codec:
    return model if isinstance(model, Codec) else Codec.default() if model is None else Codec.from_checkpoint(model)
