"""What every format shares: signatures, format names, error construction and the flat-data checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import FORMATS
from ..errors import BundleFormatError

MAGIC = {"trk": b"TRACK", "tck": b"mrtrix tracks", "trx": b"PK\x03\x04"}
ACCEPTED = "accepted formats are TrackVis .trk, MRtrix .tck and TRX .trx"
NAMES = {"trk": "TrackVis .trk", "tck": "MRtrix .tck", "trx": "TRX .trx (zip)"}
# formats parsed from the file's bytes in one piece; a TRX archive is read member by member from its path
WHOLE = frozenset({"trk", "tck"})


def fail(message: str, reason: str, where: str | None) -> BundleFormatError:
    return BundleFormatError(message, reason=reason, path=where)


def cut(detail: str, fmt: str, where: str | None) -> BundleFormatError:
    return fail(f"{detail}; expected a complete {NAMES[fmt]} file", "truncated", where)


def normalise_format(fmt: str, where: str | None = None) -> str:
    f = str(fmt).lower().lstrip(".")
    if f not in FORMATS:
        raise fail(f"unsupported tractogram format {fmt!r}; {ACCEPTED}", "unsupported_format", where)
    return f


def format_from_path(path: Path) -> str:
    if path.suffix.lower() not in (".trk", ".tck", ".trx"):
        raise fail(f"unsupported file extension {path.suffix!r}; {ACCEPTED}", "unsupported_format", str(path))
    return path.suffix.lower()[1:]


def read_whole(path) -> bool:
    """Whether the reader parses ``path`` (by its extension) from its bytes in one piece, so that a
    caller that reads them anyway (to hash them) can hand them to `load_bundle` (``data=``): True for
    ``.trk`` and ``.tck``; False for ``.trx`` (read member by member from its path) and for other
    extensions (the reader refuses them)."""
    return Path(path).suffix.lower()[1:] in WHOLE


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


def check_magic(head: bytes, fmt: str, where: str | None) -> None:
    magic = MAGIC[fmt]
    if head.startswith(magic):
        return
    if len(head) < len(magic) and magic.startswith(head):
        raise cut(f"file is only {len(head)} bytes, cut inside the signature {magic!r}", fmt, where)
    other = sniff_format(head)
    hint = f" (it looks like a {NAMES[other]} file: fix its extension)" if other else ""
    raise fail(f"file starts with {head[:8]!r}, not the {NAMES[fmt]} signature {magic!r}{hint}; "
               f"{ACCEPTED}", "wrong_magic", where)


def check_flat(data: np.ndarray, lengths: np.ndarray, where: str | None) -> np.ndarray:
    """Vectorised `validate_streamlines` on the concatenated points; return the (S+1,) offsets."""
    if len(lengths) == 0:
        raise fail("the tractogram holds no streamlines; a bundle needs at least 1 streamline", "empty", where)
    short = np.flatnonzero(lengths < 2)
    if short.size:
        i = int(short[0])
        raise fail(f"streamline {i} has {int(lengths[i])} point(s) ({short.size} such streamline(s)); "
                   "every streamline needs at least 2 points", "too_few_points", where)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    bad = None if np.isfinite(np.sum(data)) else np.flatnonzero(~np.isfinite(data).all(axis=1))  # cheap test first
    if bad is not None and bad.size:  # (a finite sum means finite points; an overflowed one is re-checked)
        i = int(np.searchsorted(offsets, int(bad[0]), side="right") - 1)
        raise fail(f"streamline {i} has NaN or infinite coordinates; only finite RAS mm coordinates are "
                   "accepted", "non_finite", where)
    return offsets
