"""Exact likelihood search over a catalog of diagonal Gaussians q(z|x).

For a query z and every catalog item x with posterior N(mu(x), sigma(x)^2):

    log q(z|x) = sum_i [ -(z_i - mu_i)^2 / (2 sigma_i^2) - log sigma_i ] - (d/2) log 2pi

How the engine finds the best k items exactly, fast (details and proofs: docs/search.md):

1. The score is an inner product. With a = 1/sigma^2, each item is the vector
   w(x) = [-a/2, a*mu, c(x)] (length 2d+1, c(x) = -sum(a mu^2/2 + log sigma) - d/2 log 2pi),
   built once at load in float64 and stored in float32; a query is [z^2, z, 1]. One matrix
   product scores the whole catalog (a batch of queries: one matrix-matrix product).
2. Items sit in blocks of `block` consecutive positions. Per block we keep the largest item norm
   |w|, so |float32 score - exact score| <= E_b = gamma * max|w| * |q| (a rounding bound that holds
   for any summation order). Only the block maxima of the float32 scores are scanned: the k-th
   largest of (block max - E_b) is a proven lower bound on the k-th best exact score, and only the
   few blocks whose (block max + E_b) reach it can hold a top-k item.
3. The candidates are rescored in float64 with the direct formula above, so the float32
   cancellation of the expanded form (tiny sigma, z near mu) never decides a ranking.
   Ties go to the lower row (in a bundle ids ascend with rows: the lower id).
4. p(x|z) = q(z|x) / sum over the catalog (uniform prior over items). The sum uses float64 scores
   for every item that can matter, float32 scores (error <= E_b) for items far below the best, and
   skips items more than log(N) + 36 nats below the best: relative error below 1e-12.

Items are stored grouped by label, each label padded to whole blocks, so a label filter only
scans that label's blocks: exact, and no slower than an unfiltered search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

LOG_2PI = math.log(2.0 * math.pi)
FLOAT32_EPS = 2.0**-24  # unit roundoff of float32
# Score of a padding position: finite (no inf * 0 = NaN in BLAS), far below any real score.
PAD_SCORE = np.float32(-3.0e38)
# p(x|z) is summed over items within log(N) + SKIP_NATS of the best; the rest weigh < e^-36.
SKIP_NATS = 36.0
# Items counted with float32 scores weigh so little that their rounding moves p by < this.
APPROX_TOLERANCE = 1e-13


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


def item_vectors(mu: np.ndarray, log_sigma: np.ndarray) -> np.ndarray:
    """w(x) = [-a/2, a*mu, c] per item, (n, 2d+1) float32, computed in float64.

    Raises ValueError when a vector does not fit float32 (sigma so small that 1/sigma^2
    overflows): the float32 stage could then not bound its own error.
    """
    mu = np.asarray(mu, dtype=np.float64)
    log_sigma = np.asarray(log_sigma, dtype=np.float64)
    n, d = mu.shape
    a = np.exp(-2.0 * log_sigma)
    out = np.empty((n, 2 * d + 1), dtype=np.float64)
    out[:, :d] = -0.5 * a
    np.multiply(a, mu, out=out[:, d:2 * d])
    out[:, 2 * d] = -(0.5 * a * mu * mu + log_sigma).sum(axis=1) - 0.5 * d * LOG_2PI
    with np.errstate(over="ignore", invalid="ignore"):
        w = out.astype(np.float32)
    bad = ~np.isfinite(w).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"catalog item at row {row} does not fit float32 item vectors (log_sigma min "
            f"{float(log_sigma[row].min()):.4g}, |mu| max {float(np.abs(mu[row]).max()):.4g}): "
            "expected log_sigma >= -40 and |mu| small enough that mu^2/sigma^2 < 1e38"
        )
    return w


def _direct_scores(z: np.ndarray, var: np.ndarray | None, mu16: np.ndarray,
                   log_sigma16: np.ndarray) -> np.ndarray:
    """The direct formula in float64, row by row: z (P, d) against items (P, d) -> (P,).

    var (P, d) or None: the query's own variance, for the expected log-likelihood
    E_{z ~ N(z, var)} log q(z|x) = log q(z|x) - sum var / (2 sigma^2).
    """
    mu = mu16.astype(np.float64)
    log_sigma = log_sigma16.astype(np.float64)
    half_inv_var = 0.5 * np.exp(-2.0 * log_sigma)
    diff = z - mu
    spread = diff * diff
    if var is not None:
        spread += var
    const = -log_sigma.sum(axis=1) - 0.5 * mu.shape[1] * LOG_2PI
    return const - np.einsum("pd,pd->p", spread, half_inv_var)


def _kth_largest(values: np.ndarray, k: int) -> np.ndarray:
    """k-th largest per row of (B, n); -inf where a row has fewer than k entries."""
    if k > values.shape[1]:
        return np.full(values.shape[0], -np.inf)
    return np.partition(values, values.shape[1] - k, axis=1)[:, values.shape[1] - k]


class LikelihoodSearch:
    """Exact log q(z|x) search over a float16 index (see the module docstring).

    mu, log_sigma: (N, d) arrays (float16 in a bundle); ids, labels: (N,).
    Memory: the float32 item vectors (N, 2d+1) plus one row number per item; mu and
    log_sigma are referenced, not copied (a memory-mapped index stays on disk).
    block: items per block of the exact selection (a multiple of 8).
    """

    def __init__(
        self, mu: np.ndarray, log_sigma: np.ndarray, ids: np.ndarray, labels: np.ndarray,
        *, block: int = 256,
    ) -> None:
        _check_catalog(mu, log_sigma, ids, labels)
        if isinstance(block, bool) or not isinstance(block, int) or block < 8 or block % 8:
            raise ValueError(f"block must be a positive multiple of 8, got {block!r}")
        n, d = mu.shape
        self.ids = np.asarray(ids, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self._mu16 = mu
        self._log_sigma16 = log_sigma
        self.block = block
        # Positions: items grouped by label (stable: row order inside a label), each label
        # padded to whole blocks, so that every block holds one label.
        order = np.argsort(self.labels, kind="stable")
        values, starts, counts = np.unique(self.labels[order], return_index=True,
                                           return_counts=True)
        padded = -(-counts // block) * block
        n_pos = int(padded.sum())
        self._rows = np.full(n_pos, -1, dtype=np.int64 if n >= 2**31 else np.int32)
        self._label_blocks: dict[int, tuple[int, int]] = {}
        pos = 0
        for value, start, count, size in zip(values, starts, counts, padded):
            self._rows[pos:pos + count] = order[start:start + count]
            self._label_blocks[int(value)] = (pos // block, (pos + size) // block)
            pos += size
        self._label_counts = {int(v): int(c) for v, c in zip(values, counts)}
        m = 2 * d + 1
        self._wt = np.zeros((m, n_pos), dtype=np.float32)  # item vectors, one column each
        self._wt[m - 1] = PAD_SCORE
        n_blocks = n_pos // block
        norms = np.zeros(n_pos)
        step = max(block, (1 << 16) // block * block)  # bounded float64 temporaries
        for lo in range(0, n_pos, step):
            rows = self._rows[lo:lo + step]
            real = rows >= 0
            w = item_vectors(mu[rows[real]], log_sigma[rows[real]])
            self._wt[:, lo:lo + step][:, real] = w.T
            norms[lo:lo + step][real] = np.sqrt(np.square(w, dtype=np.float64).sum(axis=1))
        self._block_norm = norms.reshape(n_blocks, block).max(axis=1)
        self._block_label = np.repeat(values, padded // block)

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self._mu16.shape[1])

    def label_count(self, label: int | None) -> int:
        if label is None:
            return self.size
        return self._label_counts.get(int(label), 0)

    def scores(self, z: np.ndarray) -> np.ndarray:
        """log q(z|x) for every item, in row order: z (B, d) -> (B, N) float64 (direct formula)."""
        z = np.asarray(z, dtype=np.float64)
        out = np.empty((z.shape[0], self.size))
        for b, query in enumerate(z):
            out[b] = _direct_scores(np.broadcast_to(query, self._mu16.shape), None,
                                    self._mu16, self._log_sigma16)
        return out

    def search(self, z: np.ndarray, k: int, label: int | None = None) -> Matches:
        """The k most likely items for each query z, (d,) or (B, d), already validated.

        k larger than the catalog (or than the label's items) is clamped: all are returned.
        label: only items of this class id are returned; p(x|z) stays over the whole catalog.
        """
        return self._run(z, None, k, label)

    def search_gaussian(self, mu: np.ndarray, log_sigma: np.ndarray, k: int,
                        label: int | None = None) -> Matches:
        """Rank by the expected log-likelihood E_{z ~ N(mu, sigma^2)} log q(z|x).

        For an encoded image query (mu, log_sigma), (d,) or (B, d). `log_likelihoods` holds the
        expected log-likelihoods; `probabilities` their softmax over the catalog.
        """
        mu = np.asarray(mu, dtype=np.float64)
        log_sigma = np.asarray(log_sigma, dtype=np.float64)
        if mu.shape != log_sigma.shape:
            raise ValueError(f"query mu and log_sigma shapes differ: {mu.shape} vs "
                             f"{log_sigma.shape}")
        return self._run(mu, np.exp(2.0 * log_sigma), k, label)

    # -- the engine ---------------------------------------------------------------------------

    def _run(self, z, var, k: int, label: int | None) -> Matches:
        z = np.asarray(z, dtype=np.float64)
        single = z.ndim == 1
        z = z.reshape(-1, self.dim)
        var = None if var is None else np.asarray(var, dtype=np.float64).reshape(z.shape)
        available = self.label_count(label)
        if label is not None and available == 0:
            raise ValueError(f"no catalog item has label {label}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        k = min(int(k), available)
        n_pos = self._wt.shape[1]
        # Score matrix at most the size of the item vectors (or 16 MB): queries in groups.
        group = max(1, min(z.shape[0], max(self._wt.size, 1 << 22) // n_pos))
        parts = [self._run_group(z[i:i + group], None if var is None else var[i:i + group],
                                 k, label) for i in range(0, z.shape[0], group)]
        fields = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        if single:
            fields = {name: array[0] for name, array in fields.items()}
        return Matches(**fields)

    def _run_group(self, z, var, k: int, label: int | None) -> dict:
        features = _query_features(z, var)
        scores = features.astype(np.float32) @ self._wt  # (B, n_pos): the one product
        blocks = scores.reshape(z.shape[0], -1, self.block)
        block_max = blocks.max(axis=2)
        if label is None:
            eligible_blocks = None
        else:
            lo, hi = self._label_blocks[int(label)]
            eligible_blocks = np.zeros(block_max.shape[1], dtype=bool)
            eligible_blocks[lo:hi] = True

        def fetch(query, block):
            rows = self._rows.reshape(-1, self.block)[block]
            if eligible_blocks is None:
                eligible = np.ones(rows.shape, dtype=bool)
            else:
                eligible = np.broadcast_to(eligible_blocks[block][:, None], rows.shape)
            return blocks[query, block], rows, eligible

        margin = _error_bound(features, self._block_norm)
        block_max_eligible = (block_max if eligible_blocks is None
                              else np.where(eligible_blocks, block_max, -np.inf))
        return _select(z, var, k, block_max, block_max_eligible, margin, fetch,
                       self._mu16, self._log_sigma16, self.size, self.ids, self.labels)


def _check_catalog(mu, log_sigma, ids, labels) -> None:
    if mu.ndim != 2 or mu.shape != log_sigma.shape:
        raise ValueError(
            f"mu and log_sigma must both have shape (N, d); got {mu.shape} and {log_sigma.shape}"
        )
    n = mu.shape[0]
    if n == 0:
        raise ValueError("the catalog is empty: expected at least one item")
    if ids.shape != (n,) or labels.shape != (n,):
        raise ValueError(
            f"ids and labels must have shape ({n},); got {ids.shape} and {labels.shape}"
        )


def _query_features(z: np.ndarray, var: np.ndarray | None) -> np.ndarray:
    """[z^2 (+ var), z, 1] per query, float64 (B, 2d+1)."""
    square = z * z if var is None else z * z + var
    return np.concatenate([square, z, np.ones((z.shape[0], 1))], axis=1)


def _error_bound(features: np.ndarray, block_norm: np.ndarray) -> np.ndarray:
    """Per query and block, a bound on |float32 score - exact score|: (B, n_blocks) float64.

    float32 rounding of q and w (one unit each) and a length-m dot product in any order
    (gamma_m, Higham 3.5) give |error| <= gamma_{m+2} sum |w_j q_j| <= gamma_{m+2} |w| |q|.
    The factor 2 also covers the float64 rounding of w and of the rescoring formula.
    """
    m = features.shape[1]
    gamma = 2.0 * (m + 2) * FLOAT32_EPS / (1.0 - (m + 2) * FLOAT32_EPS)
    query_norm = np.sqrt(np.square(features).sum(axis=1)) * (1.0 + 4 * FLOAT32_EPS)
    return gamma * np.outer(query_norm, block_norm) + np.finfo(np.float32).tiny


def _select(z, var, k, block_max, block_max_eligible, margin, fetch: Callable,
            mu16, log_sigma16, n_items: int, ids, labels) -> dict:
    """Exact top-k and p(x|z) from float32 block maxima (see docs/search.md for the proof).

    block_max (B, n_blocks) float32; block_max_eligible: the same restricted to items that pass
    the label filter (-inf where none); margin: the error bound per query and block.
    fetch(query, block) -> (float32 scores, rows (-1 = padding), eligible), each (P, block).
    """
    n_queries = block_max.shape[0]
    best = block_max.astype(np.float64)
    upper = best + margin  # no exact score in the block is above this
    lower = best - margin  # the block's float32 winner scores at least this
    top_low = lower.max(axis=1)  # <= the best exact score
    eligible_upper = block_max_eligible + margin
    # k blocks each hold an eligible item scoring >= their lower bound: so the k-th best
    # eligible exact score is >= the k-th largest lower bound (-inf: take every eligible item).
    kth_low = _kth_largest(np.where(np.isfinite(block_max_eligible), lower, -np.inf), k)
    spread = float(margin.max())
    log_n = math.log(n_items)
    # Items below top - rescore_nats weigh <= e^-rescore_nats each; their float32 error moves
    # the sum by a factor <= e^(2 margin): together below APPROX_TOLERANCE.
    rescore_nats = log_n + math.log(max(math.expm1(min(2 * spread, 700.0)), 1e-300)) \
        - math.log(APPROX_TOLERANCE)
    rescore_nats = max(rescore_nats, 0.0)
    skip_nats = max(log_n + SKIP_NATS, rescore_nats)
    rescore_at = top_low - rescore_nats
    skip_at = top_low - skip_nats

    want = (upper >= skip_at[:, None]) | (
        np.isfinite(block_max_eligible) & (eligible_upper >= kth_low[:, None]))
    query, block = np.nonzero(want)
    block_scores, rows, eligible = fetch(query, block)
    ceiling = block_scores.astype(np.float64) + margin[query, block][:, None]
    real = rows >= 0
    exact = real & ((ceiling >= rescore_at[query, None])
                    | (eligible & (ceiling >= kth_low[query, None])))
    approx = real & ~exact & (ceiling >= skip_at[query, None])

    pair, slot = np.nonzero(exact)
    owner = query[pair]  # sorted: np.nonzero walks queries in order
    item = rows[pair, slot].astype(np.int64)
    exact_scores = _direct_scores(z[owner], None if var is None else var[owner],
                                  mu16[item], log_sigma16[item])
    starts = np.searchsorted(owner, np.arange(n_queries))
    top = np.maximum.reduceat(exact_scores, starts)
    total = np.add.reduceat(np.exp(exact_scores - top[owner]), starts)
    far_pair, far_slot = np.nonzero(approx)
    if far_pair.size:
        far_owner = query[far_pair]
        far = np.exp(block_scores[far_pair, far_slot].astype(np.float64) - top[far_owner])
        total += np.bincount(far_owner, weights=far, minlength=n_queries)
    log_total = top + np.log(total)

    keep = eligible[pair, slot] & (exact_scores >= kth_low[owner])
    owner, item, kept = owner[keep], item[keep], exact_scores[keep]
    order = np.lexsort((item, -kept, owner))
    starts = np.searchsorted(owner[order], np.arange(n_queries))
    take = order[starts[:, None] + np.arange(k)[None, :]]
    chosen = item[take]
    chosen_scores = kept[take]
    return {"rows": chosen, "ids": ids[chosen], "labels": labels[chosen],
            "log_likelihoods": chosen_scores,
            "probabilities": np.exp(chosen_scores - log_total[:, None])}
