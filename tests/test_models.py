import pytest
import torch

from vqdiff.bottlenecks import KINDS, VQDiffBottleneck, VQDiffConfig, bottleneck_config, squared_distances
from vqdiff.models import ModelConfig, StreamlineAutoencoder

TINY = dict(hidden=16, residual_hidden=8, embedding_dim=8)


def tiny(kind: str, **bottleneck) -> StreamlineAutoencoder:
    if kind != "ae" and kind != "vae":
        bottleneck.setdefault("num_codes", 16)
    return StreamlineAutoencoder.from_config(ModelConfig.for_kind(kind, bottleneck=bottleneck, **TINY))


@pytest.mark.parametrize("kind", KINDS)
def test_forward_backward_shapes(kind):
    model = tiny(kind).train()
    x = torch.randn(3, 3, 64, 64)
    out = model(x)
    assert out.reconstruction.shape == (3, 3, 64, 64)
    assert out.bottleneck.latents.shape == (3, 8, 16, 16)
    loss = torch.nn.functional.mse_loss(out.reconstruction, x) + out.bottleneck.loss
    loss.backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads), "no gradient reached the encoder"


@pytest.mark.parametrize("kind", KINDS)
def test_paper_defaults_shapes(kind):
    model = StreamlineAutoencoder.from_config(ModelConfig.for_kind(kind)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.bottleneck.latents.shape == (1, 64, 16, 16)
    assert out.reconstruction.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("kind", KINDS)
def test_config_round_trip(kind):
    cfg = tiny(kind).config
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.kind == kind


def test_unknown_kind_and_option_name_what_is_accepted():
    with pytest.raises(ValueError, match="select one of"):
        ModelConfig.for_kind("vqgan")
    with pytest.raises(ValueError, match="accepted"):
        bottleneck_config("vq_diff", temperature=3)


def test_vq_diff_defaults_match_paper():
    cfg = VQDiffConfig()
    assert (cfg.num_codes, cfg.tau, cfg.init_std) == (512, 10.0, 2.0)
    torch.manual_seed(1)
    b = VQDiffBottleneck(64, cfg)
    std = b.codebook.detach().std().item()
    assert 1.9 < std < 2.1, std  # N(0, sigma=2) initialisation


def test_squared_distances_is_squared_not_doubled():
    z = torch.tensor([[1.0, 2.0]])
    e = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(squared_distances(z, e), torch.tensor([[5.0, 4.0]]))


def test_vq_diff_train_is_stochastic_eval_is_deterministic_softmax():
    b = VQDiffBottleneck(8, VQDiffConfig(num_codes=16))
    z = torch.randn(2, 8, 4, 4)
    b.train()
    assert not torch.equal(b(z).latents, b(z).latents), "training must sample Gumbel noise"
    b.eval()
    a1, a2 = b(z).latents, b(z).latents
    assert torch.equal(a1, a2)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    w = torch.softmax(-squared_distances(flat, b.codebook) / 10.0, dim=-1)
    expected = (w @ b.codebook).reshape(2, 4, 4, 8).permute(0, 3, 1, 2)
    assert torch.allclose(a1, expected, atol=1e-5)


def test_vq_diff_gradients_reach_codebook():
    b = VQDiffBottleneck(8, VQDiffConfig(num_codes=16)).train()
    b(torch.randn(2, 8, 4, 4)).latents.sum().backward()
    assert b.codebook.grad is not None and b.codebook.grad.abs().sum() > 0


def test_vq_straight_through_and_codebook_loss():
    model = tiny("vq").train()
    out = model(torch.randn(2, 3, 64, 64))
    out.bottleneck.loss.backward()
    assert model.bottleneck.codebook.grad.abs().sum() > 0
    assert out.bottleneck.indices.shape == (2, 16, 16)
    assert 1.0 <= out.bottleneck.perplexity.item() <= 16.0


def test_vq_ema_updates_buffers_in_place():
    model = tiny("vq_ema").train()
    b = model.bottleneck
    assert "codebook" not in dict(b.named_parameters())
    ptrs = {n: buf.data_ptr() for n, buf in b.named_buffers()}
    before = b.codebook.clone()
    model(torch.randn(2, 3, 64, 64))
    assert {n: buf.data_ptr() for n, buf in b.named_buffers()} == ptrs
    assert not torch.equal(before, b.codebook), "EMA step must move the codebook"
    b.eval()
    frozen = b.codebook.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(frozen, b.codebook), "eval must not update the EMA codebook"


def test_vae_samples_in_training_mean_in_eval():
    model = tiny("vae")
    x = torch.randn(1, 3, 64, 64)
    model.train()
    assert not torch.equal(model.encode(x).latents, model.encode(x).latents)
    model.eval()
    assert torch.equal(model.encode(x).latents, model.encode(x).latents)
    assert model.encode(x).loss.item() >= 0
