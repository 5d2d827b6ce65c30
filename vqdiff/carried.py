"""What a file carries besides its streamlines: groups, per-streamline and per-point data.

A `Bundle` holds three dicts (all empty for a file without them):

- ``groups``: group name -> member indices (1-D int64, into the file's streamlines, in the file's
  order of members; TRX ``groups/<name>.<int>``);
- ``dps``: name -> per-streamline values, shape (N,) or (N, k) (TRX ``dps``, TRK properties);
- ``dpv``: name -> per-point values, shape (M,) or (M, k), M the file's points in streamline order
  (TRX ``dpv``, TRK scalars).

`check_carried` refuses data that do not fit the streamlines (`BundleFormatError`, reason
``bad_groups`` or ``bad_carried_data``, the message naming what is accepted). `take` cuts them to a
subset of streamlines; `dropped_names` says what a format that cannot hold them would lose.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import BundleFormatError

GROUPS_ACCEPTED = ("a TRX group is a non-empty 1-D array of integer streamline indices in [0, NB_STREAMLINES), "
                   "each index at most once")
DATA_ACCEPTED = ("per-streamline data (dps, TRK properties) have one row per streamline and per-point data (dpv, "
                 "TRK scalars) one row per point, numeric, 1-D or 2-D")


def check_group(name: str, members: Any, n_streamlines: int, where: str | None = None) -> np.ndarray:
    """``members`` as int64 indices, or `BundleFormatError` (reason ``bad_groups``) naming what is accepted."""
    arr = np.asarray(members)
    problem = None
    if arr.ndim != 1:
        problem = f"has shape {arr.shape}"
    elif arr.size == 0:
        problem = "is empty"
    elif arr.dtype.kind not in "iu":
        problem = f"holds {arr.dtype} values, not integers"
    else:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= n_streamlines:
            problem = f"refers to streamline(s) {lo}..{hi} of a file of {n_streamlines}"
        elif np.unique(arr).size != arr.size:
            problem = "lists a streamline more than once"
    if problem:
        raise BundleFormatError(f"group {name!r} {problem}; {GROUPS_ACCEPTED}", reason="bad_groups", path=where)
    return arr.astype(np.int64)


def _check_rows(kind: str, name: str, values: Any, rows: int, what: str, where: str | None) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim not in (1, 2) or arr.shape[0] != rows or arr.dtype.kind not in "iufb":
        raise BundleFormatError(f"{kind} {name!r} has shape {arr.shape} ({arr.dtype}) for {rows} {what}; "
                                f"{DATA_ACCEPTED}", reason="bad_carried_data", path=where)
    return arr


def check_carried(bundle, *, where: str | None = None, points: bool = True) -> None:
    """Refuse groups, dps or dpv that do not fit ``bundle``'s streamlines (``points``: check dpv too)."""
    n = len(bundle.streamlines)
    for name, members in bundle.groups.items():
        bundle.groups[name] = check_group(name, members, n, where)
    for name, values in bundle.dps.items():
        bundle.dps[name] = _check_rows("per-streamline data", name, values, n, "streamlines", where)
    if points and bundle.dpv:
        m = sum(len(s) for s in bundle.streamlines)
        for name, values in bundle.dpv.items():
            bundle.dpv[name] = _check_rows("per-point data", name, values, m, "points", where)


def point_offsets(counts) -> np.ndarray:
    """(N+1,) offsets of each streamline's first point in the concatenated points."""
    return np.concatenate(([0], np.cumsum(np.asarray(counts, np.int64))))


def take(carried: dict[str, dict[str, np.ndarray]], indices: np.ndarray, counts) -> dict[str, dict[str, np.ndarray]]:
    """``{"dps", "dpv"}`` of the streamlines ``indices`` (in that order); ``counts``: every streamline's points."""
    idx = np.asarray(indices, np.int64)
    out: dict[str, dict[str, np.ndarray]] = {"dps": {k: np.asarray(v)[idx] for k, v in carried.get("dps", {}).items()}}
    dpv = carried.get("dpv", {})
    if dpv:
        counts = np.asarray(counts, np.int64)
        k = counts[idx]  # each taken streamline's points, at its offset in the file: one vectorised gather
        rows = np.repeat(point_offsets(counts)[idx] - point_offsets(k)[:-1], k) + np.arange(int(k.sum()))
        out["dpv"] = {k: np.asarray(v)[rows] for k, v in dpv.items()}
    else:
        out["dpv"] = {}
    return out


def dropped_names(bundle) -> list[str]:
    """What a file without groups, dps or dpv would lose of ``bundle``: ``["group 'ARC_L'", "dps 'weight'"...]``."""
    return ([f"group {k!r}" for k in bundle.groups] + [f"dps {k!r}" for k in bundle.dps]
            + [f"dpv {k!r}" for k in bundle.dpv])


def has_carried(bundle) -> bool:
    return bool(bundle.groups or bundle.dps or bundle.dpv)


def carried_equal(a, b) -> bool:
    """Whether two bundles carry the same groups (names in the same order: it decides where a streamline
    of several groups is encoded; members in the same order), dps and dpv (names in any order, values)."""
    for key in ("groups", "dps", "dpv"):
        x, y = getattr(a, key), getattr(b, key)
        names_differ = list(x) != list(y) if key == "groups" else sorted(x) != sorted(y)
        if names_differ or any(not np.array_equal(np.asarray(x[k]), np.asarray(y[k])) for k in x):
            return False
    return True


def join_bundles(bundles, *, name: str = "", where: str | None = None):
    """One `Bundle` of several (a subject's per-bundle files): their streamlines in the given order, one
    group per bundle named by the bundle (so that `vqdiff.subject.subject_parts` encodes each on its own),
    the first bundle's header; dps / dpv kept when every bundle has the same names and widths, else
    dropped with a warning naming them (as are the bundles' own groups)."""
    import logging

    from .bundle import Bundle

    bundles = list(bundles)
    names = [b.name for b in bundles]
    if not bundles or len(set(names)) != len(names) or not all(names):
        raise ValueError(f"joining bundles needs at least one, each with its own name; got {names}")
    log, dropped = logging.getLogger(__name__), []
    first = bundles[0]
    if any(b.header.to_dict() != first.header.to_dict() for b in bundles[1:]):
        log.warning("%s: the bundles' headers differ; the subject keeps %s's (coordinates stay in RAS mm)",
                    where or name or "subject", first.name)
    starts = np.cumsum([0] + [len(b.streamlines) for b in bundles])
    groups = {b.name: np.arange(starts[i], starts[i + 1]) for i, b in enumerate(bundles)}
    dropped += [f"{b.name}'s group {g!r}" for b in bundles for g in b.groups]
    joined = {}
    for kind in ("dps", "dpv"):
        shapes = [{k: np.shape(v)[1:] for k, v in getattr(b, kind).items()} for b in bundles]
        if all(s == shapes[0] for s in shapes):
            joined[kind] = {k: np.concatenate([getattr(b, kind)[k] for b in bundles]) for k in shapes[0]}
        else:
            joined[kind] = {}
            dropped += sorted({f"{kind} {k!r}" for s in shapes for k in s})
    if dropped:
        log.warning("%s: not carried (the bundles do not all have them alike): %s", where or name or "subject",
                    ", ".join(dropped))
    return Bundle([s for b in bundles for s in b.streamlines], first.header, source_format=first.source_format,
                  name=name, groups=groups, dps=joined["dps"], dpv=joined["dpv"])
