"""Faster CPU variants of an export, kept only when they are faster *and* nearly as good.

int8 static quantisation (ONNX Runtime, QDQ format, per-channel int8 weights, uint8 activations,
MinMax calibration on real groups; on x86 ORT fuses the QDQ pairs around Conv into QLinearConv,
which uses AVX-512 VNNI). Only the Conv layers are quantised, except the first one and the one that
produces the encoder output / the decoder output; ConvTranspose, the residual adds and the encoder's
bottleneck (codebook distances, softmax, argmax) stay fp32 (on the default model this recipe lost
the least BUAN for the same speed-up as quantising every op).

Quality is judged on held-out real groups in RAS mm against the fp32 graphs by the one quality gate
(`vqdiff.export.gate`: |mean MDF change| <= 0.05 mm, |BUAN change| <= 0.002, the engine
selection's); speed is encode + decode groups/s (64 groups in
chunks of 8, as the ORT CPU engine runs them) in
the same process (interleaved, best of 10) and must be >= 1.10x fp32. Every tried combination is
recorded in the manifest with its numbers; only a kept one has its files in the export
(``encoder.int8.onnx`` / ``decoder.int8.onnx``; the other graph stays the fp32 file when only one
graph gains).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .data import split_groups
from .gate import gate_limits, judge, quality
from .manifest import DEC_INPUT, DECODER, ENC_INPUT, ENCODER, file_entry
from .onnx_tools import bottleneck_nodes
from .ort_backend import ort_session

log = logging.getLogger(__name__)

MIN_SPEEDUP = 1.10  # timings on a shared machine are noisy: a variant must win clearly


def _reader(arrays: list[np.ndarray], input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(arrays)

        def get_next(self):
            b = next(self._it, None)
            return None if b is None else {input_name: np.ascontiguousarray(b, np.float32)}

        def rewind(self):
            self._it = iter(arrays)

    return Reader()


def quantize_graph(src: str | os.PathLike, dst: str | os.PathLike, batches: list[np.ndarray], input_name: str, *,
                   exclude_from: str | None = None, method: str = "minmax", per_channel: bool = True,
                   fp32_edges: bool = False, op_types: list[str] | None = None,
                   nodes: list[str] | None = None) -> Path:
    """Static int8 QDQ quantisation of ``src`` calibrated on ``batches``; nodes that do not compute
    tensor ``exclude_from`` (the encoder's bottleneck) stay fp32; with ``fp32_edges`` so do the first
    node after the input and the node producing ``exclude_from`` (or the graph output); with ``nodes``
    only those are quantised (a layer policy, `layer_policy.int8_nodes`)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(src))
    exclude = bottleneck_nodes(model, exclude_from) if exclude_from else []
    if fp32_edges:
        last = exclude_from or model.graph.output[0].name
        first = model.graph.input[0].name
        exclude += [n.name for n in model.graph.node if first in n.input or last in n.output]
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    root, advice = logging.getLogger(), _PreprocessAdvice()
    root.addFilter(advice)
    try:
        quantize_static(
            str(src), str(dst), _reader(batches, input_name), quant_format=QuantFormat.QDQ,
            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude, nodes_to_quantize=nodes, calibrate_method=methods[method], op_types_to_quantize=op_types,
            extra_options={"CalibMovingAverage": method == "minmax"} if method == "minmax" else {},
        )
    finally:
        root.removeFilter(advice)
    if advice.dropped:
        log.debug("onnxruntime's advice to pre-process %s before quantising was not followed: the graph is "
                  "quantised as exported, and the int8 gate judges the result", Path(src).name)
    return Path(dst)


class _PreprocessAdvice(logging.Filter):
    """Drops onnxruntime's quantiser advice ("Please consider to run pre-processing before quantization",
    logged as root WARNINGs on every call, twice per graph), which tells users of an engine selection
    that something went wrong when nothing did; every other record passes."""

    def __init__(self):
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root" and str(record.msg).startswith("Please consider") and "pre-processing" in str(record.msg):
            self.dropped += 1
            return False
        return True


def _sessions(enc_path, dec_path, threads):
    return ort_session(enc_path, threads=threads), ort_session(dec_path, threads=threads)


def roundtrip(enc, dec, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Encode + decode normalised groups with two ORT sessions, ``batch`` groups per run."""
    out = []
    for s in range(0, len(x), batch):
        lat = enc.run(["latents"], {ENC_INPUT: np.ascontiguousarray(x[s : s + batch])})[0]
        out.append(dec.run(None, {DEC_INPUT: lat})[0])
    return np.concatenate(out)


def groups_per_second(pairs: dict[str, tuple], x: np.ndarray, *, batch: int = 8, groups: int = 64,
                      repeats: int = 5) -> dict[str, float]:
    """Encode + decode throughput of several session pairs on ``groups`` groups in chunks of ``batch``,
    interleaved and best of ``repeats`` (fair under background load)."""
    xb = np.ascontiguousarray(np.resize(x, (groups, *x.shape[1:])))
    for enc, dec in pairs.values():  # warm-up
        roundtrip(enc, dec, xb, batch)
    best = {k: float("inf") for k in pairs}
    for _ in range(repeats):
        for k, (enc, dec) in pairs.items():
            t = time.perf_counter()
            roundtrip(enc, dec, xb, batch)
            best[k] = min(best[k], time.perf_counter() - t)
    return {k: len(xb) / v for k, v in best.items()}


def evaluate_int8(export_dir: str | os.PathLike, groups_mm: np.ndarray, normalisation, *, out_dir=None,
                  threads: int | None = None, calibration_fraction: float = 0.5, seed: int = 0,
                  method: str = "minmax", batch: int = 8, repeats: int = 10,
                  calibration_mm: np.ndarray | None = None, fp32_edges: bool = True,
                  op_types: list[str] | None = ("Conv",)) -> dict[str, Any]:
    """Quantise, then judge every combination (int8 encoder, int8 decoder, both) against fp32.

    ``groups_mm`` are split into calibration groups and held-out groups (``calibration_fraction``),
    unless ``calibration_mm`` is given: then all of ``groups_mm`` are held out.
    Writes ``encoder.int8.onnx`` / ``decoder.int8.onnx`` into ``out_dir`` (default ``export_dir``).
    Returns a report with every combination's quality and speed and the one to keep (or None).
    """
    from vqdiff.geometry import groups_to_model

    export_dir = Path(export_dir)
    out_dir = Path(out_dir) if out_dir else export_dir
    if calibration_mm is None:
        calib_mm, held_mm = split_groups(groups_mm, 1.0 - calibration_fraction, seed)
    else:
        calib_mm, held_mm = np.asarray(calibration_mm, np.float32), np.asarray(groups_mm, np.float32)
    calib = groups_to_model(normalisation.apply(calib_mm))
    held = groups_to_model(normalisation.apply(held_mm))

    enc32, dec32 = _sessions(export_dir / ENCODER, export_dir / DECODER, threads)
    step = min(16, len(calib))  # equal-sized batches (histogram calibrators need them)
    calib_batches = [calib[s : s + step] for s in range(0, len(calib) - step + 1, step)]
    lat_batches = [enc32.run(["latents"], {ENC_INPUT: b})[0] for b in calib_batches]
    enc8_path = quantize_graph(export_dir / ENCODER, out_dir / "encoder.int8.onnx", calib_batches, ENC_INPUT,
                               exclude_from="z", method=method, fp32_edges=fp32_edges,
                               op_types=list(op_types) if op_types else None)
    dec8_path = quantize_graph(export_dir / DECODER, out_dir / "decoder.int8.onnx", lat_batches, DEC_INPUT,
                               method=method, fp32_edges=fp32_edges, op_types=list(op_types) if op_types else None)
    enc8, dec8 = _sessions(enc8_path, dec8_path, threads)
    pairs = {"fp32": (enc32, dec32), "int8-encoder": (enc8, dec32), "int8-decoder": (enc32, dec8),
             "int8-both": (enc8, dec8)}
    speed = groups_per_second(pairs, held, batch=batch, repeats=repeats)
    ref = quality(held_mm, roundtrip(enc32, dec32, held), normalisation)
    combos: dict[str, Any] = {"fp32": {**ref, "groups_per_s": speed["fp32"]}}
    for name in ("int8-encoder", "int8-decoder", "int8-both"):
        g = judge(quality(held_mm, roundtrip(*pairs[name], held), normalisation), ref)
        speedup = speed[name] / speed["fp32"]
        combos[name] = {**g, "buan_drop": -g["buan_change"], "mdf_rise_mm": g["mdf_change_mm"],
                        "groups_per_s": speed[name], "speedup": speedup,
                        "acceptable": bool(g["passed"] and speedup >= MIN_SPEEDUP)}
    ok = [k for k in ("int8-both", "int8-encoder", "int8-decoder") if combos[k]["acceptable"]]
    keep = max(ok, key=lambda k: combos[k]["speedup"]) if ok else None
    return {
        "method": f"onnxruntime static QDQ, per-channel int8 weights / uint8 activations, {method} calibration, "
                  f"ops {list(op_types) if op_types else 'all'}; bottleneck kept fp32"
                  + (", first and last conv fp32" if fp32_edges else ""),
        "calibration_groups": int(len(calib_mm)),
        "held_out_groups": int(len(held_mm)),
        "threads": threads,
        "batch": batch,
        "criteria": {"max_mdf_change_mm": gate_limits(False)[0], "max_buan_change": gate_limits(False)[1],
                     "gate": "vqdiff.export.gate", "min_speedup": MIN_SPEEDUP},
        "combinations": combos,
        "keep": keep,
        "files": {"encoder": str(enc8_path.name), "decoder": str(dec8_path.name)},
    }


def add_int8_variant(export_dir: Path, manifest: dict[str, Any], ckpt, groups_mm: np.ndarray, *,
                     threads: int | None = None) -> dict[str, Any]:
    """Try the int8 variant inside an export being written; record it, keep its files only if it wins."""
    report = evaluate_int8(export_dir, groups_mm, ckpt.normalisation, threads=threads)
    keep = report["keep"]
    files = {"encoder": ENCODER, "decoder": DECODER}
    if keep in ("int8-encoder", "int8-both"):
        files["encoder"] = "encoder.int8.onnx"
    if keep in ("int8-decoder", "int8-both"):
        files["decoder"] = "decoder.int8.onnx"
    for graph, name in (("encoder", "encoder.int8.onnx"), ("decoder", "decoder.int8.onnx")):
        if files[graph] == name:
            manifest["files"][name] = file_entry(export_dir / name, f"{graph}-int8", precision="int8")
        else:
            (export_dir / name).unlink(missing_ok=True)
    entry = {**report, "kept": keep is not None, "encoder": files["encoder"], "decoder": files["decoder"]}
    entry.pop("files")
    manifest.setdefault("variants", {})["int8"] = entry
    log.info("int8 variant: %s", "kept (" + keep + ")" if keep else "not kept")
    return entry
