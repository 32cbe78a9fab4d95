"""`vae-eval --catalog CSV`: how a bundle trained on any shop catalog matches, through the runtime.

- The slider scenario: z from N(0, I), uniform in [-A, A]^d and the corners {-A, A}^d, each
  matched by every mode of Runtime.nearest; r = Pearson correlation of the pixels of decode(z)
  and of the top item's fitted photo (median), beside the best r any item reaches (the bound),
  r / bound, and the share of queries whose top item is a distinct item (distinct top items /
  queries).
- Photo queries: each item's own fitted photo through Runtime.nearest_image; label agreement of
  the nearest other item, beside raw-pixel L2 (the item itself left out of both), and
  self-retrieval: the share of items ranked first for their own photo, or behind an item whose
  fitted photo is pixel for pixel the same.
- Held-out items (the manifest's dataset.holdout_ids, the items training left out): loss parts
  at mu, the negative ELBO and the importance-sampled -log p(x) of their fitted photos, in nats
  per image, from decoder.onnx (evaluation/report.py's likelihoods); null for a bundle whose
  manifest records none.
- A picture sheet per match mode: decoded designs, then their top matches; and a grid of
  decodes of z ~ N(0, I), whether samples of the prior look like catalog items.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..runtime.atomic import atomic_directory
from ..runtime.catalog import fit_catalog, read_catalog
from ..runtime.checks import MATCH_MODES
from ..runtime.core import Runtime
from ..runtime.images import save_png
from .pictures import prior_grid
from .report import (
    PICTURES_DIR,
    REPORT_NAME,
    EvalConfig,
    OnnxDecoder,
    _likelihood,
    _log,
    _quartiles,
    pixel_correlation,
    unit_pixels,
)
from .report import slider_queries as slider_positions

BATCH = 250
SHEET_MATCHES = 5
# Importance sampling costs images x samples decodes: bounded so that a large shop's held-out
# tenth stays about a minute's work at 64x64x3 on 2 cores.
HELD_OUT_IS_IMAGES = 500
HELD_OUT_IS_SAMPLES = 50
HELD_OUT_UNITS = ("nats per image; Bernoulli likelihood of the colour levels in [0, 1], summed "
                  "over pixels and channels")


def catalog_images(rt: Runtime, csv_path: str | Path) -> np.ndarray:
    """The bundle's items' photos fitted as training fits them, (N, C, H, W) uint8, in the
    order of the bundle's index. ValueError names the bundle items the CSV lacks."""
    channels, size, _ = rt.image_shape
    catalog, images, _ = fit_catalog(read_catalog(csv_path, skip_bad=True), size, channels,
                                     skip_bad=True)
    position = {item: i for i, item in enumerate(catalog.ids)}
    missing = [str(item) for item in rt.index.ids if str(item) not in position]
    if missing:
        raise ValueError(f"{csv_path}: {len(missing)} of the bundle's {len(rt.index)} items "
                         f"have no readable photo there (first: {missing[0]!r}); expected the "
                         "catalog CSV the bundle was exported from")
    return images[np.array([position[str(item)] for item in rt.index.ids])]


def pixel_nearest(queries: np.ndarray, catalog: np.ndarray, exclude: np.ndarray | None = None,
                  chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per query: the catalog row nearest by raw-pixel L2, and the best pixel correlation any
    row reaches; exclude[i] is a row left out for query i."""
    c = unit_pixels(catalog).astype(np.float64)
    c_sq = (c * c).sum(1)
    centred = c - c.mean(1, keepdims=True)
    centred /= np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-300)
    top, bound = np.empty(len(queries), dtype=np.int64), np.empty(len(queries))
    for lo in range(0, len(queries), chunk):
        q = unit_pixels(queries[lo:lo + chunk]).astype(np.float64)
        near = 2.0 * q @ c.T - c_sq
        qc = q - q.mean(1, keepdims=True)
        qc /= np.maximum(np.linalg.norm(qc, axis=1, keepdims=True), 1e-300)
        correlation = qc @ centred.T
        if exclude is not None:
            near[np.arange(len(q)), exclude[lo:lo + chunk]] = -np.inf
            correlation[np.arange(len(q)), exclude[lo:lo + chunk]] = -np.inf
        top[lo:lo + chunk] = near.argmax(1)
        bound[lo:lo + chunk] = correlation.max(1)
    return top, bound


def slider_scenario(rt: Runtime, images: np.ndarray, n: int, a: float, seed: int, log=None):
    """The report section and, for the sheets, {source: (z, {mode: top k rows})}."""
    section, tops = {}, {}
    for source, z in slider_positions(rt.latent_dim, n, a, seed).items():
        _log(log, f"slider scenario: {n} z from {source}")
        decoded = np.concatenate([rt.decode(z[lo:lo + BATCH]) for lo in range(0, n, BATCH)])
        _, bound = pixel_nearest(decoded, images)
        rows = {by: np.concatenate([rt.nearest(z[lo:lo + BATCH], k=SHEET_MATCHES, by=by).rows
                                    for lo in range(0, n, BATCH)]) for by in MATCH_MODES}
        entry = {"bound": _quartiles(bound)}
        for by, ranked in rows.items():
            r = pixel_correlation(decoded, images[ranked[:, 0]])
            entry[by] = _quartiles(r) | {
                "of_bound": round(float(np.median(r) / np.median(bound)), 4),
                "distinct_top_items": round(np.unique(ranked[:, 0]).size / n, 4)}
        section[source] = entry
        tops[source] = (z, rows)
    return section, tops


def photo_queries(rt: Runtime, images: np.ndarray, n: int | None, seed: int, log=None) -> dict:
    rows = np.arange(len(images))
    if n is not None and n < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, n, replace=False))
    _log(log, f"photo queries: {len(rows)} items' own photos")
    labels = rt.index.labels
    flat = images.reshape(len(images), -1)
    first, other = np.empty(len(rows), np.int64), np.empty(len(rows), np.int64)
    for lo in range(0, len(rows), BATCH):
        ranked = rt.nearest_image(images[rows[lo:lo + BATCH]], k=2).rows
        first[lo:lo + BATCH] = ranked[:, 0]
        itself = ranked[:, 0] == rows[lo:lo + BATCH]
        other[lo:lo + BATCH] = np.where(itself, ranked[:, 1], ranked[:, 0])
    pixel_other, _ = pixel_nearest(images[rows], images, exclude=rows)
    same_photo = (flat[first] == flat[rows]).all(axis=1)
    return {"queries": int(len(rows)),
            "label_agreement": round(float((labels[other] == labels[rows]).mean()), 4),
            "label_agreement_pixel_l2": round(
                float((labels[pixel_other] == labels[rows]).mean()), 4),
            "self_retrieval": round(float(same_photo.mean()), 4)}


def held_out(rt: Runtime, images: np.ndarray, is_images: int | None, is_samples: int,
             seed: int, log=None) -> dict | None:
    """The likelihood figures of the held-out items' fitted photos (evaluation/report.py's
    _likelihood), or None where the manifest records no holdout_ids or none is in the index."""
    ids = (rt.manifest.get("dataset") or {}).get("holdout_ids")
    if not ids:
        _log(log, "held-out ELBO: the manifest records no holdout_ids; held_out is null")
        return None
    wanted = {str(item) for item in ids}
    rows = np.flatnonzero([str(item) in wanted for item in rt.index.ids])
    if rows.size == 0:
        _log(log, f"held-out ELBO: none of the manifest's {len(wanted)} holdout_ids is in the "
                  "bundle's index; held_out is null")
        return None
    _log(log, f"held-out ELBO: {rows.size} of the manifest's {len(wanted)} held-out items")
    photos = images[rows]
    codes = [rt.encode(photos[lo:lo + BATCH]) for lo in range(0, len(photos), BATCH)]
    mu = np.concatenate([m for m, _ in codes])
    log_sigma = np.concatenate([s for _, s in codes])
    x = photos.reshape(len(photos), -1).astype(np.float32) / 255.0
    config = EvalConfig(is_images=is_images, is_samples=is_samples, seed=seed)
    section = _likelihood(OnnxDecoder(rt), x, mu, log_sigma, config, log)
    return section | {"units": HELD_OUT_UNITS, "holdout_ids": len(wanted)}


def sheet(path: Path, rt: Runtime, images: np.ndarray, tops: dict, by: str,
          per_source: int = 4) -> str:
    """One row per design: decode(z) | gap | its top matches' fitted photos."""
    channels, size, _ = rt.image_shape
    pad = 4
    lines = [(z[i], rows[by][i]) for z, rows in tops.values() for i in range(per_source)]
    width = (SHEET_MATCHES + 1) * (size + pad) + 3 * pad
    canvas = np.full((channels, len(lines) * (size + pad) + pad, width), 0.6, np.float32)
    for r, (z, ranked) in enumerate(lines):
        y = pad + r * (size + pad)
        canvas[:, y:y + size, pad:pad + size] = rt.decode(z)
        for c, row in enumerate(ranked[:SHEET_MATCHES]):
            x = 4 * pad + (c + 1) * (size + pad)
            canvas[:, y:y + size, x:x + size] = images[row] / 255.0
    save_png(path, canvas)
    return path.name


def evaluate_catalog_bundle(bundle, csv_path, out_dir, *, queries: int = 250,
                            slider_range: float = 5.0, photos: int | None = None,
                            seed: int = 0, threads: int = 2, pictures: bool = True,
                            is_images: int | None = HELD_OUT_IS_IMAGES,
                            is_samples: int = HELD_OUT_IS_SAMPLES, force: bool = False,
                            log=None) -> dict:
    """Write OUT/report.json (and OUT/pictures/: slider_<mode>.png, prior_samples.png); returns
    the report. is_images, is_samples: importance sampling of the held-out items' likelihood on
    the first is_images of them (None: all), is_samples z each."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists: pass --force to replace it")
    rt = Runtime.load(bundle, threads=threads)
    images = catalog_images(rt, csv_path)
    report = {"bundle": str(rt.root), "catalog": str(csv_path), "items": len(images),
              "image_shape": list(rt.image_shape), "latent_dim": rt.latent_dim,
              "seed": seed, "slider_range": slider_range, "queries_per_source": queries}
    report["slider_scenario"], tops = slider_scenario(rt, images, queries, slider_range, seed,
                                                      log)
    report["photo_queries"] = photo_queries(rt, images, photos, seed, log)
    report["held_out"] = held_out(rt, images, is_images, is_samples, seed, log)
    with atomic_directory(out) as staging:
        if pictures:
            (staging / PICTURES_DIR).mkdir()
            report["pictures"] = {by: sheet(staging / PICTURES_DIR / f"slider_{by}.png", rt,
                                            images, tops, by) for by in MATCH_MODES}
            prior = save_png(staging / PICTURES_DIR / "prior_samples.png", prior_grid(rt, seed))
            report["pictures"]["prior_samples"] = prior.name
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


def summary(report: dict) -> str:
    lines = [f"{report['items']} items, d = {report['latent_dim']}"]
    for source, entry in report["slider_scenario"].items():
        for by in MATCH_MODES:
            lines.append(f"slider {source:8s} by {by:8s} r {entry[by]['median']:.3f} "
                         f"({entry[by]['of_bound']:.2f} of bound {entry['bound']['median']:.3f})"
                         f", distinct top items {entry[by]['distinct_top_items']:.2f}")
    photo = report["photo_queries"]
    lines.append(f"photos: label agreement {photo['label_agreement']:.3f} (raw-pixel L2 "
                 f"{photo['label_agreement_pixel_l2']:.3f}), self-retrieval "
                 f"{photo['self_retrieval']:.3f}")
    held = report["held_out"]
    lines.append("held out: none (no holdout_ids of the manifest in the index)" if held is None else
                 f"held out: {held['images']} items, nats/image: -ELBO "
                 f"{held['negative_elbo']:.2f}, -log p(x) IS(K={held['is_samples']}, "
                 f"{held['is_images']} items) {held['negative_log_likelihood_is']:.2f}")
    return "\n".join(lines)
