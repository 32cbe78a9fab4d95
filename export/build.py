"""Checkpoint -> bundle directory (ONNX graphs, float16 index, manifest), atomically.

On N ranks (`torchrun --nproc-per-node N $(which vae-export) ...`) each rank fits the photos of
a consecutive part of the catalog and encodes them; rank 0 gathers the codes and writes the
bundle. The encoder sees the same batches of ENCODE_BATCH as in one process (float32 kernels may
round differently for another batch shape): a rank encodes the batches that lie within its
part, and rank 0 the few that straddle two parts, so the index has the same bytes for any N.
"""

from __future__ import annotations

import contextlib
import datetime
import platform
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from ..runtime.atomic import exclusive, recover_directory
from ..runtime.bundle import MODEL_FILES, Bundle, CatalogIndex, new_manifest, to_float16
from ..runtime.catalog import (
    Catalog,
    bad_rows_error,
    catalog_fingerprint,
    fit_catalog,
    items_index,
    read_catalog,
)
from ..training import distributed
from ..training.catalog_data import exported_photos
from ..training.data import CLASS_NAMES, Split, load_split
from ..training.model import VAE
from ..training.train import load_checkpoint, model_from_checkpoint, to_tensor, weights_epoch
from .onnx_export import PARITY_TOLERANCE, export_decoder, export_encoder, parity

# Thumbnails for the kiosk's result tiles: about 1 to 3 KB of WebP per photo at 96x96.
DEFAULT_THUMBNAIL_SIZE = 96
ENCODE_BATCH = 1000


class ExportError(ValueError):
    """The exported graphs or index failed a check; nothing was written."""


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


@torch.no_grad()
def encode_catalog(vae: VAE, images: np.ndarray, batch_size: int = ENCODE_BATCH):
    """uint8 images (N, H, W) or (N, C, H, W) -> float32 mu and log_sigma (N, d)."""
    vae.eval()
    mus, log_sigmas = [], []
    for start in range(0, len(images), batch_size):
        mu, log_var = vae.encode(to_tensor(images[start : start + batch_size]))
        mus.append(mu.numpy())
        log_sigmas.append(0.5 * log_var.numpy())
    return np.concatenate(mus), np.concatenate(log_sigmas)


def encode_on_ranks(vae: VAE, part: np.ndarray, offset: int, total: int, ranks,
                    batch_size: int = ENCODE_BATCH):
    """encode_catalog of the whole catalog, with each rank holding images[offset:offset +
    len(part)] of its `total` images: rank 0 gets mu and log_sigma, the others None."""
    end = offset + len(part)
    first = -(-offset // batch_size)  # the batches that lie within the part
    last = end // batch_size if end < total else -(-total // batch_size)
    whole = (np.empty((0, vae.config.latent_dim), np.float32),) * 2
    if first < last:
        whole = encode_catalog(vae, part[first * batch_size - offset:
                                         min(last * batch_size, total) - offset], batch_size)
    pieces = {k: part[max(k * batch_size, offset) - offset: min((k + 1) * batch_size, end) - offset]
              for k in range(offset // batch_size, -(-end // batch_size))
              if not first <= k < last}
    gathered = distributed.gather_to_leader((first, whole, pieces), ranks)
    if gathered is None:
        return None
    batches = {}
    for first, (mu, log_sigma), _ in gathered:
        for i in range(0, len(mu), batch_size):
            batches[first + i // batch_size] = (mu[i:i + batch_size], log_sigma[i:i + batch_size])
    straddling = sorted({k for _, _, pieces in gathered for k in pieces})
    for k in straddling:  # pieces in rank order: the parts are consecutive
        batches[k] = encode_catalog(vae, np.concatenate(
            [pieces[k] for _, _, pieces in gathered if k in pieces]), batch_size)
    return tuple(np.concatenate([batches[k][j] for k in sorted(batches)]) for j in (0, 1))


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
    In a process group (torchrun, training.distributed.join) every rank calls build_bundle
    with the same arguments: each fits and encodes its part of the catalog, rank 0 writes.
    """
    ranks = distributed.current()
    out_dir = Path(out_dir)
    # Only rank 0 writes the bundle, so only it takes the edit lock.
    with exclusive(out_dir, log) if ranks.leader else contextlib.nullcontext():
        return _build_bundle(checkpoint_path, out_dir, catalog, data_dir, limit, force, log,
                             catalog_split, skip_bad, thumbnail_size, ranks)


def _build_bundle(checkpoint_path, out_dir: Path, catalog, data_dir, limit, force, log,
                  catalog_split, skip_bad, thumbnail_size, ranks) -> Path:
    if ranks.leader:
        recover_directory(out_dir, log)
        if out_dir.exists() and not force:
            raise FileExistsError(f"{out_dir} exists: pass --force to replace it")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if thumbnail_size is not None and not 8 <= thumbnail_size <= 512:
        raise ValueError(f"thumbnail size must be in [8, 512], got {thumbnail_size}")
    checkpoint = distributed.from_leader(
        load_checkpoint(checkpoint_path) if ranks.leader else None, ranks)
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
    # Every rank fits and encodes its share of the catalog; rank 0 gets the index and writes.
    graphs, report = export_graphs(vae, log) if ranks.leader else (None, None)
    if from_csv:
        index, provenance = catalog_index(vae, rows, limit, skip_bad, thumbnail_size, dataset,
                                          log)
    else:
        index, provenance = fashion_mnist_index(vae, catalog, data_dir, limit, catalog_split,
                                                dataset, log)
        thumbnail_size = None
    if not ranks.leader:
        return out_dir
    manifest = _manifest(vae, checkpoint, report, thumbnail_size, provenance)
    Bundle(manifest, index, graphs).write(out_dir)
    log(f"wrote {out_dir}")
    return out_dir


def _manifest(vae: VAE, checkpoint: dict, parity_report: dict, thumbnail_size,
              provenance: dict) -> dict:
    """The new bundle's manifest: the model's shapes and the export's provenance."""
    size = vae.config.image_size
    return new_manifest(
        latent_dim=vae.config.latent_dim,
        image_shape=(vae.config.image_channels, size, size),
        thumbnail_size=thumbnail_size,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        parity=parity_report,
        model_config=checkpoint["config"],
        training=checkpoint["train_config"],
        epochs_trained=checkpoint["epoch"],
        metrics={k: v for k, v in checkpoint["history"][weights_epoch(checkpoint) - 1].items()
                 if k.startswith("test_")},
        versions={
            "vae-edge": _version("vae-edge"), "torch": str(torch.__version__),
            "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime"),
            "numpy": np.__version__, "python": platform.python_version(),
        },
        **provenance,
    )


def export_graphs(vae: VAE, log) -> tuple[dict[str, bytes], dict]:
    """encoder.onnx and decoder.onnx (their bytes, by file name), checked against PyTorch,
    and the parity report."""
    log("exporting encoder.onnx and decoder.onnx")
    with tempfile.TemporaryDirectory(prefix="vae-export-") as work:
        encoder_path = export_encoder(vae, Path(work) / MODEL_FILES["encoder"])
        decoder_path = export_decoder(vae, Path(work) / MODEL_FILES["decoder"])
        report = parity(vae, encoder_path, decoder_path)
        graphs = {path.name: path.read_bytes() for path in (encoder_path, decoder_path)}
    log(f"ONNX vs PyTorch at batch {', '.join(report['batches'])}: max abs diff "
        f"{report['max_abs_diff']:.2e} (tolerance {PARITY_TOLERANCE:g})")
    if not report["max_abs_diff"] <= PARITY_TOLERANCE:
        raise ExportError(
            f"ONNX outputs differ from PyTorch by {report['max_abs_diff']:.3g} "
            f"> {PARITY_TOLERANCE:g}: {report['batches']}"
        )
    return graphs, report


def fashion_mnist_index(vae: VAE, split_name: str, data_dir, limit, split: Split | None,
                        dataset: dict, log):
    """Encode a Fashion-MNIST split: the index (ids: row numbers) and the manifest's
    description of it, `dataset` (the checkpoint's record) completed."""
    split = split or load_split(split_name, data_dir)
    images, labels = split.images[:limit], split.labels[:limit]
    log(f"encoding the catalog: {len(images)} {split_name} images")
    ranks = distributed.current()
    if ranks.world == 1:
        mu, log_sigma = encode_catalog(vae, images)
    else:  # parts of whole batches
        batches = -(-len(images) // ENCODE_BATCH)
        start, end = (min(len(images), ENCODE_BATCH * round(batches * r / ranks.world))
                      for r in (ranks.rank, ranks.rank + 1))
        codes = encode_on_ranks(vae, images[start:end], start, len(images), ranks)
        if codes is None:
            return None, None
        mu, log_sigma = codes
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
    ranks = distributed.current()
    if ranks.world == 1:
        with tqdm(total=len(rows), desc="photos", unit="photo", disable=None,
                  leave=False) as bar:
            rows, pixels, thumbnails = exported_photos(rows, size, channels, skip_bad=skip_bad,
                                                   thumbnail_size=thumbnail_size,
                                                   progress=bar.update)
        if rows.skipped:
            log(f"skipped {len(rows.skipped)} bad rows of {rows.source} (--skip-bad)")
        log(f"encoding the catalog: {len(rows)} photos of {rows.source}")
        mu, log_sigma = encode_catalog(vae, pixels)
    else:
        rows, thumbnails, codes = _fit_and_encode_on_ranks(vae, rows, skip_bad, thumbnail_size,
                                                           ranks, log)
        if codes is None:
            return None, None
        mu, log_sigma = codes
    index = items_index(rows, mu, log_sigma, thumbnails)
    return index, {"image_layout": f"NCHW, {'colour' if channels == 3 else 'grayscale'} photos "
                                   "fitted into the square, padded with their border colour",
                   "catalog": rows.source.name,  # the device and its kiosk API see no paths
                   "ids": f"the id column of {rows.source.name}",
                   "dataset": dataset | {"catalog_fingerprint": catalog_fingerprint(rows),
                                         "catalog_skipped": len(rows.skipped)}}


def _fit_and_encode_on_ranks(vae: VAE, rows: Catalog, skip_bad: bool, thumbnail_size, ranks,
                             log):
    """fit_catalog and encode_catalog of the catalog, each rank taking a consecutive part of
    it: on rank 0 the catalog of the usable items, their thumbnails and (mu, log_sigma); on
    the others (None, None, None)."""
    from tqdm import tqdm

    bounds = np.linspace(0, len(rows), ranks.world + 1).round().astype(int)
    mine = rows.select(list(range(bounds[ranks.rank], bounds[ranks.rank + 1])), [])
    with tqdm(total=len(mine), desc=f"photos, rank 0 of {ranks.world}", unit="photo",
              disable=None if ranks.leader else True, leave=False) as bar:
        good, pixels, thumbnails = fit_catalog(
            mine, vae.config.image_size, vae.config.image_channels, skip_bad=True,
            thumbnail_size=thumbnail_size, progress=bar.update, at_least_one=False)
    parts = distributed.everyone((good.ids, good.skipped[len(rows.skipped):]), ranks)
    problems = [problem for _, skipped in parts for problem in skipped]
    if problems and not skip_bad:
        raise bad_rows_error(rows.source, problems, "photo")
    counts = [len(ids) for ids, _ in parts]
    if not sum(counts):
        raise ValueError(f"{rows.source}: no item has a readable photo")
    skipped = len(rows.skipped) + len(problems)
    if skipped:
        log(f"skipped {skipped} bad rows of {rows.source} (--skip-bad)")
    log(f"encoding the catalog: {sum(counts)} photos of {rows.source} on {ranks.world} ranks")
    codes = encode_on_ranks(vae, pixels, sum(counts[:ranks.rank]), sum(counts), ranks)
    thumbnails = distributed.gather_to_leader(thumbnails, ranks)
    if not ranks.leader:
        return None, None, None
    position = {item_id: i for i, item_id in enumerate(rows.ids)}  # ids are unique
    rows = rows.select([position[item_id] for ids, _ in parts for item_id in ids], problems)
    if thumbnail_size is not None:
        thumbnails = [thumbnail for part in thumbnails for thumbnail in part]
    else:
        thumbnails = None
    return rows, thumbnails, codes
