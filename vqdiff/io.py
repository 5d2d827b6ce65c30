"""Read and write streamline bundles: TrackVis ``.trk``, MRtrix ``.tck`` and TRX ``.trx``.

Readers return float32 ``(N, 3)`` streamlines in RAS mm (nibabel's world space) with the file's
`SpatialHeader`. Malformed input raises `BundleFormatError`, ``reason`` being one of:
``unsupported_format``, ``wrong_magic``, ``truncated`` (file ends inside the header or a record,
TCK without its ``inf inf inf`` marker, zip without a complete central directory), ``empty`` (no
streamline, **including a 0-byte file**), ``count_mismatch``, ``too_few_points`` (0 or 1 point),
``non_finite``, ``missing_reference`` (TCK), ``bad_reference`` (unreadable/unsupported reference,
or a header that cannot be written) and ``unreadable`` (other structural damage). A missing path
raises `FileNotFoundError`. TRK: a record cut by the end of the file is ``truncated``; complete
records whose number differs from ``nb_streamlines`` (0 = "not recorded") are ``count_mismatch``,
which also covers a file cut exactly on a record boundary (indistinguishable from a lying header).

TRK/TCK data are parsed with vectorised numpy (nibabel parses their headers and writes them).
TRX is read and written with `zipfile` (``header.json``, ``positions.3.<float>``, ``offsets.<int>``
with NB_STREAMLINES + 1 entries), compatible with trx-python but without its read-write memory
maps and temporary folders, so trx is never imported.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from nibabel.affines import voxel_sizes as _affine_voxel_sizes
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import aff2axcodes
from nibabel.streamlines import ArraySequence, TckFile, Tractogram, TrkFile
from nibabel.streamlines.header import Field
from nibabel.streamlines.tractogram_file import DataError, HeaderError
from nibabel.streamlines.trk import get_affine_trackvis_to_rasmm

from .bundle import FORMATS, Bundle, SpatialHeader
from .errors import BundleFormatError

__all__ = ["load_bundle", "save_bundle", "load_bundle_bytes", "bundle_to_bytes", "sniff_format"]

MAGIC = {"trk": b"TRACK", "tck": b"mrtrix tracks", "trx": b"PK\x03\x04"}
ACCEPTED = "accepted formats are TrackVis .trk, MRtrix .tck and TRX .trx"
_NAMES = {"trk": "TrackVis .trk", "tck": "MRtrix .tck", "trx": "TRX .trx (zip)"}
_REF_ACCEPTED = "a NIfTI image (.nii/.nii.gz), a TRK file (.trk) or a SpatialHeader"
_TRX_POS = re.compile(r"^positions\.3\.(float16|float32|float64)$")
_TRX_OFF = re.compile(r"^offsets\.(u?int32|u?int64)$")
_CHUNK = 1 << 20


def _fail(message: str, reason: str, where: str | None) -> BundleFormatError:
    return BundleFormatError(message, reason=reason, path=where)


def _cut(detail: str, fmt: str, where: str | None) -> BundleFormatError:
    return _fail(f"{detail}; expected a complete {_NAMES[fmt]} file", "truncated", where)


def _normalise_format(fmt: str, where: str | None = None) -> str:
    f = str(fmt).lower().lstrip(".")
    if f not in FORMATS:
        raise _fail(f"unsupported tractogram format {fmt!r}; {ACCEPTED}", "unsupported_format", where)
    return f


def _format_from_path(path: Path) -> str:
    if path.suffix.lower() not in (".trk", ".tck", ".trx"):
        raise _fail(f"unsupported file extension {path.suffix!r}; {ACCEPTED}", "unsupported_format",
                    str(path))
    return path.suffix.lower()[1:]


def sniff_format(data_or_path) -> str | None:
    """Guess the tractogram format from the first bytes.

    Parameters
    ----------
    data_or_path : bytes-like or path-like
        File content (only the first bytes matter) or a path to read them from.

    Returns
    -------
    str or None
        ``"trk"`` (starts with ``b"TRACK"``), ``"tck"`` (``b"mrtrix tracks"``), ``"trx"`` (a zip,
        ``b"PK\\x03\\x04"``), or ``None`` when no signature matches.
    """
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        head = bytes(data_or_path[:16])
    else:
        with open(data_or_path, "rb") as fh:
            head = fh.read(16)
    return next((fmt for fmt, magic in MAGIC.items() if head.startswith(magic)), None)


def _check_magic(head: bytes, fmt: str, where: str | None) -> None:
    magic = MAGIC[fmt]
    if head.startswith(magic):
        return
    if len(head) < len(magic) and magic.startswith(head):
        raise _cut(f"file is only {len(head)} bytes, cut inside the signature {magic!r}", fmt, where)
    other = sniff_format(head)
    hint = f" (it looks like a {_NAMES[other]} file: fix its extension)" if other else ""
    raise _fail(f"file starts with {head[:8]!r}, not the {_NAMES[fmt]} signature {magic!r}{hint}; "
                f"{ACCEPTED}", "wrong_magic", where)


def _trk_header(buf: bytes, where: str | None, reason: str) -> tuple[dict, SpatialHeader]:
    """Parse the 1000-byte TRK header with nibabel (header only: a lazy load would read data)."""
    try:
        hdr = TrkFile._read_header(io.BytesIO(buf[:1000]))
        order = hdr[Field.VOXEL_ORDER]
        order = (order.decode("latin-1") if isinstance(order, bytes) else str(order)).strip("\x00 ")
        spatial = SpatialHeader(np.asarray(hdr[Field.VOXEL_TO_RASMM], dtype=np.float64),
                                tuple(int(d) for d in hdr[Field.DIMENSIONS]),
                                tuple(float(v) for v in hdr[Field.VOXEL_SIZES]), order.upper() or "LPS")
    except (HeaderError, DataError, ValueError, KeyError, struct.error) as exc:
        raise _fail(f"invalid TRK header ({exc}); expected a TrackVis v1/v2 header of 1000 bytes "
                    "with hdr_size 1000 and a valid vox_to_ras affine", reason, where) from exc
    return hdr, spatial


def _resolve_reference(reference, where: str | None) -> SpatialHeader:
    def bad(what: str) -> BundleFormatError:
        return _fail(f"{what}; expected {_REF_ACCEPTED}", "bad_reference", where)

    if reference is None:
        raise _fail(f"a .tck file stores no reference space; pass reference= {_REF_ACCEPTED}",
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
                return _trk_header(buf, None, "bad_reference")[1]
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


def _apply_affine(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Map (P, 3) points through a 4x4 affine in float64 (in chunks); return native float32."""
    out = np.empty(points.shape, dtype=np.float32)
    rot, shift = np.asarray(affine[:3, :3], np.float64), affine[:3, 3]
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite input is reported by _check_flat
        for i in range(0, len(points), _CHUNK):  # einsum, not BLAS matmul: no thread spin on busy hosts
            out[i:i + _CHUNK] = np.einsum("pj,ij->pi", points[i:i + _CHUNK].astype(np.float64), rot) + shift
    return out


def _trk_records(buf: bytes, off: int, e: str, stride: int, nprop: int, where: str | None):
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
            raise _cut(f"file ends inside the point count of streamline {k}", "trk", where)
        n = unpack(buf, pos)[0]
        if n < 0:
            raise _fail(f"streamline {k} declares {n} points; expected a non-negative point count",
                        "unreadable", where)
        need = 4 * (1 + n * stride + nprop)
        if pos + need > end:
            raise _cut(f"file ends inside streamline {k} (its record needs {need} bytes, {end - pos} remain)",
                       "trk", where)
        starts.append(pos)
        lengths.append(n)
        pos += need
    return np.asarray(starts, np.int64), np.asarray(lengths, np.int64)


def _read_trk(path: Path, where: str | None):
    buf = path.read_bytes()
    if len(buf) < 1000:
        raise _cut(f"file has {len(buf)} bytes but a TRK header alone is 1000 bytes", "trk", where)
    hdr, spatial = _trk_header(buf, where, "unreadable")
    stride, nprop = 3 + int(hdr[Field.NB_SCALARS_PER_POINT]), int(hdr[Field.NB_PROPERTIES_PER_STREAMLINE])
    declared, off, e = int(hdr[Field.NB_STREAMLINES]), int(hdr["_offset_data"]), hdr[Field.ENDIANNESS]
    if stride < 3 or nprop < 0 or declared < 0:
        raise _fail(f"TRK header has negative counts (n_scalars={stride - 3}, n_properties={nprop}, "
                    f"n_count={declared}); expected counts >= 0", "unreadable", where)
    if len(buf) == off and declared > 0:
        raise _cut(f"header declares {declared} streamlines but the file ends after the header", "trk", where)
    starts, lengths = _trk_records(buf, off, e, stride, nprop, where)
    if declared and declared != len(lengths):
        raise _fail(f"header declares {declared} streamlines (n_count) but the file holds {len(lengths)} "
                    "complete records; expected the two to agree", "count_mismatch", where)
    words = np.frombuffer(buf, e + "f4", (len(buf) - off) // 4, off)
    if len(lengths) and np.all(lengths == lengths[0]):
        n = int(lengths[0])
        pts = words.reshape(len(lengths), -1)[:, 1:1 + n * stride].reshape(-1, stride)[:, :3]
    elif stride == 3 and nprop == 0:  # points only: drop the count words
        keep = np.ones(len(words), dtype=bool)
        keep[(starts - off) // 4] = False
        pts = words[keep].reshape(-1, 3)
    else:
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        rows = np.repeat((starts - off) // 4 + 1, lengths) + within * stride
        pts = words[rows[:, None] + np.arange(3)]
    return spatial, _apply_affine(pts, get_affine_trackvis_to_rasmm(hdr)), lengths


def _read_tck(path: Path, where: str | None):
    buf = path.read_bytes()
    expected = ("expected 'mrtrix tracks', text 'key: value' lines with 'datatype: Float32LE|BE', "
                "'file: . <offset>' and an integer 'count', then 'END'")
    try:
        hdr = TckFile._read_header(io.BytesIO(buf))
        off, dtype = int(hdr["_offset_data"]), hdr["_dtype"]
        declared = int(hdr["count"].strip()) if "count" in hdr else None
    except HeaderError as exc:
        reason = "unreadable" if re.search(rb"\nEND\r?\n", buf) else "truncated"
        raise _fail(f"invalid TCK header ({exc}); {expected}", reason, where) from exc
    except (ValueError, KeyError, IndexError) as exc:  # ValueError includes UnicodeDecodeError
        raise _fail(f"invalid TCK header ({exc}); {expected}", "unreadable", where) from exc
    nbytes = len(buf) - off
    if nbytes < 0 or nbytes % 12:
        raise _cut(f"data section of {nbytes} bytes is not a whole number of float32 (x, y, z)", "tck", where)
    coords = np.frombuffer(buf, dtype, nbytes // 4, off).reshape(-1, 3)
    if len(coords) == 0 or not np.isinf(coords[-1]).all():
        raise _cut("file does not end with the 'inf inf inf' end-of-file marker", "tck", where)
    body = coords[:-1]
    delim = np.isnan(body).all(axis=1)
    cuts = np.flatnonzero(delim)
    starts, ends = np.concatenate(([0], cuts + 1)), np.concatenate((cuts, [len(body)]))
    lengths = (ends - starts)[:-1] if starts[-1] == len(body) else ends - starts
    if declared is not None and declared != len(lengths):
        raise _fail(f"header 'count: {declared}' but the file holds {len(lengths)} streamlines; expected "
                    "the two to agree", "count_mismatch", where)
    return body[~delim].astype(np.float32), lengths.astype(np.int64)


def _le(member: str) -> np.dtype:
    return np.dtype(member.rsplit(".", 1)[1]).newbyteorder("<")


def _read_trx(path: Path, where: str | None):
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        with open(path, "rb") as fh:  # a complete zip ends with its end-of-central-directory record
            fh.seek(max(0, path.stat().st_size - 65557))
            tail = fh.read()
        rec = tail[tail.rfind(b"PK\x05\x06"):] if b"PK\x05\x06" in tail else b""
        if len(rec) < 22 or len(rec) < 22 + struct.unpack_from("<H", rec, 20)[0]:
            raise _cut(f"zip archive has no complete central directory ({exc})", "trx", where) from exc
        raise _fail(f"corrupt zip archive ({exc}); expected a TRX zip", "unreadable", where) from exc
    with zf:
        try:
            names = zf.namelist()
            pos_name = next((n for n in names if _TRX_POS.match(n)), None)
            off_name = next((n for n in names if _TRX_OFF.match(n)), None)
            hdr = json.loads(zf.read("header.json"))
            affine = np.asarray(hdr["VOXEL_TO_RASMM"], dtype=np.float64).reshape(4, 4)
            dims = tuple(int(d) for d in hdr["DIMENSIONS"])
            nv, ns = int(hdr["NB_VERTICES"]), int(hdr["NB_STREAMLINES"])
            codes = aff2axcodes(affine)
            if ns == 0:
                return SpatialHeader(affine, dims, (1.0, 1.0, 1.0)), np.zeros((0, 3), np.float32), np.zeros(0)
            if pos_name is None or off_name is None or len(dims) != 3 or None in codes:
                raise ValueError(f"members {names}, DIMENSIONS {dims}, axis codes {codes}")
            pos = np.frombuffer(zf.read(pos_name), _le(pos_name))
            offs = np.frombuffer(zf.read(off_name), _le(off_name)).astype(np.int64)
        except (KeyError, TypeError, ValueError, zipfile.BadZipFile, zlib.error, EOFError,
                NotImplementedError) as exc:
            raise _fail(f"invalid TRX archive ({exc}); expected header.json (VOXEL_TO_RASMM 4x4, DIMENSIONS, "
                        "NB_VERTICES, NB_STREAMLINES), positions.3.<float16|32|64> and offsets.<(u)int32|64>",
                        "unreadable", where) from exc
    sizes = tuple(float(v) for v in _affine_voxel_sizes(affine))
    spatial = SpatialHeader(affine, dims, sizes, "".join(codes))
    if pos.size % 3 or pos.size // 3 != nv or len(offs) != ns + 1:  # trx-python writes NB_STREAMLINES + 1
        raise _fail(f"header declares {ns} streamlines and {nv} vertices but the archive holds "
                    f"{pos.size / 3:g} positions and {len(offs)} offsets (expected NB_STREAMLINES + 1); "
                    "expected them to agree", "count_mismatch", where)
    if offs[0] != 0 or offs[-1] != nv or np.any(np.diff(offs) < 0):
        raise _fail("TRX offsets must start at 0, never decrease and end at NB_VERTICES", "unreadable", where)
    return spatial, pos.reshape(-1, 3).astype(np.float32), np.diff(offs)


def _check_flat(data: np.ndarray, lengths: np.ndarray, where: str | None) -> np.ndarray:
    """Vectorised `validate_streamlines` on the concatenated points; return the (S+1,) offsets."""
    if len(lengths) == 0:
        raise _fail("the tractogram holds no streamlines; a bundle needs at least 1 streamline", "empty",
                    where)
    short = np.flatnonzero(lengths < 2)
    if short.size:
        i = int(short[0])
        raise _fail(f"streamline {i} has {int(lengths[i])} point(s) ({short.size} such streamline(s)); "
                    "every streamline needs at least 2 points", "too_few_points", where)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    if not np.isfinite(np.sum(data, dtype=np.float64)):  # cheap test first, then locate
        i = int(np.searchsorted(offsets, int(np.argmax(~np.isfinite(data).all(axis=1))), side="right") - 1)
        raise _fail(f"streamline {i} has NaN or infinite coordinates; only finite RAS mm coordinates are "
                    "accepted", "non_finite", where)
    return offsets


def _load(path: Path, fmt: str, reference, name: str | None, where: str | None) -> Bundle:
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "tractogram file not found", str(path))
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head:
        raise _fail(f"file is empty (0 bytes); expected a {_NAMES[fmt]} file with at least 1 streamline",
                    "empty", where)
    _check_magic(head, fmt, where)
    if fmt == "tck":
        spatial = _resolve_reference(reference, where)
        data, lengths = _read_tck(path, where)
    else:
        spatial, data, lengths = (_read_trk if fmt == "trk" else _read_trx)(path, where)
    offsets = _check_flat(data, lengths, where)
    data = np.ascontiguousarray(data, dtype=np.float32)
    bounds = offsets.tolist()  # slicing views from a list of ints is ~5x faster than np.split
    streamlines = [data[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return Bundle(streamlines, spatial, source_format=fmt, name=path.stem if name is None else name)


def load_bundle(path, *, reference=None, name: str | None = None) -> Bundle:
    """Read a ``.trk``, ``.tck`` or ``.trx`` file (format from the extension, case-insensitive).

    Parameters
    ----------
    path : path-like
        The tractogram file.
    reference : path-like, SpatialHeader or nibabel image, optional
        Required for ``.tck`` (which stores no space): a NIfTI ``.nii``/``.nii.gz`` path or image,
        a ``.trk`` path (its header) or a `SpatialHeader`. Ignored for ``.trk`` and ``.trx``.
    name : str, optional
        Bundle name; defaults to the file stem (``"IFOF_R"`` for ``IFOF_R.trk``).

    Returns
    -------
    Bundle
        Validated float32 ``(N_i, 3)`` streamlines in RAS mm (views into one array) and the header.

    Raises
    ------
    BundleFormatError
        Malformed or unsupported input; ``reason`` as listed in the module docstring.
    FileNotFoundError
        If ``path`` does not exist.
    """
    path = Path(path)
    return _load(path, _format_from_path(path), reference, name, str(path))


def load_bundle_bytes(data: bytes, *, format: str, reference=None, name: str = "") -> Bundle:
    """Read a tractogram held in memory (an HTTP upload).

    Parameters
    ----------
    data : bytes
        The file content; its signature is checked against ``format`` first.
    format : str
        ``"trk"``, ``"tck"`` or ``"trx"`` (any case, leading dot allowed).
    reference, name
        As for `load_bundle`; ``name`` also prefixes error messages (no temporary path leaks).

    Returns
    -------
    Bundle
        As `load_bundle`. The temporary file is removed in every case.
    """
    where = name or None
    fmt = _normalise_format(format, where)
    if len(data) == 0:
        raise _fail(f"upload is empty (0 bytes); expected a {_NAMES[fmt]} file with at least 1 streamline",
                    "empty", where)
    _check_magic(bytes(data[:16]), fmt, where)
    tmp = tempfile.NamedTemporaryFile(prefix="vqdiff-upload-", suffix="." + fmt, delete=False)
    try:
        with tmp:
            tmp.write(data)
        return _load(Path(tmp.name), fmt, reference, name, where)
    finally:
        Path(tmp.name).unlink(missing_ok=True)


def _write(fmt: str, arrays: list[np.ndarray], header: SpatialHeader, fh) -> None:
    affine = np.asarray(header.affine, dtype=np.float64)
    if fmt == "trx":
        offsets = np.cumsum([0] + [len(a) for a in arrays]).astype("<u8")
        meta = {"VOXEL_TO_RASMM": affine.tolist(), "DIMENSIONS": [int(d) for d in header.dimensions],
                "NB_VERTICES": int(offsets[-1]), "NB_STREAMLINES": len(arrays)}
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr("header.json", json.dumps(meta))
            zf.writestr("positions.3.float32", np.concatenate(arrays).astype("<f4").tobytes())
            zf.writestr("offsets.uint64", offsets.tobytes())
        return
    tractogram = Tractogram(ArraySequence(arrays), affine_to_rasmm=np.eye(4))
    if fmt == "tck":
        return TckFile(tractogram).save(fh)
    hdr = {Field.VOXEL_TO_RASMM: affine.astype(np.float32), Field.DIMENSIONS: np.asarray(header.dimensions),
           Field.VOXEL_SIZES: np.asarray(header.voxel_sizes, dtype=np.float32),
           Field.VOXEL_ORDER: str(header.voxel_order).encode("latin-1")}
    TrkFile(tractogram, header=hdr).save(fh)


def _bad_header(detail: str, fmt: str, where: str) -> BundleFormatError:
    return _fail(f"the bundle's header cannot be written as {fmt.upper()} ({detail}); expected an invertible "
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
    TRK keeps affine (float32), dimensions, voxel sizes and voxel order; TRX keeps affine and
    dimensions (voxel sizes and order are derived from the affine on reload); TCK keeps world
    coordinates only, so reloading it needs the reference. Data go to a temporary file in the
    destination folder that is renamed over ``path`` (`os.replace`) and removed on failure.
    """
    path = Path(path)
    where = str(path)
    fmt = _normalise_format(format, where) if format else _format_from_path(path)
    arrays = [np.asarray(s, dtype=np.float32) for s in bundle.streamlines]
    for i, a in enumerate(arrays):
        if a.ndim != 2 or a.shape[1] != 3:
            raise _fail(f"streamline {i} has shape {a.shape}; each streamline must be an (N, 3) array",
                        "bad_shape", where)
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    _check_flat(np.concatenate(arrays) if arrays else np.zeros((0, 3), np.float32), lengths, where)
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
                _write(fmt, arrays, bundle.header, fh)
            except (HeaderError, DataError, ValueError, OverflowError) as exc:  # LinAlgError is a ValueError
                raise _bad_header(f"{exc}", fmt, where) from exc
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def bundle_to_bytes(bundle: Bundle, *, format: str = "trk") -> bytes:
    """Serialise ``bundle`` to the bytes of a ``format`` file (via a temporary file, removed)."""
    fmt = _normalise_format(format)
    with tempfile.TemporaryDirectory(prefix="vqdiff-out-") as tmp:
        return save_bundle(bundle, Path(tmp) / f"bundle.{fmt}", format=fmt).read_bytes()


def file_order_groups(paths) -> np.ndarray:
    """Consecutive chunks of 64 streamlines of each file, in file order, as (G, 64, P, 3) float32.

    The authors' grouping (no canonicalisation; a trailing partial group is dropped). Every
    streamline of a file must have the same point count P (as in ``../shared/data``).
    """
    out = []
    for path in paths:
        streamlines = load_bundle(path).streamlines
        arr = np.stack(streamlines).astype(np.float32, copy=False)
        n = len(arr) // 64 * 64
        out.append(arr[:n].reshape(-1, 64, arr.shape[1], 3))
    return np.concatenate(out)
