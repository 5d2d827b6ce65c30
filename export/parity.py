"""Parity of a backend against torch on real groups: the gate of every export and TensorRT engine.

ONNX Runtime (CPU) and torch encode / decode the same real groups (batches of 1, 3 and 64); the max
abs error of latents and reconstructions must be <= ``atol`` (1e-4) and the indices must be equal,
except where torch's two best codes score within ``tie_tol`` (1e-6, relative for VQ distances) of
each other, where either is accepted. torch is imported only by `torch_reference`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .manifest import DEC_INPUT, ENC_INPUT
from .ort_backend import ort_session

PARITY_ATOL = 1e-4
TIE_TOL = 1e-6
PARITY_BATCHES = (1, 3, 64)  # chunk sizes cycled through during the parity run


def _chunks(n: int, sizes=PARITY_BATCHES):
    start, i = 0, 0
    while start < n:
        size = sizes[min(i, len(sizes) - 1)]
        yield start, min(n, start + size)
        start += size
        i += 1


def torch_reference(model, x: np.ndarray, batch: int = 64) -> dict[str, np.ndarray | None]:
    """Torch eval outputs on ``x`` plus, for codebook kinds, the top-2 code scores per position."""
    import torch

    from vqdiff.bottlenecks import _flatten, squared_distances

    model = model.eval()
    bn = model.bottleneck
    out = {"latents": [], "z": [], "indices": [], "top2_values": [], "top2_indices": [], "reconstruction": []}
    with torch.no_grad():
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


def _ort_runners(encoder_path, decoder_path, threads):
    enc = ort_session(encoder_path, threads=threads)
    dec = ort_session(decoder_path, threads=threads)
    names = [o.name for o in enc.get_outputs()]

    def run_encoder(b):
        res = dict(zip(names, enc.run(None, {ENC_INPUT: b}), strict=True))
        return res["latents"], res["z"], res.get("indices")

    def run_decoder(lat):
        return dec.run(None, {DEC_INPUT: lat})[0]

    return run_encoder, run_decoder


def run_parity(model, encoder_path, decoder_path, x: np.ndarray, *, atol: float = PARITY_ATOL,
               tie_tol: float = TIE_TOL, threads: int | None = None, ref: dict | None = None,
               run_encoder=None, run_decoder=None, label: str = "onnxruntime-cpu") -> dict[str, Any]:
    """Compare a backend (default: ONNX Runtime CPU on the two graphs) with torch on groups ``x``.

    ``run_encoder(batch) -> (latents, z|None, indices|None)`` and ``run_decoder(latents) -> groups``
    may be given to check another backend (TensorRT, an engine) against the same reference; a z of
    None (an engine that does not expose the encoder output) leaves z unchecked.
    Returns a JSON-able report whose ``passed`` says whether every criterion holds.
    """
    if run_encoder is None or run_decoder is None:
        run_encoder, run_decoder = _ort_runners(encoder_path, decoder_path, threads)
    ref = ref if ref is not None else torch_reference(model, x)
    lat, z, idx, rec, e2e, sizes = [], [], [], [], [], []
    for s, e in _chunks(len(x)):
        xb = np.ascontiguousarray(x[s:e], np.float32)
        lb, zb, ib = run_encoder(xb)
        lat.append(np.asarray(lb, np.float32))
        if zb is not None:
            z.append(np.asarray(zb, np.float32))
        if ib is not None:
            idx.append(np.asarray(ib))
        rec.append(np.asarray(run_decoder(np.ascontiguousarray(ref["latents"][s:e])), np.float32))
        e2e.append(np.asarray(run_decoder(np.ascontiguousarray(lat[-1])), np.float32))
        sizes.append(e - s)
    lat, rec, e2e = map(np.concatenate, (lat, rec, e2e))
    z = np.concatenate(z) if z else None
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
        "z": None if z is None else float(np.abs(z - ref["z"]).max()),
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


def failure_message(report: dict[str, Any]) -> str:
    """Why a parity report failed, for `ParityError`."""
    bad = [k for k, ok in report["checks"].items() if not ok]
    e = report["max_abs_error"]
    return (
        f"{report['backend']} does not match torch on {report['groups']} real groups ({', '.join(bad)} failed): "
        f"max abs error latents {e['latents']:.3g}, reconstruction {e['reconstruction']:.3g}, "
        f"end-to-end {e['end_to_end']:.3g} (tolerance {report['atol']:g}); indices {report['indices']}. "
        "Nothing was written."
    )
