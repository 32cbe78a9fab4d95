"""Compare ways to rank catalog items for a designed garment and for a photo, side by side.

Every ranking compares two diagonal Gaussians: the query's posterior N(m, s^2) (the garment
decode(z) encoded again, or a photo encoded) and each item's N(mu, sigma^2), in float64 over
the bundle's float16 index:

    elogl   E_{z ~ N(m, s^2)} log q(z|x)   (the same order as -KL(query || item))
    w2      -(|m - mu|^2 + |s - sigma|^2)   (2-Wasserstein distance, squared)
    mean    -|m - mu|^2
    bhatt   -Bhattacharyya distance
    kl_rev  -KL(item || query)
    latent  log q(z|x) of the slider z itself (designs only)

Designs: z from N(0, I), uniform in [-A, A]^d and the corners {-A, A}^d (the corners are
vae-eval's, seed for seed); r = pixel correlation of decode(z) and the top item's fitted photo
(median), beside the best r any item reaches ("bound"), and the share of queries whose first
item no other query has first ("distinct"). Then w2 against elogl on the same designs: the
difference of their median r with a 95% interval from 2,000 paired bootstrap resamples, and
their mean r. Photos: each catalog item's own photo, itself left out; label agreement of the
nearest other item, beside raw-pixel L2.

    python benchmarks/rankings.py --bundle runs/recipes/default/bundle \\
        --catalog runs/real/catalog.csv
    python benchmarks/rankings.py            # the shipped model, Fashion-MNIST training images
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from vae_edge.evaluation.catalog import catalog_images as bundle_photos
from vae_edge.evaluation.catalog import pixel_nearest
from vae_edge.evaluation.report import pixel_correlation, slider_queries
from vae_edge.runtime.core import Runtime

RANKINGS = ("elogl", "w2", "mean", "bhatt", "kl_rev")


def scores(name: str, m, s, mu, sigma) -> np.ndarray:
    """(B, N) float64 scores, higher is better, for query posteriors (B, d), items (N, d)."""
    diff2 = (m[:, None, :] - mu[None]) ** 2
    s, sigma = s[:, None, :], sigma[None]
    if name == "elogl":
        return -(0.5 * (diff2 + s**2) / sigma**2 + np.log(sigma)).sum(-1)
    if name == "w2":
        return -(diff2 + (s - sigma) ** 2).sum(-1)
    if name == "mean":
        return -diff2.sum(-1)
    if name == "bhatt":
        var = 0.5 * (s**2 + sigma**2)
        return -(diff2 / (8 * var) + 0.5 * np.log(var / (s * sigma))).sum(-1)
    if name == "kl_rev":
        return -(np.log(s / sigma) + (sigma**2 + diff2) / (2 * s**2) - 0.5).sum(-1)
    raise ValueError(name)


def ranked(name, m, s, mu, sigma, exclude=None) -> np.ndarray:
    """The top row per query by a ranking, optionally leaving out row exclude[i] for query i."""
    top = np.empty(len(m), dtype=np.int64)
    chunk = max(1, 4_000_000 // mu.size)  # (chunk, N, d) float64 temporaries of 32 MB
    for lo in range(0, len(m), chunk):
        block = scores(name, m[lo:lo + chunk], s[lo:lo + chunk], mu, sigma)
        if exclude is not None:
            block[np.arange(len(block)), exclude[lo:lo + chunk]] = -np.inf
        top[lo:lo + chunk] = block.argmax(axis=1)
    return top


def paired_difference(a: np.ndarray, b: np.ndarray, seed: int, resamples: int = 2000) -> dict:
    """median(a) - median(b) for r of the same designs, its 95% paired bootstrap interval, and
    both means."""
    picks = np.random.default_rng(seed).integers(0, len(a), (resamples, len(a)))
    spread = np.median(a[picks], axis=1) - np.median(b[picks], axis=1)
    return {"median_difference": round(float(np.median(a) - np.median(b)), 4),
            "ci95": [round(float(v), 4) for v in np.percentile(spread, [2.5, 97.5])],
            "mean": [round(float(a.mean()), 4), round(float(b.mean()), 4)]}


def catalog_images(rt: Runtime, csv_path: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's items' fitted photos (N, C, H, W) uint8 in index order, and their labels."""
    if csv_path is None:
        from vae_edge.training.data import load_split

        split = load_split("train")
        return split.images[rt.index.ids.astype(np.int64)][:, None], \
            rt.index.labels.astype(np.int64)
    return bundle_photos(rt, csv_path), rt.index.labels.astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--catalog", default=None, help="the bundle's catalog CSV "
                        "(default: Fashion-MNIST training images, for the shipped model)")
    parser.add_argument("--queries", type=int, default=250)
    parser.add_argument("--photos", type=int, default=2000, help="photo queries (0: none)")
    parser.add_argument("--range", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rt = Runtime.load(args.bundle)
    images, labels = catalog_images(rt, args.catalog)
    mu = rt.index.mu.astype(np.float64)
    sigma = np.exp(rt.index.log_sigma.astype(np.float64))
    rng = np.random.default_rng(args.seed)
    d, report = rt.latent_dim, {}
    corners = slider_queries(d, args.queries, args.range, args.seed)["corners"]
    for source, z in (("normal", rng.standard_normal((args.queries, d))),
                      ("uniform", rng.uniform(-args.range, args.range, (args.queries, d))),
                      ("corners", corners)):
        decoded = rt.decode(z)
        m, log_s = rt.encode(decoded)
        m, s = m.astype(np.float64), np.exp(log_s.astype(np.float64))
        _, bound = pixel_nearest(decoded, images)
        row = {"bound": float(np.median(bound))}
        tops = {name: ranked(name, m, s, mu, sigma) for name in RANKINGS}
        tops["latent"] = rt.nearest(z, k=1, by="latent").rows[:, 0]
        r = {name: pixel_correlation(decoded, images[top]) for name, top in tops.items()}
        for name, top in tops.items():
            row[name] = {"r": round(float(np.median(r[name])), 3),
                         "share": round(float(np.median(r[name]) / np.median(bound)), 3),
                         "distinct": round(np.unique(top).size / len(top), 3)}
        row["w2_vs_elogl"] = paired_difference(r["w2"], r["elogl"], args.seed)
        report[source] = row
        print(source, json.dumps(row))
    if args.photos:
        rows = np.sort(rng.choice(len(mu), min(args.photos, len(mu)), replace=False))
        # The photo's posterior as the runtime computes it (float32 encoder) from its pixels.
        m, log_s = rt.encode(images[rows])
        m, s = m.astype(np.float64), np.exp(log_s.astype(np.float64))
        row = {"pixel_l2": float((labels[pixel_nearest(images[rows], images, rows)[0]]
                                  == labels[rows]).mean())}
        for name in RANKINGS:
            top = ranked(name, m, s, mu, sigma, exclude=rows)
            row[name] = round(float((labels[top] == labels[rows]).mean()), 3)
        report["photos"] = row
        print("photos", json.dumps(row))


if __name__ == "__main__":
    main()
