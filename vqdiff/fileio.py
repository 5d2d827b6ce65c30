"""Small file helpers shared by every on-disk format of the project."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Buffer = bytes | bytearray | memoryview

TMP_MARK = ".tmp-"  # temp files are ".<name>.tmp-<pid>-<thread>" beside their target


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Sequence[Buffer]) -> Path:
    """Write ``data`` (bytes, or buffers written one after the other: no joined copy) to ``path`` via a
    temp file in the same folder, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.writelines([data] if isinstance(data, Buffer) else data)
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


# safetensors dtype codes, in the order safetensors (0.4-0.8) lays tensors out: larger codes first
_ST_DTYPES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "float16": "F16",
              "int32": "I32", "uint32": "U32", "float32": "F32", "float64": "F64", "int64": "I64", "uint64": "U64"}
_ST_RANK = {code: i for i, code in enumerate(_ST_DTYPES.values())}


def safetensors_parts(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> list[Buffer]:
    """A safetensors file as buffers to write one after the other (or join): the length-prefixed JSON
    header, then every tensor's memory as it is (no copy of the data).

    The same bytes as ``safetensors.numpy.save(tensors, metadata)`` - its layout (tensors ordered by
    dtype, larger safetensors codes first, then by name; the header padded with spaces to 8 bytes) - with
    the metadata sorted by key, where safetensors writes it in a per-process random order (a Rust
    HashMap): identical tensors give identical bytes in every process. Tensors must be C-contiguous,
    little-endian, of a dtype of `_ST_DTYPES`.
    """
    arrays = []
    for name, a in tensors.items():
        code = _ST_DTYPES.get(a.dtype.name)
        if code is None or not a.flags.c_contiguous or a.dtype.byteorder == ">":
            raise ValueError(f"tensor {name!r}: need a C-contiguous little-endian array of "
                             f"{sorted(_ST_DTYPES)}, got {a.dtype} (contiguous: {a.flags.c_contiguous})")
        arrays.append((name, code, a))
    arrays.sort(key=lambda t: (-_ST_RANK[t[1]], t[0]))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset, data = 0, []
    for name, code, a in arrays:
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        data.append(memoryview(a).cast("B") if a.nbytes else b"")
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors keeps the tensor data 8-byte aligned
    return [len(text).to_bytes(8, "little") + text, *data]


def save_file(path: str | os.PathLike, parts, *, overwrite: bool = False) -> Path:
    """Write ``parts()`` (a callable giving the bytes or buffers) atomically to ``path``; refuse to
    overwrite unless asked (before the parts are made)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: -f) to replace it")
    atomic_write_bytes(path, parts())
    return path


def safetensors_metadata(data: bytes, formats: Sequence[str], accepted: str, error: type[Exception]) -> dict:
    """The ``__metadata__`` of a safetensors file's JSON header, checked to carry one of ``formats`` as
    its ``format`` tag, without touching the tensors; ``error(... accepted ...)`` otherwise."""
    if len(data) < 8:
        raise error(f"file is too short to be {accepted}")
    n = int.from_bytes(bytes(data[:8]), "little")
    if n <= 0 or n > len(data) - 8 or n > 100_000_000:
        raise error(f"not {accepted} (bad header length)")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"not {accepted} (header is not JSON)") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") not in formats:
        raise error(f"not {accepted} (format tag missing)")
    return meta


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
