"""Exact likelihood search over a catalog of diagonal Gaussians q(z|x).

For a query z and every catalog item x with posterior N(mu(x), sigma(x)^2):

    log q(z|x) = sum_i [ -(z_i - mu_i)^2 / (2 sigma_i^2) - log sigma_i ] - (d/2) log 2pi

The engine ranks items by that score, best first; ties go to the lower row.
No epsilon is sampled anywhere: the score is the density itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class Matches:
    """Search results, best first.

    For one query every array has shape (k,); for a batch of B queries, (B, k).
    `rows` index the catalog arrays; `ids` are the catalog's own item ids.
    """

    rows: np.ndarray  # int64
    ids: np.ndarray  # int64
    labels: np.ndarray  # int64
    log_likelihoods: np.ndarray  # float64, log q(z|x)
    # p(x|z) = q(z|x) / sum over the whole catalog of q(z|x'): a uniform prior over items.
    probabilities: np.ndarray  # float64

    def __len__(self) -> int:
        return int(self.ids.shape[-1])


def log_likelihood_reference(z: np.ndarray, mu: np.ndarray, log_sigma: np.ndarray) -> np.ndarray:
    """Direct formula in float64 for queries z (B, d) against items (N, d): returns (B, N).

    This is the definition the engine is tested against; it is O(B*N*d) in memory.
    """
    z = np.asarray(z, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    log_sigma = np.asarray(log_sigma, dtype=np.float64)
    d = mu.shape[1]
    diff = z[:, None, :] - mu[None, :, :]  # (B, N, d)
    inv_var = np.exp(-2.0 * log_sigma)  # (N, d)
    quad = 0.5 * np.einsum("bnd,nd->bn", diff * diff, inv_var)
    return -quad - log_sigma.sum(axis=1)[None, :] - 0.5 * d * LOG_2PI


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
    # lexsort: last key is primary -> sort by -score, then by row.
    order = np.lexsort((part, -part_scores), axis=1)
    return np.take_along_axis(part, order, axis=1).astype(np.int64)


class LikelihoodSearch:
    """Exact log q(z|x) search over a float16 index, scored in float64.

    mu, log_sigma: (N, d) arrays (float16 in a bundle). ids, labels: (N,).
    """

    def __init__(
        self, mu: np.ndarray, log_sigma: np.ndarray, ids: np.ndarray, labels: np.ndarray
    ) -> None:
        if mu.ndim != 2 or mu.shape != log_sigma.shape:
            raise ValueError(
                f"mu and log_sigma must both have shape (N, d); got {mu.shape} and "
                f"{log_sigma.shape}"
            )
        n = mu.shape[0]
        if ids.shape != (n,) or labels.shape != (n,):
            raise ValueError(
                f"ids and labels must have shape ({n},); got {ids.shape} and {labels.shape}"
            )
        self.ids = np.asarray(ids, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self._mu = mu.astype(np.float64)
        log_sigma64 = log_sigma.astype(np.float64)
        self._half_inv_var = 0.5 * np.exp(-2.0 * log_sigma64)  # (N, d)
        self._const = -log_sigma64.sum(axis=1) - 0.5 * mu.shape[1] * LOG_2PI  # (N,)

    @property
    def size(self) -> int:
        return int(self._mu.shape[0])

    @property
    def dim(self) -> int:
        return int(self._mu.shape[1])

    def scores(self, z: np.ndarray) -> np.ndarray:
        """log q(z|x) for every item: z (B, d) float -> (B, N) float64."""
        out = np.empty((z.shape[0], self.size))
        for b, query in enumerate(np.asarray(z, dtype=np.float64)):
            diff = self._mu - query  # (N, d)
            out[b] = self._const - np.einsum("nd,nd->n", diff * diff, self._half_inv_var)
        return out

    def search(self, z: np.ndarray, k: int) -> Matches:
        """The k most likely items for each query; z is (d,) or (B, d), already validated."""
        z = np.asarray(z, dtype=np.float64)
        single = z.ndim == 1
        batch = z[None, :] if single else z
        k = min(k, self.size)
        scores = self.scores(batch)
        rows = top_k_rows(scores, k)
        best = np.take_along_axis(scores, rows, axis=1)
        top = scores.max(axis=1, keepdims=True)
        log_total = top + np.log(np.exp(scores - top).sum(axis=1, keepdims=True))
        fields = {"rows": rows, "ids": self.ids[rows], "labels": self.labels[rows],
                  "log_likelihoods": best, "probabilities": np.exp(best - log_total)}
        if single:
            fields = {name: array[0] for name, array in fields.items()}
        return Matches(**fields)
