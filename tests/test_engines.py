"""One name for an engine (`vqdiff.engine.EngineSpec`), one quality gate, layer policies, OpenVINO.

Fast: specs and the gate's single threshold are checked without models; the per-layer policy is
built on the bundled model and gated on 8 real subject01 groups (torch, a few seconds).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from vqdiff.engine import SPECS, EngineSpec, engine_choice, engine_info, engine_spec, spec_from_record

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "default"


def test_spec_names_round_trip_through_every_record():
    for name, spec in SPECS.items():
        assert spec.name == name and engine_spec(name) is spec and engine_spec(name.upper()) is spec
        rec = spec.record()
        assert rec["engine"] == name and spec_from_record(rec) is spec
        assert spec_from_record({**rec, "selection": {"mode": "auto"}}) is spec
    # what latents recorded before specs had names still reads, as the CPU spec of that backend and variant
    old = {("torch", "fp32"): "torch-fp32", ("torch", "bf16"): "torch-bf16", ("onnxruntime", "fp32"): "ort-fp32",
           ("onnxruntime", "int8"): "ort-int8", ("onnxruntime", "int8-encoder"): "ort-int8-encoder",
           ("onnxruntime", "int8-decoder"): "ort-int8-decoder", ("tensorrt", "fp16"): "tensorrt-fp16"}
    for (backend, variant), name in old.items():
        assert spec_from_record({"backend": backend, "variant": variant}).name == name
        assert SPECS[name].record() == {"backend": backend, "variant": variant, "engine": name}  # same values
    assert spec_from_record({"backend": "unknown", "variant": "unknown"}) is None
    with pytest.raises(ValueError, match="layer policy"):
        EngineSpec("x", "torch", "cpu", "bf16", "middle")
    with pytest.raises(ValueError, match="no layer policy"):
        EngineSpec("x", "torch", "cpu", "fp32", "trunk")


def test_the_engine_variable_accepts_auto_and_spec_names_and_lists_them_otherwise(monkeypatch):
    monkeypatch.delenv("VQDIFF_ENGINE", raising=False)
    assert engine_choice() == "auto"
    monkeypatch.setenv("VQDIFF_ENGINE", " ORT-int8-safe ")
    assert engine_choice() == "ort-int8-safe"
    monkeypatch.setenv("VQDIFF_ENGINE", "bogus")
    with pytest.raises(ValueError, match=r"unknown engine \(VQDIFF_ENGINE\) 'bogus'; accepted: auto, ") as e:
        engine_choice()
    assert all(n in str(e.value) for n in SPECS)
    from vqdiff.export.select import select_engine

    with pytest.raises(ValueError, match="accepted: auto, torch-fp32"):  # before any work: at start
        select_engine(MODEL, cache_dir="/nonexistent/never-created")
    assert not Path("/nonexistent/never-created").exists()


def test_engine_info_names_the_spec_of_plain_engines_too():
    class Plain:  # vqdiff.torch_engine.TorchEngine as Codec.from_checkpoint makes it
        backend, provider, precision = "torch", "cpu", "fp32"

    assert engine_info(Plain()) == {"backend": "torch", "variant": "fp32", "engine": "torch-fp32"}
    Plain.provider = "cuda:0"
    assert engine_info(Plain())["engine"] == "cuda-fp32"


_THRESHOLD = re.compile(r"^\s*\w*(MDF|BUAN)\w*(MAX|MIN|RISE|DROP|CHANGE|LIMIT|TOL)\w*\s*=|"
                        r"^\s*\w*(MAX|MIN|LIMIT)\w*(MDF|BUAN)\w*\s*=", re.MULTILINE)


def test_one_quality_gate_holds_the_only_threshold():
    """Export (``vqdiff-export --int8``) and the selection judge with `vqdiff.export.gate`; a second
    MDF / BUAN threshold anywhere in the code fails this test."""
    from vqdiff.export import gate, quantize, select, variants

    found = []
    for folder in ("vqdiff", "export", "service", "training", "benchmarks"):
        for f in (ROOT / folder).rglob("*.py"):
            if f.resolve() != Path(gate.__file__).resolve():
                found += [f"{f.relative_to(ROOT)}: {m.group(0).strip()}" for m in _THRESHOLD.finditer(f.read_text())]
    assert not found, f"a second quality threshold: {found}"
    assert len(_THRESHOLD.findall(Path(gate.__file__).read_text())) == 2  # the pattern finds the real ones
    assert (gate.MAX_MDF_CHANGE_MM, gate.MAX_BUAN_CHANGE) == (0.05, 0.002)
    assert variants.gate is gate.gate and select.gate is gate.gate and quantize.judge is gate.judge
    ref = {"mean_mdf_mm": 0.6, "buan": 0.999}
    assert gate.judge({"mean_mdf_mm": 0.649, "buan": 0.998}, ref)["passed"]
    assert not gate.judge({"mean_mdf_mm": 0.651, "buan": 0.999}, ref)["passed"]  # 0.1 mm no longer passes
    assert not gate.judge({"mean_mdf_mm": 0.6, "buan": 0.9965}, ref)["passed"]


def test_openvino_absent_is_unavailable_with_the_reason(monkeypatch, tmp_path):
    from vqdiff.export.engine_base import BackendUnavailable
    from vqdiff.export.variants import ModelSource, open_variant

    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    src = ModelSource(tmp_path, None, tmp_path, "0" * 64)
    for name in ("openvino-fp32", "openvino-bf16", "openvino-int8"):
        with pytest.raises(BackendUnavailable, match="openvino package is not installed"):
            open_variant(name, src, tmp_path)


def test_openvino_bf16_is_refused_without_native_bf16():
    ov = pytest.importorskip("openvino", reason="the optional openvino package is not installed")
    from vqdiff.export.openvino_backend import cpu_capabilities

    caps = cpu_capabilities(ov.Core())
    if "BF16" in caps:
        pytest.skip("this CPU has native bf16")
    from vqdiff.export.engine_base import BackendUnavailable
    from vqdiff.export.openvino_backend import OpenVinoEngine

    with pytest.raises(BackendUnavailable, match="no native bf16"):
        OpenVinoEngine("/nonexistent", precision="bf16")


@pytest.fixture(scope="module")
def eight_groups(subject_dir):
    from vqdiff.export.data import load_groups

    return load_groups(subject_dir, bundles=("POPT_R",), max_groups=8)


def test_a_layer_policy_variant_is_built_and_gated_on_real_groups(eight_groups):
    import torch

    from vqdiff.export.gate import gate
    from vqdiff.export.variants import model_source, open_variant
    from vqdiff.geometry import groups_to_model
    from vqdiff.torch_engine import Island, edge_layers

    src = model_source(MODEL)
    ref_eng = open_variant("torch-fp32", src, None, threads=1)
    trunk = open_variant("torch-bf16-trunk", src, None, threads=1)
    assert trunk.spec is SPECS["torch-bf16-trunk"] and trunk.spec.layers == "trunk"
    model = trunk.inner.model
    edges = edge_layers(ref_eng.inner.model)
    islands = [n for n, m in model.named_modules() if isinstance(m, Island)]
    assert islands == edges and all(model.get_submodule(n).dtype is None for n in islands)
    assert not any(isinstance(m, Island) for m in ref_eng.inner.model.modules())  # the reference is untouched
    x = groups_to_model(src_norm(src).apply(eight_groups))

    def rec(e):
        return e.decode_groups(e.encode_groups(x))

    norm = src_norm(src)
    ref_q = gate(eight_groups, rec(ref_eng), norm, None)
    g = gate(eight_groups, rec(trunk), norm, ref_q)
    assert np.isfinite(g["mdf_change_mm"]) and g["mdf_change_mm"] != 0.0  # bf16 really ran
    assert engine_info(trunk)["engine"] == "torch-bf16-trunk" and engine_info(trunk)["variant"] == "bf16-trunk"
    # the fp32 islands keep the layers that carry most of bf16's error: all-bf16 changes more
    g_all = gate(eight_groups, rec(open_variant("torch-bf16", src, None, threads=1)), norm, ref_q)
    assert abs(g["mdf_change_mm"]) < abs(g_all["mdf_change_mm"])
    assert torch.get_num_threads() >= 1


def src_norm(src):
    from vqdiff.checkpoint import load_checkpoint

    return load_checkpoint(src.checkpoint).normalisation


def test_the_int8_safe_policy_comes_from_the_measured_budget():
    from vqdiff.export.gate import MAX_MDF_CHANGE_MM
    from vqdiff.export.layer_policy import INT8_BUDGET_MM, INT8_SAFE, SAFE_SHARE, int8_nodes

    for graph, positions in INT8_SAFE.items():
        names = [n for n in INT8_BUDGET_MM if n.startswith(graph + ".")]
        assert all(INT8_BUDGET_MM[names[i]] <= SAFE_SHARE * MAX_MDF_CHANGE_MM for i in positions)
        assert 0 not in positions and len(names) - 1 not in positions  # the edges stay fp32

    class Node:
        def __init__(self, name, op):
            self.name, self.op_type = name, op

    class Graph:
        node = [Node("a", "Conv"), Node("r", "Relu"), Node("b", "Conv")]

    class Model:
        graph = Graph()

    with pytest.raises(ValueError, match="measure its budget"):
        int8_nodes(Model(), "encoder")
    assert int8_nodes(Model(), "encoder", (1,)) == ["b"]


def test_the_default_codec_accepts_an_export_directory(tmp_path, monkeypatch):
    import json

    from vqdiff.codec import Codec
    from vqdiff.errors import CheckpointError
    from vqdiff.fileio import file_sha256

    sha = file_sha256(MODEL / "model.safetensors")
    export = tmp_path / "export"
    export.mkdir()
    manifest = {"format": "vqdiff-export", "format_version": 1, "model": {"sha256": sha},
                "source": {"checkpoint": str(MODEL)}}
    (export / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("VQDIFF_MODEL", str(export))
    codec = Codec.default()
    assert codec.model_info["sha256"] == sha and codec.engine.backend == "torch"
    manifest["model"]["sha256"] = "0" * 64  # another model's export: its checkpoint is not here
    (export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="make_codec"):
        Codec.default()


def test_cpu_bf16_variants_are_measured_only_where_bf16_is_native(monkeypatch):
    from vqdiff.export import engine_cache
    from vqdiff.export.select import emulated

    def flags(*f):
        monkeypatch.setattr(engine_cache, "cpu_info", lambda: {"model": "x", "flags": list(f), "cores": 2})

    flags("avx2", "fma")
    assert "no native bf16" in emulated("torch-bf16") and "no native bf16" in emulated("torch-bf16-trunk")
    assert emulated("ort-int8") is None and emulated("cuda-bf16") is None and emulated("torch-fp32") is None
    flags("avx512f", "avx512_bf16")
    assert emulated("torch-bf16-trunk") is None
    flags("amx_tile", "amx_bf16")
    assert emulated("torch-bf16") is None


def test_openvino_argmax_runs_without_the_stable_sort_and_gives_the_same_indices():
    ov = pytest.importorskip("openvino", reason="the optional openvino package is not installed")
    import onnx
    from onnx import TensorProto, helper

    from vqdiff.export.openvino_backend import argmax_without_sort

    g = helper.make_graph(  # as the exporter writes the bottleneck's argmax: ArgMax axis 1, first index on ties
        [helper.make_node("ArgMax", ["w"], ["i"], axis=1, keepdims=0),
         helper.make_node("TopK", ["w", "k"], ["v2", "i2"], axis=1)], "argmax",
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, [None, 512])],
        [helper.make_tensor_value_info("i", TensorProto.INT64, [None]),
         helper.make_tensor_value_info("i2", TensorProto.INT64, [None, 2])],
        [helper.make_tensor("k", TensorProto.INT64, [1], [2])])
    blob = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    core = ov.Core()
    plain, changed = core.read_model(blob, b""), core.read_model(blob, b"")
    assert argmax_without_sort(changed) == 1  # the k = 2 TopK keeps its sort
    sorts = sorted(op.get_attributes()["sort"] for op in changed.get_ordered_ops() if op.get_type_name() == "TopK")
    assert sorts == ["index", "value"]
    w = np.random.default_rng(0).integers(0, 4, (64, 512)).astype(np.float32)  # many ties per row
    w[:, -1] = w.max()  # a tie with the last column in every row
    a = core.compile_model(plain, "CPU").create_infer_request().infer({0: w})
    b = core.compile_model(changed, "CPU").create_infer_request().infer({0: w})
    ia, ib = (np.asarray(list(r.values())[0]).reshape(-1) for r in (a, b))
    assert np.array_equal(ia, w.argmax(1)) and np.array_equal(ib, w.argmax(1))  # first index on ties, both
    onnx.checker.check_model(onnx.load_from_string(blob))


def test_openvino_engine_full_and_partial_chunks_match_the_graph_as_exported(tmp_path, eight_groups):
    ov = pytest.importorskip("openvino", reason="the optional openvino package is not installed")
    from vqdiff.export.manifest import read_manifest
    from vqdiff.export.onnx_export import export_checkpoint
    from vqdiff.export.openvino_backend import OpenVinoEngine
    from vqdiff.export.variants import model_source
    from vqdiff.geometry import groups_to_model

    export = export_checkpoint(MODEL, tmp_path / "export", parity_groups=eight_groups, exporter="torchscript")
    x = groups_to_model(src_norm(model_source(MODEL)).apply(eight_groups))
    x = np.concatenate([x, x[::-1], x])[:7]
    assert len(x) == 7
    eng = OpenVinoEngine(export, batch_size=4, threads=1)  # one full (static) chunk of 4, one partial of 3
    assert eng._enc_full is not None and eng._dec_full is not None
    lat, idx = eng.encode_with_indices(x)
    rec = eng.decode_groups(lat)
    core, m = ov.Core(), read_manifest(export)
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": "1"}
    enc = core.compile_model(str(export / m["graphs"]["encoder"]["file"]), "CPU", config)
    dec = core.compile_model(str(export / m["graphs"]["decoder"]["file"]), "CPU", config)
    for s, e in ((0, 4), (4, 7)):
        r = enc.create_infer_request().infer({0: x[s:e]})
        out = {" ".join(o.get_names()): r[o] for o in enc.outputs}
        lat0 = next(v for k, v in out.items() if "latents" in k)
        idx0 = next(v for k, v in out.items() if "indices" in k)
        assert np.array_equal(lat[s:e], lat0) and np.array_equal(idx[s:e], idx0)  # bit for bit
        assert np.array_equal(rec[s:e], dec.create_infer_request().infer({0: lat0})[dec.outputs[0]])


def test_the_selection_does_not_time_a_first_call(monkeypatch):
    """The first call of a shape pays one-time costs (oneDNN primitives, OpenVINO kernels): the
    selection takes the gate's outputs from it, untimed, and times the calls after it."""
    import time

    from vqdiff.export import select

    class Fake:
        def __init__(self, first_s, then_s):
            self.calls, self.first_s, self.then_s = 0, first_s, then_s

        def encode_with_indices(self, x):
            time.sleep(self.first_s if self.calls == 0 else self.then_s)
            self.calls += 1
            return x, None

        def decode_groups(self, lat):
            return lat

    engines = {"ref": Fake(0.0, 0.004), "slow-start": Fake(0.3, 0.001), "fails": Fake(0.0, 0.0)}
    seen = {}

    def judge_all(recs):
        seen.update(recs)
        return {n: {"passed": n != "fails"} for n in recs}

    gates, times = select.measure(engines, list(engines), np.zeros((2, 3, 4, 4), np.float32), judge_all, 1.0)
    assert set(seen) == set(engines) and gates["slow-start"]["passed"] and not gates["fails"]["passed"]
    assert all(len(t) >= 1 for t in times.values()) and max(times["slow-start"]) < 0.1  # its first call is not timed
    assert min(times["slow-start"]) < min(times["ref"])  # so it is the faster one, as it is once warm
    assert len(times["fails"]) == 1 and len(times["ref"]) >= 2  # only passing contenders are re-timed


def test_the_roof_holds_an_openvino_variant_to_the_layers_it_runs(monkeypatch, tmp_path, eight_groups):
    """The bf16 hint lets OpenVINO choose per layer: the roof counts what its runtime model runs in
    reduced precision, not the spec's "all" (the fallback where the engine cannot say)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import _roof

    from vqdiff.checkpoint import load_checkpoint
    from vqdiff.torch_engine import layer_names

    model = load_checkpoint(MODEL).model
    names = layer_names(model)
    enc = [n for n in names if n.startswith("encoder.")]
    dec = [n for n in names if n.startswith("decoder.")]

    class Fake:
        def runtime_precisions(self):
            return {"encoder": ["bf16"] * len(enc), "decoder": ["bf16"] * (len(dec) - 2) + ["f32", "f32"]}

    spec = SPECS["openvino-bf16"]
    assert _roof.reduced_layers(model, spec) == set(names)  # by the policy: all
    assert _roof.reduced_layers(model, spec, Fake()) == set(names) - set(dec[-2:])
    r = {"gemm_gflops": {"fp32": 100.0, "bf16": 300.0}}
    per = _roof.layer_gflop_per_group(model)
    assert _roof.spec_roof(model, spec, r, per, Fake()) < _roof.spec_roof(model, spec, r, per)

    class Other(Fake):  # a graph whose convolutions do not match the model's layers: the policy
        def runtime_precisions(self):
            return {"encoder": ["bf16"], "decoder": ["f32"]}

    assert _roof.reduced_layers(model, spec, Other()) == set(names)
    ov = pytest.importorskip("openvino", reason="the optional openvino package is not installed")
    from vqdiff.export.onnx_export import export_checkpoint
    from vqdiff.export.openvino_backend import OpenVinoEngine, cpu_capabilities

    export = export_checkpoint(MODEL, tmp_path / "export", parity_groups=eight_groups, exporter="torchscript")
    eng = OpenVinoEngine(export, threads=1)
    got = eng.runtime_precisions()
    assert [len(got["encoder"]), len(got["decoder"])] == [len(enc), len(dec)] and set(sum(got.values(), [])) == {"f32"}
    if "BF16" in cpu_capabilities(ov.Core()):
        low = _roof.reduced_layers(model, spec, OpenVinoEngine(export, precision="bf16", threads=1))
        assert low and enc[1] in low  # native bf16: the plugin runs the encoder's convolutions in bf16


def test_bench_batch_times_the_engine_calls_the_job_makes(tmp_path, subject_dir, monkeypatch):
    """A job decodes its latents by default (fidelity): the benchmark's stages must run the same calls,
    or finish fails every file (as it did) and the engine's CPU per group leaves out the decode."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_batch

    from vqdiff.batch.model import load_codec
    from vqdiff.batch.tasks import encode_tasks

    src = tmp_path / "in" / "sub-01" / "tractography"
    src.mkdir(parents=True)
    (src / "sub-01__POPT_R.trk").symlink_to(subject_dir / "POPT_R.trk")
    tasks = encode_tasks(tmp_path / "in", tmp_path / "out")
    codec = load_codec(MODEL, backend="torch", threads=1, batch_size=8)
    cpu = bench_batch.cpu_seconds(codec, tasks, MODEL, 8, tmp_path / "scratch", repeats=1)
    assert all(v > 0 for v in cpu.values())
    enc_only = bench_batch.cpu_seconds(codec, tasks, MODEL, 8, tmp_path / "scratch", repeats=1, fidelity=False)
    assert all(v > 0 for v in enc_only.values())
