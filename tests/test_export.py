"""ONNX export, parity, runtime backends, TensorRT (marker ``tensorrt``) and the BentoML store.

Random-weight checkpoints of every kind (a reduced config for the kind sweep, the default config for
one model) fitted on the real data; parity is checked on real groups of ../shared/data.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vqdiff.api import Codec
from vqdiff.bottlenecks import KINDS
from vqdiff.checkpoint import load_checkpoint, save_checkpoint
from vqdiff.engine import Engine
from vqdiff.geometry import groups_to_model
from vqdiff.models import ModelConfig, StreamlineAutoencoder
from vqdiff.normalise import Normalisation

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from vqdiff.export import graphs, onnx_export, parity  # noqa: E402
from vqdiff.export.manifest import ExportError, ParityError, file_sha256, read_manifest  # noqa: E402
from vqdiff.export.ort_backend import ort_session  # noqa: E402
from vqdiff.export.runtime import BACKENDS, BackendUnavailable, load_engine, make_codec  # noqa: E402

SMALL = {"hidden": 32, "residual_hidden": 8}
SMALL_BUNDLES = ("CC_Fr_1", "FPT_L", "FPT_R", "ILF_R", "POPT_L", "POPT_R", "PYT_L", "PYT_R")
SMALL_CODES = {"vq": {"num_codes": 64}, "vq_ema": {"num_codes": 64}, "vq_diff": {"num_codes": 64}}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def real_groups(subject_dir) -> np.ndarray:
    from vqdiff.export.data import load_groups

    # the eight smallest bundles (63 real groups): canonicalising all 12 costs seconds per run
    return load_groups(subject_dir, bundles=SMALL_BUNDLES)


@pytest.fixture(scope="session")
def normalisation(real_groups) -> Normalisation:
    return Normalisation.fit(real_groups)


def _make_checkpoint(path: Path, kind: str, norm: Normalisation, groups: np.ndarray, *, small: bool) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig.for_kind(kind, bottleneck=SMALL_CODES.get(kind), **SMALL) if small else ModelConfig.for_kind(kind)
    model = StreamlineAutoencoder.from_config(cfg)
    if kind == "vq_ema":  # one train-mode forward so the EMA buffers are non-trivial
        model.train()
        with torch.no_grad():
            model(torch.from_numpy(groups_to_model(norm.apply(groups[:8]))))
    model.eval()
    return save_checkpoint(path, model, norm, model_id=f"test-{kind}{'-small' if small else ''}")


@pytest.fixture(scope="session")
def small_exports(tmp_path_factory, real_groups, normalisation):
    """kind -> (checkpoint dir, export dir); built lazily, once per session."""
    root = tmp_path_factory.mktemp("small")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in cache:
            ck = _make_checkpoint(root / f"ck_{kind}", kind, normalisation, real_groups, small=True)
            ex = onnx_export.export_checkpoint(ck, root / f"ex_{kind}", parity_groups=real_groups[::8])
            cache[kind] = (ck, ex)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def full_export(tmp_path_factory, real_groups, normalisation):
    """The default (full-size) vq_diff config, random weights; parity on 32 real groups."""
    root = tmp_path_factory.mktemp("full")
    ck = _make_checkpoint(root / "ck", "vq_diff", normalisation, real_groups, small=False)
    ex = onnx_export.export_checkpoint(ck, root / "export", parity_groups=real_groups[::2][:32])
    return ck, ex


def _x(groups, norm):
    return groups_to_model(norm.apply(groups))


# ----------------------------------------------------------------------------- export + parity
@pytest.mark.parametrize("kind", KINDS)
def test_export_every_kind(small_exports, real_groups, kind):
    ck, ex = small_exports(kind)
    m = read_manifest(ex)
    assert sorted(p.name for p in ex.iterdir()) == ["decoder.onnx", "encoder.onnx", "manifest.json"]  # no sidecar
    assert m["model"]["kind"] == kind and m["opset"] >= 17
    enc_out = [o["name"] for o in m["graphs"]["encoder"]["outputs"]]
    if kind in ("ae", "vae"):
        assert enc_out == ["latents", "z"]
        assert m["indices"]["output"] is None and "no codebook" in m["indices"]["note"]
    else:
        assert enc_out == ["latents", "z", "indices"]
        assert m["graphs"]["encoder"]["outputs"][2]["dtype"] == "int64"
        assert m["parity"]["indices"]["unexplained"] == 0 and m["parity"]["indices"]["checked"]
    p = m["parity"]
    assert p["passed"] and p["backend"] == "onnxruntime-cpu"
    assert p["max_abs_error"]["latents"] <= 1e-4 and p["max_abs_error"]["reconstruction"] <= 1e-4
    assert {1, 3}.issubset(p["batch_sizes"])
    engine = load_engine(ex, backend="ort-cpu", warmup=False)
    lat, idx = engine.encode_with_indices(_x(real_groups[:2], Normalisation.from_dict(m["normalisation"])))
    assert lat.shape == (2, 64, 16, 16) and engine.has_indices == (kind not in ("ae", "vae"))
    assert idx is None if kind in ("ae", "vae") else idx.shape == (2, 16, 16)
    for name in ("encoder.onnx", "decoder.onnx"):
        model = onnx.load(str(ex / name))
        onnx.checker.check_model(model)
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        meta = {e.key: e.value for e in model.metadata_props}
        assert meta["vqdiff.model_sha256"] == m["model"]["sha256"]


def test_manifest_contents_and_checksums(full_export, normalisation):
    ck, ex = full_export
    m = read_manifest(ex)
    ckpt = load_checkpoint(ck)
    assert m["format"] == "vqdiff-export" and m["format_version"] == 1
    assert m["model"] == {"id": ckpt.model_id, "kind": "vq_diff", "sha256": ckpt.model_hash,
                          "config": ckpt.model.config.to_dict()}
    assert m["source"]["weights_sha256"] == file_sha256(ck / "model.safetensors") == ckpt.model_hash
    assert m["source"]["config_sha256"] == file_sha256(ck / "config.json")
    assert Normalisation.from_dict(m["normalisation"]) == normalisation
    for name, entry in m["files"].items():
        assert entry["sha256"] == file_sha256(ex / name) and entry["bytes"] == (ex / name).stat().st_size
    enc, dec = m["graphs"]["encoder"], m["graphs"]["decoder"]
    assert enc["inputs"] == [{"name": "groups", "shape": ["batch", 3, 64, 64], "dtype": "float32"}]
    assert enc["outputs"][0] == {"name": "latents", "shape": ["batch", 64, 16, 16], "dtype": "float32"}
    assert enc["outputs"][2] == {"name": "indices", "shape": ["batch", 16, 16], "dtype": "int64"}
    assert dec["inputs"] == [{"name": "latents", "shape": ["batch", 64, 16, 16], "dtype": "float32"}]
    assert dec["outputs"] == [{"name": "groups", "shape": ["batch", 3, 64, 64], "dtype": "float32"}]
    assert m["parity"]["groups"] == 32 and m["parity"]["passed"]
    assert m["versions"]["onnxruntime"] == ort.__version__


def test_tampered_export_is_refused(full_export, tmp_path):
    _, ex = full_export
    bad = tmp_path / "bad"
    shutil.copytree(ex, bad)
    data = bytearray((bad / "decoder.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bad / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="does not match"):
        read_manifest(bad)
    with pytest.raises(ExportError):
        load_engine(bad, backend="ort-cpu")


def test_dynamic_batch_sizes(small_exports, real_groups, normalisation):
    ck, ex = small_exports("vq_diff")
    groups = np.resize(real_groups, (257, *real_groups.shape[1:]))  # more than the real groups: wrap around
    x = _x(groups, normalisation)
    ref = parity.torch_reference(load_checkpoint(ck).model, x)  # per-group: slices are references
    enc = ort_session(ex / "encoder.onnx")
    dec = ort_session(ex / "decoder.onnx")
    for batch in (1, 3, 64, 257):
        sl = {k: (v[-batch:] if v is not None else None) for k, v in ref.items()}
        lat, _, idx = enc.run(None, {"groups": x[-batch:]})
        rec = dec.run(None, {"latents": sl["latents"]})[0]
        assert lat.shape == (batch, 64, 16, 16) and idx.shape == (batch, 16, 16) and idx.dtype == np.int64
        assert rec.shape == (batch, 3, 64, 64)
        assert np.abs(lat - sl["latents"]).max() <= 1e-4
        assert np.abs(rec - sl["reconstruction"]).max() <= 1e-4
        assert parity.compare_indices(sl, idx)["unexplained"] == 0


def test_tie_handling():
    ref = {"indices": np.array([[[3, 5]]]), "top2_values": np.array([[[[0.5, 0.5 - 5e-7], [0.9, 0.1]]]]),
           "top2_indices": np.array([[[[3, 7], [5, 2]]]])}
    ok = parity.compare_indices(ref, np.array([[[7, 5]]]))  # tie at position 0: either code accepted
    assert ok["mismatches"] == 1 and ok["ties_accepted"] == 1 and ok["unexplained"] == 0
    bad = parity.compare_indices(ref, np.array([[[3, 2]]]))  # clear winner at position 1 differs
    assert bad["unexplained"] == 1
    far = parity.compare_indices(ref, np.array([[[9, 5]]]))  # not one of torch's two best
    assert far["unexplained"] == 1
    # an exact tie that torch's argmax (349) and topk (506 first) order differently
    exact = {"indices": np.array([[[349]]]), "top2_values": np.array([[[[0.0291726, 0.0291726]]]]),
             "top2_indices": np.array([[[[506, 349]]]])}
    assert parity.compare_indices(exact, np.array([[[506]]]))["ties_accepted"] == 1


def test_parity_failure_writes_nothing(small_exports, real_groups, monkeypatch):
    ck, ex = small_exports("vq_diff")
    before = (ex / "manifest.json").read_text()
    parent = ex.parent
    monkeypatch.setattr(graphs.DecoderGraph, "forward", lambda self, latents: self.decoder(latents) + 1e-2)
    with pytest.raises(ParityError, match="reconstruction") as err:
        onnx_export.export_checkpoint(ck, parent / "broken", parity_groups=real_groups[:4], exporter="torchscript")
    assert err.value.report["checks"]["reconstruction"] is False
    assert not (parent / "broken").exists()
    # a failed re-export leaves the existing export untouched
    with pytest.raises(ParityError):
        onnx_export.export_checkpoint(ck, ex, overwrite=True, parity_groups=real_groups[:4], exporter="torchscript")
    assert (ex / "manifest.json").read_text() == before
    read_manifest(ex)
    assert not [p for p in parent.iterdir() if ".tmp-" in p.name]


def test_tolerance_is_enforced(small_exports, real_groups, tmp_path):
    ck, _ = small_exports("vae")
    with pytest.raises(ParityError, match="tolerance 0"):
        onnx_export.export_checkpoint(ck, tmp_path / "strict", parity_groups=real_groups[:4], atol=0.0,
                                      exporter="torchscript")
    assert not (tmp_path / "strict").exists()


def test_existing_output_needs_overwrite(small_exports, real_groups):
    ck, ex = small_exports("ae")
    with pytest.raises(FileExistsError):
        onnx_export.export_checkpoint(ck, ex, parity_groups=real_groups[:2])


def test_torchscript_exporter(small_exports, real_groups, tmp_path):
    ck, _ = small_exports("vq")
    ex = onnx_export.export_checkpoint(ck, tmp_path / "ts", exporter="torchscript", parity_groups=real_groups[::8])
    m = read_manifest(ex)
    assert m["exporter"] == "torchscript" and m["parity"]["passed"]


def test_cli_export(small_exports, subject_dir, tmp_path, capsys):
    from vqdiff.export.cli_export import main

    ck, _ = small_exports("vq_ema")
    out = tmp_path / "cli"
    args = [str(ck), str(out), "--parity-data", str(subject_dir), "--parity-bundles", *SMALL_BUNDLES,
            "--parity-groups", "6", "--exporter", "torchscript"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parity"]["passed"] and summary["parity"]["groups"] == 6 and summary["kind"] == "vq_ema"
    with pytest.raises(SystemExit) as e:  # exists, no -f
        main(args)
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main([*args, "-f"])
    assert e.value.code == 0


# ----------------------------------------------------------------------------- runtime
def test_runtime_auto_override_and_unknown(full_export):
    ck, ex = full_export
    engine = load_engine(ex)
    assert isinstance(engine, Engine) and engine.name in BACKENDS
    if not torch.cuda.is_available():
        assert engine.name == "ort-cpu" and engine.provider == "CPUExecutionProvider"
        assert any(r.startswith("ort-cuda") for r in engine.fallback_reasons)
    ort_cpu = load_engine(ex, backend="ort-cpu", threads=1, warmup=False)
    assert (ort_cpu.backend, ort_cpu.provider) == ("onnxruntime", "CPUExecutionProvider")
    via_torch = load_engine(ex, backend="torch", device="cpu")  # the source checkpoint, found via the manifest
    assert via_torch.backend == "torch" and via_torch.model_info == ort_cpu.model_info
    ckpt_engine = load_engine(ck)
    assert ckpt_engine.backend == "torch" and ckpt_engine.model_info == ort_cpu.model_info
    assert load_engine(ex, device="cpu").name == "ort-cpu"
    with pytest.raises(ValueError, match="accepted: 'auto', 'tensorrt', 'ort-cuda', 'ort-cpu', 'torch'"):
        load_engine(ex, backend="onnx")
    with pytest.raises(ValueError, match="unknown engine option"):
        load_engine(ex, backend="ort-cpu", thread=2)
    with pytest.raises(BackendUnavailable, match="export directory"):
        load_engine(ck, backend="ort-cpu")
    with pytest.raises(BackendUnavailable, match="no TensorRT engines"):
        load_engine(ex, backend="tensorrt")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
            load_engine(ex, backend="ort-cuda")
    with pytest.raises(ValueError, match="contradicts"):
        load_engine(ex, backend="ort-cpu", device="cuda:0")
    with pytest.raises(BackendUnavailable, match="int8"):
        load_engine(ex, backend="ort-cpu", variant="int8")


def test_ort_cuda_silent_fallback_is_an_error(full_export, monkeypatch):
    """ORT falls back to the CPU with only a warning when CUDA cannot start; we raise instead."""
    from vqdiff.export import runtime

    _, ex = full_export
    real = ort.InferenceSession

    class FallbackSession:
        def __init__(self, path, sess_options=None, providers=None):
            assert providers[0][0] == "CUDAExecutionProvider"
            self._s = real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return self._s.get_providers()

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FallbackSession)
    with pytest.raises(BackendUnavailable, match="runs on \\['CPUExecutionProvider'\\]"):
        runtime.load_engine(ex, backend="ort-cuda")


def test_engines_agree_and_batch(full_export, real_groups, normalisation):
    ck, ex = full_export
    x = _x(real_groups[:40], normalisation)
    o = load_engine(ex, backend="ort-cpu", batch_size=16)  # 40 groups in 3 runs
    t = load_engine(ck, backend="torch", batch_size=16)
    lo, io = o.encode_with_indices(x)
    lt, it = t.encode_with_indices(x)
    assert lo.shape == (40, 64, 16, 16) and io.shape == (40, 16, 16) and io.dtype == np.int64
    assert np.abs(lo - lt).max() <= 1e-4 and (io == it).mean() > 0.999
    assert np.array_equal(o.code_indices(x[:5]), io[:5]) and np.allclose(o.encode_groups(x[:5]), lo[:5])
    assert np.abs(o.decode_groups(lt) - t.decode_groups(lt)).max() <= 1e-4


def test_codec_roundtrip_ort_vs_torch(full_export, subject_dir):
    from vqdiff.io import load_bundle

    ck, ex = full_export
    bundle = load_bundle(subject_dir / "ILF_R.trk")
    c_ort = make_codec(ex, backend="ort-cpu")
    c_torch = Codec.from_checkpoint(ck)
    assert c_ort.model_info == c_torch.model_info
    lat_o, lat_t = c_ort.encode(bundle), c_torch.encode(bundle)
    assert np.abs(lat_o.latents - lat_t.latents).max() <= 1e-4
    assert np.array_equal(lat_o.order, lat_t.order)
    # latents made by ONNX Runtime decode with torch (same weights hash) and vice versa
    b_ot, b_oo, b_to = c_torch.decode(lat_o), c_ort.decode(lat_o), c_ort.decode(lat_t)
    tol = 1e-4 * c_ort.normalisation.scale + 1e-4  # 1e-4 in model units, in mm
    for a, b in ((b_ot, b_oo), (b_to, b_oo)):
        assert len(a.streamlines) == len(bundle.streamlines)
        assert max(np.abs(np.asarray(p) - np.asarray(q)).max() for p, q in zip(a.streamlines, b.streamlines,
                                                                               strict=True)) <= tol


def test_ort_path_does_not_import_torch(full_export):
    """Opening an export with ONNX Runtime on the CPU, encoding and decoding never imports torch."""
    _, ex = full_export
    code = ("import sys, numpy as np; from vqdiff.export.runtime import load_engine; "
            f"e = load_engine({str(ex)!r}, backend='ort-cpu'); "
            "lat, idx = e.encode_with_indices(np.zeros((3, 3, 64, 64), np.float32)); "
            "rec = e.decode_groups(lat); "
            "print(lat.shape, idx.shape, rec.shape, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "(3, 64, 16, 16) (3, 16, 16) (3, 3, 64, 64) False"


def _package_imports() -> dict[str, set[str]]:
    """module -> the modules of `vqdiff.export` it imports (any statement, at any depth)."""
    import ast

    pkg = Path(onnx_export.__file__).parent
    names = {p.stem for p in pkg.glob("*.py")}
    graph = {}
    for path in pkg.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                assert node.level or not (mod == "export" or mod.startswith("export.")), \
                    f"{path.name} imports the top-level name {mod!r}: use a relative import"
                if node.level == 1:
                    targets = [mod] if mod else [a.name for a in node.names]
                elif mod.startswith("vqdiff.export."):
                    targets = [mod.split(".")[2]]
                elif mod == "vqdiff.export":
                    targets = [a.name for a in node.names]
                else:
                    targets = []
                deps.update(t.split(".")[0] for t in targets if t.split(".")[0] in names)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    assert not (a.name == "export" or a.name.startswith("export.")), \
                        f"{path.name} imports the top-level name {a.name!r}"
                    if a.name.startswith("vqdiff.export.") and a.name.split(".")[2] in names:
                        deps.add(a.name.split(".")[2])
        graph[path.stem] = deps - {path.stem}
    return graph


def test_export_package_has_no_import_cycles():
    graph = _package_imports()
    assert {"runtime", "ort_backend", "onnx_export", "tensorrt_build"} <= set(graph)
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(m):], m]))
        if m in done:
            return
        stack.append(m)
        for d in sorted(graph[m]):
            visit(d)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    # the ONNX Runtime path reaches neither the export, the torch backend nor parity at module level
    assert not graph["ort_backend"] & {"onnx_export", "graphs", "parity", "torch_backend", "runtime"}


# ----------------------------------------------------------------------------- CPU variants
def test_int8_variant_is_recorded(small_exports, real_groups, tmp_path, caplog):
    ck, _ = small_exports("vq_diff")
    with caplog.at_level(logging.DEBUG):
        ex = onnx_export.export_checkpoint(ck, tmp_path / "int8", parity_groups=real_groups[::4], int8=True,
                                           threads=1)
    # onnxruntime's "consider pre-processing" root warnings do not reach users; the quantiser still ran
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "pre-processing" in r.getMessage()]
    assert any("advice to pre-process" in r.getMessage() for r in caplog.records)
    v = read_manifest(ex)["variants"]["int8"]
    assert set(v["combinations"]) == {"fp32", "int8-encoder", "int8-decoder", "int8-both"}
    for name, c in v["combinations"].items():
        assert 0.0 <= c["buan"] <= 1.0 and c["groups_per_s"] > 0 and c["mean_mdf_mm"] >= 0
        if name != "fp32":
            # the engines' one gate (vqdiff.export.gate: |changes| <= 0.05 mm / 0.002), plus the speed-up
            gate_ok = abs(c["mdf_change_mm"]) <= 0.05 and abs(c["buan_change"]) <= 0.002
            assert c["passed"] == gate_ok and c["acceptable"] == (gate_ok and c["speedup"] >= 1.10)
    files = set(read_manifest(ex)["files"])
    if v["kept"]:
        assert {v["encoder"], v["decoder"]} <= files | {"encoder.onnx", "decoder.onnx"}
        e = load_engine(ex, backend="ort-cpu", variant="int8")
        assert e.variant == "int8"
    else:
        assert not {"encoder.int8.onnx", "decoder.int8.onnx"} & files
        assert not (ex / "encoder.int8.onnx").exists()
        with pytest.raises(BackendUnavailable):
            load_engine(ex, backend="ort-cpu", variant="int8")


def test_fp16_graph_keeps_the_bottleneck_fp32(full_export, real_groups, normalisation, tmp_path):
    """The fp16 ONNX graph used for strongly typed TensorRT (>= 11) builds, checked on ORT CPU."""
    from vqdiff.export.onnx_tools import bottleneck_nodes, make_fp16_onnx

    ck, ex = full_export
    src = onnx.load(str(ex / "encoder.onnx"))
    block = set(bottleneck_nodes(src, "z"))
    assert {"Softmax", "ArgMax", "MatMul"} <= {n.op_type for n in src.graph.node if n.name in block}
    assert not {"Conv"} & {n.op_type for n in src.graph.node if n.name in block}
    enc16 = make_fp16_onnx(ex / "encoder.onnx", tmp_path / "encoder.fp16.onnx", keep_fp32_from="z")
    dec16 = make_fp16_onnx(ex / "decoder.onnx", tmp_path / "decoder.fp16.onnx")
    m16 = onnx.load(str(enc16))
    conv_w = {n.input[1] for n in m16.graph.node if n.op_type == "Conv"}
    dtypes = {t.name: t.data_type for t in m16.graph.initializer}
    assert all(dtypes[w] == onnx.TensorProto.FLOAT16 for w in conv_w if w in dtypes)
    assert m16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O
    x = _x(real_groups[:8], normalisation)
    ref = parity.torch_reference(load_checkpoint(ck).model, x)
    lat = ort_session(enc16).run(["latents"], {"groups": x})[0]
    rec = ort_session(dec16).run(None, {"latents": ref["latents"]})[0]
    assert np.abs(lat - ref["latents"]).max() < 0.1 and np.abs(rec - ref["reconstruction"]).max() < 0.05


# ----------------------------------------------------------------------------- TensorRT
def _needs_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pytest.skip("tensorrt is not installed (NVIDIA wheels; GPU machines only)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU; none is visible")


@pytest.mark.tensorrt
def test_tensorrt_build_and_run(small_exports, real_groups, normalisation, tmp_path):
    _needs_tensorrt()
    from vqdiff.export.tensorrt_runtime import TensorRTEngine

    ck, _ = small_exports("vq_diff")
    ex = onnx_export.export_checkpoint(
        ck, tmp_path / "trt", parity_groups=real_groups[::4], tensorrt=True,
        tensorrt_options={"profile": {"min": 1, "opt": 16, "max": 64}},
    )
    m = read_manifest(ex)
    trt_info = m["tensorrt"]
    assert trt_info["plans"]["fp32"]["kept"] and (ex / "timing.cache").is_file()
    for p, entry in trt_info["plans"].items():
        assert m["files"][entry["encoder"]]["precision"] == p
    engine = load_engine(ex)  # auto: TensorRT first
    assert isinstance(engine, TensorRTEngine) and engine.backend == "tensorrt"
    x = _x(np.resize(real_groups, (70, *real_groups.shape[1:])), normalisation)  # > profile max: chunked
    ref = load_engine(ex, backend="ort-cpu")
    lt, it = engine.encode_with_indices(x)
    lo, io = ref.encode_with_indices(x)
    assert np.abs(lt - lo).max() <= 1e-3 and (it == io).mean() > 0.99
    assert np.abs(engine.decode_groups(lo) - ref.decode_groups(lo)).max() <= 1e-3
    if trt_info["plans"].get("fp16", {}).get("kept"):
        e16 = load_engine(ex, backend="tensorrt", precision="fp16")
        assert np.abs(e16.encode_groups(x[:8]) - lo[:8]).max() <= 5e-2


@pytest.mark.tensorrt
def test_tensorrt_version_policy():
    _needs_tensorrt()
    import tensorrt as trt

    from vqdiff.export.tensorrt_runtime import strongly_typed_only, tensorrt_version

    assert strongly_typed_only(trt) == (tensorrt_version(trt)[0] >= 11 or not hasattr(trt.BuilderFlag, "FP16"))


# ----------------------------------------------------------------------------- BentoML
def test_bentoml_store(full_export, real_groups, normalisation, tmp_path):
    pytest.importorskip("bentoml", reason="bentoml is not installed (pip install 'vqdiff[serve]')")
    _, ex = full_export
    code = f"""
import json, numpy as np
from vqdiff.export.bento_store import register, export_path, load_engine_from_store
from vqdiff.export.runtime import load_engine
tag = register({str(ex)!r})
path = export_path(tag)
import bentoml
info = bentoml.models.get(tag).info
x = np.load({str(tmp_path / 'x.npy')!r})
a = load_engine_from_store(tag, backend="ort-cpu").encode_groups(x)
b = load_engine({str(ex)!r}, backend="ort-cpu").encode_groups(x)
print(json.dumps({{"tag": tag, "path": str(path), "labels": dict(info.labels),
                  "diff": float(np.abs(a - b).max()), "sha": info.metadata["model_sha256"]}}))
"""
    np.save(tmp_path / "x.npy", _x(real_groups[:4], normalisation))
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    m = read_manifest(ex)
    assert res["tag"].startswith("vqdiff:") and res["diff"] == 0.0
    assert res["labels"]["kind"] == "vq_diff" and res["labels"]["model_id"] == m["model"]["id"]
    assert res["sha"] == m["model"]["sha256"]
    assert Path(res["path"]).is_relative_to(tmp_path / "bentoml")
    read_manifest(Path(res["path"]))  # a complete, intact export directory
    read_manifest(ex)  # the plain directory is untouched and still usable


class _FakeTRT:
    """Just enough of the TensorRT 10 / 11 Python API to drive `build_engine` without a GPU: it records
    the calls so that the build sequence (profile, timing cache, flags, fp32 pinning) can be checked."""

    def __init__(self, version: str, network_layers):
        import enum
        import types

        self.__version__ = version
        self.calls = []
        self.DataType = enum.Enum("DataType", "FLOAT HALF INT32 INT64 BOOL INT8")
        flags = "TF32 OBEY_PRECISION_CONSTRAINTS" + (" FP16" if version.startswith("10.") else "")
        self.BuilderFlag = enum.Enum("BuilderFlag", flags)
        self.NetworkDefinitionCreationFlag = enum.IntEnum("NDCF", "STRONGLY_TYPED")
        self.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, *a: None})
        fake, layers = self, network_layers

        class Network:
            num_layers = len(layers)

            def get_layer(self, i):
                return layers[i]

            def get_input(self, i):
                return types.SimpleNamespace(name="groups", shape=(-1, 3, 64, 64))

        class Parser:
            def __init__(self, network, logger):
                self.num_errors = 0

            def parse(self, data):
                fake.calls.append(("parse", len(data)))
                return True

        class Profile:
            def set_shape(self, name, mn, opt, mx):
                fake.calls.append(("set_shape", name, mn, opt, mx))

        class Cache:
            def serialize(self):
                return b"cache"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", size))

            def clear_flag(self, flag):
                fake.calls.append(("clear_flag", flag.name))

            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag.name))

            def add_optimization_profile(self, p):
                fake.calls.append(("add_profile",))

            def create_timing_cache(self, data):
                fake.calls.append(("create_timing_cache", bytes(data)))
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("set_timing_cache", ignore_mismatch))

            def get_timing_cache(self):
                return Cache()

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build",))
                return b"plan"

        self.Builder, self.OnnxParser = Builder, Parser


def _fake_layers(trt_types):
    """conv -> z (encoder); codebook constant -> pow -> (z, pow) distance -> softmax -> argmax (int)."""
    import types

    F, INT = trt_types.FLOAT, trt_types.INT64

    def t(name, dtype=F):
        return types.SimpleNamespace(name=name, dtype=dtype)

    def layer(name, ins, outs):
        lay = types.SimpleNamespace(name=name, num_inputs=len(ins), num_outputs=len(outs), precision=None, set=[])
        lay.get_input = lambda i: ins[i]
        lay.get_output = lambda i: outs[i]
        lay.set_output_type = lambda i, d: lay.set.append((i, d))
        return lay

    return [layer("conv", [t("groups")], [t("z")]), layer("codebook", [], [t("E")]),
            layer("pow", [t("E")], [t("E2")]), layer("dist", [t("z"), t("E2")], [t("d")]),
            layer("softmax", [t("d")], [t("w")]), layer("argmax", [t("w")], [t("indices", INT)])]


@pytest.mark.parametrize("version", ["10.8.0", "11.1.0"])
def test_tensorrt_build_sequence_with_a_fake(monkeypatch, tmp_path, version):
    """Drives build_engine through a recording fake of the TensorRT API (the real one needs a GPU)."""
    from vqdiff.export import tensorrt_build as trt_mod

    probe = _FakeTRT(version, [])
    layers = _fake_layers(probe.DataType)
    fake = _FakeTRT(version, layers)
    fake.DataType = probe.DataType
    monkeypatch.setattr(trt_mod, "import_tensorrt", lambda: fake)
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    (tmp_path / "timing.cache").write_bytes(b"old")
    info = trt_mod.build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", input_name="groups", precision="fp16",
                                timing_cache=tmp_path / "timing.cache", keep_fp32_from="z")
    calls = fake.calls
    assert ("set_shape", "groups", (1, 3, 64, 64), (64, 3, 64, 64), (512, 3, 64, 64)) in calls
    assert ("create_timing_cache", b"old") in calls and ("set_timing_cache", False) in calls
    assert ("clear_flag", "TF32") in calls
    assert (tmp_path / "m.plan").read_bytes() == b"plan" and (tmp_path / "timing.cache").read_bytes() == b"cache"
    if version.startswith("10."):  # weakly typed: FP16 flag, bottleneck + codebook pinned to fp32
        assert not info["strongly_typed"] and ("create_network", 0) in calls
        assert ("set_flag", "FP16") in calls and ("set_flag", "OBEY_PRECISION_CONSTRAINTS") in calls
        assert info["fp32_pinned_layers"] == 4  # codebook, pow, dist, softmax; not conv (computes z), not argmax (int)
        pinned = {lay.name for lay in layers if lay.precision == fake.DataType.FLOAT}
        assert pinned == {"codebook", "pow", "dist", "softmax"}
        assert all(lay.set == [(0, fake.DataType.FLOAT)] for lay in layers if lay.name in pinned)
    else:  # strongly typed: no precision flags at all; the fp16 graph carries the precision
        assert info["strongly_typed"] and ("create_network", 1 << int(fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) in calls
        assert not [c for c in calls if c[0] == "set_flag"]
        assert info["fp32_pinned_layers"] == 0


def test_templates_travel_with_the_export(small_exports, real_groups, subject_dir, tmp_path):
    """A checkpoint's registration templates are copied into its export (checksummed in the manifest)
    and the export's codec registers with them, on the torch-free ORT path too."""
    import shutil

    from vqdiff.codec import TEMPLATES_FILE
    from vqdiff.export.manifest import read_manifest
    from vqdiff.export.onnx_export import export_checkpoint
    from vqdiff.export.runtime import make_codec
    from vqdiff.io import load_bundle
    from vqdiff.templates import Templates

    ck, _ = small_exports("vq_diff")
    ck2 = tmp_path / "ck"
    shutil.copytree(ck, ck2)
    Templates.from_bundles({n: load_bundle(subject_dir / f"{n}.trk").streamlines for n in ("PYT_L", "PYT_R")}).save(
        ck2 / TEMPLATES_FILE)
    ex = export_checkpoint(ck2, tmp_path / "ex", parity_groups=real_groups[:4])
    manifest = read_manifest(ex)
    assert manifest["files"][TEMPLATES_FILE]["role"] == "templates"
    codec = make_codec(ex, backend="ort-cpu")
    assert codec.pipeline.templates.names == ["PYT_L", "PYT_R"]
    lat = codec.encode(load_bundle(subject_dir / "PYT_R.trk"))
    assert lat.registration["template"] == "PYT_R" and lat.registration["method"] == "identity"


# ----------------------------------------------------------------------------- batch buckets (CUDA graphs)
def test_bucket_chunks_pad_only_the_last_chunk_to_the_next_bucket():
    from vqdiff.export.engine_base import DEFAULT_BUCKETS, bucket_chunks, bucket_for, check_buckets

    b = (1, 8, 64, 512)
    assert bucket_chunks(1, b) == [(0, 1, 1)] and bucket_chunks(8, b) == [(0, 8, 8)]
    assert bucket_chunks(9, b) == [(0, 9, 64)] and bucket_chunks(512, b) == [(0, 512, 512)]
    assert bucket_chunks(1100, b) == [(0, 512, 512), (512, 1024, 512), (1024, 1100, 512)]
    assert bucket_chunks(0, b) == [] and bucket_for(65, (64, 8, 512, 1)) == 512
    assert check_buckets([64, 1, 64, 8]) == (1, 8, 64) and DEFAULT_BUCKETS == check_buckets(DEFAULT_BUCKETS)
    for n in range(1, 1600, 7):
        chunks = bucket_chunks(n, DEFAULT_BUCKETS)
        assert chunks[0][0] == 0 and chunks[-1][1] == n
        assert all(a[1] == c[0] for a, c in zip(chunks, chunks[1:], strict=False))  # contiguous, in order
        assert all(e - s == top for s, e, top in chunks[:-1])  # full chunks of the largest bucket first
        s, e, bucket = chunks[-1]
        assert bucket == min(x for x in DEFAULT_BUCKETS if x >= e - s)  # the rest: the next bucket up
    for bad in ([], [0, 8], [-1]):
        with pytest.raises(ValueError):
            check_buckets(bad)
    with pytest.raises(ValueError, match="do not fit"):
        bucket_for(513, b)


def test_torch_engine_precisions(full_export, real_groups, normalisation):
    from vqdiff.torch_engine import TorchEngine

    ck, _ = full_export
    x = _x(real_groups[:6], normalisation)
    model = load_checkpoint(ck).model
    with torch.no_grad():
        ref = model.encode(torch.from_numpy(x))
        ref_rec = model.decode(torch.from_numpy(ref.latents.numpy().copy())).numpy()  # as the engine's input is laid out
    plain = TorchEngine(load_checkpoint(ck).model)
    lat, idx = plain.encode_with_indices(x)
    assert np.array_equal(lat, ref.latents.numpy()) and np.array_equal(idx, ref.indices.numpy())  # bit for bit
    assert np.array_equal(plain.decode_groups(lat), ref_rec)
    nhwc = TorchEngine(load_checkpoint(ck).model, channels_last=True)
    assert np.abs(nhwc.encode_groups(x) - lat).max() <= 1e-4 and np.abs(nhwc.decode_groups(lat) - ref_rec).max() <= 1e-4
    bf16 = TorchEngine(load_checkpoint(ck).model, precision="bf16", channels_last=True)
    lb, ib = bf16.encode_with_indices(x)
    assert lb.dtype == np.float32 and np.abs(lb - lat).max() < 0.1 and (ib == idx).mean() > 0.8
    assert np.abs(bf16.decode_groups(lat) - ref_rec).max() < 0.05
    with pytest.raises(ValueError, match="precision"):
        TorchEngine(model, precision="int4")
    tb = load_engine(ck, backend="torch", precision="bf16", warmup=False)
    assert tb.precision == "bf16" and tb.channels_last and tb.inner.precision == "bf16"


# ----------------------------------------------------------------------------- engine selection
@pytest.fixture(scope="module")
def selected(small_exports, subject_dir, tmp_path_factory):
    from vqdiff.export.select import select_engine

    ck, _ = small_exports("vq_diff")
    cache = tmp_path_factory.mktemp("engines")
    return ck, cache, select_engine(ck, engine="auto", cache_dir=cache, gate_data=subject_dir, threads=1)


def test_selection_measures_gates_chooses_and_caches(selected, subject_dir):
    from vqdiff.engine import engine_info
    from vqdiff.export.select import select_engine
    from vqdiff.export.variants import CANDIDATES, MAX_BUAN_CHANGE, MAX_MDF_CHANGE_MM

    ck, cache, eng = selected
    sel = eng.selection
    assert sel["mode"] == "auto" and sel["cache"] == "miss" and sel["variant"] == eng.variant_name
    assert set(sel["candidates"]) == set(CANDIDATES["cpu"])
    avail = {n: c for n, c in sel["candidates"].items() if c["available"]}
    assert {"torch-fp32", "ort-fp32", "ort-int8", "ort-int8-safe"} <= set(avail)
    from vqdiff.export.select import emulated

    for name in ("torch-bf16", "torch-bf16-trunk"):  # measured where the CPU has bf16, else skipped with why
        assert (name in avail) == (emulated(name) is None)
        if name not in avail:
            assert "no native bf16" in sel["candidates"][name]["reason"]
    for c in avail.values():
        g = c["gate"]
        assert c["groups_per_s"] > 0 and 0 <= g["buan"] <= 1 and g["mean_mdf_mm"] >= 0
        assert g["passed"] == (abs(g["mdf_change_mm"]) <= MAX_MDF_CHANGE_MM and abs(g["buan_change"]) <= MAX_BUAN_CHANGE)
    assert avail["torch-fp32"]["gate"]["mdf_change_mm"] == 0.0  # the reference
    assert abs(avail["ort-fp32"]["gate"]["mdf_change_mm"]) < 1e-3  # parity-checked fp32 graphs
    passing = [n for n, c in avail.items() if c["gate"]["passed"]]
    assert sel["variant"] == max(passing, key=lambda n: avail[n]["groups_per_s"])  # the fastest that passed
    assert sel["gate"]["groups"] > 0 and sel["gate"]["reference"] == "torch-fp32"
    t = sel["timing"]
    assert isinstance(t["contended"], bool) and t["load_avg_before"] >= 0 and t["cores"] == os.cpu_count()
    entry = Path(sel["cache_dir"])
    assert entry.parent == cache and (entry / "decision.json").is_file() and (entry / "check.npz").is_file()
    decision = json.loads((entry / "decision.json").read_text())
    assert decision["variant"] == sel["variant"] and decision["key_fields"]["model_sha256"] == eng.model_info["sha256"]
    assert decision["key_fields"]["cpu"]["cores"] == os.cpu_count() and "torch" in decision["key_fields"]["versions"]
    info = engine_info(eng)  # what latents record: backend, variant (precision) and why
    assert info["backend"] == eng.backend and info["selection"]["variant"] == sel["variant"]
    assert set(info["selection"]["candidates"]) == set(avail)
    again = select_engine(ck, engine="auto", cache_dir=cache, gate_data=subject_dir, threads=1)
    assert again.selection["cache"] == "hit" and again.variant_name == eng.variant_name
    assert again.selection["start_s"] < sel["start_s"]
    x = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(again.encode_groups(x), eng.encode_groups(x), atol=1e-5)


def test_a_stale_cached_choice_is_selected_again(selected, subject_dir, caplog):
    from vqdiff.export.select import select_engine

    ck, cache, eng = selected
    check = Path(eng.selection["cache_dir"]) / "check.npz"
    with np.load(check) as c:
        data = dict(c)
    np.savez(check, **{**data, "latents": data["latents"] + 1.0})  # the engine no longer reproduces it
    with caplog.at_level("WARNING", logger="vqdiff.export.select"):
        e = select_engine(ck, engine="auto", cache_dir=cache, gate_data=subject_dir, threads=1)
    assert e.selection["cache"] == "miss" and "no longer reproduces" in caplog.text


def test_forced_engines_and_fallbacks(selected, subject_dir, monkeypatch, caplog):
    from vqdiff.engine import engine_info
    from vqdiff.export import data as export_data
    from vqdiff.export.select import select_engine

    ck, cache, _ = selected
    monkeypatch.setenv("VQDIFF_ENGINE", "ort-fp32")
    e = select_engine(ck, cache_dir=cache, gate_data=subject_dir, threads=1)  # the selection's key: same threads
    assert (e.variant_name, e.backend, e.selection["mode"]) == ("ort-fp32", "onnxruntime", "forced")
    assert "VQDIFF_ENGINE=ort-fp32" in e.selection["reason"] and e.selection["candidates"]  # the measured numbers
    assert engine_info(e) == {"backend": "onnxruntime", "variant": "fp32", "engine": "ort-fp32"}  # asked for by name: no selection
    monkeypatch.setenv("VQDIFF_ENGINE", "torch-bf16")
    e = select_engine(ck, cache_dir=cache)
    assert (e.backend, e.precision, engine_info(e)) == ("torch", "bf16", {"backend": "torch", "variant": "bf16", "engine": "torch-bf16"})
    monkeypatch.setenv("VQDIFF_ENGINE", "onnx")
    with pytest.raises(ValueError, match="accepted: auto, torch-fp32"):
        select_engine(ck, cache_dir=cache)
    if not torch.cuda.is_available():
        monkeypatch.setenv("VQDIFF_ENGINE", "cuda-bf16")
        with caplog.at_level("WARNING", logger="vqdiff.export.select"):
            e = select_engine(ck, cache_dir=cache)
        assert e.variant_name == "torch-fp32" and e.selection["mode"] == "fallback"
        assert "cuda-bf16 failed" in e.selection["reason"] and "falling back" in caplog.text
        assert engine_info(e)["selection"]["mode"] == "fallback"
    # no real groups to gate on: the fp32 reference, with the reason
    monkeypatch.setenv("VQDIFF_ENGINE", "auto")
    monkeypatch.delenv("VQDIFF_GATE_DATA", raising=False)
    monkeypatch.setattr(export_data, "default_data_dir", lambda: Path("/nonexistent/subject01"))
    with caplog.at_level("WARNING", logger="vqdiff.export.select"):
        e = select_engine(ck, cache_dir=cache.parent / "empty-cache")
    assert e.variant_name == "torch-fp32" and e.selection["mode"] == "fallback"
    assert "no real groups" in e.selection["reason"]


def test_forced_int8_on_an_export_builds_it_in_the_cache(small_exports, subject_dir, tmp_path):
    from vqdiff.export.select import select_engine

    _, ex = small_exports("vq_diff")
    before = sorted(p.name for p in ex.iterdir())
    e = select_engine(ex, engine="ort-int8", cache_dir=tmp_path, gate_data=subject_dir, threads=1)
    assert e.variant_name == "ort-int8" and e.variant == "int8" and e.backend == "onnxruntime"
    assert sorted(p.name for p in ex.iterdir()) == before  # the model's own export is left alone
    cached = Path(e.selection["cache_dir"]) / "export"
    v = read_manifest(cached)["variants"]
    assert v["int8"]["kept"] and (cached / "encoder.int8.onnx").is_file()


def test_make_codec_and_the_service_use_the_selection(selected, monkeypatch):
    from vqdiff.export.runtime import make_codec, open_engine
    from vqdiff.export.served import model_card, open_codec

    ck, cache, eng = selected
    monkeypatch.setenv("VQDIFF_ENGINE_CACHE", str(cache))
    monkeypatch.setenv("VQDIFF_ENGINE", "auto")
    codec = make_codec(ck, threads=1)
    decided = json.loads((Path(eng.selection["cache_dir"]) / "decision.json").read_text())["variant"]
    assert codec.engine.variant_name == decided and codec.engine.selection["mode"] == "auto"
    assert codec.engine.selection["cache"] == "hit"
    _, codec = open_codec(str(ck), threads=1)
    served = codec.engine
    card = model_card(ck, codec)
    assert card["engine_variant"] == served.variant_name and card["selection"]["variant"] == served.variant_name
    assert card["selection"]["candidates"] and card["precision"] in ("fp32", "bf16", "int8")
    assert open_engine(ck, backend="torch").backend == "torch"  # a named backend: no selection


def test_gpu_variants_say_why_they_cannot_run_here(small_exports):
    from vqdiff.export.variants import CANDIDATES, VARIANTS, model_source, open_variant

    assert set(CANDIDATES["cpu"]) | set(CANDIDATES["cuda"]) <= set(VARIANTS)
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    ck, ex = small_exports("vq_diff")
    for name in ("cuda-bf16", "cuda-fp32"):
        with pytest.raises(BackendUnavailable, match="CUDA"):
            open_variant(name, model_source(ck), ex)
    with pytest.raises(ValueError, match="unknown engine variant"):
        open_variant("cuda-int2", model_source(ck), ex)


def test_gate_falls_back_to_groups_from_the_models_templates(tmp_path, monkeypatch):
    """A user's machine has no ../shared: the gate draws bundle-like groups from the model's own
    registration templates (deterministic, finite, in the model's space), not nothing."""
    from vqdiff.export import data as export_data
    from vqdiff.export.variants import CALIB_GROUPS, GATE_GROUPS, gate_groups, model_source, template_groups

    model = Path(__file__).resolve().parents[1] / "models" / "default"
    if not (model / "templates.safetensors").is_file():
        pytest.skip("the bundled model has no templates")
    monkeypatch.delenv("VQDIFF_GATE_DATA", raising=False)
    monkeypatch.setattr(export_data, "default_data_dir", lambda: tmp_path / "no-data")
    calib, held, where, synthetic = gate_groups(model_source(model))
    assert synthetic and where.startswith("synthetic") and calib.shape == (CALIB_GROUPS, 64, 64, 3)
    assert held.shape == (GATE_GROUPS, 64, 64, 3) and np.isfinite(held).all()
    np.testing.assert_array_equal(template_groups(model, 4), template_groups(model, 4))
    from vqdiff.checkpoint import load_checkpoint

    norm = load_checkpoint(model).normalisation  # inside the model's training range (its own space)
    assert norm.out_of_range(held) is None
    empty = tmp_path / "bare"
    empty.mkdir()
    assert template_groups(empty, 4) is None
    from vqdiff.export.variants import MAX_BUAN_CHANGE, MAX_MDF_CHANGE_MM, gate_limits

    assert gate_limits(synthetic) == (MAX_MDF_CHANGE_MM / 2, MAX_BUAN_CHANGE / 2)  # a stand-in judges stricter
    assert gate_limits(False) == (MAX_MDF_CHANGE_MM, MAX_BUAN_CHANGE)


def test_cuda_device_names_are_normalised_in_one_place():
    from vqdiff.export.engine_base import cuda_device
    from vqdiff.export.runtime import _cuda_device
    from vqdiff.export.select import _device

    assert [cuda_device(d) for d in (None, "cuda", "cuda:1", "cpu")] == ["cuda:0", "cuda:0", "cuda:1", "cuda:0"]
    assert [_cuda_device(d) for d in (None, "cuda", "cuda:2", "cpu")] == ["cuda:0", "cuda:0", "cuda:2", None]
    with pytest.raises(ValueError, match="accepted"):
        _cuda_device("gpu")
    assert _device("cuda", "cuda-bf16") == "cuda:0" and _device("cuda:3", "ort-cuda") == "cuda:3"
    assert _device(None, "ort-fp32") == "cpu" and _device("cuda", "auto") == "cuda:0"
