"""Small file helpers shared by every on-disk format of the project."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"  # temp files are ".<name>.tmp-<pid>-<thread>" beside their target


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # folder fsync: not supported everywhere
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_versioned_json(path: str | os.PathLike, fmt: str, version: int, error: type[Exception]) -> dict[str, Any]:
    """Read a JSON file whose ``format`` must be ``fmt`` and ``format_version`` ``version``.

    Raises ``error`` naming the file and what this vqdiff reads.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else None
        raise error(f"{path}: format {found!r} is not {fmt!r}")
    if data.get("format_version") != version:
        raise error(
            f"{path}: format_version {data.get('format_version')!r} is not supported; "
            f"this vqdiff reads version {version}"
        )
    return data


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def recover_replaced_dir(target: Path, marker: str) -> bool:
    """Undo a `replace_dir` cut between its two renames (``target`` -> ``.target.old``, the new one ->
    ``target``): that leaves no ``target`` but a complete ``.target.old`` (it holds ``marker``); put it
    back. Several processes may try at once; one wins. True when it was put back."""
    import logging

    old = target.with_name(f".{target.name}.old")
    if target.exists() or not (old / marker).is_file():
        return False
    try:
        os.replace(old, target)
    except OSError:  # another process put it back first
        return False
    logging.getLogger(__name__).warning("%s was being replaced when the run stopped: resuming from the "
                                        "previous one", target)
    return True


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished directory ``tmp`` to ``target``, replacing an existing one last-moment."""
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs are meant to be read by services
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
