"""One function per graph: encoder.onnx and decoder.onnx, single-file, dynamic batch.

Both are exported with torch.onnx's dynamo exporter, checked with onnx.checker (full
check with shape inference) and compared with PyTorch through onnxruntime.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..runtime.graphs import open_session
from ..training.model import VAE

PARITY_BATCHES = (1, 7, 64)
PARITY_TOLERANCE = 1e-4
OPSET = 18


class EncoderGraph(nn.Module):
    """images (B, C, H, W) in [0, 1] -> mu, log_var (B, d); no sampling node."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vae.encode(images)


class DecoderGraph(nn.Module):
    """z (B, d) -> images (B, C, H, W) in [0, 1]."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str,
            output_names: list[str]) -> Path:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=65536)
    module.eval()
    # The exporter logs a warning per missing torchvision op; we use none of them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (example,), dynamo=True, input_names=[input_name],
            output_names=output_names, dynamic_shapes=({0: batch},), opset_version=OPSET,
            optimize=True, verbose=False,
        )
    program.save(str(path), external_data=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = {node.op_type for node in model.graph.node}
    random_ops = ops & {"RandomNormal", "RandomNormalLike", "RandomUniform",
                        "RandomUniformLike", "Multinomial", "Bernoulli"}
    if random_ops:
        raise RuntimeError(f"{path.name}: graph holds random nodes {sorted(random_ops)}")
    return path


def export_encoder(vae: VAE, path: str | Path) -> Path:
    c, size = vae.config.image_channels, vae.config.image_size
    example = torch.rand(2, c, size, size)
    return _export(EncoderGraph(vae), example, Path(path), "images", ["mu", "log_var"])


def export_decoder(vae: VAE, path: str | Path) -> Path:
    example = torch.randn(2, vae.config.latent_dim)
    return _export(DecoderGraph(vae), example, Path(path), "z", ["images"])


@torch.no_grad()
def parity(vae: VAE, encoder_path: Path, decoder_path: Path, seed: int = 0,
           batches: tuple[int, ...] = PARITY_BATCHES) -> dict:
    """Max |onnxruntime - torch| over both graphs' outputs at each batch size."""
    vae.eval()
    generator = torch.Generator().manual_seed(seed)
    # the sessions the runtime will run: the same options, so parity is the runtime's
    encoder, decoder = open_session(encoder_path, threads=1), open_session(decoder_path, threads=1)
    report = {}
    for b in batches:
        images = torch.rand(b, vae.config.image_channels, vae.config.image_size,
                            vae.config.image_size, generator=generator)
        z = torch.randn(b, vae.config.latent_dim, generator=generator) * 2
        mu, log_var = vae.encode(images)
        onnx_mu, onnx_log_var = encoder.run(["mu", "log_var"], {"images": images.numpy()})
        (onnx_images,) = decoder.run(["images"], {"z": z.numpy()})
        report[str(b)] = {
            "encoder": float(max(np.abs(onnx_mu - mu.numpy()).max(),
                                 np.abs(onnx_log_var - log_var.numpy()).max())),
            "decoder": float(np.abs(onnx_images - vae.decode(z).numpy()).max()),
        }
    worst = max(max(r.values()) for r in report.values())
    return {"batches": report, "max_abs_diff": worst, "tolerance": PARITY_TOLERANCE}
