"""Checkpoint -> bundle directory (ONNX graphs, float16 index, manifest), atomically."""

from __future__ import annotations

import datetime
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from ..runtime.atomic import (
    atomic_directory,
    remove_stale_temporaries,
    stale_temporaries,
)
from ..runtime.bundle import (
    MODEL_FILES,
    new_manifest,
    write_index,
    write_manifest,
)
from ..training.data import CLASS_NAMES, Split, load_split
from ..training.model import VAE
from ..training.train import load_checkpoint, model_from_checkpoint, to_tensor
from .onnx_export import PARITY_TOLERANCE, export_decoder, export_encoder, parity

FLOAT16_MAX = float(np.finfo(np.float16).max)


class ExportError(ValueError):
    """The exported graphs or index failed a check; nothing was written."""


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


@torch.no_grad()
def encode_catalog(vae: VAE, images: np.ndarray, batch_size: int = 1000):
    """uint8 images (N, 28, 28) -> float32 mu and log_sigma (N, d), encoding with mu."""
    vae.eval()
    mus, log_sigmas = [], []
    for start in range(0, len(images), batch_size):
        mu, log_var = vae.encode(to_tensor(images[start : start + batch_size]))
        mus.append(mu.numpy())
        log_sigmas.append(0.5 * log_var.numpy())
    return np.concatenate(mus), np.concatenate(log_sigmas)


def to_float16(name: str, array: np.ndarray) -> np.ndarray:
    if np.abs(array).max(initial=0.0) > FLOAT16_MAX:
        raise ExportError(f"{name}: values up to {np.abs(array).max():.3g} overflow float16")
    return array.astype(np.float16)


def build_bundle(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    catalog: str = "train",
    data_dir: str | Path | None = None,
    limit: int | None = None,
    force: bool = False,
    log=print,
    catalog_split: Split | None = None,
) -> Path:
    """Export a checkpoint to a bundle directory.

    Everything is written into a temporary sibling directory and renamed into place only
    after every check passed, so an interrupted export leaves no half-written bundle and
    (with force) the previous bundle stays until the new one is complete.
    """
    out_dir = Path(out_dir)
    recover_interrupted_export(out_dir, log)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists: pass --force to replace it")
    if catalog not in ("train", "test"):
        raise ValueError(f"catalog must be 'train' or 'test', got {catalog!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    checkpoint = load_checkpoint(checkpoint_path)
    vae = model_from_checkpoint(checkpoint)
    with atomic_directory(out_dir) as tmp:
        log("exporting encoder.onnx and decoder.onnx")
        encoder_path = export_encoder(vae, tmp / MODEL_FILES["encoder"])
        decoder_path = export_decoder(vae, tmp / MODEL_FILES["decoder"])
        report = parity(vae, encoder_path, decoder_path)
        log(f"ONNX vs PyTorch at batch {', '.join(report['batches'])}: max abs diff "
            f"{report['max_abs_diff']:.2e} (tolerance {PARITY_TOLERANCE:g})")
        if not report["max_abs_diff"] <= PARITY_TOLERANCE:
            raise ExportError(
                f"ONNX outputs differ from PyTorch by {report['max_abs_diff']:.3g} "
                f"> {PARITY_TOLERANCE:g}: {report['batches']}"
            )

        split = catalog_split or load_split(catalog, data_dir)
        images, labels = split.images[:limit], split.labels[:limit]
        log(f"encoding the catalog: {len(images)} {catalog} images")
        mu, log_sigma = encode_catalog(vae, images)
        write_index(tmp, {
            "mu": to_float16("mu", mu),
            "log_sigma": to_float16("log_sigma", log_sigma),
            "ids": np.arange(len(images), dtype=np.int32),
            "labels": labels.astype(np.int32),
        })
        history = checkpoint["history"]
        manifest = new_manifest(
            latent_dim=vae.config.latent_dim,
            image_shape=(1, vae.config.image_size, vae.config.image_size),
            image_layout="NCHW, white garment on black, like Fashion-MNIST",
            catalog=f"fashion-mnist/{catalog}",
            size=len(images),
            label_names=CLASS_NAMES,
            ids=f"row number in the Fashion-MNIST {catalog} split",
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            parity=report,
            model_config=checkpoint["config"],
            training=checkpoint["train_config"],
            epochs_trained=checkpoint["epoch"],
            metrics={k: v for k, v in history[-1].items() if k.startswith("test_")},
            dataset=checkpoint.get("dataset", {}) | {"catalog_sha256": split.sha256},
            versions={
                "vae-edge": _version("vae-edge"), "torch": str(torch.__version__),
                "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime"),
                "numpy": np.__version__, "python": platform.python_version(),
            },
        )
        write_manifest(tmp, manifest)

        from ..runtime.core import Runtime

        Runtime.load(tmp)  # the runtime must accept what we wrote
    log(f"wrote {out_dir}")
    return out_dir


def recover_interrupted_export(out_dir: Path, log=print) -> None:
    """Undo what a killed export left beside out_dir: its half-written `.partial`
    directory, and, if it died between its two renames, the previous bundle parked
    as `.old` (moved back, since out_dir is then missing)."""
    out_dir = Path(out_dir)
    remove_stale_temporaries(out_dir, ".partial", log)
    parked = stale_temporaries(out_dir, ".old")
    if parked and not out_dir.exists():
        newest = max(parked, key=lambda p: p.stat().st_mtime)
        newest.rename(out_dir)
        log(f"restored the previous bundle {out_dir} from {newest.name} "
            "(an export was interrupted while replacing it)")
    remove_stale_temporaries(out_dir, ".old", log)
