"""The engine a machine serves: the fastest variant that passes the quality gate here, chosen once.

>>> from vqdiff.export.select import select_engine
>>> engine = select_engine("models/default")            # VQDIFF_ENGINE=auto (default)
>>> engine.variant_name, engine.selection["reason"]

``auto`` (the default; ``$VQDIFF_ENGINE`` or ``engine=`` force one of the spec names of
`vqdiff.engine.SPECS`; any other value is refused with the list of valid names):

1. the cache entry of this model x machine x library versions (`engine_cache`) holds a decision:
   open its variant, replay the recorded check (2 groups, outputs within `CHECK_ATOL`) and use it;
2. otherwise select, under the entry's lock: real groups split into calibration / held-out halves
   (`variants.gate_groups`); an export (TorchScript, parity-checked against torch) and int8 graphs
   are built into the entry when the model has none; every candidate of the device kind
   (`variants.CANDIDATES`) is opened, encodes + decodes the held-out groups once untimed (the gate's
   outputs; a first call of a shape pays one-time costs), once timed, then the ones within
   `CONTENDER_RATIO` of the fastest passing one are timed again while `TIMING_BUDGET_S` lasts
   (interleaved rounds, best of: `measure`); the fastest that passes is chosen.
   The decision (each candidate's groups/s and gate, the load average before / after) is written.
3. anything failing on the way: the fp32 reference (torch; ONNX fp32 for an export without its
   checkpoint), with the reason logged and recorded (mode ``fallback``; not cached).

The engine carries ``variant_name``, ``precision`` and ``selection`` (mode, reason, candidates);
`vqdiff.engine.engine_info` puts the short form of it into every latents file it makes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from vqdiff.engine import ENGINE_ENV, SPECS, engine_choice

from .engine_base import BackendUnavailable, _GroupEngine, cuda_device
from .engine_cache import cache_key, entry_dir, key_fields, locked, read_decision, write_decision
from .variants import (
    CANDIDATES,
    EXPORT_VARIANT,
    REFERENCE,
    ModelSource,
    device_kind,
    ensure_export,
    ensure_int8,
    gate,
    gate_groups,
    gate_limits,
    model_source,
    open_variant,
)

log = logging.getLogger(__name__)

ENGINES = ("auto", *SPECS)
TIMING_BUDGET_S = 2.0  # re-timing rounds after the first (gate) pass stop once this is spent
CONTENDER_RATIO = 1.5  # beyond the two fastest passing ones, a candidate slower than this ratio is timed once
MAX_ROUNDS = 4
CHECK_ATOL = 1e-3  # the chosen engine replays its recorded outputs within this (normalised units)


def _device(device: str | None, name: str) -> str:
    if name != "auto":
        kind = SPECS[name].device
        return cuda_device(device) if kind == "cuda" else "cpu"
    if device is not None:
        return cuda_device(device) if str(device).startswith("cuda") else str(device)
    import shutil

    if not (any(Path(p).exists() for p in ("/dev/nvidia0", "/proc/driver/nvidia/gpus")) or shutil.which("nvidia-smi")):
        return "cpu"  # no sign of an NVIDIA GPU: no need to import torch to find out
    try:
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def select_engine(path: str | os.PathLike, *, engine: str | None = None, device: str | None = None,
                  threads: int | None = None, cache_dir: str | os.PathLike | None = None,
                  gate_data: str | os.PathLike | None = None, budget_s: float = TIMING_BUDGET_S) -> _GroupEngine:
    """The engine to run ``path`` (checkpoint or export directory) with on this machine (see the module)."""
    name = engine_choice(engine)
    src = model_source(path)
    dev = _device(device, name)
    fields = key_fields(src.model_sha256, dev if dev == "cpu" else f"{dev} {_gpu_name(dev)}", threads)
    folder = entry_dir(fields, cache_dir)
    t0 = time.perf_counter()
    try:
        with locked(folder):
            if name == "auto":
                eng = _auto(src, folder, fields, dev, threads, gate_data, budget_s)
            else:
                eng = _forced(name, src, folder, fields, dev, threads, gate_data)
    except Exception as exc:  # noqa: BLE001 - whatever failed, serve the reference and say why
        reason = f"{'selection' if name == 'auto' else name} failed: {type(exc).__name__}: {exc}"
        log.warning("engine: %s; falling back to the fp32 reference", reason)
        eng = _fallback(src, threads, reason, name)
    eng.selection["start_s"] = round(time.perf_counter() - t0, 3)
    eng.selection["cache_dir"] = str(folder)
    log.info("engine %s (%s, %s): %s", eng.variant_name, eng.backend, eng.provider, eng.selection["reason"])
    return eng


def _gpu_name(dev: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(dev)) if torch.cuda.is_available() else "?"


# ---------------------------------------------------------------------------------------- modes
def _auto(src, folder, fields, dev, threads, gate_data, budget_s) -> _GroupEngine:
    decision = read_decision(folder, fields)
    if decision is not None:
        try:
            eng = _open(decision["variant"], src, folder, dev, threads)
            _replay_check(eng, folder)
            return _attach(eng, "auto", decision, cache="hit")
        except Exception as exc:  # noqa: BLE001
            log.warning("engine: the cached decision in %s is unusable (%s); selecting again", folder, exc)
    decision, eng = run_selection(src, folder, dev, threads, gate_data, budget_s)
    decision["key"], decision["key_fields"] = cache_key(fields), fields
    _record_check(eng, folder, decision.pop("_check_x"))
    write_decision(folder, decision)
    return _attach(eng, "auto", decision, cache="miss")


def _forced(name, src, folder, fields, dev, threads, gate_data) -> _GroupEngine:
    decision = read_decision(folder, fields)
    needs_export = SPECS[name].backend != "torch"
    if needs_export and not _export_ready(src, folder, name):
        data = gate_groups(src, gate_data)
        export_dir = ensure_export(src, folder, None if data is None else data[0])
        if name in EXPORT_VARIANT:
            if data is None:
                raise BackendUnavailable(f"{name} needs real groups to calibrate on (VQDIFF_GATE_DATA)")
            ensure_int8(export_dir, data[0], _normalisation(src))
    eng = _open(name, src, folder, dev, threads)
    measured = (decision or {}).get("candidates", {})
    return _attach(eng, "forced", {"variant": name, "candidates": measured,
                                   "reason": f"forced by {ENGINE_ENV}={name}"}, cache=None)


def _fallback(src: ModelSource, threads, reason: str, asked: str) -> _GroupEngine:
    for name in ("torch-fp32", "ort-fp32"):
        try:
            eng = open_variant(name, src, src.export, threads=threads)
            eng.warmup()
            return _attach(eng, "fallback", {"variant": name, "candidates": {}, "asked": asked,
                                             "reason": f"{reason}; serving the fp32 reference {name}"}, cache=None)
        except Exception as exc:  # noqa: BLE001
            reason = f"{reason}; {name}: {exc}"
    raise BackendUnavailable(f"no engine can run {src.path}: {reason}")


def _export_ready(src: ModelSource, folder: Path, name: str) -> bool:
    export_dir = _export_dir(src, folder, name)
    if export_dir is None:
        return False
    if name not in EXPORT_VARIANT:
        return True
    from .manifest import read_manifest

    return bool(read_manifest(export_dir, verify=False).get("variants", {}).get(EXPORT_VARIANT[name],
                                                                                 {}).get("kept"))


def _export_dir(src: ModelSource, folder: Path, name: str) -> Path | None:
    if (folder / "export" / "manifest.json").is_file() and not name.startswith("tensorrt"):
        return folder / "export"
    return src.export


def _open(name, src, folder, dev, threads) -> _GroupEngine:
    return open_variant(name, src, _export_dir(src, folder, name), device=dev, threads=threads)


def _normalisation(src: ModelSource):
    from vqdiff.normalise import Normalisation

    from .manifest import read_manifest

    if src.export is not None:
        return Normalisation.from_dict(read_manifest(src.export, verify=False)["normalisation"])
    from vqdiff.checkpoint import read_config

    return Normalisation.from_dict(read_config(src.checkpoint)["normalisation"])


# ---------------------------------------------------------------------------------------- selection
def _roundtrip(eng, x: np.ndarray) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    lat, _ = eng.encode_with_indices(x)
    rec = eng.decode_groups(lat)
    return time.perf_counter() - t, rec


def run_selection(src: ModelSource, folder: Path, dev: str, threads, gate_data, budget_s):
    """Measure and gate every candidate; (decision, chosen engine). See the module docstring."""
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    kind = device_kind(dev)
    data = gate_groups(src, gate_data)
    if data is None:
        raise BackendUnavailable("no real groups to gate the variants on (set VQDIFF_GATE_DATA to a folder of "
                                 "tractograms, or put gate_groups.npy beside the model)")
    calib_mm, held_mm, desc, synthetic = data
    norm = _normalisation(src)
    from vqdiff.geometry import groups_to_model

    x = groups_to_model(norm.apply(held_mm))
    cand: dict[str, dict[str, Any]] = {}
    export_dir = src.export
    if kind == "cpu" or (src.export is None and _ort_cuda()):
        try:
            export_dir = ensure_export(src, folder, calib_mm)
            if kind == "cpu":
                ensure_int8(export_dir, calib_mm, norm)
        except Exception as exc:  # noqa: BLE001 - the torch variants can still be measured
            log.warning("engine: cannot prepare the ONNX variants (%s)", exc)
            cand["ort-fp32"] = {"available": False, "reason": f"export failed: {exc}"}
    prepare_s = time.perf_counter() - t0
    engines: dict[str, _GroupEngine] = {}
    for name in CANDIDATES[kind]:
        if name in cand:
            continue
        why = emulated(name)
        if why:
            cand[name] = {"available": False, "reason": why}
            continue
        try:
            d = export_dir if not name.startswith("tensorrt") else src.export
            engines[name] = open_variant(name, src, d, device=dev, threads=threads)
            engines[name].warmup()
        except Exception as exc:  # noqa: BLE001 - unavailable here: recorded, not fatal
            cand[name] = {"available": False, "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
    ref_name = REFERENCE[kind] if REFERENCE[kind] in engines else next(
        (n for n in ("ort-fp32", "ort-cuda", "torch-fp32") if n in engines), None)
    if ref_name is None:
        raise BackendUnavailable("neither fp32 reference could be opened: "
                                 + "; ".join(f"{k}: {v['reason']}" for k, v in cand.items()))
    order = [ref_name, *[n for n in engines if n != ref_name]]
    limits = gate_limits(synthetic)

    def judge_all(recs: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
        ref_q = gate(held_mm, recs[ref_name], norm, None)
        return {n: gate(held_mm, r, norm, ref_q, limits) if n != ref_name else ref_q for n, r in recs.items()}

    gates, times = measure(engines, order, x, judge_all, budget_s)
    gps = {n: len(x) / min(t) for n, t in times.items()}
    for n in engines:
        cand[n] = {"available": True, "groups_per_s": round(gps[n], 1), "timings": len(times[n]),
                   "gate": _round(gates[n]), "provider": engines[n].provider}
    passing = [n for n in engines if gates[n]["passed"]]
    chosen = max(passing, key=lambda n: gps[n])
    failed = [n for n in engines if not gates[n]["passed"]]
    load1 = os.getloadavg()[0]
    reason = (f"fastest variant that passed the quality gate: {chosen} {gps[chosen]:.0f} groups/s "
              f"({gps[chosen] / gps[ref_name]:.2f}x the fp32 reference {ref_name})")
    if failed:
        reason += "; failed the gate: " + ", ".join(failed)
    decision = {
        "variant": chosen, "spec": asdict(SPECS[chosen]), "reason": reason, "candidates": dict(sorted(cand.items())),
        "gate": {"data": desc, "groups": int(len(x)), "calibration_groups": int(len(calib_mm)),
                 "reference": ref_name, "max_mdf_change_mm": limits[0], "max_buan_change": limits[1]},
        "timing": {"groups_per_call": int(len(x)), "what": "encode + decode, best of the timed calls",
                   "threads": threads, "prepare_s": round(prepare_s, 2),
                   "select_s": round(time.perf_counter() - t0, 2), "load_avg_before": round(load0, 2),
                   "load_avg_after": round(load1, 2), "cores": os.cpu_count(),
                   "contended": bool(max(load0, load1) > (os.cpu_count() or 1))},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "_check_x": x[:2],
    }
    return decision, engines[chosen]


def measure(engines: dict[str, _GroupEngine], order: list[str], x: np.ndarray, judge_all, budget_s: float):
    """(gate results, timings in s) of every engine on ``x``: one untimed call each, the reference first
    (the gate's outputs, judged by ``judge_all(outputs) -> {name: gate}``; untimed because the first
    call of a shape pays one-time costs: oneDNN primitives, OpenVINO's dynamic-shape kernels, ORT's
    arena), then one timed call each, then the passing ones within `CONTENDER_RATIO` of the fastest
    (at least two) re-timed in interleaved rounds while ``budget_s`` lasts (`MAX_ROUNDS` in all)."""
    recs = {name: _roundtrip(engines[name], x)[1] for name in order}
    gates = judge_all(recs)
    times = {name: [_roundtrip(engines[name], x)[0]] for name in order}
    t_budget = time.perf_counter()
    for _ in range(MAX_ROUNDS - 1):
        ranked = sorted((n for n in order if gates[n]["passed"]), key=lambda n: min(times[n]))
        if not ranked:
            break
        best = min(times[ranked[0]])
        contenders = [n for i, n in enumerate(ranked) if i < 2 or min(times[n]) <= CONTENDER_RATIO * best]
        if len(contenders) < 2 or time.perf_counter() - t_budget > budget_s:
            break
        for name in contenders:  # interleaved: a burst of background load hits every contender alike
            times[name].append(_roundtrip(engines[name], x)[0])
    return gates, times


def emulated(name: str) -> str | None:
    """Why a CPU bf16 variant is not measured here (no native bf16: emulated, an order of magnitude
    slower than fp32, measured 15 against 180 groups/s on the AVX2 machine), or None."""
    from .engine_cache import cpu_info

    spec = SPECS[name]
    if spec.device != "cpu" or spec.precision != "bf16":
        return None
    flags = cpu_info()["flags"]
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return None
    return "this CPU has no native bf16 (avx512_bf16 / amx_bf16): bf16 would be emulated, far slower than fp32"


def _ort_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _round(g: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in g.items()}


def _record_check(eng, folder: Path, x: np.ndarray) -> None:
    lat, _ = eng.encode_with_indices(x)
    np.savez(folder / "check.npz", x=x, latents=lat, reconstruction=eng.decode_groups(lat))


def _replay_check(eng, folder: Path) -> None:
    """The chosen engine must still give the outputs it gave when it was chosen (artefacts, libraries)."""
    with np.load(folder / "check.npz") as c:
        lat, _ = eng.encode_with_indices(c["x"])
        err = max(float(np.abs(lat - c["latents"]).max()),
                  float(np.abs(eng.decode_groups(c["latents"]) - c["reconstruction"]).max()))
    if not err <= CHECK_ATOL:
        raise BackendUnavailable(f"the chosen engine no longer reproduces its recorded outputs (max abs error "
                                 f"{err:.3g} > {CHECK_ATOL:g})")


def _attach(eng, mode: str, decision: dict, *, cache: str | None) -> _GroupEngine:
    cands = decision.get("candidates", {})
    summary = {"mode": mode, "variant": decision["variant"], "reason": decision["reason"],
               "candidates": {n: {"groups_per_s": c["groups_per_s"], "passed": c["gate"]["passed"],
                                  "mdf_change_mm": c["gate"]["mdf_change_mm"], "buan_change": c["gate"]["buan_change"]}
                              for n, c in cands.items() if c.get("available")},
               "key": decision.get("key", "")[:16]}
    eng.selection = {"mode": mode, "cache": cache, **{k: v for k, v in decision.items() if k != "key_fields"},
                     "backend": eng.backend, "precision": getattr(eng, "precision", None), "provider": eng.provider,
                     "summary": summary}
    eng.fallback_reasons = [f"{n}: {c['reason']}" for n, c in cands.items() if not c.get("available")]
    return eng
