"""Checkpoint -> ONNX export directory, with a parity check against torch on real groups.

>>> from vqdiff.export.onnx_export import export_checkpoint
>>> export_checkpoint("models/default", "exports/default")          # encoder.onnx, decoder.onnx, manifest.json

Graphs (dynamic batch axis ``batch``, one file each, no external data, opset >= 17):

``encoder.onnx``  ``groups`` (B, 3, 64, 64) float32 -> ``latents`` (B, D, 16, 16) float32 (the
                  deterministic inference bottleneck inside), ``z`` (B, D, 16, 16) float32 (the
                  pre-bottleneck encoding) and, for kinds with a codebook, ``indices`` (B, 16, 16)
                  int64 (the argmax code per position; ``ae`` / ``vae`` have no such output and the
                  manifest says so).
``decoder.onnx``  ``latents`` (B, D, 16, 16) float32 -> ``groups`` (B, 3, 64, 64) float32.

Parity: ONNX Runtime (CPU) and torch encode / decode the same real groups (batches of 1, 3 and 64);
the max abs error of latents and reconstructions must be <= ``atol`` (1e-4) and the indices must be
equal, except where torch's two best codes score within ``tie_tol`` (1e-6, relative for VQ
distances) of each other, where either is accepted. Everything is written to a temporary directory
that is renamed into place only when parity passed; otherwise `ParityError` is raised and nothing
is left behind.
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
import torch
from torch import nn

from vqdiff.bottlenecks import _flatten, squared_distances, uses_codebook
from vqdiff.checkpoint import CONFIG, WEIGHTS, Checkpoint, file_sha256, load_checkpoint
from vqdiff.fileio import replace_dir
from vqdiff.models import GROUP_SIZE, NUM_POINTS

from .manifest import (
    BATCH_AXIS,
    DEC_INPUT,
    DEC_OUTPUT,
    DECODER,
    ENC_INPUT,
    ENC_OUTPUTS,
    ENCODER,
    FORMAT,
    FORMAT_VERSION,
    ExportError,
    ParityError,
    file_entry,
    write_manifest,
)

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MIN_OPSET = 17
PARITY_ATOL = 1e-4
TIE_TOL = 1e-6
PARITY_BATCHES = (1, 3, 64)  # chunk sizes cycled through during the parity run
_ONNX_DTYPES = {1: "float32", 7: "int64", 10: "float16", 16: "bfloat16", 6: "int32"}


# ----------------------------------------------------------------------------- graphs
class EncoderGraph(nn.Module):
    """groups -> (latents, z[, indices]) with the model's own eval-mode bottleneck."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = model.encoder
        self.bottleneck = model.bottleneck
        self.with_indices = uses_codebook(model.config.bottleneck)

    def forward(self, groups: torch.Tensor):
        z = self.encoder(groups)
        out = self.bottleneck(z)
        if self.with_indices:
            return out.latents, z, out.indices
        return out.latents, z


class DecoderGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)


def resolve_exporter(exporter: str = "auto") -> str:
    """``dynamo`` (torch.export based, needs onnxscript) or ``torchscript`` (the legacy tracer)."""
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"unknown exporter {exporter!r}; accepted: 'auto', 'dynamo', 'torchscript'")
    if exporter != "auto":
        return exporter
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return "torchscript"
    return "dynamo"


def _export_one(module: nn.Module, example: torch.Tensor, path: Path, input_name: str,
                output_names: list[str], opset: int, exporter: str) -> None:
    module = module.eval()
    # the dynamo exporter logs one warning per torchvision op it cannot register: noise here
    reg_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = reg_log.level
    reg_log.setLevel(logging.ERROR)
    try:
        _export_call(module, example, path, input_name, output_names, opset, exporter)
    finally:
        reg_log.setLevel(level)


def _export_call(module, example, path, input_name, output_names, opset, exporter) -> None:
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        if exporter == "dynamo":
            batch = torch.export.Dim(BATCH_AXIS, min=1)
            torch.onnx.export(
                module, (example,), str(path), dynamo=True, opset_version=opset, input_names=[input_name],
                output_names=output_names, dynamic_shapes=({0: batch},), external_data=False,
                optimize=True, verbose=False,
            )
        else:
            # the training-only loss terms (dead code at inference) trip shape-check warnings while tracing
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            axes = {n: {0: BATCH_AXIS} for n in [input_name, *output_names]}
            torch.onnx.export(
                module, (example,), str(path), dynamo=False, opset_version=opset, input_names=[input_name],
                output_names=output_names, dynamic_axes=axes, do_constant_folding=True,
            )


def _finalise_onnx(path: Path, metadata: dict[str, str]) -> None:
    """Check the graph, refuse external data, stamp metadata, save as one self-contained file."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer if uses_external_data(t)]
    if external:
        raise ExportError(f"{path.name}: {len(external)} initializers use external data; expected one file")
    for p in list(path.parent.iterdir()):  # a sidecar written by the exporter (there should be none)
        if p.name.startswith(path.name) and p != path:
            raise ExportError(f"exporter wrote an external-data sidecar {p.name}; expected one self-contained file")
    del model.metadata_props[:]
    for k, v in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, str(v)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def graph_io(path: str | os.PathLike) -> dict[str, Any]:
    """Names, shapes (dim names for dynamic axes) and dtypes of a graph's inputs and outputs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
            out.append({"name": v.name, "shape": dims, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type))})
        return out

    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output), "opset": opset}


def export_graphs(model: nn.Module, out_dir: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                  exporter: str = "auto", metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``encoder.onnx`` and ``decoder.onnx`` of ``model`` (eval mode) into ``out_dir``."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old; use >= {MIN_OPSET}")
    exporter = resolve_exporter(exporter)
    out_dir = Path(out_dir)
    model = model.eval()
    cfg = model.config
    enc = EncoderGraph(model)
    enc_out = list(ENC_OUTPUTS if enc.with_indices else ENC_OUTPUTS[:2])
    x = torch.zeros(2, cfg.in_channels, GROUP_SIZE, NUM_POINTS)
    with torch.no_grad():
        lat = model.encoder(x)
    _export_one(enc, x, out_dir / ENCODER, ENC_INPUT, enc_out, opset, exporter)
    _export_one(DecoderGraph(model), torch.zeros_like(lat), out_dir / DECODER, DEC_INPUT, [DEC_OUTPUT], opset,
                exporter)
    for name in (ENCODER, DECODER):
        _finalise_onnx(out_dir / name, {**(metadata or {}), "vqdiff.graph": name.split(".")[0]})
    return {
        "exporter": exporter,
        "encoder": {"file": ENCODER, **graph_io(out_dir / ENCODER)},
        "decoder": {"file": DECODER, **graph_io(out_dir / DECODER)},
        "indices": enc.with_indices,
    }


# ----------------------------------------------------------------------------- parity
def ort_cpu_session(path: str | os.PathLike, *, threads: int | None = None, level: str = "all"):
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[level]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _chunks(n: int, sizes=PARITY_BATCHES):
    start, i = 0, 0
    while start < n:
        size = sizes[min(i, len(sizes) - 1)]
        yield start, min(n, start + size)
        start += size
        i += 1


@torch.no_grad()
def torch_reference(model: nn.Module, x: np.ndarray, batch: int = 64) -> dict[str, np.ndarray | None]:
    """Torch eval outputs on ``x`` plus, for codebook kinds, the top-2 code scores per position."""
    model = model.eval()
    bn = model.bottleneck
    out = {"latents": [], "z": [], "indices": [], "top2_values": [], "top2_indices": [], "reconstruction": []}
    for s in range(0, len(x), batch):
        xb = torch.from_numpy(np.ascontiguousarray(x[s : s + batch], np.float32))
        z = model.encoder(xb)
        o = bn(z)
        out["latents"].append(o.latents.numpy())
        out["z"].append(z.numpy())
        out["reconstruction"].append(model.decode(o.latents).numpy())
        if o.indices is not None:
            out["indices"].append(o.indices.numpy())
            if hasattr(bn, "code_weights"):  # vq_diff: soft weights, argmax
                score = bn.code_weights(z)
            else:  # vq / vq_ema: argmin distance == argmax of -distance
                score = -squared_distances(_flatten(z), bn.codebook)
            v, i = torch.topk(score, 2, dim=1)
            b, _, h, w = z.shape
            out["top2_values"].append(v.reshape(b, h, w, 2).numpy())
            out["top2_indices"].append(i.reshape(b, h, w, 2).numpy())
    return {k: (np.concatenate(v) if v else None) for k, v in out.items()}


def compare_indices(ref: dict, indices: np.ndarray | None, *, tie_tol: float = TIE_TOL,
                    relative: bool = False) -> dict[str, Any]:
    """Indices of a backend against torch's: mismatches, accepted ties, and the tie mask."""
    if ref["indices"] is None:
        if indices is not None:
            return {"checked": False, "unexpected_output": True, "unexplained": 1}
        return {"checked": False, "note": "this kind has no codebook: no indices output"}
    if indices is None:
        return {"checked": True, "missing_output": True, "unexplained": 1}
    indices = np.asarray(indices).astype(np.int64)
    differ = indices != ref["indices"]
    v, i = ref["top2_values"], ref["top2_indices"]
    gap = v[..., 0] - v[..., 1]
    tol = tie_tol * np.maximum(1.0, np.abs(v[..., 0])) if relative else tie_tol
    # torch's argmax and its topk may order exactly equal scores differently: accept either of the two
    # best codes whenever they are within the tolerance of each other
    in_top2 = (indices == i[..., 0]) | (indices == i[..., 1])
    tie = differ & in_top2 & (gap <= tol)
    return {
        "checked": True,
        "positions": int(differ.size),
        "mismatches": int(differ.sum()),
        "ties_accepted": int(tie.sum()),
        "unexplained": int((differ & ~tie).sum()),
        "tie_mask": tie,
    }


def run_parity(model: nn.Module, encoder_path, decoder_path, x: np.ndarray, *, atol: float = PARITY_ATOL,
               tie_tol: float = TIE_TOL, threads: int | None = None, ref: dict | None = None,
               run_encoder=None, run_decoder=None, label: str = "onnxruntime-cpu") -> dict[str, Any]:
    """Compare a backend (default: ONNX Runtime CPU on the two graphs) with torch on groups ``x``.

    ``run_encoder(batch) -> (latents, z, indices|None)`` and ``run_decoder(latents) -> groups`` may
    be given to check another backend (TensorRT) against the same reference.
    Returns a JSON-able report whose ``passed`` says whether every criterion holds.
    """
    if run_encoder is None or run_decoder is None:
        enc = ort_cpu_session(encoder_path, threads=threads)
        dec = ort_cpu_session(decoder_path, threads=threads)
        names = [o.name for o in enc.get_outputs()]

        def run_encoder(b):
            res = dict(zip(names, enc.run(None, {ENC_INPUT: b}), strict=True))
            return res["latents"], res["z"], res.get("indices")

        def run_decoder(lat):
            return dec.run(None, {DEC_INPUT: lat})[0]

    ref = ref if ref is not None else torch_reference(model, x)
    lat, z, idx, rec, e2e, sizes = [], [], [], [], [], []
    for s, e in _chunks(len(x)):
        xb = np.ascontiguousarray(x[s:e], np.float32)
        lb, zb, ib = run_encoder(xb)
        lat.append(np.asarray(lb, np.float32))
        z.append(np.asarray(zb, np.float32))
        if ib is not None:
            idx.append(np.asarray(ib))
        rec.append(np.asarray(run_decoder(np.ascontiguousarray(ref["latents"][s:e])), np.float32))
        e2e.append(np.asarray(run_decoder(np.ascontiguousarray(lat[-1])), np.float32))
        sizes.append(e - s)
    lat, z, rec, e2e = map(np.concatenate, (lat, z, rec, e2e))
    idx = np.concatenate(idx) if idx else None

    relative = ref["indices"] is not None and not hasattr(model.bottleneck, "code_weights")
    ind = compare_indices(ref, idx, tie_tol=tie_tol, relative=relative)
    tie_mask = ind.pop("tie_mask", None)
    hard_vq = relative  # vq / vq_ema: a tie picks a different code vector; compare the rest
    lat_err = np.abs(lat - ref["latents"])
    if hard_vq and tie_mask is not None and tie_mask.any():
        lat_err = np.where(tie_mask[:, None], 0.0, lat_err)
    errors = {
        "latents": float(lat_err.max()),
        "z": float(np.abs(z - ref["z"]).max()),
        "reconstruction": float(np.abs(rec - ref["reconstruction"]).max()),
        "end_to_end": float(np.abs(e2e - ref["reconstruction"]).max()),
    }
    ties = bool(tie_mask is not None and tie_mask.any())
    checks = {
        "latents": errors["latents"] <= atol,
        "reconstruction": errors["reconstruction"] <= atol,
        # a legitimately different code at a tie changes the decoded group: only gated without ties
        "end_to_end": (errors["end_to_end"] <= atol) or (hard_vq and ties),
        "indices": ind.get("unexplained", 0) == 0,
    }
    return {
        "backend": label,
        "groups": int(len(x)),
        "batch_sizes": sorted(set(sizes)),
        "atol": atol,
        "tie_tol": tie_tol,
        "max_abs_error": errors,
        "indices": ind,
        "checks": checks,
        "passed": all(checks.values()),
    }


def _failure_message(report: dict[str, Any]) -> str:
    bad = [k for k, ok in report["checks"].items() if not ok]
    e = report["max_abs_error"]
    return (
        f"{report['backend']} does not match torch on {report['groups']} real groups ({', '.join(bad)} failed): "
        f"max abs error latents {e['latents']:.3g}, reconstruction {e['reconstruction']:.3g}, "
        f"end-to-end {e['end_to_end']:.3g} (tolerance {report['atol']:g}); indices {report['indices']}. "
        "Nothing was written."
    )


# ----------------------------------------------------------------------------- export
def _versions(exporter: str) -> dict[str, str]:
    import onnx
    import onnxruntime

    import vqdiff

    v = {"vqdiff": vqdiff.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
         "onnxruntime": onnxruntime.__version__}
    if exporter == "dynamo":
        import onnxscript

        v["onnxscript"] = onnxscript.__version__
    return v


def parity_inputs(ckpt: Checkpoint, groups_mm: np.ndarray) -> np.ndarray:
    from vqdiff.api import groups_to_model

    return groups_to_model(ckpt.normalisation.apply(groups_mm))


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
        Also build TensorRT engines (needs ``tensorrt`` and CUDA; see `vqdiff.export.tensorrt`).

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
            raise ParityError(_failure_message(parity), parity)
        log.info("parity passed: %s", parity["max_abs_error"])

        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {"id": ckpt.model_id, "kind": model.kind, "sha256": ckpt.model_hash,
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
        if int8:
            from .quantize import add_int8_variant

            add_int8_variant(tmp, manifest, ckpt, parity_groups, threads=threads)
        if tensorrt:
            from .tensorrt import add_tensorrt_engines

            add_tensorrt_engines(tmp, manifest, model=model, x=x, ref=ref, **(tensorrt_options or {}))
        write_manifest(tmp, manifest)
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s", out_dir)
    return out_dir


