"""The CUDA engine (`vqdiff.export.torch_cuda.CudaGraphEngine`) and the selection on a GPU; marker ``gpu``.

Every test skips with "needs a CUDA GPU" where torch sees none; `scripts/gpu-check.sh` runs them on a
lent GPU machine (``pytest -m gpu``). The CPU-testable parts (bucket arithmetic, variant names,
selection) are tested in `test_export.py`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vqdiff.checkpoint import load_checkpoint, save_checkpoint
from vqdiff.models import ModelConfig, StreamlineAutoencoder
from vqdiff.normalise import Normalisation

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL = {"hidden": 32, "residual_hidden": 8}


@pytest.fixture(scope="module")
def groups(subject_dir):
    from vqdiff.export.data import load_groups

    return load_groups(subject_dir, bundles=("POPT_R", "PYT_R", "ILF_R"))


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, groups):
    torch.manual_seed(0)
    norm = Normalisation.fit(groups)
    model = StreamlineAutoencoder.from_config(ModelConfig.for_kind("vq_diff", bottleneck={"num_codes": 64}, **SMALL))
    return save_checkpoint(tmp_path_factory.mktemp("gpu") / "ck", model.eval(), norm, model_id="test-gpu")


def _x(groups, ckpt_dir, n):
    from vqdiff.geometry import groups_to_model

    norm = load_checkpoint(ckpt_dir).normalisation
    return groups_to_model(norm.apply(np.resize(groups, (n, *groups.shape[1:]))))


def _cpu_reference(ckpt_dir, x):
    from vqdiff.torch_engine import TorchEngine

    e = TorchEngine(load_checkpoint(ckpt_dir).model, device="cpu")
    lat, idx = e.encode_with_indices(x)
    return lat, idx, e.decode_groups(lat)


def test_fp32_graphs_match_the_cpu_reference_at_every_bucket_edge(ckpt_dir, groups):
    from vqdiff.export.torch_cuda import CudaGraphEngine

    eng = CudaGraphEngine(ckpt_dir, precision="fp32", buckets=(1, 8, 64))
    for n in (1, 2, 8, 9, 64, 65, 200):  # exact buckets, padded ones, and several chunks of the largest
        x = _x(groups, ckpt_dir, n)
        lat_ref, idx_ref, rec_ref = _cpu_reference(ckpt_dir, x)
        lat, idx = eng.encode_with_indices(x)
        assert lat.shape == lat_ref.shape and lat.dtype == np.float32 and idx.dtype == np.int64
        assert np.abs(lat - lat_ref).max() <= 1e-4
        assert (idx == idx_ref).mean() >= 0.999
        assert np.abs(eng.decode_groups(lat_ref) - rec_ref).max() <= 1e-4


def test_graphs_equal_eager_and_keep_the_order(ckpt_dir, groups):
    """Replayed graphs give the eager pipeline's numbers, group by group, whatever the chunking."""
    from vqdiff.export.torch_cuda import CudaGraphEngine

    x = _x(groups, ckpt_dir, 150)
    x[::7] *= 0.5  # make the groups distinct so that a misplaced chunk would show
    for precision, tol in (("fp32", 1e-4), ("bf16", 3e-2)):
        graphs = CudaGraphEngine(ckpt_dir, precision=precision, buckets=(1, 8, 64))
        eager = CudaGraphEngine(ckpt_dir, precision=precision, buckets=(1, 8, 64), graphs=False)
        lg, ig = graphs.encode_with_indices(x)
        le, ie = eager.encode_with_indices(x)
        assert np.abs(lg - le).max() <= tol and (ig == ie).mean() >= 0.99, precision
        one_by_one = np.concatenate([graphs.encode_with_indices(x[i : i + 1])[0] for i in range(0, 150, 37)])
        assert np.abs(one_by_one - lg[::37]).max() <= tol, precision  # bucket 1 vs chunks of 64: same rows
        assert np.abs(graphs.decode_groups(lg) - eager.decode_groups(lg)).max() <= tol, precision


def test_bf16_and_fp16_stay_close_to_fp32(ckpt_dir, groups):
    from vqdiff.export.torch_cuda import CudaGraphEngine

    x = _x(groups, ckpt_dir, 64)
    lat32, idx32, rec32 = _cpu_reference(ckpt_dir, x)
    for precision in ("bf16", "fp16"):
        eng = CudaGraphEngine(ckpt_dir, precision=precision)
        lat, idx = eng.encode_with_indices(x)
        assert np.abs(lat - lat32).max() < 0.1 and (idx == idx32).mean() > 0.5, precision
        assert np.abs(eng.decode_groups(lat32) - rec32).max() < 0.05, precision
        assert eng.precision == precision and eng.backend == "torch"


def test_load_engine_opens_the_graph_engine_on_cuda(ckpt_dir, groups):
    from vqdiff.export.runtime import load_engine
    from vqdiff.export.torch_cuda import CudaGraphEngine

    eng = load_engine(ckpt_dir, backend="torch", device="cuda", precision="bf16")
    assert isinstance(eng, CudaGraphEngine) and eng.provider.startswith("cuda:0")
    plain = load_engine(ckpt_dir, backend="torch", device="cuda", graphs=False)
    assert not isinstance(plain, CudaGraphEngine)
    x = _x(groups, ckpt_dir, 5)
    assert np.abs(eng.encode_groups(x) - plain.encode_groups(x)).max() < 0.1


def test_selection_on_a_gpu_serves_a_cuda_variant_that_passed(ckpt_dir, subject_dir, tmp_path):
    from vqdiff.engine import engine_info
    from vqdiff.export.select import select_engine

    eng = select_engine(ckpt_dir, cache_dir=tmp_path, gate_data=subject_dir, engine="auto")
    sel = eng.selection
    assert sel["mode"] == "auto" and sel["variant"].startswith(("cuda-", "ort-cuda", "tensorrt"))
    assert sel["candidates"][sel["variant"]]["gate"]["passed"]
    assert sel["candidates"]["cuda-fp32"]["available"]
    assert engine_info(eng)["selection"]["variant"] == sel["variant"]
    again = select_engine(ckpt_dir, engine="auto", cache_dir=tmp_path, gate_data=subject_dir)
    assert again.selection["cache"] == "hit" and again.variant_name == eng.variant_name
