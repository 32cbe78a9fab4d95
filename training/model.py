"""The convolutional VAE: config, encoder, reparameterisation, decoder, loss.

q(z|x) = N(mu(x), diag(exp(log_var(x)))), z = mu + exp(0.5 * log_var) * eps,
p(x|z) = Bernoulli(sigmoid(decoder(z))) per pixel, prior p(z) = N(0, I).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VAEConfig:
    latent_dim: int = 16
    # Conv widths: the first two layers halve the resolution (28 -> 14 -> 7),
    # further layers keep 7x7 and only add depth.
    channels: tuple[int, ...] = (32, 64)
    hidden_dim: int = 256  # fully connected layer between the conv stack and the latent
    image_size: int = 28
    # > 0 adds a linear classifier on z (training only, never exported), for the optional
    # label-aware objective (TrainConfig.label_weight).
    num_classes: int = 0

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if not 1 <= self.latent_dim <= 512:
            raise ValueError(f"latent_dim must be in [1, 512], got {self.latent_dim}")
        if len(self.channels) < 2 or min(self.channels) < 1:
            raise ValueError(f"channels needs at least two positive widths, got {self.channels}")
        if self.hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {self.hidden_dim}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.image_size != 28:
            raise ValueError(f"image_size must be 28 (Fashion-MNIST), got {self.image_size}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["channels"] = list(self.channels)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> VAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)


def _conv_block(c_in: int, c_out: int, downsample: bool) -> nn.Module:
    if downsample:
        return nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1)
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1)


def _deconv_block(c_in: int, c_out: int, upsample: bool) -> nn.Module:
    if upsample:
        return nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1)
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1)


class VAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        widths = (1,) + config.channels
        self.feature_shape = (config.channels[-1], 7, 7)
        flat = config.channels[-1] * 7 * 7

        enc = []
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            enc += [_conv_block(c_in, c_out, downsample=i < 2), nn.ReLU()]
        self.encoder_conv = nn.Sequential(*enc, nn.Flatten())
        self.encoder_fc = nn.Sequential(nn.Linear(flat, config.hidden_dim), nn.ReLU())
        self.to_mu = nn.Linear(config.hidden_dim, config.latent_dim)
        self.to_log_var = nn.Linear(config.hidden_dim, config.latent_dim)

        self.decoder_fc = nn.Sequential(
            nn.Linear(config.latent_dim, config.hidden_dim), nn.ReLU(),
            nn.Linear(config.hidden_dim, flat), nn.ReLU(),
        )
        rev = widths[::-1]  # (C_last, ..., C_1, 1)
        n = len(rev) - 1
        dec = []
        for j, (c_in, c_out) in enumerate(zip(rev[:-1], rev[1:])):
            dec.append(_deconv_block(c_in, c_out, upsample=j >= n - 2))
            if j < n - 1:
                dec.append(nn.ReLU())
        self.decoder_conv = nn.Sequential(*dec)
        self.classifier = (
            nn.Linear(config.latent_dim, config.num_classes) if config.num_classes else None
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, 1, 28, 28) in [0, 1]
        h = self.encoder_fc(self.encoder_conv(x))  # (B, hidden)
        return self.to_mu(h), self.to_log_var(h)  # (B, d), (B, d)

    @staticmethod
    def reparameterize(
        mu: torch.Tensor, log_var: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return mu + torch.exp(0.5 * log_var) * eps

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        h = self.decoder_fc(z).view(-1, *self.feature_shape)  # (B, C, 7, 7)
        return self.decoder_conv(h)  # (B, 1, 28, 28) logits

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z))  # (B, 1, 28, 28) in [0, 1]

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Training pass: Bernoulli logits, mu, log_var, and the z that was sampled."""
        mu, log_var = self.encode(x)
        z = self.reparameterize(mu, log_var, generator)
        return self.decode_logits(z), mu, log_var, z


def loss_parts(
    logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image reconstruction (Bernoulli NLL, nats) and KL(q(z|x) || N(0, I)), each (B,)."""
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    kl = -0.5 * (1.0 + log_var - mu.pow(2) - log_var.exp()).sum(1)
    return recon, kl
