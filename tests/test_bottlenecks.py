"""Codebook bottlenecks: VQ-EMA keeps its codes alive (bias-corrected EMA, Laplace smoothing, dead-code
restarts), the codebook kinds compute in float32 under autocast, and old vq_ema checkpoints still load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vqdiff.bottlenecks import (
    VQDiffBottleneck,
    VQDiffConfig,
    VQEMABottleneck,
    VQEMAConfig,
    bottleneck_config,
    build_bottleneck,
)
from vqdiff.models import ModelConfig, StreamlineAutoencoder

DIM, CODES = 64, 512  # the paper's embedding dim and codebook size


# ----------------------------------------------------------------------------- code usage
class _OldEMA(VQEMABottleneck):
    """Control: the EMA rule this module had before (statistics from zero without bias correction,
    ``ema_weight`` from the initial codebook, no restarts). It collapses at its first step."""

    def __init__(self, dim, config):
        super().__init__(dim, config)
        self.ema_weight.copy_(self.codebook)

    @torch.no_grad()
    def _ema_update(self, flat, one_hot):
        cfg = self.config
        one_hot = one_hot.to(flat.dtype)
        self.ema_cluster_size.mul_(cfg.decay).add_(one_hot.sum(0), alpha=1 - cfg.decay)
        self.ema_weight.mul_(cfg.decay).add_(one_hot.t() @ flat, alpha=1 - cfg.decay)
        n = self.ema_cluster_size.sum()
        size = (self.ema_cluster_size + cfg.epsilon) / (n + cfg.num_codes * cfg.epsilon) * n
        self.codebook.copy_(self.ema_weight / size.unsqueeze(1))


def _encoder_like_batches(steps: int, n: int = 2048, clusters: int = 1024, seed: int = 0):
    """Batches (1, DIM, n, 1) of encodings like an encoder's: ~1024 clusters on a low-dimensional
    manifold, norm ~1 at first (far smaller than the N(0, 1) codebook's ~8) and growing 3x as
    training goes on, plus the held-out batch the usage is counted on."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, DIM, generator=g) / 8**0.5
    centres = torch.randn(clusters, 8, generator=g) @ basis * 0.4

    def batch(scale):
        pick = torch.randint(clusters, (n,), generator=g)
        x = (centres[pick] + 0.03 * torch.randn(n, DIM, generator=g)) * scale
        return x.t().reshape(1, DIM, n, 1)

    return [batch(1 + 2 * s / max(1, steps - 1)) for s in range(steps)], batch(3.0)


def _train_codes(bottleneck, steps: int = 150) -> tuple[int, float, float]:
    """Codes in use on held-out encodings after ``steps`` EMA steps, the largest code norm and the
    largest encoding norm."""
    batches, held_out = _encoder_like_batches(steps)
    bottleneck.train()
    for z in batches:
        bottleneck(z)
    bottleneck.eval()
    with torch.no_grad():
        used = bottleneck(held_out).indices.unique().numel()
    return used, bottleneck.codebook.norm(dim=1).max().item(), held_out.norm(dim=1).max().item()


def _healthy(used: int, code_norm: float, data_norm: float) -> bool:
    return used > 100 and code_norm < 3 * data_norm


def test_vq_ema_keeps_codes_in_use_and_bounded():
    torch.manual_seed(0)
    used, code_norm, data_norm = _train_codes(VQEMABottleneck(DIM, VQEMAConfig()))
    assert used > 100, f"only {used} of {CODES} codes in use"
    assert code_norm < 3 * data_norm, (code_norm, data_norm)


def test_old_ema_rule_fails_the_same_check():
    """The check above is meaningful: the previous rule collapses (a few codes, norms ~1e5)."""
    torch.manual_seed(0)
    used, code_norm, data_norm = _train_codes(_OldEMA(DIM, VQEMAConfig()))
    assert not _healthy(used, code_norm, data_norm)
    assert used < 20 and code_norm > 1e3, (used, code_norm)


def test_vq_ema_without_restarts_still_bias_corrected():
    """With restarts off, no code explodes and the codes assigned at the first step hold the batch means."""
    torch.manual_seed(0)
    b = VQEMABottleneck(DIM, VQEMAConfig(dead_code_threshold=0.0)).train()
    init = b.codebook.clone()
    (z,), _ = _encoder_like_batches(1)
    out = b(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, DIM)
    idx = out.indices.reshape(-1)
    for k in idx.unique()[:5]:
        torch.testing.assert_close(b.codebook[k], flat[idx == k].mean(0), rtol=1e-4, atol=1e-5)
    unused = torch.ones(CODES, dtype=torch.bool)
    unused[idx.unique()] = False
    assert torch.equal(b.codebook[unused], init[unused])  # never assigned: left where they were
    assert int(b.ema_steps) == 1


def test_dead_codes_restart_at_batch_encodings_deterministically():
    def run():
        torch.manual_seed(3)
        b = VQEMABottleneck(DIM, VQEMAConfig()).train()
        batches, _ = _encoder_like_batches(3)
        for z in batches:
            out = b(z)
        return b, z, out

    b, z, out = run()
    flat = z.permute(0, 2, 3, 1).reshape(-1, DIM)
    size = b.ema_cluster_size / (1 - 0.99 ** int(b.ema_steps))
    assert (size >= 1.0 - 1e-4).all(), "every code is alive or was just restarted"
    # restarted at the last step: unused by it, left with exactly the threshold's pseudo-usage
    restarted = ~torch.isin(torch.arange(CODES), out.indices.unique()) & ((size - 1.0).abs() < 1e-5)
    assert restarted.sum() > 10
    on_batch = [(flat == code).all(dim=1).any().item() for code in b.codebook[restarted]]
    assert all(on_batch), "restarted codes sit on encodings of the batch"
    assert len(torch.unique(b.codebook[restarted], dim=0)) == restarted.sum(), "at distinct encodings"
    b2, _, _ = run()
    for name, buf in b.named_buffers():
        assert torch.equal(buf, dict(b2.named_buffers())[name]), f"{name} is not deterministic"


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial codebook on every rank ...
    b = VQEMABottleneck(16, VQEMAConfig(num_codes=64)).train()
    torch.manual_seed(100 + rank)  # ... and on purpose different RNG streams and data
    for _ in range(4):
        b(torch.randn(2, 16, 4, 4) * 0.3 + rank)
    torch.save({k: v.clone() for k, v in b.state_dict().items()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_vq_ema_ddp_ranks_restart_the_same_codes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between ranks"
    assert int(a["ema_steps"]) == 4


# ----------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_vq_ema_model_on_real_groups_keeps_codes(tmp_path, subject_dir):
    """The paper's vq_ema model trained (bf16 autocast, as the trainer does) on subject01 groups."""
    from vqdiff.geometry import groups_to_model
    from vqdiff.normalise import Normalisation
    from vqdiff.training.data import GroupSampler, load_dataset, prepare_dataset

    prepare_dataset(subject_dir, tmp_path / "data", val_fraction=0.1, seed=0)
    _, bundles = load_dataset(tmp_path / "data")
    norm = Normalisation.fit(np.concatenate([b.train for b in bundles if len(b.train)]))
    sampler = GroupSampler(bundles, seed=1)
    model = StreamlineAutoencoder.from_config(ModelConfig.for_kind("vq_ema"))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(150):
        x = torch.from_numpy(groups_to_model(norm.apply(sampler.sample(16))))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = F.mse_loss(out.reconstruction.float(), x) + out.bottleneck.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    val = torch.from_numpy(groups_to_model(norm.apply(np.concatenate([b.val_groups for b in bundles]))))
    model.eval()
    with torch.no_grad():
        z = model.encoder(val)
        used = model.bottleneck(z).indices.unique().numel()
    assert used > 100, f"only {used} of {CODES} codes in use on the held-out groups"
    assert model.bottleneck.codebook.norm(dim=1).max() < 3 * z.norm(dim=1).max()


# ----------------------------------------------------------------------------- fp32 under autocast
def test_vq_diff_weights_under_bf16_autocast_equal_fp32():
    torch.manual_seed(0)
    b = VQDiffBottleneck(DIM, VQDiffConfig()).eval()
    z = torch.randn(4, DIM, 16, 16)
    with torch.no_grad():
        ref_w, ref = b.code_weights(z), b(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w, out = b.code_weights(z), b(z)
            zb = z.to(torch.bfloat16)  # what the encoder hands over under autocast
            wb = b.code_weights(zb)
    assert w.dtype == torch.float32 and out.latents.dtype == torch.float32
    assert (w - ref_w).abs().max() <= 1e-6
    assert (out.latents - ref.latents).abs().max() <= 1e-5
    assert torch.equal(out.indices, ref.indices)
    assert (wb - b.code_weights(zb.float())).abs().max() <= 1e-6


@pytest.mark.parametrize("kind", ["vq", "vq_ema"])
def test_vq_indices_and_ema_statistics_under_bf16_autocast_equal_fp32(kind):
    torch.manual_seed(0)
    cfg = bottleneck_config(kind)
    a = build_bottleneck(DIM, cfg).train()
    b = build_bottleneck(DIM, cfg).train()
    b.load_state_dict(a.state_dict())
    (z,), _ = _encoder_like_batches(1)
    torch.manual_seed(1)
    ref = a(z)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = b(z)
    assert out.latents.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert torch.equal(out.indices, ref.indices)
    sa, sb = a.state_dict(), b.state_dict()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.allclose(sa[name], sb[name], rtol=0, atol=1e-6), name


@pytest.mark.parametrize("kind", ["vq", "vq_ema", "vq_diff"])
def test_model_trains_under_bf16_autocast(kind):
    model = StreamlineAutoencoder.from_config(
        ModelConfig.for_kind(kind, bottleneck={"num_codes": 16}, hidden=16, residual_hidden=8, embedding_dim=8))
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = F.mse_loss(out.reconstruction.float(), x) + out.bottleneck.loss
    loss.backward()
    assert out.reconstruction.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.encoder.parameters())


# ----------------------------------------------------------------------------- old checkpoints
def _trained_vq_ema():
    model = StreamlineAutoencoder.from_config(
        ModelConfig.for_kind("vq_ema", bottleneck={"num_codes": 16}, hidden=16, residual_hidden=8, embedding_dim=8))
    model.train()(torch.randn(2, 3, 64, 64))
    return model.eval()


def test_old_vq_ema_state_dict_without_step_counter_loads():
    old = _trained_vq_ema()
    state = {k: v for k, v in old.state_dict().items() if k != "bottleneck.ema_steps"}
    new = StreamlineAutoencoder.from_config(old.config)
    new.load_state_dict(state, strict=True)
    new.eval()
    for k, v in state.items():
        assert torch.equal(new.state_dict()[k], v), k
    warm = int(new.bottleneck.ema_steps)
    assert 1 - 0.99**warm == pytest.approx(1.0, abs=1e-7)  # trained statistics count as warmed up
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(new(x).reconstruction, old(x).reconstruction)
    new.train()(x)  # and training goes on from them without exploding
    assert int(new.bottleneck.ema_steps) == warm + 1
    assert new.bottleneck.codebook.norm(dim=1).max() < 100

    untrained = StreamlineAutoencoder.from_config(old.config).state_dict()
    del untrained["bottleneck.ema_steps"]
    fresh = StreamlineAutoencoder.from_config(old.config)
    fresh.load_state_dict(untrained, strict=True)
    assert int(fresh.bottleneck.ema_steps) == 0


def test_old_vq_ema_checkpoint_on_disk_loads(tmp_path):
    """A checkpoint written before: no ``ema_steps`` tensor, no ``dead_code_threshold`` in its config."""
    from safetensors.torch import load_file, save_file

    from vqdiff.checkpoint import load_checkpoint, save_checkpoint
    from vqdiff.normalise import Normalisation

    model = _trained_vq_ema()
    save_checkpoint(tmp_path / "ck", model, Normalisation((0.0, 0.0, 0.0), 100.0, (-1.0,) * 3, (1.0,) * 3))
    weights = tmp_path / "ck" / "model.safetensors"
    state = load_file(weights)
    del state["bottleneck.ema_steps"]
    save_file(state, weights)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    del config["model"]["bottleneck"]["dead_code_threshold"]
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.model.config.bottleneck == VQEMAConfig(num_codes=16)
    assert torch.equal(ck.model.bottleneck.codebook, model.bottleneck.codebook)
