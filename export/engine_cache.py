"""Where an engine selection is kept: one folder per model x machine x library versions (torch-free).

``$VQDIFF_ENGINE_CACHE`` or ``$XDG_CACHE_HOME/vqdiff/engines`` (default ``~/.cache/vqdiff/engines``)
holds ``<model sha256[:16]>-<key[:16]>/``: ``decision.json`` (the choice, every candidate's numbers,
the key's fields), ``check.npz`` (inputs and the chosen engine's outputs, replayed at every start)
and ``export/`` (the ONNX graphs and int8 variant built for this machine when the model is a
checkpoint). The key is the sha256 of the model's weights hash, the CPU model and its ISA flags, the
core and thread counts, the device and the versions of vqdiff, numpy, torch, onnx and onnxruntime: a
new model, machine or library makes a new selection, never a stale one. A lock file serialises the
processes that start at once (service workers, Ray actors): one selects, the others read its choice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

CACHE_ENV = "VQDIFF_ENGINE_CACHE"
SELECTION_VERSION = 3  # 2: engine specs, layer policies, OpenVINO; 3: untimed first call, faster OpenVINO graphs. Bump when the selection's rules change: old decisions are then ignored
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
_PACKAGES = ("vqdiff", "numpy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "tensorrt",
             "openvino")


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vqdiff" / "engines"


def cpu_info() -> dict[str, Any]:
    """CPU model name and the ISA flags that decide which kernels run (Linux /proc/cpuinfo)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"model": name, "flags": [f for f in ISA_FLAGS if f in flags], "cores": os.cpu_count()}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def key_fields(model_sha256: str, device: str, threads: int | None, extra: dict | None = None) -> dict[str, Any]:
    return {"selection_version": SELECTION_VERSION, "model_sha256": model_sha256, "device": device,
            "threads": threads, "cpu": cpu_info(), "versions": versions(), **(extra or {})}


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def entry_dir(fields: dict[str, Any], root: str | os.PathLike | None = None) -> Path:
    root = Path(root) if root is not None else cache_root()
    return root / f"{fields['model_sha256'][:16]}-{cache_key(fields)[:16]}"


@contextlib.contextmanager
def locked(folder: Path):
    """An exclusive lock on ``folder/.lock`` (no-op where fcntl is missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; a concurrent start at worst selects twice
        yield
        return
    with open(folder / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_decision(folder: Path, fields: dict[str, Any]) -> dict[str, Any] | None:
    """The decision stored for exactly these key fields, or None."""
    try:
        d = json.loads((folder / "decision.json").read_text())
    except (OSError, ValueError):
        return None
    return d if d.get("key") == cache_key(fields) else None


def write_decision(folder: Path, decision: dict[str, Any]) -> Path:
    out = folder / "decision.json"
    tmp = folder / ".decision.json.tmp"
    tmp.write_text(json.dumps(decision, indent=2, default=float) + "\n")
    os.replace(tmp, out)
    return out
