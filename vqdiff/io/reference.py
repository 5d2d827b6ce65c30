"""The reference space a ``.tck`` needs: a SpatialHeader, a NIfTI image or path, or a ``.trk`` path."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import aff2axcodes

from ..bundle import SpatialHeader
from ..errors import BundleFormatError
from .common import MAGIC, fail
from .trk import trk_header

REF_ACCEPTED = "a NIfTI image (.nii/.nii.gz), a TRK file (.trk) or a SpatialHeader"


def resolve_reference(reference, where: str | None) -> SpatialHeader:
    """The `SpatialHeader` of ``reference``; `BundleFormatError` (missing/bad_reference) otherwise."""
    def bad(what: str) -> BundleFormatError:
        return fail(f"{what}; expected {REF_ACCEPTED}", "bad_reference", where)

    if reference is None:
        raise fail(f"a .tck file stores no reference space; pass reference= {REF_ACCEPTED}",
                   "missing_reference", where)
    if isinstance(reference, SpatialHeader):
        return reference
    if all(hasattr(reference, a) for a in ("affine", "shape", "header")):  # a nibabel image
        img, label = reference, type(reference).__name__
    elif isinstance(reference, (str, os.PathLike)):
        ref, label = Path(reference), str(reference)
        if ref.name.lower().endswith(".trk"):
            try:
                with open(ref, "rb") as fh:
                    buf = fh.read(1000)
            except OSError as exc:
                raise bad(f"cannot read reference {label} ({exc})") from exc
            if not buf.startswith(MAGIC["trk"]) or len(buf) < 1000:
                raise bad(f"reference {label} is not a TrackVis file (no 1000-byte 'TRACK' header)")
            try:
                return trk_header(buf, None, "bad_reference")[1]
            except BundleFormatError as exc:
                raise bad(f"reference {label}: {exc}") from exc.__cause__
        if not ref.name.lower().endswith((".nii", ".nii.gz")):
            raise bad(f"unsupported reference {label}")
        import nibabel as nib

        try:
            img = nib.load(ref)
            img.header.get_zooms()
        except (OSError, EOFError, ValueError, zlib.error, ImageFileError) as exc:
            raise bad(f"cannot read reference {label} ({exc})") from exc
    else:
        raise bad(f"reference of type {type(reference).__name__} is not supported")
    affine = np.asarray(img.affine, dtype=np.float64)
    codes = aff2axcodes(affine) if affine.shape == (4, 4) and np.isfinite(affine).all() else (None,)
    if len(img.shape) < 3 or None in codes:
        raise bad(f"reference {label} is not a 3D image with a valid affine")
    return SpatialHeader(affine, tuple(int(s) for s in img.shape[:3]),
                         tuple(float(z) for z in img.header.get_zooms()[:3]), "".join(codes))
