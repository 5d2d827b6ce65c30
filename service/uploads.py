"""The HTTP side of the codec's files, run in worker threads: uploads -> `Bundle` / `Latents` with the
limits checked, bundles -> bytes, a request's stage timer; refusals as `ApiError`. Nothing of encoding
or decoding is restated here (that is `vqdiff.codec.Pipeline`)."""

from __future__ import annotations

import hashlib
import io
import re
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from vqdiff.bundle import Bundle
from vqdiff.canonical import zero_length_streamlines
from vqdiff.errors import BundleFormatError
from vqdiff.filesteps import decode_file_input, join_files
from vqdiff.io import bundle_to_bytes, load_bundle_bytes, sniff_format
from vqdiff.subject import Subject, load_latents

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


def read_files(files: list[Path], reference: Path | None, names: list[str], *, max_bundles: int,
               max_streamlines: int, **limits) -> tuple[Bundle, str]:
    """One uploaded tractogram -> (`Bundle`, sha256); several (a subject's per-bundle files, one format, named by
    their file names) -> one file whose groups are the bundles (`join_bundles`, as batch's ``--per-subject``)."""
    if len(files) > max_bundles:
        raise ApiError(413, "too_many_bundles", f"{len(files)} files; this server takes at most {max_bundles} bundles "
                       "per request", f"at most {max_bundles} 'file' parts; {ACCEPTED_BUNDLE}", limit_bundles=max_bundles)
    read = [read_bundle(f, reference, name=bundle_name(n), max_streamlines=max_streamlines, **limits)
            for f, n in zip(files, names + [""] * (len(files) - len(names)), strict=False)]
    if len(read) == 1:
        return read[0]
    if len(formats := sorted({b.source_format for b, _ in read})) > 1:
        raise ApiError(400, "mixed_formats", f"the files are of several formats ({', '.join(formats)})",
                       "the 'file' parts of one request all TRK, all TCK (one 'reference') or all TRX")
    if (total := sum(len(b) for b, _ in read)) > max_streamlines:
        raise ApiError(413, "too_many_streamlines", f"the files hold {total} streamlines; this server accepts at most "
                       f"{max_streamlines} per request", ACCEPTED_BUNDLE, limit_streamlines=max_streamlines)
    try:
        return join_files(read, name="subject")
    except ValueError as exc:
        raise ApiError(400, "duplicate_bundle_names", str(exc), "'file' parts with distinct file names") from exc


def read_latents(file: Path, pipeline, latent_shape: tuple, *, max_groups: int, max_points: int, max_bundles: int):
    """An uploaded latents or subject file -> (`Latents` | `Subject`, its decoder input), checked against the
    served model and the limits."""
    data = file.read_bytes()
    if not data:
        raise ApiError(400, "empty", "the uploaded latents file is empty (0 bytes)", ACCEPTED_LATENTS)
    lat = load_latents(data)  # LatentsFormatError: 400 (`errors.refusal`)
    parts = [p.latents for p in lat.parts] if isinstance(lat, Subject) else [lat]
    if len(parts) > max_bundles:
        raise ApiError(413, "too_many_bundles", f"the subject holds {len(parts)} bundles; this server decodes at most "
                       f"{max_bundles} per request", ACCEPTED_LATENTS, limit_bundles=max_bundles)
    if (n_groups := sum(p.n_groups for p in parts)) > max_groups:
        raise ApiError(413, "too_many_groups", f"the latents hold {n_groups} groups; this server decodes at "
                       f"most {max_groups} per request", ACCEPTED_LATENTS, limit_groups=max_groups)
    if bad := next((p for p in parts if tuple(p.latents.shape[1:]) != tuple(latent_shape)), None):
        raise ApiError(422, "latent_shape_mismatch", f"latents of shape {list(bad.latents.shape[1:])} per group; "
                       f"the served model uses {list(latent_shape)}", ACCEPTED_LATENTS)
    if (points := sum(p.total_points for p in parts)) > max_points:
        raise ApiError(413, "too_many_points", f"the latents record {points} points in all; this "
                       f"server restores at most {max_points}", ACCEPTED_LATENTS, limit_points=max_points)
    if not all(np.isfinite(p.latents).all() for p in parts):
        raise ApiError(422, "non_finite", "the latents hold NaN or infinite values", ACCEPTED_LATENTS)
    return lat, decode_file_input(pipeline, lat)  # ModelMismatchError: 409


def output_format(requested: str | None, default: str) -> str:
    fmt = (requested or default).lower().lstrip(".")
    if fmt not in OUTPUT_FORMATS:
        raise ApiError(400, "unsupported_output_format", f"output format {requested!r} is not supported",
                       "format = trk, tck or trx")
    return fmt


def write_zip(bundles: dict[str, Bundle], fmt: str) -> bytes:
    """A zip of one ``<name>.<fmt>`` per bundle (``bundles=zip`` on /decode)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:  # the formats compress themselves or hardly at all
        for name, bundle in bundles.items():
            z.writestr(f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.{fmt}", write_bundle(bundle, fmt))
    return out.getvalue()


def write_bundle(bundle: Bundle, fmt: str) -> bytes:
    try:
        return bundle_to_bytes(bundle, format=fmt)
    except BundleFormatError as exc:
        raise ApiError(422, exc.reason, str(exc), "latents whose spatial header can be written as TRK/TRX, "
                       "or format=tck") from exc
