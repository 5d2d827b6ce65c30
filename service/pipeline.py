"""The gateway's CPU-side work, run in worker threads: uploads -> `Bundle` / `Latents`, the limits,
and the codec core's steps (`vqdiff.codec.Pipeline`) around a remote engine (the model service).

`RemoteEngine` posts ``.npy`` bodies to the model service (async, so that a worker's threads never
wait on it). Nothing of encoding or decoding is restated here: `ModelView.pipeline` is the same
`Pipeline` that `vqdiff.codec.Codec` and batch encoding run, built from the served model's card.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from vqdiff.bundle import Bundle, SpatialHeader
from vqdiff.canonical import zero_length_streamlines
from vqdiff.codec import REGISTER_MODES, EncodeState, Pipeline
from vqdiff.errors import BundleFormatError, LatentsFormatError, ModelMismatchError
from vqdiff.io import bundle_to_bytes, load_bundle_bytes, sniff_format
from vqdiff.latents import Latents
from vqdiff.normalise import Normalisation

from . import npy
from .errors import (
    ACCEPTED_BUNDLE,
    ACCEPTED_LATENTS,
    ApiError,
    from_bundle_error,
    from_latents_error,
    from_model_mismatch,
)

log = logging.getLogger("bentoml.vqdiff")

OUTPUT_FORMATS = ("trk", "tck", "trx")
_TMP_NAME = re.compile(r"^tmp[a-z0-9_]{8}")  # tempfile's prefix on BentoML's upload copies


class Timer:
    """Stage durations of one request, for the ``Server-Timing`` header and the summary."""

    def __init__(self):
        self.t0 = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self.last
        self.last = now

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 4)

    def header(self) -> str:
        return ", ".join(f"{k};dur={1e3 * v:.1f}" for k, v in self.stages.items())


class RemoteEngine:
    """Async client of the model service's group APIs: ``.npy`` bodies, requests of at most ``chunk``
    groups sent concurrently, one retry when the connection drops (the calls are idempotent)."""

    def __init__(self, client, *, chunk: int):
        self.client, self.chunk = client, max(1, int(chunk))

    async def _call(self, name: str, x: np.ndarray) -> np.ndarray:
        import aiohttp

        fn = getattr(self.client, name)
        for attempt in range(2):
            try:
                out = fn(x)
                out = await out if inspect.isawaitable(out) else out
                break
            except (aiohttp.ClientConnectionError, RuntimeError) as exc:  # RuntimeError: "Session is closed"
                if attempt or (isinstance(exc, RuntimeError) and "closed" not in str(exc)):
                    raise
                log.warning("model service connection dropped (%s); retrying once", exc)
        return npy.loads(out) if isinstance(out, (bytes, bytearray, memoryview)) else np.asarray(out)

    async def _run(self, name: str, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        parts = await asyncio.gather(*(self._call(name, x[s : s + self.chunk]) for s in range(0, len(x), self.chunk)))
        return np.concatenate(parts)

    async def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Normalised groups (G, 3, 64, 64) -> latents (G, D, 16, 16), code indices (G, 16, 16) or None."""
        out = await self._run("encode_groups", x)
        return np.ascontiguousarray(out["latents"]), (out["indices"] if "indices" in out.dtype.names else None)

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents (G, D, 16, 16) -> normalised groups (G, 3, 64, 64)."""
        return await self._run("decode_groups", latents)


@dataclass
class ModelView:
    """What the gateway knows of the served model (from the model service's card)."""

    card: dict[str, Any]

    @property
    def normalisation(self) -> Normalisation:
        return Normalisation.from_dict(self.card["normalisation"])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.card["latent_shape"])

    @property
    def model_info(self) -> dict[str, Any]:
        return dict(self.card["model"])

    @cached_property
    def templates(self):
        """The served model's registration templates (None when it has none)."""
        from vqdiff.templates import Templates

        blob = self.card.get("templates_b64")
        return Templates.from_bytes(base64.b64decode(blob)) if blob else None

    @cached_property
    def pipeline(self) -> Pipeline:
        """The codec core's steps for the served model."""
        return Pipeline(self.normalisation, self.model_info, self.templates, self.card.get("engine"))

    def public_card(self) -> dict[str, Any]:
        """The card as ``GET /model`` shows it (template names instead of the templates file)."""
        card = {k: v for k, v in self.card.items() if k != "templates_b64"}
        card["templates"] = list(self.templates.names) if self.templates is not None else None
        return card

    def prepare_encode(self, bundle: Bundle, input_sha256: str, register: str = "auto") -> tuple[np.ndarray, EncodeState]:
        """`Pipeline.prepare_encode`, its refusals as 4xx."""
        try:
            return self.pipeline.prepare_encode(bundle, input_sha256=input_sha256, register=register)
        except BundleFormatError as exc:
            raise from_bundle_error(exc) from exc
        except ValueError as exc:  # an unknown register mode
            raise ApiError(400, "bad_register", str(exc), REGISTER_MODES) from exc

    def assemble_bundle(self, lat: Latents, groups: np.ndarray, *, restore_points: bool) -> Bundle:
        """`Pipeline.assemble_bundle`, its refusals as 4xx."""
        try:
            return self.pipeline.assemble_bundle(lat, groups, restore_points=restore_points)
        except LatentsFormatError as exc:
            raise from_latents_error(exc) from exc


def original_name(path: Path) -> str:
    """The uploaded file's stem (BentoML stores uploads as ``tmpXXXXXXXX<filename>``)."""
    name = _TMP_NAME.sub("", path.name) or "bundle"
    for suffix in (".trk", ".tck", ".trx", ".vqlat"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "bundle"
    return name


def _reference_suffix(data: bytes, name: str) -> str:
    """File suffix telling `vqdiff.io` how to read a reference: from its bytes, else its name."""
    if data[:5] == b"TRACK":
        return ".trk"
    if data[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if len(data) >= 348 and data[344:348] in (b"n+1\x00", b"ni1\x00"):
        return ".nii"
    lower = name.lower()
    return next((s for s in (".nii.gz", ".nii", ".trk") if lower.endswith(s)), ".nii")


def read_bundle(file: Path, reference: Path | None, *, max_streamlines: int,
                max_points: int | None = None) -> tuple[Bundle, str]:
    """An uploaded tractogram (format from its magic bytes) -> (validated `Bundle`, its sha256), or `ApiError`."""
    data = file.read_bytes()
    name = original_name(file)
    if not data:
        raise ApiError(400, "empty", "the uploaded file is empty (0 bytes)", ACCEPTED_BUNDLE)
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(415, "wrong_magic", f"the file starts with {data[:8]!r}: not a TrackVis ('TRACK'), "
                       "MRtrix ('mrtrix tracks') or TRX (zip) file", ACCEPTED_BUNDLE)
    try:
        if fmt != "tck":
            bundle = load_bundle_bytes(data, format=fmt, name=name, max_streamlines=max_streamlines,
                                       max_points=max_points)
        else:
            if reference is None:
                raise ApiError(400, "missing_reference", "a .tck file stores no space: add a 'reference' "
                               "file (NIfTI .nii/.nii.gz or .trk)", ACCEPTED_BUNDLE)
            ref = reference.read_bytes()
            with tempfile.TemporaryDirectory(prefix="vqdiff-ref-") as tmp:
                ref_path = Path(tmp) / ("reference" + _reference_suffix(ref, reference.name))
                ref_path.write_bytes(ref)
                bundle = load_bundle_bytes(data, format=fmt, reference=ref_path, name=name)
    except BundleFormatError as exc:
        raise from_bundle_error(exc) from exc
    if len(bundle) > max_streamlines:
        raise ApiError(413, "too_many_streamlines", f"the bundle has {len(bundle)} streamlines; this server "
                       f"accepts at most {max_streamlines} per request", "split the bundle into smaller files",
                       limit_streamlines=max_streamlines)
    zero = zero_length_streamlines(bundle)
    if len(zero):
        raise ApiError(422, "zero_length", f"{len(zero)} streamline(s) have all their points at one place "
                       f"(indices {zero[:5].tolist()}{'...' if len(zero) > 5 else ''})",
                       "streamlines of at least 2 distinct points; " + ACCEPTED_BUNDLE)
    return bundle, hashlib.sha256(data).hexdigest()


def read_latents(file: Path, view: ModelView, *, max_groups: int, max_points: int) -> Latents:
    """An uploaded latents file -> `Latents` checked against the served model and the limits."""
    data = file.read_bytes()
    if not data:
        raise ApiError(400, "empty", "the uploaded latents file is empty (0 bytes)", ACCEPTED_LATENTS)
    try:
        lat = Latents.from_bytes(data)
    except LatentsFormatError as exc:
        raise from_latents_error(exc) from exc
    if lat.n_groups > max_groups:
        raise ApiError(413, "too_many_groups", f"the latents hold {lat.n_groups} groups; this server decodes at "
                       f"most {max_groups} per request", ACCEPTED_LATENTS, limit_groups=max_groups)
    if tuple(lat.latents.shape[1:]) != view.latent_shape:
        raise ApiError(422, "latent_shape_mismatch", f"latents of shape {list(lat.latents.shape[1:])} per group; "
                       f"the served model uses {list(view.latent_shape)}", ACCEPTED_LATENTS)
    if lat.total_points > max_points:
        raise ApiError(413, "too_many_points", f"the latents record {lat.total_points} points in all; this "
                       f"server restores at most {max_points}", ACCEPTED_LATENTS, limit_points=max_points)
    if not np.isfinite(lat.latents).all():
        raise ApiError(422, "non_finite", "the latents hold NaN or infinite values", ACCEPTED_LATENTS)
    try:
        view.pipeline.prepare_decode(lat)
    except ModelMismatchError as exc:
        raise from_model_mismatch(exc) from exc
    return lat


def output_format(requested: str | None, default: str) -> str:
    fmt = (requested or default).lower().lstrip(".")
    if fmt not in OUTPUT_FORMATS:
        raise ApiError(400, "unsupported_output_format", f"output format {requested!r} is not supported",
                       "format = trk, tck or trx")
    return fmt


def write_bundle(bundle: Bundle, fmt: str) -> bytes:
    try:
        return bundle_to_bytes(bundle, format=fmt)
    except BundleFormatError as exc:
        raise ApiError(422, exc.reason, str(exc), "latents whose spatial header can be written as TRK/TRX, "
                       "or format=tck") from exc


def warm_up_registration(view: ModelView) -> None:
    """Decode the served model's templates and run one registration (dipy's first calls are slow)."""
    if view.templates is None:
        return
    rng = np.random.default_rng(0)
    lines = list(np.cumsum(rng.normal(0.0, 1.0, (40, 20, 3)), axis=1).astype(np.float32))
    view.pipeline.register(Bundle(streamlines=lines, header=SpatialHeader.identity(), source_format="memory", name=""))


def warm_up() -> float:
    """Exercise parsing, the codec core's CPU steps, writing and the metrics once (imports, caches); seconds."""
    from vqdiff.geometry import groups_to_model, model_to_groups
    from vqdiff.quality import reconstruction_quality

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    steps = rng.normal(0.0, 1.0, (70, 30, 3)).astype(np.float32)
    streamlines = list(np.cumsum(steps, axis=1) + np.array([0.0, 0.0, 10.0], np.float32))
    bundle = Bundle(streamlines=streamlines, header=SpatialHeader.identity(), source_format="memory", name="warmup")
    bundle = load_bundle_bytes(bundle_to_bytes(bundle, format="trk"), format="trk", name="warmup")
    pipe = Pipeline(Normalisation.identity(), {"id": "warmup"})
    x, state = pipe.prepare_encode(bundle)
    lat = pipe.assemble_latents(state, np.zeros((len(x), 1, 1, 1), np.float32), None)
    recon = pipe.assemble_bundle(lat, groups_to_model(model_to_groups(x)), restore_points=True)
    reconstruction_quality(bundle, recon)
    return time.perf_counter() - t0
