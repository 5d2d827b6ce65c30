"""TrackVis ``.trk``: the header (parsed by nibabel) and the records, parsed with vectorised numpy."""

from __future__ import annotations

import functools
import io
import struct
from pathlib import Path

import numpy as np
from nibabel.streamlines import TrkFile
from nibabel.streamlines.header import Field
from nibabel.streamlines.tractogram_file import DataError, HeaderError
from nibabel.streamlines.trk import decode_value_from_name, get_affine_trackvis_to_rasmm

from ..bundle import SpatialHeader
from ..geometry import map_points
from .common import cut, fail


def trk_header(buf: bytes, where: str | None, reason: str) -> tuple[dict, SpatialHeader, np.ndarray]:
    """Parse the 1000-byte TRK header with nibabel (header only: a lazy load would read data) ->
    (its fields, the file's `SpatialHeader`, the voxmm -> RAS mm affine of its points, read-only)."""
    try:
        hdr = TrkFile._read_header(io.BytesIO(buf[:1000]))
        raw = hdr[Field.VOXEL_ORDER]
        raw = bytes(raw) if isinstance(raw, bytes) else str(raw).encode("latin-1")
        order = raw.decode("latin-1").strip("\x00 ")
        vox_to_ras = np.asarray(hdr[Field.VOXEL_TO_RASMM], dtype=np.float64)
        dims = tuple(int(d) for d in hdr[Field.DIMENSIONS])
        sizes = tuple(float(v) for v in hdr[Field.VOXEL_SIZES])
        affine = _points_affine(vox_to_ras.tobytes(), sizes, raw, dims)
        spatial = SpatialHeader(vox_to_ras, dims, sizes, order.upper() or "LPS")
    except (HeaderError, DataError, ValueError, KeyError, struct.error) as exc:
        raise fail(f"invalid TRK header ({exc}); expected a TrackVis v1/v2 header of 1000 bytes "
                   "with hdr_size 1000 and a valid vox_to_ras affine", reason, where) from exc
    return hdr, spatial, affine


@functools.lru_cache(maxsize=64)
def _points_affine(vox_to_ras: bytes, sizes: tuple, order: bytes, dims: tuple) -> np.ndarray:
    """nibabel's voxmm -> RAS mm affine of a TRK file's points, from the header fields it reads (cached:
    the files of one subject share them, and nibabel's orientation arithmetic costs about as much as
    mapping a 64-streamline group). Read-only."""
    hdr = {Field.VOXEL_TO_RASMM: np.frombuffer(vox_to_ras, np.float64).reshape(4, 4),
           Field.VOXEL_SIZES: np.asarray(sizes, np.float32), Field.VOXEL_ORDER: order,
           Field.DIMENSIONS: np.asarray(dims, np.int16)}
    affine = np.asarray(get_affine_trackvis_to_rasmm(hdr), np.float64)
    affine.flags.writeable = False
    return affine


def _records(buf: bytes, off: int, e: str, stride: int, nprop: int, where: str | None):
    """(starts, lengths) of the TRK records; one vectorised check when all streamlines share a length."""
    end, size = len(buf), len(buf) - off
    first = struct.unpack_from(e + "i", buf, off)[0] if size >= 4 else -1
    rec = 4 * (1 + first * stride + nprop)
    if first >= 0 and size % rec == 0:
        words = np.frombuffer(buf, e + "i4", size // 4, off).reshape(-1, rec // 4)
        if np.all(words[:, 0] == first):
            return off + rec * np.arange(len(words), dtype=np.int64), np.full(len(words), first, np.int64)
    starts, lengths, pos, unpack = [], [], off, struct.Struct(e + "i").unpack_from
    while pos < end:
        k = len(starts)
        if end - pos < 4:
            raise cut(f"file ends inside the point count of streamline {k}", "trk", where)
        n = unpack(buf, pos)[0]
        if n < 0:
            raise fail(f"streamline {k} declares {n} points; expected a non-negative point count",
                       "unreadable", where)
        need = 4 * (1 + n * stride + nprop)
        if pos + need > end:
            raise cut(f"file ends inside streamline {k} (its record needs {need} bytes, {end - pos} remain)",
                      "trk", where)
        starts.append(pos)
        lengths.append(n)
        pos += need
    return np.asarray(starts, np.int64), np.asarray(lengths, np.int64)


def _named(columns: np.ndarray | None, names, default: str) -> dict[str, np.ndarray]:
    """Split the scalar / property ``columns`` by the header's names (nibabel's ``name\\x00<count>`` rule;
    columns no name covers are ``default``, as nibabel names them); a 1-column item is 1-D."""
    if columns is None or columns.shape[1] == 0:
        return {}
    out, at = {}, 0
    for field in names:
        name, count = decode_value_from_name(bytes(field))
        if count == 0 or at >= columns.shape[1]:
            continue
        out[name] = columns[:, at:at + count]
        at += count
    if at < columns.shape[1]:
        out[default] = columns[:, at:]
    return {k: (v[:, 0] if v.shape[1] == 1 else v).astype(np.float32) for k, v in out.items()}


def read_trk(source: Path | bytes, where: str | None):
    """(SpatialHeader, points (M, 3) float32 in RAS mm, lengths (S,) int64, carried) of a ``.trk`` file;
    ``carried``: ``{"dps": properties, "dpv": scalars}`` by the header's names."""
    buf = source if isinstance(source, bytes | bytearray | memoryview) else Path(source).read_bytes()
    if len(buf) < 1000:
        raise cut(f"file has {len(buf)} bytes but a TRK header alone is 1000 bytes", "trk", where)
    hdr, spatial, affine = trk_header(buf, where, "unreadable")
    stride, nprop = 3 + int(hdr[Field.NB_SCALARS_PER_POINT]), int(hdr[Field.NB_PROPERTIES_PER_STREAMLINE])
    declared, off, e = int(hdr[Field.NB_STREAMLINES]), int(hdr["_offset_data"]), hdr[Field.ENDIANNESS]
    if stride < 3 or nprop < 0 or declared < 0:
        raise fail(f"TRK header has negative counts (n_scalars={stride - 3}, n_properties={nprop}, "
                   f"n_count={declared}); expected counts >= 0", "unreadable", where)
    if len(buf) == off and declared > 0:
        raise cut(f"header declares {declared} streamlines but the file ends after the header", "trk", where)
    starts, lengths = _records(buf, off, e, stride, nprop, where)
    if declared and declared != len(lengths):
        raise fail(f"header declares {declared} streamlines (n_count) but the file holds {len(lengths)} "
                   "complete records; expected the two to agree", "count_mismatch", where)
    words = np.frombuffer(buf, e + "f4", (len(buf) - off) // 4, off)
    scalars = props = None
    if len(lengths) and np.all(lengths == lengths[0]):
        n = int(lengths[0])
        recs = words.reshape(len(lengths), -1)
        block = recs[:, 1:1 + n * stride].reshape(len(lengths), n, stride)
        pts = block[..., :3]
        if stride > 3 or nprop:
            scalars, props = block[..., 3:].reshape(-1, stride - 3), recs[:, 1 + n * stride:1 + n * stride + nprop]
    elif stride == 3 and nprop == 0:  # points only: drop the count words
        keep = np.ones(len(words), dtype=bool)
        keep[(starts - off) // 4] = False
        pts = words[keep].reshape(-1, 3)
    else:
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        rows = np.repeat((starts - off) // 4 + 1, lengths) + within * stride
        pts = words[rows[:, None] + np.arange(3)]
        scalars = words[rows[:, None] + np.arange(3, stride)]
        props = words[((starts - off) // 4 + 1 + lengths * stride)[:, None] + np.arange(nprop)]
    carried = {"dps": _named(props, hdr["property_name"], "properties"),
               "dpv": _named(scalars, hdr["scalar_name"], "scalars")} if scalars is not None else {}
    return spatial, map_points(pts, affine), lengths, carried
