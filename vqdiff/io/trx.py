"""TRX ``.trx``: read and written with `zipfile` (``header.json``, ``positions.3.<float>``,
``offsets.<int>`` with NB_STREAMLINES + 1 entries), compatible with trx-python but without its
read-write memory maps and temporary folders, so trx is never imported."""

from __future__ import annotations

import io
import json
import logging
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from nibabel.affines import voxel_sizes as _affine_voxel_sizes
from nibabel.orientations import aff2axcodes

from ..bundle import SpatialHeader
from ..errors import BundleFormatError
from .common import cut, fail

log = logging.getLogger(__name__)

_TRX_POS = re.compile(r"^positions\.3\.(float16|float32|float64)$")
_TRX_OFF = re.compile(r"^offsets\.(u?int32|u?int64)$")
# groups/<name>.<int>, dps/<name>[.<k>].<num>, dpv/<name>[.<k>].<num> (trx-python's layout)
_TRX_DATA = re.compile(r"^(groups|dps|dpv)/(.+?)(?:\.(\d+))?\.(u?int(?:8|16|32|64)|float(?:16|32|64)|bool)$")
CARRIED = ("groups", "dps", "dpv")


def _le(member: str) -> np.dtype:
    return np.dtype(member.rsplit(".", 1)[1]).newbyteorder("<")


MAX_HEADER_BYTES = 1 << 20  # header.json


def _check_member(zf: zipfile.ZipFile, name: str, expected: int, where: str | None) -> None:
    """Refuse a member whose inflated size (from the zip directory) is not what the header implies,
    before a byte of it is inflated: a small archive cannot unpack into gigabytes."""
    size = zf.getinfo(name).file_size
    if size != expected:
        raise fail(f"member {name} would inflate to {size} bytes but the header implies {expected}; expected the "
                   "zip directory and header.json to agree", "count_mismatch", where)


def read_trx(source: Path | bytes, where: str | None, *, max_streamlines: int | None = None,
             max_points: int | None = None):
    """(SpatialHeader, points (M, 3) float32 in RAS mm, lengths (S,)) of a ``.trx`` archive.

    The header's counts are checked against ``max_streamlines`` / ``max_points`` and the members'
    declared sizes against the counts before anything is inflated (zip-bomb guard)."""
    in_memory = isinstance(source, bytes | bytearray | memoryview)
    try:
        zf = zipfile.ZipFile(io.BytesIO(source) if in_memory else source)
    except zipfile.BadZipFile as exc:
        if in_memory:  # a complete zip ends with its end-of-central-directory record
            tail = bytes(source[-65557:])
        else:
            with open(source, "rb") as fh:
                fh.seek(max(0, Path(source).stat().st_size - 65557))
                tail = fh.read()
        rec = tail[tail.rfind(b"PK\x05\x06"):] if b"PK\x05\x06" in tail else b""
        if len(rec) < 22 or len(rec) < 22 + struct.unpack_from("<H", rec, 20)[0]:
            raise cut(f"zip archive has no complete central directory ({exc})", "trx", where) from exc
        raise fail(f"corrupt zip archive ({exc}); expected a TRX zip", "unreadable", where) from exc
    with zf:
        try:
            names = zf.namelist()
            pos_name = next((n for n in names if _TRX_POS.match(n)), None)
            off_name = next((n for n in names if _TRX_OFF.match(n)), None)
            if zf.getinfo("header.json").file_size > MAX_HEADER_BYTES:
                raise ValueError(f"header.json inflates to more than {MAX_HEADER_BYTES} bytes")
            hdr = json.loads(zf.read("header.json"))
            affine = np.asarray(hdr["VOXEL_TO_RASMM"], dtype=np.float64).reshape(4, 4)
            dims = tuple(int(d) for d in hdr["DIMENSIONS"])
            nv, ns = int(hdr["NB_VERTICES"]), int(hdr["NB_STREAMLINES"])
            codes = aff2axcodes(affine)
            if ns == 0:
                return SpatialHeader(affine, dims, (1.0, 1.0, 1.0)), np.zeros((0, 3), np.float32), np.zeros(0), {}
            if pos_name is None or off_name is None or len(dims) != 3 or None in codes:
                raise ValueError(f"members {names}, DIMENSIONS {dims}, axis codes {codes}")
            if nv < 0 or ns < 0:
                raise ValueError(f"negative counts NB_VERTICES={nv}, NB_STREAMLINES={ns}")
            for count, limit, what in ((ns, max_streamlines, "streamlines"), (nv, max_points, "points")):
                if limit is not None and count > limit:
                    raise fail(f"header declares {count} {what}; at most {limit} are accepted here",
                               f"too_many_{what}", where)
            _check_member(zf, pos_name, 3 * nv * _le(pos_name).itemsize, where)
            _check_member(zf, off_name, (ns + 1) * _le(off_name).itemsize, where)
            pos = np.frombuffer(zf.read(pos_name), _le(pos_name))
            offs = np.frombuffer(zf.read(off_name), _le(off_name)).astype(np.int64)
            carried, ignored = _read_carried(zf, names, ns, nv, where)
        except BundleFormatError:
            raise
        except (KeyError, TypeError, ValueError, zipfile.BadZipFile, zlib.error, EOFError,
                NotImplementedError, RuntimeError, OSError) as exc:  # RuntimeError: encrypted member
            raise fail(f"invalid TRX archive ({exc}); expected header.json (VOXEL_TO_RASMM 4x4, DIMENSIONS, "
                       "NB_VERTICES, NB_STREAMLINES), positions.3.<float16|32|64> and offsets.<(u)int32|64>",
                       "unreadable", where) from exc
    sizes = tuple(float(v) for v in _affine_voxel_sizes(affine))
    spatial = SpatialHeader(affine, dims, sizes, "".join(codes))
    if pos.size % 3 or pos.size // 3 != nv or len(offs) != ns + 1:  # trx-python writes NB_STREAMLINES + 1
        raise fail(f"header declares {ns} streamlines and {nv} vertices but the archive holds "
                   f"{pos.size / 3:g} positions and {len(offs)} offsets (expected NB_STREAMLINES + 1); "
                   "expected them to agree", "count_mismatch", where)
    if offs[0] != 0 or offs[-1] != nv or np.any(np.diff(offs) < 0):
        raise fail("TRX offsets must start at 0, never decrease and end at NB_VERTICES", "unreadable", where)
    if ignored:
        log.warning("%s: TRX member(s) %s are not carried through vqdiff (it carries groups, dps and dpv); they "
                    "will not be in decoded files", where or "TRX", ", ".join(ignored))
    return spatial, pos.reshape(-1, 3).astype(np.float32), np.diff(offs), carried


def _read_carried(zf: zipfile.ZipFile, names: list[str], ns: int, nv: int, where: str | None):
    """``{"groups", "dps", "dpv"}`` of the archive (file order), each member's inflated size checked against the
    counts before it is read, and the names of data members vqdiff does not carry (``dpg/...``, others)."""
    from ..carried import GROUPS_ACCEPTED, check_group

    carried: dict[str, dict[str, np.ndarray]] = {k: {} for k in CARRIED}
    ignored = []
    for member in names:
        if member.endswith("/") or "/" not in member:
            continue
        m = _TRX_DATA.match(member)
        if m is None:
            if member.split("/", 1)[0] == "groups":
                raise fail(f"TRX group member {member!r} is not groups/<name>.<(u)int8|16|32|64>; {GROUPS_ACCEPTED}",
                           "bad_groups", where)
            ignored.append(member)
            continue
        kind, name, k, dtype = m.group(1), m.group(2), int(m.group(3) or 1), np.dtype(m.group(4)).newbyteorder("<")
        size = zf.getinfo(member).file_size
        if kind == "groups":
            what = (f"holds {dtype.name} values, not integers" if dtype.kind not in "iu" else
                    f"({size} bytes) lists more indices than the file's {ns} streamlines"
                    if size % dtype.itemsize == 0 and size > ns * dtype.itemsize else
                    f"({size} bytes) is not whole {dtype.name} indices" if size % dtype.itemsize else "")
            if what:
                raise fail(f"TRX group member {member!r} {what}; {GROUPS_ACCEPTED}", "bad_groups", where)
            carried["groups"][name] = check_group(name, np.frombuffer(zf.read(member), dtype), ns, where)
            continue
        rows = ns if kind == "dps" else nv
        if k < 1 or size != rows * k * dtype.itemsize:
            raise fail(f"TRX member {member!r} would inflate to {size} bytes; {rows} rows of {k} {dtype.name} "
                       f"need {rows * k * dtype.itemsize}: {kind} has one row per "
                       f"{'streamline' if kind == 'dps' else 'point'}", "bad_carried_data", where)
        values = np.frombuffer(zf.read(member), dtype).astype(dtype.newbyteorder("="))
        carried[kind][name] = values if m.group(3) is None else values.reshape(rows, k)
    return carried, ignored


def _member(kind: str, name: str, values: np.ndarray) -> tuple[str, bytes]:
    arr = np.asarray(values)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "iuf" or arr.dtype.itemsize > 8:
        arr = arr.astype(np.float64)
    dims = f".{arr.shape[1]}" if arr.ndim == 2 else ""
    return f"{kind}/{name}{dims}.{arr.dtype.name}", arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def write_trx(arrays: list[np.ndarray], header: SpatialHeader, fh, *, groups=None, dps=None, dpv=None) -> None:
    """Write float32 positions, uint64 offsets, the header JSON and the carried data (groups as uint32,
    dps / dpv in their dtype) as a stored (uncompressed) zip."""
    affine = np.asarray(header.affine, dtype=np.float64)
    offsets = np.cumsum([0] + [len(a) for a in arrays]).astype("<u8")
    meta = {"VOXEL_TO_RASMM": affine.tolist(), "DIMENSIONS": [int(d) for d in header.dimensions],
            "NB_VERTICES": int(offsets[-1]), "NB_STREAMLINES": len(arrays)}
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("header.json", json.dumps(meta))
        zf.writestr("positions.3.float32", np.concatenate(arrays).astype("<f4").tobytes())
        zf.writestr("offsets.uint64", offsets.tobytes())
        for name, members in (groups or {}).items():
            zf.writestr(f"groups/{name}.uint32", np.asarray(members).astype("<u4").tobytes())
        for kind, data in (("dps", dps or {}), ("dpv", dpv or {})):
            for name, values in data.items():
                zf.writestr(*_member(kind, name, values))
