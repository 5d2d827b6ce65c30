"""The five bottlenecks compared in the paper, and the registry that maps a model kind to one.

Every bottleneck maps pre-bottleneck latents ``z`` of shape (B, D, H, W) to latents of the same
shape and returns a `BottleneckOutput`. Train/eval behaviour is switched by ``module.train()`` /
``module.eval()`` only; nothing else.

Kinds
-----
``ae``       identity.
``vae``      Gaussian posterior; reparameterised sample in training, the mean at inference.
``vq``       VQ-VAE (van den Oord et al. 2017): nearest code, straight-through gradient,
             codebook + commitment loss.
``vq_ema``   VQ-VAE whose codebook follows exponential moving averages of the assigned
             encodings (van den Oord et al. 2017, appendix; Razavi et al. 2019): bias-corrected
             EMA statistics, Laplace smoothing, and restart of dead codes to encoder outputs of
             the current batch (Dhariwal et al. 2020, Jukebox). Buffers are updated in place,
             never re-created.
``vq_diff``  VQ-Diff (this paper): codebook initialised N(0, sigma^2); weights
             w = gumbel_softmax(-||z - e||^2, tau) during training (gradients reach the codebook),
             w = softmax(-||z - e||^2 / tau) at inference (deterministic, no noise); s = w @ E.

The codebook kinds (vq, vq_ema, vq_diff) compute in float32 even under autocast (distances,
argmin, soft weights, the codebook product, EMA statistics): ``z`` is cast to float32 and their
latents are float32 under autocast (the decoder's first conv casts them back), ``z``'s dtype otherwise.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class BottleneckOutput(NamedTuple):
    latents: torch.Tensor  # (B, D, H, W), what the decoder receives
    loss: torch.Tensor  # scalar, the bottleneck's own loss term (0 where it has none)
    indices: torch.Tensor | None  # (B, H, W) int64 argmax code per position, None for ae/vae
    perplexity: torch.Tensor | None  # scalar, exp(entropy of mean code usage), None for ae/vae


# ----------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class AEConfig:
    kind: ClassVar[str] = "ae"


@dataclass(frozen=True)
class VAEConfig:
    kind: ClassVar[str] = "vae"
    kl_weight: float = 1e-3  # weight of the KL term (per latent element) against the MSE


@dataclass(frozen=True)
class VQConfig:
    kind: ClassVar[str] = "vq"
    num_codes: int = 512
    commitment_cost: float = 0.25


@dataclass(frozen=True)
class VQEMAConfig:
    kind: ClassVar[str] = "vq_ema"
    num_codes: int = 512
    commitment_cost: float = 0.25
    decay: float = 0.99
    epsilon: float = 1e-5  # Laplace smoothing of the cluster sizes
    # a code whose bias-corrected EMA usage (encodings assigned per training step, summed over the
    # ranks) falls below this is restarted at an encoder output of the current batch; 0 disables
    dead_code_threshold: float = 1.0


@dataclass(frozen=True)
class VQDiffConfig:
    kind: ClassVar[str] = "vq_diff"
    num_codes: int = 512
    tau: float = 10.0  # Gumbel-softmax temperature (the paper's beta)
    init_std: float = 2.0  # codebook prior N(0, init_std^2) (the paper's sigma)


# ----------------------------------------------------------------------------- helpers
def squared_distances(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """||z - e||^2 for every row of ``flat`` (N, D) and code of ``codebook`` (K, D) -> (N, K)."""
    return (
        flat.pow(2).sum(dim=1, keepdim=True)
        + codebook.pow(2).sum(dim=1).unsqueeze(0)
        - 2.0 * flat @ codebook.t()
    )


def _flatten(z: torch.Tensor) -> torch.Tensor:
    # (B, D, H, W) -> (B*H*W, D)
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _unflatten(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    b, d, h, w = like.shape
    return flat.reshape(b, h, w, d).permute(0, 3, 1, 2)


def _full_precision(z: torch.Tensor):
    """A context in which ops run at their input precision: autocast off where it is on, else nothing
    (so that exported / traced graphs are unchanged)."""
    if torch.is_autocast_enabled(z.device.type):
        return torch.autocast(device_type=z.device.type, enabled=False)
    return contextlib.nullcontext()


def _out_dtype(z: torch.Tensor) -> torch.dtype:
    """float32 under autocast (the decoder's autocast conv accepts it), else the input's own dtype."""
    return torch.float32 if torch.is_autocast_enabled(z.device.type) else z.dtype


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _perplexity(probs: torch.Tensor) -> torch.Tensor:
    avg = probs.float().mean(dim=0)  # (K,)
    return torch.exp(-(avg * torch.log(avg + 1e-10)).sum())


# ----------------------------------------------------------------------------- bottlenecks
class AEBottleneck(nn.Module):
    def __init__(self, dim: int, config: AEConfig):
        super().__init__()
        self.config = config

    def forward(self, z: torch.Tensor) -> BottleneckOutput:
        return BottleneckOutput(z, z.new_zeros(()), None, None)


class VAEBottleneck(nn.Module):
    def __init__(self, dim: int, config: VAEConfig):
        super().__init__()
        self.config = config
        self.to_stats = nn.Conv2d(dim, 2 * dim, kernel_size=1)  # -> mu, logvar

    def forward(self, z: torch.Tensor) -> BottleneckOutput:
        mu, logvar = self.to_stats(z).chunk(2, dim=1)  # (B, D, H, W) each
        logvar = logvar.clamp(-30.0, 20.0)
        if self.training:
            sample = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            sample = mu
        kl = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
        return BottleneckOutput(sample, self.config.kl_weight * kl, None, None)


class VQBottleneck(nn.Module):
    def __init__(self, dim: int, config: VQConfig):
        super().__init__()
        self.config = config
        self.codebook = nn.Parameter(
            torch.empty(config.num_codes, dim).uniform_(-1 / config.num_codes, 1 / config.num_codes)
        )

    def _codebook(self) -> torch.Tensor:
        return self.codebook

    def forward(self, z: torch.Tensor) -> BottleneckOutput:
        out_dtype = _out_dtype(z)
        with _full_precision(z):
            z = z.float()
            flat = _flatten(z)
            codebook = self._codebook().float()
            indices = squared_distances(flat, codebook).argmin(dim=1)  # (N,)
            quantized = _unflatten(codebook[indices], z)
            one_hot = F.one_hot(indices, codebook.shape[0])
            loss = self._loss(z, quantized, flat, one_hot)
            quantized = z + (quantized - z).detach()  # straight-through estimator
            perplexity = _perplexity(one_hot)
        b, _, h, w = z.shape
        return BottleneckOutput(quantized.to(out_dtype), loss, indices.reshape(b, h, w), perplexity)

    def _loss(self, z, quantized, flat, one_hot) -> torch.Tensor:
        codebook_loss = F.mse_loss(quantized, z.detach())
        commitment = F.mse_loss(z, quantized.detach())
        return codebook_loss + self.config.commitment_cost * commitment


class VQEMABottleneck(VQBottleneck):
    """VQ with an EMA codebook: the codebook is a buffer, updated in place under no_grad.

    Per training step t, with n_k encodings assigned to code k and s_k their sum (summed over the
    ranks under torch.distributed), the raw EMAs are ``N_k <- d N_k + (1 - d) n_k`` and
    ``m_k <- d m_k + (1 - d) s_k`` from zero (buffers ``ema_cluster_size``, ``ema_weight``; step
    counter ``ema_steps``). They are bias-corrected, ``N^_k = N_k / (1 - d^t)`` (likewise m^), so the
    first step already holds the batch's own statistics, and ``e_k = m^_k / N~_k`` with the
    Laplace-smoothed size ``N~_k = (N^_k + eps) / (sum N^ + K eps) * sum N^``.
    A code whose usage N^_k falls below ``dead_code_threshold`` is restarted at a random encoder
    output of the current batch (distinct rows, drawn with the torch RNG; under torch.distributed
    rank 0's draw is broadcast, so every rank restarts the same codes at the same vectors), and its
    statistics restart as ``dead_code_threshold`` pseudo-assignments at that vector.
    """

    def __init__(self, dim: int, config: VQEMAConfig):
        nn.Module.__init__(self)
        self.config = config
        self.register_buffer("codebook", torch.randn(config.num_codes, dim))
        self.register_buffer("ema_cluster_size", torch.zeros(config.num_codes))
        self.register_buffer("ema_weight", torch.zeros(config.num_codes, dim))
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))

    def _loss(self, z, quantized, flat, one_hot) -> torch.Tensor:
        if self.training:
            self._ema_update(flat.detach(), one_hot)
        return self.config.commitment_cost * F.mse_loss(z, quantized.detach())

    def _warm_steps(self) -> int:
        """The number of steps after which 1 - decay^t is 1 in float32."""
        d = self.config.decay
        return max(1, math.ceil(math.log(2.0**-24) / math.log(d))) if 0.0 < d < 1.0 else 1

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "ema_steps"
        if key not in state_dict:
            # a checkpoint from before the step counter (its statistics have no bias correction): a
            # trained one counts as warmed up (1 - decay^t = 1), an untrained one as step 0
            sizes = state_dict.get(prefix + "ema_cluster_size")
            trained = sizes is not None and sizes.device.type != "meta" and bool(sizes.sum() > 0)
            state_dict[key] = torch.tensor(self._warm_steps() if trained else 0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, one_hot: torch.Tensor) -> None:
        cfg = self.config
        flat = flat.float()
        one_hot = one_hot.to(flat.dtype)
        counts = one_hot.sum(dim=0)  # (K,)
        sums = one_hot.t() @ flat  # (K, D)
        if _distributed():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        # at step 0 whatever the buffers hold is dropped (the EMAs start from zero)
        keep = cfg.decay * (self.ema_steps > 0).to(flat.dtype)
        self.ema_cluster_size.mul_(keep).add_(counts.to(self.ema_cluster_size.dtype), alpha=1 - cfg.decay)
        self.ema_weight.mul_(keep).add_(sums.to(self.ema_weight.dtype), alpha=1 - cfg.decay)
        self.ema_steps.add_(1)
        correction = 1.0 - cfg.decay ** self.ema_steps.to(flat.dtype)  # 1 - decay^t, a 0-d tensor
        size = self.ema_cluster_size.float() / correction  # (K,) bias-corrected usage
        weight = self.ema_weight.float() / correction  # (K, D)
        n = size.sum()
        smoothed = (size + cfg.epsilon) / (n + cfg.num_codes * cfg.epsilon) * n  # Laplace
        codebook = weight / smoothed.unsqueeze(1)
        codebook = torch.where((size > 0).unsqueeze(1), codebook, self.codebook.float())  # never assigned: kept
        if cfg.dead_code_threshold > 0:
            dead = size < cfg.dead_code_threshold  # (K,)
            candidates = self._restart_candidates(flat)  # (K, D)
            codebook = torch.where(dead.unsqueeze(1), candidates, codebook)
            pseudo = cfg.dead_code_threshold * correction  # raw EMA value whose corrected usage is the threshold
            self.ema_cluster_size.copy_(torch.where(dead, pseudo, self.ema_cluster_size.float()))
            self.ema_weight.copy_(torch.where(dead.unsqueeze(1), candidates * pseudo, self.ema_weight.float()))
        self.codebook.copy_(codebook)

    def _restart_candidates(self, flat: torch.Tensor) -> torch.Tensor:
        """(K, D) encoder outputs of this batch, one per code, distinct rows where the batch has enough;
        the same on every rank (rank 0's). Drawn every step, so the RNG stream does not depend on usage."""
        n, k = flat.shape[0], self.config.num_codes
        if n >= k:
            idx = torch.randperm(n, device=flat.device)[:k]
        else:
            idx = torch.randint(n, (k,), device=flat.device)
        candidates = flat[idx].contiguous()
        if _distributed():
            torch.distributed.broadcast(candidates, src=0)
        return candidates


class VQDiffBottleneck(nn.Module):
    def __init__(self, dim: int, config: VQDiffConfig):
        super().__init__()
        self.config = config
        self.codebook = nn.Parameter(torch.randn(config.num_codes, dim) * config.init_std)

    def code_weights(self, z: torch.Tensor) -> torch.Tensor:
        """Soft assignment weights (B*H*W, K), float32 even under autocast; Gumbel noise in training only."""
        with _full_precision(z):
            logits = -squared_distances(_flatten(z).float(), self.codebook.float())  # (N, K)
            if self.training:
                return F.gumbel_softmax(logits, tau=self.config.tau, hard=False, dim=-1)
            return torch.softmax(logits / self.config.tau, dim=-1)

    def forward(self, z: torch.Tensor) -> BottleneckOutput:
        out_dtype = _out_dtype(z)
        with _full_precision(z):
            weights = self.code_weights(z)  # (N, K)
            s = _unflatten(weights @ self.codebook.float(), z).to(out_dtype)  # (B, D, H, W)
            b, _, h, w = z.shape
            indices = weights.argmax(dim=1).reshape(b, h, w)
            perplexity = _perplexity(weights.detach())
        return BottleneckOutput(s, weights.new_zeros(()), indices, perplexity)


# ----------------------------------------------------------------------------- registry
BOTTLENECKS: dict[str, tuple[type, type[nn.Module]]] = {
    "ae": (AEConfig, AEBottleneck),
    "vae": (VAEConfig, VAEBottleneck),
    "vq": (VQConfig, VQBottleneck),
    "vq_ema": (VQEMAConfig, VQEMABottleneck),
    "vq_diff": (VQDiffConfig, VQDiffBottleneck),
}
KINDS = tuple(BOTTLENECKS)


def _entry(kind: str):
    try:
        return BOTTLENECKS[kind]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}; select one of {list(KINDS)}") from None


def bottleneck_config(kind: str, **overrides: Any):
    """The default config of ``kind`` with ``overrides`` applied (unknown keys are refused)."""
    config_cls, _ = _entry(kind)
    allowed = {f.name for f in fields(config_cls)}
    unknown = set(overrides) - allowed
    if unknown:
        raise ValueError(f"{kind!r} bottleneck has no option(s) {sorted(unknown)}; accepted: {sorted(allowed)}")
    return config_cls(**overrides)


def build_bottleneck(dim: int, config) -> nn.Module:
    _, module_cls = _entry(config.kind)
    return module_cls(dim, config)


def bottleneck_config_to_dict(config) -> dict[str, Any]:
    return {"kind": config.kind, **asdict(config)}


def bottleneck_config_from_dict(d: dict[str, Any]):
    d = dict(d)
    kind = d.pop("kind")
    return bottleneck_config(kind, **d)


def uses_codebook(config) -> bool:
    """True for kinds that report code usage (indices and perplexity)."""
    return hasattr(config, "num_codes")

