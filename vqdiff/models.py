"""The paper's ResNet encoder / decoder and the model that joins them through a bottleneck.

Shapes (defaults): groups (B, 3, 64, 64) [xyz, streamline, point] -> encoder -> z (B, 64, 16, 16)
-> bottleneck -> latents (B, 64, 16, 16) -> decoder -> groups (B, 3, 64, 64).
The architecture follows the VQ-VAE of van den Oord et al. as used by the authors
(hidden 128, residual hidden 32, 2 residual layers, embedding dim 64).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .bottlenecks import (
    BottleneckOutput,
    bottleneck_config,
    bottleneck_config_from_dict,
    bottleneck_config_to_dict,
    build_bottleneck,
)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored in every checkpoint's config.json."""

    bottleneck: Any = field(default_factory=lambda: bottleneck_config("vq_diff"))
    in_channels: int = 3
    hidden: int = 128
    residual_hidden: int = 32
    residual_layers: int = 2
    embedding_dim: int = 64
    # "identity": x + block(x) (van den Oord et al.); "relu": relu(x) + block(x), what the authors' code
    # computes (its residual block starts with an in-place ReLU that also rectifies the skip input).
    residual_skip: str = "identity"

    def __post_init__(self) -> None:
        if self.residual_skip not in RESIDUAL_SKIPS:
            raise ValueError(f"residual_skip {self.residual_skip!r}; select one of {list(RESIDUAL_SKIPS)}")

    @property
    def kind(self) -> str:
        return self.bottleneck.kind

    @classmethod
    def for_kind(cls, kind: str, *, bottleneck: dict[str, Any] | None = None, **kwargs: Any) -> ModelConfig:
        return cls(bottleneck=bottleneck_config(kind, **(bottleneck or {})), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "in_channels": self.in_channels,
            "hidden": self.hidden,
            "residual_hidden": self.residual_hidden,
            "residual_layers": self.residual_layers,
            "embedding_dim": self.embedding_dim,
            "residual_skip": self.residual_skip,
            "bottleneck": bottleneck_config_to_dict(self.bottleneck),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d.pop("kind", None)
        bottleneck = bottleneck_config_from_dict(d.pop("bottleneck"))
        return cls(bottleneck=bottleneck, **d)


RESIDUAL_SKIPS = ("identity", "relu")


class Residual(nn.Module):
    def __init__(self, channels: int, hidden: int, skip: str = "identity"):
        super().__init__()
        self.relu_skip = skip == "relu"
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, kernel_size=3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.relu(x) if self.relu_skip else x) + self.block(x)


class ResidualStack(nn.Module):
    def __init__(self, channels: int, hidden: int, layers: int, skip: str = "identity"):
        super().__init__()
        self.layers = nn.Sequential(*[Residual(channels, hidden, skip) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.layers(x))


class Encoder(nn.Module):
    """(B, C, 64, 64) -> (B, D, 16, 16): two stride-2 convs, a 3x3 conv, residuals, 1x1 to D."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden
        self.net = nn.Sequential(
            nn.Conv2d(cfg.in_channels, h // 2, kernel_size=4, stride=2, padding=1),  # (B, h/2, 32, 32)
            nn.ReLU(),
            nn.Conv2d(h // 2, h, kernel_size=4, stride=2, padding=1),  # (B, h, 16, 16)
            nn.ReLU(),
            nn.Conv2d(h, h, kernel_size=3, padding=1),
            ResidualStack(h, cfg.residual_hidden, cfg.residual_layers, cfg.residual_skip),
            nn.Conv2d(h, cfg.embedding_dim, kernel_size=1),  # (B, D, 16, 16)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(B, D, 16, 16) -> (B, C, 64, 64): 3x3 conv, residuals, two stride-2 transposed convs."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden
        self.net = nn.Sequential(
            nn.Conv2d(cfg.embedding_dim, h, kernel_size=3, padding=1),
            ResidualStack(h, cfg.residual_hidden, cfg.residual_layers, cfg.residual_skip),
            nn.ConvTranspose2d(h, h // 2, kernel_size=4, stride=2, padding=1),  # (B, h/2, 32, 32)
            nn.ReLU(),
            nn.ConvTranspose2d(h // 2, cfg.in_channels, kernel_size=4, stride=2, padding=1),  # (B, C, 64, 64)
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents)


class ModelOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, C, 64, 64)
    bottleneck: BottleneckOutput


class StreamlineAutoencoder(nn.Module):
    """encoder -> bottleneck -> decoder; the kind is decided by the bottleneck passed in."""

    def __init__(self, encoder: nn.Module, bottleneck: nn.Module, decoder: nn.Module, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.bottleneck = bottleneck
        self.decoder = decoder

    @classmethod
    def from_config(cls, config: ModelConfig) -> StreamlineAutoencoder:
        return cls(Encoder(config), build_bottleneck(config.embedding_dim, config.bottleneck), Decoder(config), config)

    @property
    def kind(self) -> str:
        return self.config.kind

    def encode(self, x: torch.Tensor) -> BottleneckOutput:
        """(B, C, 64, 64) -> bottleneck output whose ``latents`` are (B, D, 16, 16)."""
        return self.bottleneck(self.encoder(x))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, D, 16, 16) -> (B, C, 64, 64)."""
        return self.decoder(latents)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        out = self.encode(x)
        return ModelOutput(self.decode(out.latents), out)
