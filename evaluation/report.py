"""Evaluate a bundle (and optionally its checkpoint) on the Fashion-MNIST test set.

What is measured, and through what:

- retrieval, through the exported runtime's search: each test image is encoded by
  encoder.onnx (rt.encode) and its mu is the query of rt.nearest over the bundle's float16
  catalog index; reported as 1-NN label agreement, kNN-5 majority-vote accuracy and label
  precision@10. Beside it, in the same run: the raw-pixel L2 baseline over the very same
  catalog items, and retrieval by the whole query posterior, -W2^2 between q(z|x_query)
  and q(z|x_item) (rt.nearest_image, what a photo query ranks by).
- reconstruction MSE (decoder.onnx on mu) and active units (variance over the test set of mu
  above 0.01, Burda et al. 2016), through the runtime.
- loss parts in nats per image: reconstruction at z = mu (what training logs), KL, the negative
  ELBO estimated with sampled z, and an importance-sampled log-likelihood
  log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, z_k ~ q(z|x)
  (Burda et al.'s IWAE bound with K samples). log p(x|z) is the training loss's Bernoulli
  likelihood of the [0, 1] grey levels. With a checkpoint it is computed by PyTorch from the
  decoder's logits (exact); without one, from decoder.onnx's float32 probabilities, clipped
  to [1e-30, 1 - 2**-24] so that a saturated pixel costs a finite amount; float32 cannot resolve
  1 - p near 1, so these figures are close but not exact (0.03 nats/image on the shipped model).
  The report says which backend was used.

The report (report.json) and the pictures are written into a fresh directory atomically: a
temporary sibling is renamed into place only when everything is written.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..runtime.atomic import atomic_directory
from ..runtime.checks import is_integer
from ..runtime.core import Runtime
from ..runtime.search import LOG_2PI
from ..training.data import Split, load_split
from ..training.kl import kl_to_prior

REPORT_NAME = "report.json"
PICTURES_DIR = "pictures"
ACTIVE_UNIT_THRESHOLD = 0.01
RETRIEVAL_K = 10
# float32's largest value below 1: decoder.onnx cannot say more than this about a saturated pixel.
ONNX_P_MAX = 1.0 - 2.0**-24
ONNX_P_MIN = 1e-30


@dataclass(frozen=True)
class EvalConfig:
    test_limit: int | None = None  # evaluate on the first this many test images
    is_images: int | None = 2000  # importance sampling on the first this many (None: all)
    is_samples: int = 100  # K, samples per image for the IS estimate
    seed: int = 0
    threads: int = 2  # onnxruntime intra-op threads
    pictures: bool = True
    query_batch: int = 250  # queries per rt.nearest call: bounds the (B, N) score matrix
    baseline: bool = True  # the raw-pixel L2 search over the same catalog (minutes on 2 cores)
    # The slider scenario: this many z per source (0: skip it), uniform and corners in [-a, a].
    slider_queries: int = 1000
    slider_range: float = 5.0

    def __post_init__(self):
        for name in ("test_limit", "is_images"):
            value = getattr(self, name)
            if value is not None and (not is_integer(value) or value < 1):
                raise ValueError(f"{name} must be None or >= 1, got {value!r}")
        if self.is_samples < 1:
            raise ValueError(f"is_samples must be >= 1, got {self.is_samples}")
        if self.threads < 1 or self.query_batch < 1:
            raise ValueError("threads and query_batch must be >= 1")
        if self.slider_queries < 0 or not self.slider_range > 0:
            raise ValueError("slider_queries must be >= 0 and slider_range > 0, got "
                             f"{self.slider_queries!r} and {self.slider_range!r}")


def _log(log, message: str) -> None:
    if log is not None:
        log(message)


# ----------------------------------------------------------------------------- retrieval


def label_metrics(neighbour_labels: np.ndarray, labels: np.ndarray, n_classes: int) -> dict:
    """1-NN agreement, kNN-5 majority vote and precision@k from (Q, k) neighbour labels.

    kNN-5 ties between classes go to the class of the best-ranked neighbour among them.
    """
    neighbour_labels = np.asarray(neighbour_labels, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if neighbour_labels.ndim != 2 or neighbour_labels.shape[0] != labels.shape[0]:
        raise ValueError(
            f"neighbour labels must be (Q, k) with Q = {labels.shape[0]}, "
            f"got {neighbour_labels.shape}"
        )
    k = neighbour_labels.shape[1]
    top5 = neighbour_labels[:, : min(5, k)]
    counts = np.zeros((len(labels), n_classes), dtype=np.int64)
    np.add.at(counts, (np.arange(len(labels))[:, None], top5), 1)
    # Break ties by rank: a tiny bonus for the class seen first.
    first_rank = np.full((len(labels), n_classes), top5.shape[1], dtype=np.int64)
    for r in range(top5.shape[1] - 1, -1, -1):
        first_rank[np.arange(len(labels)), top5[:, r]] = r
    vote = np.argmax(counts * (top5.shape[1] + 1) - first_rank, axis=1)
    return {
        "nn1": float(np.mean(neighbour_labels[:, 0] == labels)),
        "knn5": float(np.mean(vote == labels)),
        f"precision_at_{k}": float(np.mean(neighbour_labels == labels[:, None])),
    }


def search_rows(search, queries: np.ndarray, k: int, batch: int, what: str,
                log=None) -> np.ndarray:
    """Catalog rows of search(block, k).rows for blocks of `batch` queries: (Q, k).

    search is a runtime query method: rt.nearest (latent z) or rt.nearest_image (images).
    """
    rows = np.empty((len(queries), k), dtype=np.int64)
    started = time.perf_counter()
    for start in range(0, len(queries), batch):
        rows[start : start + batch] = search(queries[start : start + batch], k=k).rows
        if log is not None and (start // batch) % 10 == 9:
            done = min(start + batch, len(queries))
            _log(log, f"  {what}: {done}/{len(queries)} queries "
                      f"({time.perf_counter() - started:.0f}s)")
    return rows


def top_k_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k highest scores per query, best first, lower row first on ties.

    scores: (B, N). Returns (B, k) int64.
    """
    n = scores.shape[1]
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), scores.shape).copy()
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)  # last key primary: -score, then row
    return np.take_along_axis(part, order, axis=1).astype(np.int64)


def pixel_neighbours(queries: np.ndarray, catalog: np.ndarray, k: int, batch: int = 500,
                     log=None) -> np.ndarray:
    """Top-k catalog rows by L2 distance of raw pixels in [0, 1]: (Q, k), nearest first.

    Images are uint8 (0..255) or float in [0, 1]."""
    q, c = unit_pixels(queries), unit_pixels(catalog)
    c_sq = (c * c).sum(axis=1)
    rows = np.empty((len(q), min(k, len(c))), dtype=np.int64)
    started = time.perf_counter()
    for start in range(0, len(q), batch):
        block = q[start : start + batch]
        # ||q||^2 is the same for every item of a row: ranking needs only the rest.
        scores = 2.0 * block @ c.T - c_sq[None, :]
        rows[start : start + batch] = top_k_rows(scores, k)
        if log is not None and (start // batch) % 5 == 4:
            _log(log, f"  pixel baseline: {min(start + batch, len(q))}/{len(q)} queries "
                      f"({time.perf_counter() - started:.0f}s)")
    return rows


def unit_pixels(images: np.ndarray) -> np.ndarray:
    """(n, ...) uint8 0..255 or float [0, 1] images -> (n, pixels) float32 in [0, 1]."""
    flat = images.reshape(len(images), -1)
    return flat.astype(np.float32) / 255.0 if flat.dtype == np.uint8 else flat.astype(np.float32)


def pixel_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of the pixels of image a[i] and b[i]: (n,) float64."""
    a = unit_pixels(a).astype(np.float64)
    b = unit_pixels(b).astype(np.float64)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-300)


def _quartiles(values: np.ndarray) -> dict:
    q25, median, q75 = np.quantile(values, [0.25, 0.5, 0.75])
    return {"median": round(float(median), 4), "q25": round(float(q25), 4),
            "q75": round(float(q75), 4)}


def slider_queries(d: int, n: int, a: float, seed: int) -> dict[str, np.ndarray]:
    """n slider positions z per source: N(0, I), uniform in [-a, a]^d, corners {-a, a}^d."""
    rng = np.random.default_rng(seed)
    return {"normal": rng.standard_normal((n, d)), "uniform": rng.uniform(-a, a, (n, d)),
            "corners": rng.choice([-a, a], (n, d))}


def slider_scenario(rt: Runtime, catalog_images: np.ndarray, n: int, a: float, seed: int,
                    log=None) -> tuple[dict, dict]:
    """How much the top match looks like the garment a shopper made with the sliders.

    For each source of z (slider_queries), the pixel correlation between decode(z) and the
    real catalog image of the top item by each match mode, beside a random item and the
    pixel-nearest catalog image (the best any ranking could show), and |z - mu(decode(z))|.
    Returns the report section and, for the pictures, {source: (z, top rows by mode)}.
    """
    rng = np.random.default_rng(seed + 1)
    section = {"queries_per_source": n, "range": a, "seed": seed,
               "measure": "Pearson correlation of pixels, decode(z) vs the top item's "
                          "catalog image: median and quartiles", "sources": {}}
    tops = {}
    for source, z in slider_queries(rt.latent_dim, n, a, seed).items():
        _log(log, f"slider scenario: {n} z from {source}")
        decoded = rt.decode(z)
        rows = {by: rt.nearest(z, k=1, by=by).rows[:, 0] for by in ("latent", "decoded")}
        rows["random"] = rng.integers(0, len(catalog_images), n)
        rows["pixel_nearest"] = pixel_neighbours(decoded, catalog_images, 1)[:, 0]
        section["sources"][source] = {
            name: _quartiles(pixel_correlation(decoded, catalog_images[r]))
            for name, r in rows.items()
        } | {
            "distance": _quartiles(rt.roundtrip_distance(z)),
            "distinct_top_items": {by: int(np.unique(rows[by]).size)
                                   for by in ("latent", "decoded")},
        }
        tops[source] = (z, rows)
    return section, tops


# ----------------------------------------------------------------------------- likelihoods


class TorchDecoder:
    """log p(x|z) from the checkpoint's decoder logits (exact Bernoulli likelihood)."""

    name = "pytorch-checkpoint"

    def __init__(self, checkpoint: dict):
        from ..training.train import model_from_checkpoint

        self.model = model_from_checkpoint(checkpoint)

    def log_px_given_z(self, x: np.ndarray, z: np.ndarray) -> np.ndarray:
        """x (B, 784) float in [0,1], z (B, K, d) -> (B, K) float64."""
        import torch
        import torch.nn.functional as F

        b, k, d = z.shape
        with torch.no_grad():
            flat = torch.from_numpy(z.reshape(b * k, d).astype(np.float32))
            logits = self.model.decode_logits(flat)
            target = torch.from_numpy(np.repeat(x, k, axis=0).astype(np.float32))
            nll = F.binary_cross_entropy_with_logits(
                logits.reshape(b * k, -1), target, reduction="none").sum(1)
        return -nll.numpy().astype(np.float64).reshape(b, k)


class OnnxDecoder:
    """log p(x|z) from decoder.onnx's probabilities, clipped to float32's resolution."""

    name = "onnx-decoder"

    def __init__(self, rt: Runtime):
        self.rt = rt

    def log_px_given_z(self, x: np.ndarray, z: np.ndarray) -> np.ndarray:
        b, k, d = z.shape
        p = self.rt.decode(z.reshape(b * k, d)).reshape(b, k, -1).astype(np.float64)
        p = np.clip(p, ONNX_P_MIN, ONNX_P_MAX)
        x = x[:, None, :].astype(np.float64)
        return (x * np.log(p) + (1.0 - x) * np.log1p(-p)).sum(axis=2)


def importance_sampled(decoder, x: np.ndarray, mu: np.ndarray, log_sigma: np.ndarray,
                       samples: int, seed: int, chunk: int = 20, log=None) -> dict:
    """Per-image IS log-likelihood, sampled reconstruction and KL (float64 arrays, nats).

    x: (B, 784) in [0, 1]; mu, log_sigma: (B, d) of q(z|x). Every image gets its own
    `samples` draws; the draws are a function of (seed, image position) only.
    """
    rng = np.random.default_rng(seed)
    n, d = mu.shape
    log_px = np.empty(n)
    recon = np.empty(n)
    started = time.perf_counter()
    for start in range(0, n, chunk):
        m = mu[start : start + chunk].astype(np.float64)
        ls = log_sigma[start : start + chunk].astype(np.float64)
        eps = rng.standard_normal((len(m), samples, d))
        z = m[:, None, :] + np.exp(ls)[:, None, :] * eps
        log_p_x_z = decoder.log_px_given_z(x[start : start + chunk], z.astype(np.float32))
        log_prior = -0.5 * (z * z).sum(axis=2) - 0.5 * d * LOG_2PI
        log_q = -0.5 * (eps * eps).sum(axis=2) - ls.sum(axis=1)[:, None] - 0.5 * d * LOG_2PI
        log_w = log_p_x_z + log_prior - log_q  # (b, K)
        top = log_w.max(axis=1)
        log_px[start : start + chunk] = (
            top + np.log(np.exp(log_w - top[:, None]).mean(axis=1)))
        recon[start : start + chunk] = -log_p_x_z.mean(axis=1)
        if log is not None and (start // chunk) % 25 == 24:
            _log(log, f"  importance sampling: {min(start + chunk, n)}/{n} images "
                      f"({time.perf_counter() - started:.0f}s)")
    kl = kl_to_prior(mu.astype(np.float64), 2 * log_sigma.astype(np.float64), np.exp)
    return {"log_px": log_px, "recon": recon, "kl": kl}


def _bce_at_mu(decoder, x: np.ndarray, mu: np.ndarray, batch: int = 500) -> np.ndarray:
    out = np.empty(len(mu))
    for start in range(0, len(mu), batch):
        z = mu[start : start + batch, None, :].astype(np.float32)
        out[start : start + batch] = -decoder.log_px_given_z(x[start : start + batch], z)[:, 0]
    return out


# ----------------------------------------------------------------------------- checks


def check_checkpoint_matches(checkpoint: dict, rt: Runtime, images: np.ndarray,
                             checkpoint_path: Path, tolerance: float = 1e-3) -> float:
    """The checkpoint's encoder must give the bundle's index (float16) for its first items."""
    import torch

    from ..training.train import model_from_checkpoint, to_tensor

    config = rt.manifest.get("model_config")
    if config is not None and checkpoint["config"] != config:
        raise ValueError(
            f"checkpoint {checkpoint_path} has model config {checkpoint['config']}, but the "
            f"bundle {rt.root} was exported from {config}"
        )
    model = model_from_checkpoint(checkpoint)
    with torch.no_grad():
        mu, _ = model.encode(to_tensor(images))
    stored = rt.index.mu[: len(images)].astype(np.float32)
    # float16 keeps 11 significant bits: compare relative to the value's size.
    diff = float(np.max(np.abs(mu.numpy() - stored) / (1.0 + np.abs(stored))))
    if not diff <= tolerance:
        raise ValueError(
            f"checkpoint {checkpoint_path} is not the model of bundle {rt.root}: its mu of the "
            f"first catalog items differs from the index by {diff:.3g} (tolerance {tolerance:g})"
        )
    return diff


def _catalog_split(rt: Runtime, data_dir, catalog_split: Split | None) -> tuple[str, Split]:
    catalog = str(rt.manifest["index"].get("catalog", "fashion-mnist/train"))
    name = catalog.rsplit("/", 1)[-1]
    if name not in ("train", "test"):
        raise ValueError(f"bundle catalog {catalog!r} is not a Fashion-MNIST split (train/test)")
    return name, catalog_split or load_split(name, data_dir)


# ----------------------------------------------------------------------------- main entry


def evaluate_bundle(
    bundle: str | Path,
    out_dir: str | Path,
    checkpoint: str | Path | None = None,
    config: EvalConfig | None = None,
    data_dir: str | Path | None = None,
    force: bool = False,
    log=print,
    test_split: Split | None = None,
    catalog_split: Split | None = None,
) -> dict:
    """Evaluate `bundle` on the test set: OUT/report.json and OUT/pictures/. Returns the report."""
    config = config or EvalConfig()
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists: pass --force to replace it")
    started = time.perf_counter()
    rt = Runtime.load(bundle, threads=config.threads)
    ckpt = None if checkpoint is None else _load_checkpoint(checkpoint)
    catalog_name, catalog_images = _catalog_images(rt, data_dir, catalog_split)
    test = test_split or load_split("test", data_dir)
    images = test.images[: config.test_limit]
    labels = test.labels[: config.test_limit].astype(np.int64)
    report = _report_header(rt, checkpoint, config, catalog_name, len(images))
    if ckpt is not None:
        report["checkpoint_vs_index_max_rel_diff"] = check_checkpoint_matches(
            ckpt, rt, catalog_images[:64], Path(checkpoint))

    _log(log, f"encoding {len(images)} test images with encoder.onnx")
    mu, log_sigma, x, decoded = _encode_test_images(rt, images)
    variances = mu.astype(np.float64).var(axis=0)
    report |= _coding_figures(x, decoded, variances)
    report["retrieval"], rows_lik, rows_pix = _retrieval(rt, images, labels, mu, catalog_images,
                                                         config, log)

    slider_tops = None
    if config.slider_queries:
        report["slider_scenario"], slider_tops = slider_scenario(
            rt, catalog_images, config.slider_queries, config.slider_range, config.seed, log=log)

    decoder = TorchDecoder(ckpt) if ckpt is not None else OnnxDecoder(rt)
    report["likelihood"] = _likelihood(decoder, x, mu, log_sigma, config, log)

    with atomic_directory(out_dir) as tmp:
        if config.pictures:
            _log(log, "pictures")
            from . import pictures as drawing

            pictures = tmp / PICTURES_DIR
            pictures.mkdir()
            report["pictures"] = drawing.draw_all(
                pictures, rt=rt, history=None if ckpt is None else ckpt["history"],
                test_images=images, test_labels=labels, rows=rows_lik,
                pixel_rows=rows_pix, catalog_images=catalog_images, variances=variances,
                seed=config.seed, slider_tops=slider_tops)
        report["seconds"] = round(time.perf_counter() - started, 1)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    _log(log, summary(report))
    return report


def _load_checkpoint(path):
    from ..training.train import load_checkpoint  # torch: only where a checkpoint is given

    return load_checkpoint(path)


def _catalog_images(rt: Runtime, data_dir, catalog_split: Split | None
                    ) -> tuple[str, np.ndarray]:
    """The name of the Fashion-MNIST split the bundle indexes and its images in index order,
    once the bundle's ids and labels are that split's."""
    catalog_name, catalog = _catalog_split(rt, data_dir, catalog_split)
    ids = rt.index.ids.astype(np.int64)  # a Fashion-MNIST bundle's ids are rows of its split
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= len(catalog):
        raise ValueError(
            f"bundle ids fall outside the {catalog_name} split (0..{len(catalog) - 1})")
    if not np.array_equal(catalog.labels[ids].astype(np.int64), rt.index.labels.astype(np.int64)):
        raise ValueError(f"bundle labels differ from the {catalog_name} split's labels of its ids")
    return catalog_name, catalog.images[ids]


def _report_header(rt: Runtime, checkpoint, config: EvalConfig, catalog_name: str,
                   test_images: int) -> dict:
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bundle": str(rt.root),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "config": asdict(config),
        "model_config": rt.manifest.get("model_config"),
        "training": rt.manifest.get("training"),
        "epochs_trained": rt.manifest.get("epochs_trained"),
        "latent_dim": rt.latent_dim,
        "catalog": {"split": catalog_name, "size": len(rt.index)},
        "test_images": test_images,
        "bundle_bytes": int(sum(p.stat().st_size for p in Path(rt.root).iterdir() if p.is_file())),
        "index_floats_per_item": {"mu": rt.latent_dim, "log_sigma": rt.latent_dim,
                                  "dtype": str(rt.index.mu.dtype)},
    }


def _encode_test_images(rt: Runtime, images: np.ndarray, batch: int = 1000):
    """mu and log_sigma of each image, its pixels x in [0, 1] and decode(mu), both (N, 784)."""
    mu = np.empty((len(images), rt.latent_dim), dtype=np.float32)
    log_sigma = np.empty_like(mu)
    decoded = np.empty((len(images), 28 * 28), dtype=np.float32)
    for start in range(0, len(images), batch):
        m, s = rt.encode(images[start : start + batch])
        mu[start : start + batch], log_sigma[start : start + batch] = m, s
        decoded[start : start + batch] = rt.decode(m).reshape(len(m), -1)
    x = images.reshape(len(images), -1).astype(np.float32) / 255.0
    return mu, log_sigma, x, decoded


def _coding_figures(x: np.ndarray, decoded: np.ndarray, variances: np.ndarray) -> dict:
    return {
        "reconstruction_mse": float(np.mean((decoded - x) ** 2)),
        "active_units": {
            "count": int((variances > ACTIVE_UNIT_THRESHOLD).sum()),
            "threshold": ACTIVE_UNIT_THRESHOLD,
            "variance_of_mu": [round(float(v), 5) for v in variances],
        },
    }


def _retrieval(rt: Runtime, images: np.ndarray, labels: np.ndarray, mu: np.ndarray,
               catalog_images: np.ndarray, config: EvalConfig, log):
    """The retrieval figures of both runtime searches (and the raw-pixel baseline), with the
    catalog rows each found for each test image: (figures, likelihood rows, pixel rows)."""
    k = min(RETRIEVAL_K, len(rt.index))
    _log(log, f"retrieval: rt.nearest on {len(images)} test mu over {len(rt.index)} items")
    t0 = time.perf_counter()
    rows_lik = search_rows(rt.nearest, mu, k, config.query_batch, "likelihood search", log=log)
    seconds_lik = time.perf_counter() - t0
    _log(log, f"retrieval: rt.nearest_image on {len(images)} test images")
    t0 = time.perf_counter()
    rows_exp = search_rows(rt.nearest_image, images, k, config.query_batch,
                           "photo search", log=log)
    seconds_exp = time.perf_counter() - t0
    cat_labels, n_classes = rt.index.labels.astype(np.int64), len(rt.label_names)
    figures = {
        "likelihood_mu": label_metrics(cat_labels[rows_lik], labels, n_classes)
        | {"engine": "runtime Runtime.nearest (log q(mu_test | x_item), float16 index)",
           "seconds": round(seconds_lik, 1)},
        "photo": label_metrics(cat_labels[rows_exp], labels, n_classes)
        | {"engine": "runtime Runtime.nearest_image (-W2^2 between q(z|x_test) and "
                     "q(z|x_item), float16 index)", "seconds": round(seconds_exp, 1)},
    }
    rows_pix = None
    if config.baseline:
        _log(log, "retrieval: raw-pixel L2 baseline over the same catalog")
        t0 = time.perf_counter()
        rows_pix = pixel_neighbours(images, catalog_images, k, log=log)
        seconds_pix = time.perf_counter() - t0
        figures["pixels_l2"] = label_metrics(cat_labels[rows_pix], labels, n_classes) | {
            "engine": "numpy float32, raw pixels in [0, 1]", "seconds": round(seconds_pix, 1)}
    return figures, rows_lik, rows_pix


def _likelihood(decoder, x: np.ndarray, mu: np.ndarray, log_sigma: np.ndarray,
                config: EvalConfig, log) -> dict:
    """The loss parts at mu over every test image, and the ELBO and importance-sampled
    log-likelihood over the first config.is_images."""
    _log(log, f"loss parts ({decoder.name})")
    bce_mu = _bce_at_mu(decoder, x, mu)
    kl = kl_to_prior(mu.astype(np.float64), 2 * log_sigma.astype(np.float64), np.exp)
    n_is = len(x) if config.is_images is None else min(config.is_images, len(x))
    _log(log, f"importance-sampled log-likelihood: {n_is} images x {config.is_samples} samples")
    t0 = time.perf_counter()
    iw = importance_sampled(decoder, x[:n_is], mu[:n_is], log_sigma[:n_is], config.is_samples,
                            config.seed, log=log)
    return {
        "backend": decoder.name,
        "units": "nats per image; Bernoulli likelihood of grey levels in [0, 1]",
        "images": len(x),
        "recon_at_mu": float(bce_mu.mean()),
        "kl": float(kl.mean()),
        "loss_at_mu": float(bce_mu.mean() + kl.mean()),
        "is_images": n_is,
        "is_samples": config.is_samples,
        "recon": float(iw["recon"].mean()),
        "kl_is_images": float(iw["kl"].mean()),
        "negative_elbo": float(iw["recon"].mean() + iw["kl"].mean()),
        "negative_log_likelihood_is": float(-iw["log_px"].mean()),
        "negative_log_likelihood_is_stderr": float(iw["log_px"].std(ddof=1) / math.sqrt(n_is))
        if n_is > 1 else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def summary(report: dict) -> str:
    """A few lines for the terminal."""
    r = report["retrieval"]
    lik = report["likelihood"]
    lines = [
        f"test images {report['test_images']}, catalog {report['catalog']['size']} "
        f"({report['catalog']['split']}), d = {report['latent_dim']}, "
        f"bundle {report['bundle_bytes'] / 1e6:.2f} MB",
        f"{'retrieval':<28}{'1-NN':>8}{'kNN-5':>8}{'P@10':>8}",
    ]
    for key, name in (("likelihood_mu", "likelihood search (mu)"),
                      ("photo", "photo search (W2)"),
                      ("pixels_l2", "raw pixels L2 (baseline)")):
        if key not in r:
            continue
        m = r[key]
        p = next(v for key_, v in m.items() if key_.startswith("precision_at_"))
        lines.append(f"{name:<28}{m['nn1']:>8.4f}{m['knn5']:>8.4f}{p:>8.4f}")
    lines.append(
        f"nats/image ({lik['backend']}): recon@mu {lik['recon_at_mu']:.2f}  KL {lik['kl']:.2f}  "
        f"-ELBO {lik['negative_elbo']:.2f}  -log p(x) IS(K={lik['is_samples']}, "
        f"{lik['is_images']} images) {lik['negative_log_likelihood_is']:.2f}")
    lines.append(f"reconstruction MSE {report['reconstruction_mse']:.5f}  active units "
                 f"{report['active_units']['count']}/{report['latent_dim']}")
    if "slider_scenario" in report:
        lines.append("slider scenario: pixel correlation of decode(z) and the top item, median")
        lines.append(f"{'z from':<12}{'latent':>8}{'decoded':>9}{'random':>8}{'pixel-NN':>10}"
                     f"{'|z - mu(dec z)|':>17}")
        for source, row in report["slider_scenario"]["sources"].items():
            lines.append(f"{source:<12}" + "".join(
                f"{row[name]['median']:>{width}.3f}" for name, width in
                (("latent", 8), ("decoded", 9), ("random", 8), ("pixel_nearest", 10),
                 ("distance", 17))))
    return "\n".join(lines)
