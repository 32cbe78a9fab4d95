"""The convolutional VAE: config, encoder, reparameterisation, decoder, loss.

q(z|x) = N(mu(x), diag(exp(log_var(x)))), z = mu + exp(0.5 * log_var) * eps,
p(x|z) = Bernoulli(sigmoid(decoder(z))) per pixel and colour channel, prior p(z) = N(0, I).

The architecture follows the image: its channels (1 or 3) feed the first conv layer and come out
of the last, and an image of side S gets downsampling_stages(S) stride-2 stages down to a
feature map of side feature_size (7 for 28, 4 for 64), mirrored by the decoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .kl import kl_to_prior

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 256
MAX_ADDED_WIDTH = 256  # widths added by doubling stop growing here


def downsampling_stages(image_size: int) -> int:
    """Stride-2 stages: the side is halved while it is even and the half is at least 4
    (28 -> 14 -> 7: 2 stages; 64 -> 32 -> 16 -> 8 -> 4: 4)."""
    stages, side = 0, image_size
    while side % 2 == 0 and side // 2 >= 4:
        side //= 2
        stages += 1
    return stages


@dataclass(frozen=True)
class VAEConfig:
    latent_dim: int = 16
    # Conv widths, one per layer: the first `stages` layers halve the resolution (stride 2),
    # further layers keep it and only add depth. Fewer widths than stages are extended by
    # doubling the last width (up to MAX_ADDED_WIDTH), so the stored list is the full one.
    channels: tuple[int, ...] = (32, 64)
    hidden_dim: int = 256  # fully connected layer between the conv stack and the latent
    image_size: int = 28  # side of the square images, a multiple of 4 from 16 to 256
    # > 0 adds a linear classifier on z (training only, never exported), for the optional
    # label-aware objective (TrainConfig.label_weight).
    num_classes: int = 0
    image_channels: int = 1  # 1 grayscale, 3 colour (RGB)

    def __post_init__(self):
        if not 1 <= self.latent_dim <= 512:
            raise ValueError(f"latent_dim must be in [1, 512], got {self.latent_dim}")
        widths = tuple(int(c) for c in self.channels)
        if not widths or min(widths) < 1:
            raise ValueError(f"channels needs at least one positive width, got {widths}")
        if self.hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {self.hidden_dim}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if (not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE
                or self.image_size % 4):
            raise ValueError(f"image_size must be a multiple of 4 from {MIN_IMAGE_SIZE} to "
                             f"{MAX_IMAGE_SIZE}, got {self.image_size}")
        if self.image_channels not in (1, 3):
            raise ValueError(f"image_channels must be 1 (grayscale) or 3 (colour), "
                             f"got {self.image_channels}")
        while len(widths) < self.stages:
            widths += (max(widths[-1], min(2 * widths[-1], MAX_ADDED_WIDTH)),)
        object.__setattr__(self, "channels", widths)

    @property
    def stages(self) -> int:
        return downsampling_stages(self.image_size)

    @property
    def feature_size(self) -> int:
        """Side of the conv stack's output (7 for 28, 4 for 64)."""
        return self.image_size >> self.stages

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
        widths = (config.image_channels,) + config.channels
        side, stages = config.feature_size, config.stages
        self.feature_shape = (config.channels[-1], side, side)
        flat = config.channels[-1] * side * side

        enc = []
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            enc += [_conv_block(c_in, c_out, downsample=i < stages), nn.ReLU()]
        self.encoder_conv = nn.Sequential(*enc, nn.Flatten())
        self.encoder_fc = nn.Sequential(nn.Linear(flat, config.hidden_dim), nn.ReLU())
        self.to_mu = nn.Linear(config.hidden_dim, config.latent_dim)
        self.to_log_var = nn.Linear(config.hidden_dim, config.latent_dim)

        self.decoder_fc = nn.Sequential(
            nn.Linear(config.latent_dim, config.hidden_dim), nn.ReLU(),
            nn.Linear(config.hidden_dim, flat), nn.ReLU(),
        )
        rev = widths[::-1]  # (C_last, ..., C_1, image_channels)
        n = len(rev) - 1
        dec = []
        for j, (c_in, c_out) in enumerate(zip(rev[:-1], rev[1:])):
            dec.append(_deconv_block(c_in, c_out, upsample=j >= n - stages))
            if j < n - 1:
                dec.append(nn.ReLU())
        self.decoder_conv = nn.Sequential(*dec)
        self.classifier = (
            nn.Linear(config.latent_dim, config.num_classes) if config.num_classes else None
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, C, S, S) in [0, 1]
        h = self.encoder_fc(self.encoder_conv(x))  # (B, hidden)
        return self.to_mu(h), self.to_log_var(h)  # (B, d), (B, d)

    @staticmethod
    def reparameterize(
        mu: torch.Tensor, log_var: torch.Tensor, generator: torch.Generator | None = None,
        eps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z = mu + sigma * eps, with eps drawn from generator unless given (a rank of a
        distributed run takes its rows of the whole batch's draw)."""
        if eps is None:
            eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return mu + torch.exp(0.5 * log_var) * eps

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        h = self.decoder_fc(z).view(-1, *self.feature_shape)  # (B, C_last, s, s)
        return self.decoder_conv(h)  # (B, C, S, S) logits

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z))  # (B, C, S, S) in [0, 1]

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                eps: torch.Tensor | None = None):
        """Training pass: Bernoulli logits, mu, log_var, and the z that was sampled."""
        mu, log_var = self.encode(x)
        z = self.reparameterize(mu, log_var, generator, eps)
        return self.decode_logits(z), mu, log_var, z


def loss_parts(
    logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image reconstruction (Bernoulli NLL, nats) and KL(q(z|x) || N(0, I)), each (B,)."""
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    kl = kl_to_prior(mu, log_var, torch.exp)
    return recon, kl
