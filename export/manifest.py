"""The export directory contract: file names, ``manifest.json`` and its checks.

An export directory holds ``encoder.onnx`` and ``decoder.onnx`` (fp32, one file each, no external
data), optional variants (``*.int8.onnx``, ``*.fp16.onnx``) and TensorRT engines (``*.plan``,
``timing.cache``), and ``manifest.json``:

``format`` / ``format_version``
    ``"vqdiff-export"``, 1.
``model``
    ``id``, ``kind``, ``sha256`` (of the source checkpoint's ``model.safetensors``: latents made
    from this export decode with the torch path of the same checkpoint and vice versa) and the
    model ``config``.
``source``
    the checkpoint it came from: path, ``weights_sha256``, ``config_sha256``, ``model_id``.
``normalisation``
    the model's normalisation (dict of `vqdiff.normalise.Normalisation`).
``opset``, ``exporter``, ``versions``
``graphs``
    per graph (``encoder``, ``decoder``): file, input / output names, shapes (``"batch"`` for the
    dynamic axis) and dtypes, read back from the ONNX files; ``indices`` says whether the encoder
    has an ``indices`` output (kinds without a codebook, ``ae`` and ``vae``, have none).
``files``
    every artefact by name: ``sha256``, ``bytes``, ``role``.
``parity``
    ONNX Runtime CPU against torch on real groups; an export is only written when it passed.
``variants``, ``tensorrt``
    optional: faster CPU variants (kept or not, with their numbers) and TensorRT engines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vqdiff.errors import VQDiffError
from vqdiff.fileio import file_sha256, read_versioned_json  # noqa: F401 (file_sha256 re-exported)

FORMAT = "vqdiff-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENCODER = "encoder.onnx"
DECODER = "decoder.onnx"

# graph I/O names (the contract of every backend)
ENC_INPUT = "groups"
ENC_OUTPUTS = ("latents", "z", "indices")
DEC_INPUT = "latents"
DEC_OUTPUT = "groups"
BATCH_AXIS = "batch"


class ExportError(VQDiffError, RuntimeError):
    """An export directory is missing, incomplete, tampered with, or could not be produced."""


class ParityError(ExportError):
    """The exported graphs do not reproduce the torch model within tolerance; nothing was written."""

    def __init__(self, message: str, report: dict[str, Any] | None = None):
        super().__init__(message)
        self.report = report or {}


def is_export_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Read ``path/manifest.json``; with ``verify`` check the format and every file's sha256."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ExportError(f"{path} is not an export directory (no {MANIFEST}); create one with vqdiff-export")
    manifest = read_versioned_json(mpath, FORMAT, FORMAT_VERSION, ExportError)
    if verify:
        verify_files(path, manifest)
    return manifest


def verify_files(path: str | os.PathLike, manifest: dict[str, Any], names=None) -> None:
    """Check that the files named in the manifest (or only ``names``) exist with their sha256."""
    path = Path(path)
    files = manifest.get("files", {})
    for name in names if names is not None else files:
        entry = files.get(name)
        if entry is None:
            raise ExportError(f"{path / MANIFEST} lists no file {name!r}")
        f = path / name
        if not f.is_file():
            raise ExportError(f"{f} is listed in {MANIFEST} but missing")
        digest = file_sha256(f)
        if digest != entry["sha256"]:
            raise ExportError(
                f"{f}: sha256 {digest[:12]}... does not match {MANIFEST} ({entry['sha256'][:12]}...); "
                "the export was modified after it was written; export it again"
            )


def file_entry(path: Path, role: str, **extra: Any) -> dict[str, Any]:
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size, "role": role, **extra}


def write_manifest(path: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    out = Path(path) / MANIFEST
    tmp = out.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def model_info(manifest: dict[str, Any]) -> dict[str, str]:
    """``{"id", "kind", "sha256"}`` as `vqdiff.api.Codec` records it in every latents file."""
    m = manifest["model"]
    return {"id": m["id"], "kind": m["kind"], "sha256": m["sha256"]}
