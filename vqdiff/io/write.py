"""Writers: a `Bundle` -> a ``.trk`` / ``.tck`` (nibabel) or ``.trx`` (zipfile) file, atomically, or bytes."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
from nibabel.orientations import aff2axcodes
from nibabel.streamlines import ArraySequence, TckFile, Tractogram, TrkFile
from nibabel.streamlines.header import Field
from nibabel.streamlines.tractogram_file import DataError, HeaderError

from ..bundle import Bundle
from ..carried import check_carried, dropped_names
from ..errors import BundleFormatError
from .common import check_flat, fail, format_from_path, normalise_format
from .trx import write_trx

log = logging.getLogger(__name__)


MAX_TRK_NAMES = 10  # TrackVis names at most 10 scalars and 10 properties, of at most 18 characters
MAX_TRK_NAME = 18


def _trk_data(bundle: Bundle, lengths: np.ndarray, dropped: list[str]) -> tuple[dict, dict]:
    """The bundle's dps / dpv as nibabel's data_per_streamline / data_per_point ((N, k), per-streamline
    (n_i, k)); names TrackVis cannot hold are added to ``dropped``."""
    def fits(kind: str, items: dict) -> dict:
        keep = {}
        for name, v in items.items():
            if len(keep) >= MAX_TRK_NAMES or len(name) > MAX_TRK_NAME or "\x00" in name:
                dropped.append(f"{kind} {name!r} (TRK holds at most {MAX_TRK_NAMES} names of {MAX_TRK_NAME} characters)")
                continue
            arr = np.asarray(v, np.float32)
            keep[name] = arr[:, None] if arr.ndim == 1 else arr
        return keep

    dps = fits("dps", bundle.dps)
    dpv = fits("dpv", bundle.dpv)
    bounds = np.cumsum(lengths)[:-1]
    return dps, {k: ArraySequence(np.split(v, bounds)) for k, v in dpv.items()}


def _write(fmt: str, arrays: list[np.ndarray], bundle: Bundle, fh, lengths: np.ndarray) -> list[str]:
    """Write the file; return what of the bundle's carried data the format could not hold."""
    header = bundle.header
    if fmt == "trx":
        write_trx(arrays, header, fh, groups=bundle.groups, dps=bundle.dps, dpv=bundle.dpv)
        return []
    if fmt == "tck":
        TckFile(Tractogram(ArraySequence(arrays), affine_to_rasmm=np.eye(4))).save(fh)
        return dropped_names(bundle)
    dropped = [f"group {k!r}" for k in bundle.groups]
    dps, dpv = _trk_data(bundle, lengths, dropped)
    tractogram = Tractogram(ArraySequence(arrays), data_per_streamline=dps, data_per_point=dpv,
                            affine_to_rasmm=np.eye(4))
    affine = np.asarray(header.affine, dtype=np.float64)
    hdr = {Field.VOXEL_TO_RASMM: affine.astype(np.float32), Field.DIMENSIONS: np.asarray(header.dimensions),
           Field.VOXEL_SIZES: np.asarray(header.voxel_sizes, dtype=np.float32),
           Field.VOXEL_ORDER: str(header.voxel_order).encode("latin-1")}
    TrkFile(tractogram, header=hdr).save(fh)
    return dropped


def _bad_header(detail: str, fmt: str, where: str) -> BundleFormatError:
    return fail(f"the bundle's header cannot be written as {fmt.upper()} ({detail}); expected an invertible "
                "4x4 affine with identifiable axes, 3 positive dimensions and positive voxel sizes",
                "bad_reference", where)


def save_bundle(bundle: Bundle, path, *, format: str | None = None, overwrite: bool = False) -> Path:
    """Write ``bundle`` as TRK, TCK or TRX, atomically.

    Parameters
    ----------
    bundle : Bundle
        Streamlines in RAS mm; validated first (`BundleFormatError` otherwise).
    path : path-like
        Destination; the format comes from its extension unless ``format`` is given.
    format : {"trk", "tck", "trx"}, optional
        Output format, overriding the extension.
    overwrite : bool
        Replace an existing file; otherwise `FileExistsError` is raised.

    Returns
    -------
    Path
        The written path.

    Notes
    -----
    TRX also writes the bundle's groups, dps and dpv; TRK its dps as properties and dpv as scalars
    (float32, at most 10 names each); what a format cannot hold is named in a logged warning (TCK
    holds none of them). Carried data that do not fit the streamlines raise `BundleFormatError`
    (``bad_groups``, ``bad_carried_data``).
    TRK keeps affine (float32), dimensions, voxel sizes and voxel order; TRX keeps affine and
    dimensions (voxel sizes and order are derived from the affine on reload); TCK keeps world
    coordinates only, so reloading it needs the reference. Data go to a temporary file in the
    destination folder that is renamed over ``path`` (`os.replace`) and removed on failure.
    """
    path = Path(path)
    where = str(path)
    fmt = normalise_format(format, where) if format else format_from_path(path)
    arrays = [np.asarray(s, dtype=np.float32) for s in bundle.streamlines]
    for i, a in enumerate(arrays):
        if a.ndim != 2 or a.shape[1] != 3:
            raise fail(f"streamline {i} has shape {a.shape}; each streamline must be an (N, 3) array",
                       "bad_shape", where)
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    check_flat(np.concatenate(arrays) if arrays else np.zeros((0, 3), np.float32), lengths, where)
    check_carried(bundle, where=where)
    h, affine = bundle.header, np.asarray(bundle.header.affine, dtype=np.float64)
    if fmt != "tck" and (  # TCK stores no header
            affine.shape != (4, 4) or not np.isfinite(affine).all() or np.linalg.det(affine[:3, :3]) == 0
            or None in aff2axcodes(affine) or len(h.dimensions) != 3 or min(h.dimensions) < 1
            or not np.all(np.asarray(h.voxel_sizes) > 0)):
        raise _bad_header(f"affine {affine.tolist()}, dimensions {h.dimensions}, voxel sizes {h.voxel_sizes}",
                          fmt, where)
    if path.exists() and not overwrite:
        raise FileExistsError(errno.EEXIST, "refusing to overwrite an existing file; pass overwrite=True "
                              "(or choose another path) to replace it", where)
    mode = (path.stat().st_mode & 0o777) if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            try:
                dropped = _write(fmt, arrays, bundle, fh, lengths)
            except (HeaderError, DataError, ValueError, OverflowError) as exc:  # LinAlgError is a ValueError
                raise _bad_header(f"{exc}", fmt, where) from exc
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if dropped:
        log.warning("%s: a %s file cannot hold %s: not written (write .trx to keep groups, dps and dpv)",
                    where, fmt.upper(), ", ".join(dropped))
    return path


def bundle_to_bytes(bundle: Bundle, *, format: str = "trk") -> bytes:
    """Serialise ``bundle`` to the bytes of a ``format`` file (via a temporary file, removed)."""
    fmt = normalise_format(format)
    with tempfile.TemporaryDirectory(prefix="vqdiff-out-") as tmp:
        return save_bundle(bundle, Path(tmp) / f"bundle.{fmt}", format=fmt).read_bytes()
