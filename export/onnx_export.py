"""Checkpoint -> ONNX export directory, with a parity check against torch on real groups.

>>> from vqdiff.export.onnx_export import export_checkpoint
>>> export_checkpoint("models/default", "exports/default")          # encoder.onnx, decoder.onnx, manifest.json

The graphs are described in `vqdiff.export.graphs`, the parity check in `vqdiff.export.parity`, the
directory and its manifest in `vqdiff.export.manifest`. Everything is written to a temporary
directory that is renamed into place only when parity passed; otherwise `ParityError` is raised
and nothing is left behind. Optional extras: an int8 CPU variant (`vqdiff.export.quantize`) and
TensorRT engines (`vqdiff.export.tensorrt_build`).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vqdiff.checkpoint import CONFIG, WEIGHTS, Checkpoint, file_sha256, load_checkpoint
from vqdiff.codec import TEMPLATES_FILE
from vqdiff.fileio import replace_dir
from vqdiff.geometry import GROUP_SIZE, NUM_POINTS, groups_to_model

from .graphs import DEFAULT_OPSET, export_graphs
from .manifest import (
    BATCH_AXIS,
    DECODER,
    ENCODER,
    FORMAT,
    FORMAT_VERSION,
    ParityError,
    file_entry,
    write_manifest,
)
from .parity import PARITY_ATOL, TIE_TOL, failure_message, run_parity, torch_reference

log = logging.getLogger(__name__)


def _versions(exporter: str) -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    import vqdiff

    v = {"vqdiff": vqdiff.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
         "onnxruntime": onnxruntime.__version__}
    if exporter == "dynamo":
        import onnxscript

        v["onnxscript"] = onnxscript.__version__
    return v


def parity_inputs(ckpt: Checkpoint, groups_mm: np.ndarray) -> np.ndarray:
    return groups_to_model(ckpt.normalisation.apply(groups_mm))


def _manifest(checkpoint: Path, ckpt: Checkpoint, graphs: dict[str, Any], parity: dict[str, Any],
              tmp: Path) -> dict[str, Any]:
    model = ckpt.model
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {**ckpt.model_info,
                  "config": model.config.to_dict()},
        "source": {
            "checkpoint": str(checkpoint.resolve()),
            "model_id": ckpt.model_id,
            "weights_sha256": ckpt.model_hash,
            "config_sha256": file_sha256(checkpoint / CONFIG),
            "weights_file": WEIGHTS,
        },
        "normalisation": ckpt.normalisation.to_dict(),
        "opset": graphs["encoder"]["opset"],
        "exporter": graphs["exporter"],
        "versions": _versions(graphs["exporter"]),
        "dynamic_axes": {BATCH_AXIS: "dimension 0 of every input and output"},
        "graphs": {
            "encoder": {k: graphs["encoder"][k] for k in ("file", "inputs", "outputs")},
            "decoder": {k: graphs["decoder"][k] for k in ("file", "inputs", "outputs")},
        },
        "indices": (
            {"output": "indices", "dtype": "int64", "shape": [BATCH_AXIS, 16, 16]}
            if graphs["indices"] else
            {"output": None, "note": f"kind {model.kind!r} has no codebook: the encoder has no indices output"}
        ),
        "files": {
            ENCODER: file_entry(tmp / ENCODER, "encoder", precision="fp32"),
            DECODER: file_entry(tmp / DECODER, "decoder", precision="fp32"),
        },
        "parity": parity,
        "variants": {},
        "tensorrt": None,
    }


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    parity_data: str | os.PathLike | None = None,
    parity_groups: np.ndarray | None = None,
    parity_max_groups: int | None = 128,
    parity_bundles=None,
    atol: float = PARITY_ATOL,
    tie_tol: float = TIE_TOL,
    threads: int | None = None,
    int8: bool = False,
    tensorrt: bool = False,
    tensorrt_options: dict[str, Any] | None = None,
) -> Path:
    """Export checkpoint directory ``checkpoint`` to the export directory ``out_dir``.

    Parameters
    ----------
    parity_groups : (G, 64, 64, 3) float array in RAS mm, optional
        Real groups for the parity check; by default ``parity_max_groups`` groups of the subject
        folder ``parity_data`` (default ``$VQDIFF_SHARED_DATA/subject01`` or ``../shared/data/subject01``),
        optionally only the bundles (file stems) in ``parity_bundles``.
    int8 : bool
        Also try an int8 static-QDQ variant (calibrated on half of the groups, judged on the other
        half); it is kept only if it is faster and loses little quality (see `vqdiff.export.quantize`).
    tensorrt : bool
        Also build TensorRT engines (needs ``tensorrt`` and CUDA; see `vqdiff.export.tensorrt_build`).

    Raises
    ------
    ParityError
        The graphs do not reproduce torch; nothing is written.
    FileExistsError
        ``out_dir`` exists and ``overwrite`` is false.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (CLI: -f) to replace it")
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.model.eval()

    if parity_groups is None:
        from .data import default_data_dir, load_groups

        parity_groups = load_groups(parity_data, max_groups=parity_max_groups, bundles=parity_bundles)
        parity_source = str(Path(parity_data).resolve() if parity_data else default_data_dir())
    else:
        parity_source = "array"
    parity_groups = np.asarray(parity_groups, np.float32)
    if parity_groups.ndim != 4 or parity_groups.shape[1:] != (GROUP_SIZE, NUM_POINTS, 3) or not len(parity_groups):
        raise ValueError(f"parity groups must be (G, {GROUP_SIZE}, {NUM_POINTS}, 3) in mm, got {parity_groups.shape}")
    x = parity_inputs(ckpt, parity_groups)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        meta = {"vqdiff.model_id": ckpt.model_id, "vqdiff.model_sha256": ckpt.model_hash,
                "vqdiff.kind": model.kind}
        graphs = export_graphs(model, tmp, opset=opset, exporter=exporter, metadata=meta)
        ref = torch_reference(model, x)
        parity = run_parity(model, tmp / ENCODER, tmp / DECODER, x, atol=atol, tie_tol=tie_tol, threads=threads,
                            ref=ref)
        parity["data"] = parity_source
        if not parity["passed"]:
            raise ParityError(failure_message(parity), parity)
        log.info("parity passed: %s", parity["max_abs_error"])

        manifest = _manifest(checkpoint, ckpt, graphs, parity, tmp)
        if (checkpoint / TEMPLATES_FILE).is_file():  # registration templates travel with the model
            shutil.copyfile(checkpoint / TEMPLATES_FILE, tmp / TEMPLATES_FILE)
            manifest["files"][TEMPLATES_FILE] = file_entry(tmp / TEMPLATES_FILE, "templates")
        if int8:
            from .quantize import add_int8_variant

            add_int8_variant(tmp, manifest, ckpt, parity_groups, threads=threads)
        if tensorrt:
            from .tensorrt_build import add_tensorrt_engines

            add_tensorrt_engines(tmp, manifest, model=model, x=x, ref=ref, **(tensorrt_options or {}))
        write_manifest(tmp, manifest)
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s", out_dir)
    return out_dir
