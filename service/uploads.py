"""The HTTP side of the codec's files, run in worker threads: uploads -> `Bundle` / `Latents` with the
limits checked, bundles -> bytes, a request's stage timer; refusals as `ApiError`. Nothing of encoding
or decoding is restated here (that is `vqdiff.codec.Pipeline`)."""

from __future__ import annotations

import hashlib
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from vqdiff.bundle import Bundle, SpatialHeader
from vqdiff.canonical import zero_length_streamlines
from vqdiff.errors import BundleFormatError
from vqdiff.io import bundle_to_bytes, load_bundle_bytes, sniff_format
from vqdiff.latents import Latents

from .errors import ACCEPTED_BUNDLE, ACCEPTED_LATENTS, ApiError

OUTPUT_FORMATS = ("trk", "tck", "trx")


class Timer:
    """Stage durations of one request, for the ``Server-Timing`` header and the summary."""

    def __init__(self):
        self.t0 = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage], self.last = self.stages.get(stage, 0.0) + now - self.last, now

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 4)

    def header(self) -> str:
        return ", ".join(f"{k};dur={1e3 * v:.1f}" for k, v in self.stages.items())


def _reference_suffix(data: bytes, name: str) -> str:
    """File suffix telling `vqdiff.io` how to read a reference: from its bytes, else its name."""
    if data[:5] == b"TRACK" or data[:2] == b"\x1f\x8b" or data[344:348] in (b"n+1\x00", b"ni1\x00"):
        return ".trk" if data[:5] == b"TRACK" else ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"
    return next((s for s in (".nii.gz", ".nii", ".trk") if name.lower().endswith(s)), ".nii")


def bundle_name(filename: str | None) -> str:
    """The bundle's name: the uploaded file's name (as the client sent it) without its extension."""
    return re.sub(r"\.(trk|tck|trx|vqlat)$", "", Path(filename or "").name, flags=re.IGNORECASE) or "bundle"


def read_bundle(file: Path, reference: Path | None, *, name: str, reference_name: str = "", max_streamlines: int,
                max_points: int | None = None) -> tuple[Bundle, str]:
    """An uploaded tractogram (format from its magic bytes) -> (validated `Bundle`, its sha256), or `ApiError`."""
    data = file.read_bytes()
    if not data:
        raise ApiError(400, "empty", "the uploaded file is empty (0 bytes)", ACCEPTED_BUNDLE)
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(415, "wrong_magic", f"the file starts with {data[:8]!r}: not a TrackVis ('TRACK'), "
                       "MRtrix ('mrtrix tracks') or TRX (zip) file", ACCEPTED_BUNDLE)
    if fmt == "tck" and reference is None:
        raise ApiError(400, "missing_reference", "a .tck file stores no space: add a 'reference' file (NIfTI "
                       ".nii/.nii.gz or .trk)", ACCEPTED_BUNDLE)
    if fmt != "tck":  # a BundleFormatError on the way is the caller's 4xx (`errors.refusal`)
        bundle = load_bundle_bytes(data, format=fmt, name=name, max_streamlines=max_streamlines, max_points=max_points)
    else:
        ref = reference.read_bytes()
        with tempfile.TemporaryDirectory(prefix="vqdiff-ref-") as tmp:
            ref_path = Path(tmp) / ("reference" + _reference_suffix(ref, reference_name))
            ref_path.write_bytes(ref)
            bundle = load_bundle_bytes(data, format=fmt, reference=ref_path, name=name)
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


def read_latents(file: Path, pipeline, latent_shape: tuple, *, max_groups: int, max_points: int) -> Latents:
    """An uploaded latents file -> `Latents` checked against the served model and the limits."""
    data = file.read_bytes()
    if not data:
        raise ApiError(400, "empty", "the uploaded latents file is empty (0 bytes)", ACCEPTED_LATENTS)
    lat = Latents.from_bytes(data)  # LatentsFormatError: 400 (`errors.refusal`)
    if lat.n_groups > max_groups:
        raise ApiError(413, "too_many_groups", f"the latents hold {lat.n_groups} groups; this server decodes at "
                       f"most {max_groups} per request", ACCEPTED_LATENTS, limit_groups=max_groups)
    if tuple(lat.latents.shape[1:]) != tuple(latent_shape):
        raise ApiError(422, "latent_shape_mismatch", f"latents of shape {list(lat.latents.shape[1:])} per group; "
                       f"the served model uses {list(latent_shape)}", ACCEPTED_LATENTS)
    if lat.total_points > max_points:
        raise ApiError(413, "too_many_points", f"the latents record {lat.total_points} points in all; this "
                       f"server restores at most {max_points}", ACCEPTED_LATENTS, limit_points=max_points)
    if not np.isfinite(lat.latents).all():
        raise ApiError(422, "non_finite", "the latents hold NaN or infinite values", ACCEPTED_LATENTS)
    pipeline.prepare_decode(lat)  # ModelMismatchError: 409
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


def warm_up(codec) -> float:
    """One synthetic bundle through parsing, registration, the codec, writing and the figures (imports,
    caches, dipy's slow first calls); seconds."""
    from vqdiff.quality import reconstruction_quality

    t0 = time.perf_counter()
    lines = np.cumsum(np.random.default_rng(0).normal(0.0, 1.0, (70, 30, 3)), axis=1).astype(np.float32) + 10
    data = bundle_to_bytes(Bundle(list(lines), SpatialHeader.identity(), "memory", "warmup"), format="trk")
    bundle = load_bundle_bytes(data, format="trk", name="warmup")
    recon = codec.decode(codec.encode(bundle), restore_points=True)
    write_bundle(recon, "trk")
    reconstruction_quality(bundle, recon)
    return time.perf_counter() - t0
