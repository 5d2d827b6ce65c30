"""Readers: a path or in-memory bytes -> a validated `Bundle` (format from the extension, signature checked)."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..errors import BundleFormatError
from .common import NAMES, WHOLE, check_flat, check_magic, fail, format_from_path, normalise_format
from .reference import resolve_reference
from .tck import read_tck
from .trk import read_trk
from .trx import read_trx


def _load(path: Path | bytes, fmt: str, reference, name: str | None, where: str | None, **limits) -> Bundle:
    """Read ``path`` (or the file's bytes); every failure of the file's content ends in `BundleFormatError` (whatever nibabel,
    zipfile or numpy raised: its message is kept), never in a foreign exception."""
    try:
        return _read(path, fmt, reference, name, where, **limits)
    except (BundleFormatError, FileNotFoundError):
        raise
    except MemoryError as exc:
        raise fail(f"the file needs more memory than this process has ({exc})", "too_large", where) from exc
    except Exception as exc:  # noqa: BLE001 (a corrupt file can make any library raise anything)
        raise fail(f"the file cannot be read ({type(exc).__name__}: {exc}); expected a valid {NAMES[fmt]} file",
                   "unreadable", where) from exc


def _read(source: Path | bytes, fmt: str, reference, name: str | None, where: str | None, *,
          max_streamlines: int | None = None, max_points: int | None = None) -> Bundle:
    if isinstance(source, Path):
        if not source.exists():
            raise FileNotFoundError(errno.ENOENT, "tractogram file not found", str(source))
        with open(source, "rb") as fh:
            head = fh.read(16)
        source = source.read_bytes() if fmt in WHOLE else source  # TRX: member by member from its file
    else:
        head = bytes(source[:16])
    if not head:
        raise fail(f"file is empty (0 bytes); expected a {NAMES[fmt]} file with at least 1 streamline",
                   "empty", where)
    check_magic(head, fmt, where)
    if fmt == "tck":
        spatial = resolve_reference(reference, where)
        data, lengths = read_tck(source, where)
        carried = {}
    elif fmt == "trk":
        spatial, data, lengths, carried = read_trk(source, where)
    else:
        spatial, data, lengths, carried = read_trx(source, where, max_streamlines=max_streamlines,
                                                   max_points=max_points)
    offsets = check_flat(data, lengths, where)
    data = np.ascontiguousarray(data, dtype=np.float32)
    bounds = offsets.tolist()  # slicing views from a list of ints is ~5x faster than np.split
    streamlines = [data[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return Bundle(streamlines, spatial, source_format=fmt, name=name or "", groups=carried.get("groups", {}),
                  dps=carried.get("dps", {}), dpv=carried.get("dpv", {}))


def load_bundle(path, *, reference=None, name: str | None = None, max_streamlines: int | None = None,
                max_points: int | None = None, data: bytes | None = None) -> Bundle:
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
    max_streamlines, max_points : int, optional
        Limits checked before a TRX archive's members are inflated (reasons ``too_many_streamlines``,
        ``too_many_points``); a member whose declared size disagrees with the header is refused
        (``count_mismatch``) before it is inflated.
    data : bytes, optional
        The file's content, when the caller has read it already (to hash it): ``.trk`` and ``.tck``
        are then parsed from it, not read again (a ``.trx`` is still read member by member from
        ``path``). Errors still name ``path``.

    Returns
    -------
    Bundle
        Validated float32 ``(N_i, 3)`` streamlines in RAS mm (views into one array) and the header.

    Raises
    ------
    BundleFormatError
        Malformed or unsupported input; ``reason`` as listed in the `vqdiff.io` docstring.
    FileNotFoundError
        If ``path`` does not exist.
    """
    path = Path(path)
    fmt = format_from_path(path)
    source = bytes(data) if data is not None and fmt in WHOLE else path
    return _load(source, fmt, reference, path.stem if name is None else name, str(path),
                 max_streamlines=max_streamlines, max_points=max_points)


def load_bundle_bytes(data: bytes, *, format: str, reference=None, name: str = "", max_streamlines: int | None = None,
                      max_points: int | None = None) -> Bundle:
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
        As `load_bundle`. Parsed in memory: no temporary file.
    """
    where = name or None
    fmt = normalise_format(format, where)
    if len(data) == 0:
        raise fail(f"upload is empty (0 bytes); expected a {NAMES[fmt]} file with at least 1 streamline",
                   "empty", where)
    check_magic(bytes(data[:16]), fmt, where)
    return _load(bytes(data), fmt, reference, name, where, max_streamlines=max_streamlines, max_points=max_points)


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
