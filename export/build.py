"""Checkpoint -> bundle directory (ONNX graphs, float16 index, manifest), atomically."""

from __future__ import annotations

import datetime
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from ..runtime.atomic import atomic_directory, exclusive, recover_directory
from ..runtime.bundle import (
    MODEL_FILES,
    CatalogIndex,
    new_manifest,
    pack_thumbnails,
    to_float16,
    write_index,
    write_manifest,
)
from ..runtime.catalog import Catalog, catalog_fingerprint, fit_catalog, read_catalog
from ..training.data import CLASS_NAMES, Split, load_split
from ..training.model import VAE
from ..training.train import load_checkpoint, model_from_checkpoint, to_tensor
from .onnx_export import PARITY_TOLERANCE, export_decoder, export_encoder, parity

# Thumbnails for the kiosk's result tiles: about 1 to 3 KB of WebP per photo at 96x96.
DEFAULT_THUMBNAIL_SIZE = 96


class ExportError(ValueError):
    """The exported graphs or index failed a check; nothing was written."""


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


@torch.no_grad()
def encode_catalog(vae: VAE, images: np.ndarray, batch_size: int = 1000):
    """uint8 images (N, H, W) or (N, C, H, W) -> float32 mu and log_sigma (N, d)."""
    vae.eval()
    mus, log_sigmas = [], []
    for start in range(0, len(images), batch_size):
        mu, log_var = vae.encode(to_tensor(images[start : start + batch_size]))
        mus.append(mu.numpy())
        log_sigmas.append(0.5 * log_var.numpy())
    return np.concatenate(mus), np.concatenate(log_sigmas)


def build_bundle(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    catalog: str | Path | None = None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    force: bool = False,
    log=print,
    catalog_split: Split | None = None,
    skip_bad: bool = False,
    thumbnail_size: int | None = DEFAULT_THUMBNAIL_SIZE,
) -> Path:
    """Export a checkpoint to a bundle directory.

    catalog: what the bundle indexes: None for the catalog the model was trained on, "train"
    or "test" for a Fashion-MNIST split, or the path of a catalog CSV (docs/catalog.md).
    thumbnail_size: the side of the WebP thumbnails a CSV catalog's bundle carries (None:
    none); a Fashion-MNIST bundle has none (the decoder's view stands in for them).
    skip_bad: leave out the catalog rows that cannot be used, instead of refusing the CSV.

    Everything is written into a temporary sibling directory and renamed into place only
    after every check passed, so an interrupted export leaves no half-written bundle and
    (with force) the previous bundle stays until the new one is complete. An export takes
    turns with `vae-run add` and `remove` on the same bundle (their lock).
    """
    out_dir = Path(out_dir)
    with exclusive(out_dir, log):
        return _build_bundle(checkpoint_path, out_dir, catalog, data_dir, limit, force, log,
                             catalog_split, skip_bad, thumbnail_size)


def _build_bundle(checkpoint_path, out_dir: Path, catalog, data_dir, limit, force, log,
                  catalog_split, skip_bad, thumbnail_size) -> Path:
    recover_directory(out_dir, log)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists: pass --force to replace it")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if thumbnail_size is not None and not 8 <= thumbnail_size <= 512:
        raise ValueError(f"thumbnail size must be in [8, 512], got {thumbnail_size}")
    checkpoint = load_checkpoint(checkpoint_path)
    vae = model_from_checkpoint(checkpoint)
    dataset = checkpoint.get("dataset", {})
    channels = vae.config.image_channels
    trained_on = dataset.get("csv") if dataset.get("kind") == "catalog" else None
    if catalog is None:
        catalog = trained_on or "train"
        if trained_on and not Path(trained_on).is_file():
            raise FileNotFoundError(f"the catalog the model was trained on is gone: {trained_on}; "
                                    "give its new place with --catalog")
    from_csv = str(catalog) not in ("train", "test")
    if from_csv:  # read and checked before any work
        rows = read_catalog(catalog, skip_bad=skip_bad)
        if trained_on and Path(catalog).resolve() == Path(trained_on).resolve() and \
                catalog_fingerprint(rows) != dataset.get("fingerprint"):
            log(f"note: {catalog} or its photos changed since the model was trained on it; "
                "the bundle indexes the catalog as it is now")
    elif (channels, vae.config.image_size) != (1, 28):
        raise ValueError(f"catalog {catalog!r} is a Fashion-MNIST split (28x28 grayscale), but "
                         f"the model takes {channels}x{vae.config.image_size}x"
                         f"{vae.config.image_size} images: give a catalog CSV")
    with atomic_directory(out_dir) as tmp:
        report = export_graphs(vae, tmp, log)
        if from_csv:
            index, provenance = catalog_index(vae, rows, limit, skip_bad, thumbnail_size,
                                              dataset, log)
        else:
            index, provenance = fashion_mnist_index(vae, catalog, data_dir, limit,
                                                    catalog_split, dataset, log)
            thumbnail_size = None
        write_index(tmp, index)
        history = checkpoint["history"]
        size = vae.config.image_size
        manifest = new_manifest(
            latent_dim=vae.config.latent_dim,
            image_shape=(channels, size, size),
            index=index,
            thumbnail_size=thumbnail_size,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            parity=report,
            model_config=checkpoint["config"],
            training=checkpoint["train_config"],
            epochs_trained=checkpoint["epoch"],
            metrics={k: v for k, v in history[-1].items() if k.startswith("test_")},
            versions={
                "vae-edge": _version("vae-edge"), "torch": str(torch.__version__),
                "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime"),
                "numpy": np.__version__, "python": platform.python_version(),
            },
            **provenance,
        )
        write_manifest(tmp, manifest)

        from ..runtime.core import Runtime

        Runtime.load(tmp)  # the runtime must accept what we wrote
    log(f"wrote {out_dir}")
    return out_dir


def export_graphs(vae: VAE, root: Path, log) -> dict:
    """encoder.onnx and decoder.onnx, checked against PyTorch: the parity report."""
    log("exporting encoder.onnx and decoder.onnx")
    encoder_path = export_encoder(vae, root / MODEL_FILES["encoder"])
    decoder_path = export_decoder(vae, root / MODEL_FILES["decoder"])
    report = parity(vae, encoder_path, decoder_path)
    log(f"ONNX vs PyTorch at batch {', '.join(report['batches'])}: max abs diff "
        f"{report['max_abs_diff']:.2e} (tolerance {PARITY_TOLERANCE:g})")
    if not report["max_abs_diff"] <= PARITY_TOLERANCE:
        raise ExportError(
            f"ONNX outputs differ from PyTorch by {report['max_abs_diff']:.3g} "
            f"> {PARITY_TOLERANCE:g}: {report['batches']}"
        )
    return report


def fashion_mnist_index(vae: VAE, split_name: str, data_dir, limit, split: Split | None,
                        dataset: dict, log):
    """Encode a Fashion-MNIST split: the index (ids: row numbers) and the manifest's
    description of it, `dataset` (the checkpoint's record) completed."""
    split = split or load_split(split_name, data_dir)
    images, labels = split.images[:limit], split.labels[:limit]
    log(f"encoding the catalog: {len(images)} {split_name} images")
    mu, log_sigma = encode_catalog(vae, images)
    index = CatalogIndex(
        mu=to_float16("mu", mu), log_sigma=to_float16("log_sigma", log_sigma),
        labels=labels.astype(np.int32), label_names=CLASS_NAMES,
        ids=np.array([str(row) for row in range(len(images))], dtype=object))

    return index, {"image_layout": "NCHW, white garment on black, like Fashion-MNIST",
                   "catalog": f"fashion-mnist/{split_name}",
                   "ids": f"row number in the Fashion-MNIST {split_name} split",
                   "dataset": dataset | {"catalog_sha256": split.sha256}}


def catalog_index(vae: VAE, rows: Catalog, limit, skip_bad: bool, thumbnail_size,
                  dataset: dict, log):
    """Fit and encode a catalog CSV's photos: the index with metadata and thumbnails, and the
    manifest's description of it, `dataset` (the checkpoint's record) completed."""
    from tqdm import tqdm

    rows = rows.select(list(range(min(len(rows), limit or len(rows)))), [])
    size, channels = vae.config.image_size, vae.config.image_channels
    with tqdm(total=len(rows), desc="photos", unit="photo", disable=None, leave=False) as bar:
        rows, pixels, thumbnails = fit_catalog(rows, size, channels, skip_bad=skip_bad,
                                               thumbnail_size=thumbnail_size,
                                               progress=bar.update)
    if rows.skipped:
        log(f"skipped {len(rows.skipped)} bad rows of {rows.source} (--skip-bad)")
    log(f"encoding the catalog: {len(rows)} photos of {rows.source}")
    mu, log_sigma = encode_catalog(vae, pixels)
    label_texts = rows.labels or ("",) * len(rows)
    label_names = tuple(sorted(set(label_texts)))
    index = CatalogIndex(
        mu=to_float16("mu", mu), log_sigma=to_float16("log_sigma", log_sigma),
        labels=np.searchsorted(np.array(label_names, dtype=object),
                               np.array(label_texts, dtype=object)).astype(np.int32),
        label_names=label_names, ids=np.array(rows.ids, dtype=object), columns=rows.columns,
        metadata=tuple(np.array(column, dtype=object) for column in zip(*rows.metadata)),
        **pack_thumbnails(thumbnails))
    return index, {"image_layout": f"NCHW, {'colour' if channels == 3 else 'grayscale'} photos "
                                   "fitted into the square, padded with their border colour",
                   "catalog": rows.source.name,  # the device and its kiosk API see no paths
                   "ids": f"the id column of {rows.source.name}",
                   "dataset": dataset | {"catalog_fingerprint": catalog_fingerprint(rows),
                                         "catalog_skipped": len(rows.skipped)}}
