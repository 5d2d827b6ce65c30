"""Finding bundle files in a folder tree (one rule for training, batch encoding and the service)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

BUNDLE_SUFFIXES = (".trk", ".tck", ".trx")
_TRACTOINFERNO = re.compile(r"^(?P<subject>sub-[^_/]+)__(?P<bundle>.+)$")


@dataclass(frozen=True)
class BundleFile:
    path: Path
    subject: str
    bundle: str


def find_bundle_files(root: str | Path) -> list[BundleFile]:
    """Bundle files under ``root``: TractoInferno layout (``sub-X/tractography/sub-X__B.trk``) or flat.

    In a flat folder the subject is the parent folder's name.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory of bundle files (.trk, .tck, .trx)")
    found = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in BUNDLE_SUFFIXES and p.is_file()):
        m = _TRACTOINFERNO.match(path.stem)
        if m:
            found.append(BundleFile(path, m["subject"], m["bundle"]))
        else:
            found.append(BundleFile(path, path.parent.name, path.stem))
    return found
