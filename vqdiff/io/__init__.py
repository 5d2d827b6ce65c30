"""Read and write streamline bundles: TrackVis ``.trk``, MRtrix ``.tck`` and TRX ``.trx``.

Readers return float32 ``(N, 3)`` streamlines in RAS mm (nibabel's world space) with the file's
`SpatialHeader`. Malformed input raises `BundleFormatError`, ``reason`` being one of:
``unsupported_format``, ``wrong_magic``, ``truncated`` (file ends inside the header or a record,
TCK without its ``inf inf inf`` marker, zip without a complete central directory), ``empty`` (no
streamline, **including a 0-byte file**), ``count_mismatch``, ``too_few_points`` (0 or 1 point),
``non_finite``, ``missing_reference`` (TCK), ``bad_reference`` (unreadable/unsupported reference,
or a header that cannot be written), ``too_many_streamlines`` / ``too_many_points`` (TRX over the
caller's limits, refused before inflating), ``bad_groups`` (a TRX group whose indices are out of range,
empty, repeated or not integers), ``bad_carried_data`` (dps / dpv whose rows do not match the
streamlines / points), ``too_large`` (out of memory) and ``unreadable`` (other
structural damage, and whatever nibabel, zipfile or numpy raised on the file: the reader never lets a
foreign exception out). A missing path
raises `FileNotFoundError`. TRK: a record cut by the end of the file is ``truncated``; complete
records whose number differs from ``nb_streamlines`` (0 = "not recorded") are ``count_mismatch``,
which also covers a file cut exactly on a record boundary (indistinguishable from a lying header).

TRK/TCK data are parsed with vectorised numpy (nibabel parses their headers and writes them).
TRX is read and written with `zipfile` (``header.json``, ``positions.3.<float>``, ``offsets.<int>``
with NB_STREAMLINES + 1 entries), compatible with trx-python but without its read-write memory
maps and temporary folders, so trx is never imported.

Besides streamlines, readers fill the `Bundle`'s ``groups``, ``dps`` and ``dpv`` (TRX groups, dps, dpv;
TRK properties and scalars by their header names; `vqdiff.carried`) and writers write them back
(TRX all three, TRK dps / dpv); what a format cannot hold (TCK: all; TRK: groups; TRX ``dpg``) is
named in a logged warning.

Modules: `common` (signatures, format names, errors, flat checks), `trk`, `tck`, `trx` (one per
format), `reference` (the space a ``.tck`` needs), `read` (path/bytes -> `Bundle`) and `write`
(`Bundle` -> file/bytes, atomic).
"""

from __future__ import annotations

from .common import read_whole, sniff_format
from .read import file_order_groups, load_bundle, load_bundle_bytes
from .write import bundle_to_bytes, save_bundle

__all__ = ["load_bundle", "save_bundle", "load_bundle_bytes", "bundle_to_bytes", "sniff_format",
           "file_order_groups", "read_whole"]
