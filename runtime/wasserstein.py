"""Exact search by the 2-Wasserstein distance between Gaussian posteriors (docs/matching.md):
the likelihood engine's float32 bound and float64 rescoring (runtime/search.py) over other item
vectors, and the scale tau^2 of its probabilities, which shards of one catalog agree on."""

from __future__ import annotations

import math

import numpy as np

from .search import LikelihoodSearch, Matches


def log_sigma_counts(log_sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of log_sigma (float32, ascending) and how often each occurs: what
    tau^2 needs of a catalog, and what shards of one catalog add up (merge_counts)."""
    return np.unique(np.asarray(log_sigma, dtype=np.float32), return_counts=True)


def merge_counts(parts) -> tuple[np.ndarray, np.ndarray]:
    """log_sigma_counts of a catalog from its shards' (values, counts) pairs."""
    values, inverse = np.unique(np.concatenate([v for v, _ in parts]), return_inverse=True)
    return values, np.bincount(inverse, weights=np.concatenate([c for _, c in parts]),
                               minlength=values.size).astype(np.int64)


def temperature_of(values: np.ndarray, counts: np.ndarray) -> float:
    """tau^2 = exp(2 median(log sigma)) over items and dimensions, from log_sigma_counts: the
    median as np.median takes it of the float32 values (the mean of the two middle ones for an
    even count; float32 holds every float16 and the mean of two of them exactly), 1 for an
    empty catalog."""
    total = int(counts.sum())
    if total == 0:
        return 1.0
    ends = np.cumsum(counts)
    middle = values[np.searchsorted(ends, [(total - 1) // 2, total // 2], side="right")]
    return math.exp(2.0 * float(np.mean(middle, dtype=np.float32)))


class WassersteinSearch(LikelihoodSearch):
    """Exact search by the 2-Wasserstein distance between a query's posterior N(m, s^2) and
    each item's N(mu, sigma^2) (docs/matching.md):

        score = -W2^2 / (2 tau^2) = -(|m - mu|^2 + |s - sigma|^2) / (2 tau^2)

    Unlike log q and the expected log-likelihood, it does not reward an item for a broad
    posterior: a broad item is as far from a sharp query as a sharp item an equal distance
    away. tau^2 = exp(2 median(log sigma)) over items and dimensions (`temperature`), the
    catalog's median posterior variance, sets the scale of the probabilities, the softmax of
    the scores over the catalog: p(x) is each item's share if the query's posterior were an
    item's moved by noise as wide as a typical item's posterior. Without it p would spread
    over most of a large catalog, and every query would rescore most items in float64.
    As an inner product: w(x) = [mu, sigma, -(|mu|^2 + |sigma|^2) / 2, 1] / tau^2 and
    q = [m, s, 1, -(|m|^2 + |s|^2) / 2], m = 2d + 2 terms; the error bound, the rescoring in
    float64, the label filter and the probabilities are the likelihood engine's, steps 1 to 3
    of the module docstring.
    """

    def __init__(self, mu: np.ndarray, log_sigma: np.ndarray, ids: np.ndarray,
                 labels: np.ndarray, temperature: float | None = None) -> None:
        """temperature: tau^2; by default this catalog's own. A shard of a larger catalog takes
        the whole catalog's (temperature_of, from every shard's log_sigma_counts) so that its
        scores are the whole catalog's."""
        self.temperature = temperature_of(*log_sigma_counts(log_sigma)) \
            if temperature is None else float(temperature)
        super().__init__(mu, log_sigma, ids, labels)

    @staticmethod
    def _width(d: int) -> int:
        return 2 * d + 2

    def _item_vectors(self, mu: np.ndarray, log_sigma: np.ndarray) -> np.ndarray:
        mu = np.asarray(mu, dtype=np.float64)
        sigma = np.exp(np.asarray(log_sigma, dtype=np.float64))
        c = -0.5 * ((mu * mu).sum(axis=1, keepdims=True) + (sigma * sigma).sum(axis=1,
                                                                             keepdims=True))
        w = np.concatenate((mu, sigma, c, np.ones_like(c)), axis=1) / self.temperature
        if not np.isfinite(w.astype(np.float32)).all():
            row = int(np.flatnonzero(~np.isfinite(w.astype(np.float32)).all(axis=1))[0])
            raise ValueError(f"catalog item at row {row} does not fit float32 item vectors "
                             f"(|mu| max {float(np.abs(mu[row]).max()):.4g}, log_sigma max "
                             f"{float(np.log(sigma[row]).max()):.4g}): expected |mu|^2 + "
                             "sigma^2 below 1e38")
        return w.astype(np.float32)

    @staticmethod
    def _features(m: np.ndarray, s: np.ndarray | None) -> np.ndarray:
        d = m.shape[-1]
        features = np.empty(m.shape[:-1] + (2 * d + 2,))
        features[..., :d], features[..., d:2 * d], features[..., 2 * d] = m, s, 1.0
        features[..., 2 * d + 1] = -0.5 * np.einsum("...m,...m->...", features[..., :2 * d],
                                                    features[..., :2 * d])
        return features

    def search(self, z, k: int, label: int | None = None) -> Matches:
        """A point z: its distance to each item's posterior, N(z, 0) against N(mu, sigma^2)."""
        z = np.asarray(z, dtype=np.float64)
        return self._run(z, np.zeros_like(z), k, label)

    def search_gaussian(self, mu, log_sigma, k: int, label: int | None = None) -> Matches:
        """Rank by -W2^2 / (2 tau^2) between N(mu, sigma^2), (d,) or (B, d), and each item."""
        mu = np.asarray(mu, dtype=np.float64)
        return self._run(mu, self.spread(log_sigma), k, label)

    @staticmethod
    def spread(log_sigma: np.ndarray) -> np.ndarray:
        """sigma, float64: the W2 score compares standard deviations."""
        return np.exp(np.asarray(log_sigma, dtype=np.float64))

    def _exact_scores(self, m, s, rows) -> np.ndarray:
        """-(|m - mu|^2 + |s - sigma|^2) / (2 tau^2) in float64 for the items `rows` and their
        queries m, s: (len(rows), d) or one (d,) for all: (len(rows),)."""
        mean = self._mu.take(rows, axis=0).astype(np.float64)
        mean -= m
        spread = np.exp(self._log_sigma.take(rows, axis=0).astype(np.float64))
        spread -= s
        mean *= mean
        spread *= spread
        mean += spread  # one sum over the d terms of both
        return mean.sum(axis=1) * (-0.5 / self.temperature)
