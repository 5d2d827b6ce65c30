"""The machine's roof for the engine benchmarks: GEMM peak per precision the CPU runs natively, the
model's FLOPs per group, and the groups/s that would make (see docs/engines.md, "The roof").

- fp32: the faster of torch ``matmul`` (MKL / oneDNN sgemm) and ONNX Runtime ``MatMul`` (MLAS) of two
  2048 x 2048 fp32 matrices, best of ``repeats``.
- bf16: the same in bf16, only where the CPU has native bf16 (``avx512_bf16`` or ``amx_bf16`` in
  /proc/cpuinfo); elsewhere oneDNN emulates it and there is no bf16 roof to measure (reported as such).
- int8: ONNX Runtime ``MatMulInteger`` (uint8 x int8 -> int32, the kernel family its QLinearConv /
  QDQ convolutions use) on 2048 x 2048, where the CPU has an int8 dot-product path: VNNI
  (``avx512_vnni`` / ``avx_vnni``), AMX (``amx_int8``), or AVX2 (``vpmaddubsw``; ORT's u8s8 kernel).
- FLOPs per group: `torch.utils.flop_counter.FlopCounterMode` over encoder + bottleneck + decoder of
  one batch (2 FLOPs per multiply-add), divided by the batch.

A variant whose layer policy keeps some layers fp32 (``trunk``, ``safe``: `vqdiff.engine.LAYER_POLICIES`)
is held to a mixed roof: its FLOPs split per layer (the counter's per-module counts), each part at
its precision's peak, ``1 / sum(flops_p / peak_p)`` groups/s (`spec_roof`). An OpenVINO variant is
held to the layers its compiled runtime model runs in reduced precision (the plugin chooses under a
precision hint: on AVX512-BF16 without AMX the transposed convolutions stay f32).

Every measure runs on ``threads`` threads, the threads the engines are given.
"""

from __future__ import annotations

import time

import numpy as np

N = 2048


def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native(flags: set[str]) -> dict[str, str | None]:
    """precision -> why the CPU runs it natively (the ISA feature), or None."""
    bf16 = next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)
    int8 = next((f for f in ("amx_int8", "avx512_vnni", "avx_vnni", "avx2") if f in flags), None)
    return {"fp32": "fma" if "fma" in flags else "sse", "bf16": bf16, "int8": int8}


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def torch_gemm_gflops(dtype_name: str, threads: int, repeats: int = 5) -> float:
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(N, N).to(dtype), torch.randn(N, N).to(dtype)
    return 2 * N**3 / _best(lambda: torch.matmul(a, b), repeats) / 1e9


def ort_gemm_gflops(dtype_name: str, threads: int, repeats: int = 5) -> float:
    """ONNX Runtime (MLAS) GEMM: ``MatMul`` fp32, or ``MatMulInteger`` uint8 x int8 -> int32 for "int8"."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    i8 = dtype_name == "int8"
    ta, tb = (TensorProto.UINT8, TensorProto.INT8) if i8 else (TensorProto.FLOAT, TensorProto.FLOAT)
    g = helper.make_graph(
        [helper.make_node("MatMulInteger" if i8 else "MatMul", ["a", "b"], ["y"])], "gemm",
        [helper.make_tensor_value_info("a", ta, [N, N]), helper.make_tensor_value_info("b", tb, [N, N])],
        [helper.make_tensor_value_info("y", TensorProto.INT32 if i8 else TensorProto.FLOAT, [N, N])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = ({"a": rng.integers(0, 255, (N, N), dtype=np.uint8), "b": rng.integers(-127, 127, (N, N), dtype=np.int8)}
            if i8 else {"a": rng.random((N, N), np.float32), "b": rng.random((N, N), np.float32)})
    return 2 * N**3 / _best(lambda: s.run(None, feed), repeats) / 1e9


def layer_gflop_per_group(model, batch: int = 8, *, what: str = "roundtrip") -> dict[str, float]:
    """GFLOP per group of each convolution (`vqdiff.torch_engine.layer_names`) and of the rest ("other":
    the bottleneck's distances), torch's FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vqdiff.torch_engine import layer_names

    model = model.eval()
    x = torch.zeros(batch, model.config.in_channels, 64, 64)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        out = model.encode(x)
        if what == "roundtrip":
            model.decode(out.latents)
    counts = {k: sum(v.values()) / batch / 1e9 for k, v in fc.get_flop_counts().items()}
    per = {n: counts.get(n.split(".", 1)[0].capitalize() + "." + n.split(".", 1)[1], 0.0) for n in layer_names(model)}
    per["other"] = counts["Global"] - sum(per.values())
    return per


def reduced_layers(model, spec, engine=None) -> set[str]:
    """The layers a spec runs in its (reduced) precision: what ``engine`` reports it runs where it can
    (OpenVINO: `runtime_precisions`, the plugin choosing per layer under a precision hint), else by the
    spec's layer policy."""
    from vqdiff.torch_engine import edge_layers, layer_names

    names = layer_names(model)
    if spec.precision == "fp32":
        return set()
    runtime = engine.runtime_precisions() if hasattr(engine, "runtime_precisions") else None
    if runtime is not None:
        out = set()
        for graph, precs in runtime.items():
            g = [n for n in names if n.startswith(graph + ".")]
            if len(g) != len(precs):  # another graph than the torch model's layers: the policy below
                break
            out |= {n for n, p in zip(g, precs, strict=True) if p not in ("f32", "fp32")}
        else:
            return out
    if spec.layers == "all":
        return set(names)
    trunk = set(names) - set(edge_layers(model))
    if spec.precision == "int8":  # the int8 trunk recipe quantises Conv only: ConvTranspose stays fp32
        import torch

        trunk = {n for n in trunk if not isinstance(model.get_submodule(n), torch.nn.ConvTranspose2d)}
    if spec.layers in ("encoder", "decoder"):
        return {n for n in trunk if n.startswith(spec.layers + ".")}
    if spec.layers == "safe":
        from vqdiff.export.layer_policy import INT8_SAFE

        out = set()
        for graph, positions in INT8_SAFE.items():
            g = [n for n in names if n.startswith(graph + ".")]
            out |= {g[i] for i in positions if i < len(g)}
        return out
    return trunk


def spec_roof(model, spec, r: dict, per_layer: dict[str, float], engine=None) -> float | None:
    """The groups/s roof of ``spec`` (`vqdiff.engine.EngineSpec`) run by ``engine``: its reduced layers
    (`reduced_layers`) at its precision's peak, the rest at fp32's; None where a needed peak was not
    measured (not native here)."""
    peaks = r["gemm_gflops"]
    low = reduced_layers(model, spec, engine)
    need = {"fp32"} | ({spec.precision} if low else set())
    if not need <= set(peaks):
        return None
    seconds = sum(f / peaks[spec.precision if n in low else "fp32"] for n, f in per_layer.items())
    return 1.0 / seconds


def model_gflop_per_group(model, batch: int = 8, *, what: str = "roundtrip") -> float:
    """FLOPs of one group, torch's FLOP counter: encode (encoder + bottleneck) + decode ("roundtrip",
    what `bench_export` times) or encode only ("encode", what batch encoding runs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    x = torch.zeros(batch, model.config.in_channels, 64, 64)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        out = model.encode(x)
        if what == "roundtrip":
            model.decode(out.latents)
    return fc.get_total_flops() / batch / 1e9


def roof(model, threads: int, *, repeats: int = 5, what: str = "roundtrip") -> dict:
    """GEMM GFLOP/s per natively supported precision, the model's GFLOP per group (``what``:
    `model_gflop_per_group`) and the roofs in groups/s."""
    flags = cpu_flags()
    why = native(flags)
    gflop = model_gflop_per_group(model, what=what)
    peaks, notes = {}, {}
    for p, feature in why.items():
        if feature is None:
            notes[p] = "not native on this CPU (no " + ("avx512_bf16 / amx_bf16" if p == "bf16" else "int8 dot product") \
                       + "): no roof; variants in it are emulated"
            continue
        try:
            runs = {"int8": {"ONNX Runtime MatMulInteger u8s8": lambda: ort_gemm_gflops("int8", threads, repeats)},
                    "bf16": {"torch matmul": lambda: torch_gemm_gflops("bf16", threads, repeats)},
                    "fp32": {"torch matmul": lambda: torch_gemm_gflops("fp32", threads, repeats),
                             "ONNX Runtime MatMul": lambda: ort_gemm_gflops("fp32", threads, repeats)}}[p]
            got = {k: f() for k, f in runs.items()}
            best = max(got, key=got.get)
            peaks[p] = got[best]
            notes[p] = f"{best} {N}x{N} (of {', '.join(f'{k} {v:.0f}' for k, v in got.items())}), via {feature}"
        except Exception as exc:  # noqa: BLE001 - a library without the kernel: say so
            notes[p] = f"not measured: {type(exc).__name__}: {exc}"
    return {"threads": threads, "what": what, "gflop_per_group": gflop, "gemm_gflops": peaks, "notes": notes,
            "roof_groups_per_s": {p: v / gflop for p, v in peaks.items()}}


def merge(a: dict, b: dict) -> dict:
    """Two roof measures of one run (before / after the variants): the higher peak of each precision."""
    out = dict(a, gemm_gflops=dict(a["gemm_gflops"]), notes=dict(a["notes"]))
    for p, v in b["gemm_gflops"].items():
        if v > out["gemm_gflops"].get(p, 0):
            out["gemm_gflops"][p], out["notes"][p] = v, b["notes"][p]
    out["roof_groups_per_s"] = {p: v / out["gflop_per_group"] for p, v in out["gemm_gflops"].items()}
    return out


def fraction(groups_per_s: float, precision: str, r: dict, top: float | None = None) -> str:
    """``groups_per_s`` as a fraction of its precision's roof, or of ``top`` (a `spec_roof`); ``--``
    where that roof was not measured."""
    top = top if top is not None else r["roof_groups_per_s"].get(precision)
    return f"{groups_per_s / top:.0%}" if top else "--"


def print_roof(r: dict) -> None:
    what = "encode + decode" if r.get("what", "roundtrip") == "roundtrip" else "encode"
    print(f"\nroof ({r['threads']} threads): model {r['gflop_per_group'] * 1e3:.1f} MFLOP per group ({what}, "
          "torch.utils.flop_counter)")
    for p in ("fp32", "bf16", "int8"):
        if p in r["gemm_gflops"]:
            print(f"- {p}: GEMM {r['gemm_gflops'][p]:,.0f} GFLOP/s ({r['notes'][p]}) -> roof "
                  f"{r['roof_groups_per_s'][p]:,.0f} groups/s")
        else:
            print(f"- {p}: {r['notes'][p]}")
