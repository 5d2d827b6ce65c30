"""MRtrix ``.tck``: the text header (parsed by nibabel) and the float32 points, parsed with numpy."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from nibabel.streamlines import TckFile
from nibabel.streamlines.tractogram_file import HeaderError

from .common import cut, fail


def read_tck(source: Path | bytes, where: str | None):
    """(points (M, 3) float32 in RAS mm, lengths (S,) int64) of a ``.tck`` file (it stores no space)."""
    buf = source if isinstance(source, bytes | bytearray | memoryview) else Path(source).read_bytes()
    expected = ("expected 'mrtrix tracks', text 'key: value' lines with 'datatype: Float32LE|BE', "
                "'file: . <offset>' and an integer 'count', then 'END'")
    try:
        hdr = TckFile._read_header(io.BytesIO(buf))
        off, dtype = int(hdr["_offset_data"]), hdr["_dtype"]
        declared = int(hdr["count"].strip()) if "count" in hdr else None
    except HeaderError as exc:
        reason = "unreadable" if re.search(rb"\nEND\r?\n", buf) else "truncated"
        raise fail(f"invalid TCK header ({exc}); {expected}", reason, where) from exc
    except (ValueError, KeyError, IndexError) as exc:  # ValueError includes UnicodeDecodeError
        raise fail(f"invalid TCK header ({exc}); {expected}", "unreadable", where) from exc
    nbytes = len(buf) - off
    if nbytes < 0 or nbytes % 12:
        raise cut(f"data section of {nbytes} bytes is not a whole number of float32 (x, y, z)", "tck", where)
    coords = np.frombuffer(buf, dtype, nbytes // 4, off).reshape(-1, 3)
    if len(coords) == 0 or not np.isinf(coords[-1]).all():
        raise cut("file does not end with the 'inf inf inf' end-of-file marker", "tck", where)
    body = coords[:-1]
    delim = np.isnan(body).all(axis=1)
    cuts = np.flatnonzero(delim)
    starts, ends = np.concatenate(([0], cuts + 1)), np.concatenate((cuts, [len(body)]))
    lengths = (ends - starts)[:-1] if starts[-1] == len(body) else ends - starts
    if declared is not None and declared != len(lengths):
        raise fail(f"header 'count: {declared}' but the file holds {len(lengths)} streamlines; expected "
                   "the two to agree", "count_mismatch", where)
    return body[~delim].astype(np.float32), lengths.astype(np.int64)
