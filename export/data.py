"""Real streamline groups for parity checks, calibration and benchmarks.

Groups come from the tractograms of a subject folder (``*.trk``; ``.tck`` needs a reference and
``.trx`` is read too), canonicalised exactly as `vqdiff.api.Codec.encode` does, in RAS mm.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from .manifest import ExportError

DATA_ENV = "VQDIFF_SHARED_DATA"
_SUFFIXES = (".trk", ".trx")


def default_data_dir() -> Path:
    """``$VQDIFF_SHARED_DATA/subject01`` or the repository's ``../shared/data/subject01``."""
    env = os.environ.get(DATA_ENV)
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return root / "subject01"


def _streamlines(path: Path) -> list[np.ndarray]:
    if path.suffix.lower() == ".trk":
        import nibabel as nib

        return [np.asarray(s, np.float32) for s in nib.streamlines.load(str(path)).streamlines]
    from vqdiff.io import load_bundle

    return list(load_bundle(path).streamlines)


@functools.lru_cache(maxsize=8)
def _load_all(folder: str, bundles: tuple[str, ...] | None) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
    from vqdiff.canonical import canonicalise

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in _SUFFIXES)
    if bundles is not None:
        files = [f for f in files if f.stem in bundles]
    if not files:
        raise ExportError(f"no tractograms ({', '.join(_SUFFIXES)}) in {folder}"
                          + (f" named {list(bundles)}" if bundles else ""))
    groups, labels = [], []
    for i, f in enumerate(files):
        g = canonicalise(_streamlines(f)).groups
        groups.append(g)
        labels.append(np.full(len(g), i))
    out = np.concatenate(groups).astype(np.float32)
    out.setflags(write=False)
    return out, tuple(f.stem for f in files), np.concatenate(labels)


def load_groups(folder: str | os.PathLike | None = None, *, max_groups: int | None = None,
                bundles=None) -> np.ndarray:
    """Canonical groups (G, 64, 64, 3) float32 in RAS mm of every bundle in ``folder`` (or only those
    whose file stem is in ``bundles``).

    With ``max_groups`` an evenly spaced subset (every bundle keeps its share) is returned.
    Results are cached per folder for the process.
    """
    folder = Path(folder) if folder is not None else default_data_dir()
    if not folder.is_dir():
        raise ExportError(
            f"real data folder {folder} not found; pass one (CLI: --parity-data) or set ${DATA_ENV}"
        )
    groups, _, _ = _load_all(str(folder.resolve()), tuple(sorted(bundles)) if bundles is not None else None)
    if max_groups is not None and max_groups < len(groups):
        idx = np.unique(np.linspace(0, len(groups) - 1, max_groups).round().astype(int))
        groups = groups[idx]
    return np.array(groups)


def split_groups(groups: np.ndarray, fraction: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A reproducible random split: (first part, held-out part of ``fraction``)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(groups))
    k = max(1, int(round(len(groups) * fraction)))
    return groups[np.sort(perm[k:])], groups[np.sort(perm[:k])]
