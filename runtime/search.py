"""Exact likelihood search over a catalog of diagonal Gaussians q(z|x).

For a query z and every catalog item x with posterior N(mu(x), sigma(x)^2):

    log q(z|x) = sum_i [ -(z_i - mu_i)^2 / (2 sigma_i^2) - log sigma_i ] - (d/2) log 2pi

How the engine finds the best k items exactly, fast (details and proofs: docs/search.md):

1. The score is an inner product. With a = 1/sigma^2, each item is the vector
   w(x) = [-a/2, a*mu, c(x)] (length 2d+1, c(x) = -sum(a mu^2/2 + log sigma) - d/2 log 2pi),
   built once at load in float64 and stored in float32; a query is [z^2, z, 1]. One matrix
   product scores the whole catalog (a batch of queries: one matrix-matrix product).
2. Items sit in blocks of `block` positions; per block we keep the largest item norm |w|, so
   |float32 score - exact score| <= E_b = gamma * max|w| * |q| (a rounding bound that holds for
   any summation order). The k-th largest of (block max - E_b) is a proven lower bound on the
   k-th best exact score: only items whose float32 score + E reaches it can be in the top k.
3. Those candidates are rescored in float64 with the direct formula above, so the float32
   cancellation of the expanded form (tiny sigma, z near mu) never decides a ranking.
   Ties go to the lower row (in a bundle ids ascend with rows: the lower id).
4. p(x|z) = q(z|x) / sum over the catalog (uniform prior over items). The sum uses float64 scores
   for every item whose float32 error could matter, float32 scores for the rest (their error
   bounds sum to <= 1e-7 of the sum), and skips items more than log(N) + 20 nats below the best
   (together < e^-20 = 2e-9 of the sum): p(x|z) is within 1.1e-7 relative of the exact value.
5. One query (the kiosk's case) takes the plain maximum of the scores and one comparison pass
   for the items p(x|z) needs; their k-th best float32 score is the floor for the top k when
   they hold at least k items well above p's floor (large catalogs), else the maxima of
   interleaved groups of positions give it (LikelihoodSearch._search_one).

Items are stored grouped by label, each label padded to whole blocks, so a label filter selects
its top k from that label's blocks only: exact, and no more work than an unfiltered search.
Within a label items are ordered by |w|, so that each block's error bound is close to its items'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOG_2PI = math.log(2.0 * math.pi)
FLOAT32_EPS = 2.0**-24  # unit roundoff of float32
# Score of a padding position: finite (no inf * 0 = NaN in BLAS), far below any real score.
PAD_SCORE = np.float32(-3.0e38)
# Below every real score (|score| < SAFE_MAGNITUDE) and above PAD_SCORE.
REAL_FLOOR = -1.0e38
# p(x|z) is summed over items within log(N) + SKIP_NATS of the best; the rest weigh < e^-SKIP_NATS.
SKIP_NATS = 20.0
# Items counted with float32 scores weigh so little that their rounding moves p by < this
# (relative); items never counted weigh < e^-SKIP_NATS in all.
P_TOLERANCE = 1e-7
# One query: up to this many items near the best are all rescored in float64 (cheaper than
# choosing among so few which need it).
FEW_NEAR = 64
# From this many scores on, a comparison pass reads only the groups whose maximum reaches
# its threshold (where at most 1/8 of them do).
GATHER_MIN_SCORES = 1 << 17
# float32 scores are used only while |w| |q| stays below this (no overflow to inf).
SAFE_MAGNITUDE = 1e37
_TINY = float(np.finfo(np.float32).tiny)
_ONE = np.ones(1)


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
    # Runtime.nearest: |z - mu(decode(z))| per query, () or (B,), float64; how far z lies
    # from where the catalog is (Runtime.roundtrip_distance). None for photo queries.
    distances: np.ndarray | None = None

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


def _vector_norms(w: np.ndarray) -> np.ndarray:
    """|w| per row of float32 item vectors, summed in float64: (n,)."""
    return np.sqrt(np.square(w, dtype=np.float64).sum(axis=1))


def _item_norms(mu: np.ndarray, log_sigma: np.ndarray, step: int = 1 << 16) -> np.ndarray:
    """|w(x)| of each item's float32 item vector, (n,) float64, in bounded chunks."""
    return np.concatenate([_vector_norms(item_vectors(mu[lo:lo + step], log_sigma[lo:lo + step]))
                           for lo in range(0, mu.shape[0], step)])


def _direct_scores(z: np.ndarray, var: np.ndarray | None, mu16: np.ndarray,
                   log_sigma16: np.ndarray) -> np.ndarray:
    """The direct formula in float64, row by row: z (P, d) against items (P, d) -> (P,).

    var (P, d) or None: the query's own variance, for the expected log-likelihood
    E_{z ~ N(z, var)} log q(z|x) = log q(z|x) - sum var / (2 sigma^2).
    """
    log_sigma = log_sigma16.astype(np.float64)
    terms = z - mu16  # float16 items widen exactly to float64
    if var is None:
        terms *= np.exp(-log_sigma)  # (z - mu) / sigma
        terms *= terms
    else:
        terms *= terms
        terms += var
        terms *= np.exp(-2.0 * log_sigma)
    terms += 2.0 * log_sigma  # one sum per row: -1/2 sum [((z - mu)/sigma)^2 + 2 log sigma]
    return -0.5 * terms.sum(axis=1) - 0.5 * mu16.shape[1] * LOG_2PI


def _kth_largest(values: np.ndarray, k: int) -> np.ndarray:
    """k-th largest per row of (B, n); -inf where a row has fewer than k entries."""
    if k > values.shape[1]:
        return np.full(values.shape[0], -np.inf)
    return np.partition(values, values.shape[1] - k, axis=1)[:, values.shape[1] - k]


class _QueryMethods:
    """The public query methods; subclasses hold _mu16 and implement _run(z, var, k, label)."""

    @property
    def size(self) -> int:
        return int(self._mu16.shape[0])

    @property
    def dim(self) -> int:
        return int(self._mu16.shape[1])

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

    def _clamp_k(self, k, label: int | None) -> int:
        """Validate k; more than the (label's) items returns them all."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        available = self.label_count(label)
        if label is not None and available == 0:
            raise ValueError(f"no catalog item has label {label}")
        return min(int(k), available)


class LikelihoodSearch(_QueryMethods):
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
        self.ids = np.asarray(ids)  # as given (int32 in a bundle): results widen to int64
        self.labels = np.asarray(labels)
        self._mu16 = mu
        self._log_sigma16 = log_sigma
        self.block = block
        # Positions: items grouped by label, each label padded to whole blocks, so that every
        # block holds one label; within a label by the norm of the item vector, so that a
        # block's largest norm (its float32 error bound) is close to each of its items' own.
        row_norms = _item_norms(mu, log_sigma)
        order = np.lexsort((row_norms, self.labels))
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
        step = max(block, (1 << 16) // block * block)  # bounded float64 temporaries
        for lo in range(0, n_pos, step):
            rows = self._rows[lo:lo + step]
            real = rows >= 0
            self._wt[:, lo:lo + step][:, real] = item_vectors(mu[rows[real]],
                                                              log_sigma[rows[real]]).T
        norms = np.where(self._rows >= 0, row_norms[np.maximum(self._rows, 0)], 0.0)
        self._block_norm = norms.reshape(n_blocks, block).max(axis=1)
        self._max_norm = float(self._block_norm.max())
        with np.errstate(divide="ignore"):  # an all-zero block: log 0 = -inf, no error at all
            self._log_block_norm = np.log(self._block_norm)
        self._log_size = math.log(n)
        # One query: take the plain maximum first and find the top k among p(x|z)'s items
        # (large catalogs, low d), or the group maxima (_search_one). Set from the last query:
        # a hint only, so a race between threads costs time, never exactness.
        self._max_first = True

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

    # -- the engine ---------------------------------------------------------------------------

    def _run(self, z, var, k: int, label: int | None) -> Matches:
        z = np.asarray(z, dtype=np.float64)
        single = z.ndim == 1
        k = self._clamp_k(k, label)
        if single and z.shape == (self.dim,):  # the kiosk's case: as few numpy calls as can be
            v = None if var is None else np.asarray(var, dtype=np.float64)
            features = np.concatenate((z * z if v is None else z * z + v, z, _ONE))
            if math.sqrt(float(features @ features)) * self._max_norm < SAFE_MAGNITUDE:
                return Matches(**self._search_one(z, v, features, k, label))
        z = z.reshape(-1, self.dim)
        var = None if var is None else np.asarray(var, dtype=np.float64).reshape(z.shape)
        features = _query_features(z, var)
        query_norm = np.sqrt(np.einsum("bm,bm->b", features, features))
        if query_norm.max() * self._max_norm >= SAFE_MAGNITUDE:
            # float32 scores could overflow: score this batch directly in float64 instead.
            fields = self._brute(z, var, k, label)
        elif single:
            return Matches(**self._search_one(z[0], None if var is None else var[0],
                                              features[0], k, label))
        else:
            n_pos = self._wt.shape[1]
            # Score matrix at most the size of the item vectors (or 16 MB): queries in groups.
            group = max(1, min(z.shape[0], max(self._wt.size, 1 << 22) // n_pos))
            parts = [self._run_group(z[i:i + group], None if var is None else var[i:i + group],
                                     features[i:i + group], k, label)
                     for i in range(0, z.shape[0], group)]
            fields = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        if single:
            fields = {name: array[0] for name, array in fields.items()}
        return Matches(**fields)

    def _brute(self, z, var, k: int, label: int | None) -> dict:
        """The direct formula over every item in float64 (for queries beyond float32 range)."""
        scores = np.empty((z.shape[0], self.size))
        for b in range(z.shape[0]):
            scores[b] = _direct_scores(
                np.broadcast_to(z[b], self._mu16.shape),
                None if var is None else np.broadcast_to(var[b], self._mu16.shape),
                self._mu16, self._log_sigma16)
        top = scores.max(axis=1, keepdims=True)
        log_total = top + np.log(np.exp(scores - top).sum(axis=1, keepdims=True))
        ranked = scores if label is None else np.where(self.labels == label, scores, -np.inf)
        rows = top_k_rows(ranked, k)
        best = np.take_along_axis(scores, rows, axis=1)
        return {"rows": rows, "ids": self.ids[rows].astype(np.int64),
                "labels": self.labels[rows].astype(np.int64),
                "log_likelihoods": best, "probabilities": np.exp(best - log_total)}

    def _search_one(self, z, var, features, k: int, label: int | None) -> dict:
        """One query in few numpy calls, with scalar bounds (docs/search.md, "One query").

        Two passes over the float32 scores (the maximum or the group maxima, then one
        comparison) find the items p(x|z) needs and the candidates for the top k; only those
        are rescored in float64.
        """
        scores = features.astype(np.float32) @ self._wt  # (n_pos,) gemv over the item vectors
        scale = _gamma(features.shape[0]) * math.sqrt(float(features @ features)) \
            * (1.0 + 4 * FLOAT32_EPS)
        error = self._max_norm * scale + _TINY  # bound on every item's float32 error
        # Plain maximum first: p's items (found anyway) usually hold the top k. A filtered query
        # always tries that; an unfiltered one when it worked for the last query.
        max_first = label is not None or self._max_first
        group_max = None if max_first else _group_max(scores, self.block)
        # the best exact score is >= top32 - error
        top32 = float(scores.max() if max_first else group_max.max())
        # Items more than log N + 20 nats below the best weigh < e^-20 of p's sum together.
        p_floor = top32 - 2.0 * error - (self._log_size + SKIP_NATS)
        if label is None:
            start, stop = 0, scores.size
        else:  # the label's items fill one span of positions
            first, last = self._label_blocks[int(label)]
            start, stop = first * self.block, last * self.block
        if max_first:
            k_floor = floor = p_floor
        else:
            # Groups are disjoint: k of them hold an item scoring >= their k-th largest
            # maximum in float32, so >= that - error exactly; any item of the top k then
            # scores >= k_floor in float32 (_kth_floor).
            k_floor = _kth_floor(group_max, k, error)
            floor = min(p_floor, k_floor)
        near, read_all = _at_or_above(scores, _below(floor), group_max)  # the one comparison
        if not max_first:
            # Max-first would have done (k groups at p's floor or above) and cost no more (the
            # group maxima did not spare the comparison most of the scores).
            self._max_first = read_all and k_floor >= p_floor + 2.0 * error
        lo, hi = (0, near.size) if label is None \
            else np.searchsorted(near, (start, stop)).tolist()  # near[lo:hi]: eligible
        near_scores = None  # float32 scores of `near`, gathered when needed
        sharp, in_near = max_first, True  # sharp: k_floor from near's own float32 scores
        if max_first:
            near_scores = scores[near]
            k_floor = _kth_floor(near_scores[lo:hi], k, error)
            if k_floor < floor:  # fewer than k eligible items near the best: group maxima
                sharp = False
                span_max = _group_max(scores[start:stop], self.block)
                k_floor = _kth_floor(span_max, k, error)
                if label is None:  # one more comparison pass, with the lower floor
                    self._max_first = False
                    floor = min(floor, k_floor)
                    near, near_scores = _at_or_above(scores, _below(floor), span_max)[0], None
                    lo, hi = 0, near.size
                else:  # the label's best lie below p's items: a pass over its span (below)
                    in_near = False
        if near.size <= FEW_NEAR:  # rescore them all: exact p, no bookkeeping
            item = self._rows[near]
            exact = _direct_scores(z, var, self._mu16[item], self._log_sigma16[item])
            top = float(exact.max())
            log_total = top + math.log(np.exp(exact - top).sum())
            item, exact = item[lo:hi], exact[lo:hi]
        else:
            if near_scores is None:
                near_scores = scores[near]
            if in_near and not sharp:  # sharpen: the k-th best eligible float32 score itself
                k_floor = _kth_floor(near_scores[lo:hi], k, error)
            # p(x|z): the sum S of exp(s - best) over the catalog is >= 1. An item counted with
            # its float32 score s32 instead moves S by at most exp(s - best) (e^e_x - 1)
            # <= exp(s32 - top32 + 2 error) e_x e^e_x, e_x its own block's error bound
            # (e^x - 1 <= x e^x, with x = e_x = scale |w|_block <= error).
            log_w = near_scores.astype(np.float64) - top32
            rescore = _heavy(log_w + self._log_block_norm[near // self.block]
                             + (3.0 * error + math.log(scale)))
            rescore[np.argmax(log_w)] = True  # the float32 best: `exact` is never empty
            if in_near:
                rescore[lo:hi] |= near_scores[lo:hi] >= _below(k_floor)
            where = np.flatnonzero(rescore)
            item = self._rows[near[where]]
            exact = _direct_scores(z, var, self._mu16[item], self._log_sigma16[item])
            top = float(exact.max())
            total = np.exp(exact - top).sum() + np.exp(log_w[~rescore] + (top32 - top)).sum()
            log_total = top + math.log(total)
            if in_near:  # the candidates: eligible, and at or above k_floor
                candidate = near_scores[where] >= _below(k_floor)
                if label is not None:
                    candidate &= (where >= lo) & (where < hi)
                item, exact = item[candidate], exact[candidate]
        if not in_near:  # one more pass, over the label's span
            span = scores[start:stop]
            found = _at_or_above(span, _below(k_floor), span_max)[0]
            found_scores = span[found]
            k_floor = _kth_floor(found_scores, k, error)
            item = self._rows[start + found[found_scores >= _below(k_floor)]]
            exact = _direct_scores(z, var, self._mu16[item], self._log_sigma16[item])
        # Every item outside `item` scores below the k-th best: the k best of `item` are exact.
        order = np.lexsort((item, -exact))[:k]
        rows, best = item[order].astype(np.int64), exact[order]
        return {"rows": rows, "ids": self.ids[rows].astype(np.int64),
                "labels": self.labels[rows].astype(np.int64),
                "log_likelihoods": best, "probabilities": np.exp(best - log_total)}

    def _run_group(self, z, var, features, k: int, label: int | None) -> dict:
        features32 = features.astype(np.float32)
        scores = features32 @ self._wt  # (B, n_pos): one product for the batch
        block_max = scores.reshape(z.shape[0], -1, self.block).max(axis=2)
        span = None
        if label is None:
            block_max_eligible = block_max
        else:
            lo, hi = self._label_blocks[int(label)]
            block_max_eligible = np.full(block_max.shape, -np.inf, dtype=np.float32)
            block_max_eligible[:, lo:hi] = block_max[:, lo:hi]
            span = (lo * self.block, hi * self.block)
        margin = _error_bound(features, self._block_norm)
        return _select(z, var, k, scores, self.block, self._rows, block_max, block_max_eligible,
                       margin, label, self._mu16, self._log_sigma16, self.ids, self.labels,
                       span)


class StreamingLikelihoodSearch(_QueryMethods):
    """The same exact search, reading the float16 index in chunks (memory-mapped files).

    For catalogs larger than RAM: nothing per item is kept resident but a float32 norm per
    block; each search scores `chunk_rows` items at a time (their float32 item vectors are
    rebuilt from the float16 rows, exactly as LikelihoodSearch builds them) and keeps one
    float32 score per item and query. Results equal LikelihoodSearch's: same rows, ids and
    log-likelihoods; probabilities agree within the tolerance of p(x|z) (P_TOLERANCE).
    """

    def __init__(self, mu: np.ndarray, log_sigma: np.ndarray, ids: np.ndarray,
                 labels: np.ndarray, *, block: int = 256, chunk_rows: int = 1 << 16) -> None:
        _check_catalog(mu, log_sigma, ids, labels)
        if isinstance(block, bool) or not isinstance(block, int) or block < 8 or block % 8:
            raise ValueError(f"block must be a positive multiple of 8, got {block!r}")
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be an integer >= 1, got {chunk_rows!r}")
        self._mu16, self._log_sigma16 = mu, log_sigma
        self.ids, self.labels = ids, labels  # memory-mapped arrays stay on disk
        self.block = block
        self.chunk_rows = -(-chunk_rows // block) * block  # whole blocks per chunk
        n = mu.shape[0]
        self._n_pos = -(-n // block) * block
        norms = np.zeros(self._n_pos)
        for lo, hi, w in self._chunks():
            norms[lo:hi] = _vector_norms(w)
        self._block_norm = norms.reshape(-1, block).max(axis=1)
        self._max_norm = float(self._block_norm.max())

    def _chunks(self):
        for lo in range(0, self.size, self.chunk_rows):
            hi = min(lo + self.chunk_rows, self.size)
            yield lo, hi, item_vectors(self._mu16[lo:hi], self._log_sigma16[lo:hi])

    def label_count(self, label: int | None) -> int:
        if label is None:
            return self.size
        return int(np.count_nonzero(np.asarray(self.labels) == label))

    def _run(self, z, var, k: int, label: int | None) -> Matches:
        z = np.asarray(z, dtype=np.float64)
        single = z.ndim == 1
        z = z.reshape(-1, self.dim)
        var = None if var is None else np.asarray(var, dtype=np.float64).reshape(z.shape)
        k = self._clamp_k(k, label)
        features = _query_features(z, var)
        if np.sqrt(np.square(features).sum(axis=1)).max() * self._max_norm >= SAFE_MAGNITUDE:
            raise ValueError("query too large for float32 scoring of this catalog: "
                             "use the in-memory LikelihoodSearch")
        features32 = features.astype(np.float32)
        n_queries = z.shape[0]
        scores = np.full((n_queries, self._n_pos), PAD_SCORE, dtype=np.float32)
        eligible_scores = None if label is None else np.full_like(scores, -np.inf)
        for lo, hi, w in self._chunks():
            scores[:, lo:hi] = features32 @ w.T
            if label is not None:
                match = np.asarray(self.labels[lo:hi]) == label
                eligible_scores[:, lo:hi] = np.where(match, scores[:, lo:hi], -np.inf)
        block_max = scores.reshape(n_queries, -1, self.block).max(axis=2)
        block_max_eligible = block_max if label is None else \
            eligible_scores.reshape(n_queries, -1, self.block).max(axis=2)
        del eligible_scores
        margin = _error_bound(features, self._block_norm)
        fields = _select(z, var, k, scores, self.block, None, block_max, block_max_eligible,
                         margin, label, self._mu16, self._log_sigma16, self.ids, self.labels)
        fields = {name: np.asarray(value) for name, value in fields.items()}
        fields["ids"] = fields["ids"].astype(np.int64)
        fields["labels"] = fields["labels"].astype(np.int64)
        if single:
            fields = {name: array[0] for name, array in fields.items()}
        return Matches(**fields)


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
    out = np.empty((z.shape[0], 2 * z.shape[1] + 1))
    d = z.shape[1]
    np.multiply(z, z, out=out[:, :d])
    if var is not None:
        out[:, :d] += var
    out[:, d:2 * d] = z
    out[:, 2 * d] = 1.0
    return out


def _gamma(m: int) -> float:
    """Bound factor: float32 rounding of q and w (one unit each) and a length-m dot product
    in any summation order (gamma_m, Higham 3.5); doubled to cover the float64 rounding of w
    and of the rescoring formula."""
    return 2.0 * (m + 2) * FLOAT32_EPS / (1.0 - (m + 2) * FLOAT32_EPS)


def _error_bound(features: np.ndarray, block_norm: np.ndarray) -> np.ndarray:
    """Per query and block, a bound on |float32 score - exact score|: (B, n_blocks) float64.

    float32 rounding of q and w (one unit each) and a length-m dot product in any order
    (gamma_m, Higham 3.5) give |error| <= gamma_{m+2} sum |w_j q_j| <= gamma_{m+2} |w| |q|.
    The factor 2 also covers the float64 rounding of w and of the rescoring formula.
    """
    query_norm = np.sqrt(np.square(features).sum(axis=1)) * (1.0 + 4 * FLOAT32_EPS)
    return _gamma(features.shape[1]) * np.outer(query_norm, block_norm) + _TINY


def _select(z, var, k, scores, block, rows, block_max, block_max_eligible, margin, label,
            mu16, log_sigma16, ids, labels, label_span=None) -> dict:
    """Exact top-k and p(x|z) from float32 scores with proven error bounds (docs/search.md).

    scores (B, n_pos) float32, positions in blocks of `block`; rows (n_pos,): catalog row of
    each position, -1 for padding (None: position = row, padding after the last row);
    block_max (B, n_blocks) float32; block_max_eligible: the same over items that pass the
    label filter (-inf where none); margin (B, n_blocks): error bound.
    """
    n_queries, n_blocks = block_max.shape
    n_pos = scores.shape[1]
    # A block's float32 winner has an exact score >= block max - margin, so the k-th best
    # eligible exact score is >= the k-th largest of those lower bounds: kth_low.
    has_eligible = np.isfinite(block_max_eligible)
    kth_low = _kth_largest(np.where(has_eligible, block_max_eligible - margin, -np.inf), k)
    error = margin.max(axis=1)  # (B,) a bound for every item
    top_low = block_max.max(axis=1).astype(np.float64) - error  # <= the best exact score

    # p(x|z) needs the sum over the catalog of q(z|x) / q(z|best). Items within rescore_nats
    # of the best are rescored in float64. Further down each weighs <= e^-rescore_nats, so
    # their float32 error (a factor <= e^(2 error)) moves the sum by < P_TOLERANCE; items more
    # than skip_nats down weigh < e^-SKIP_NATS together and are left out.
    log_n = math.log(ids.shape[0])
    rescore_nats = np.maximum(
        log_n + np.log(np.maximum(np.expm1(np.minimum(2 * error, 700.0)), 1e-300))
        - math.log(P_TOLERANCE), 0.0)
    skip_nats = np.maximum(log_n + SKIP_NATS, rescore_nats)
    floor = _float32_below(top_low - skip_nats - error)
    flat = np.flatnonzero(scores >= floor[:, None])  # the one pass over every score
    near_query = flat // n_pos
    near_pos = flat - near_query * n_pos
    near = scores.reshape(-1)[flat].astype(np.float64) + error[near_query]  # upper bounds
    rescore = near >= (top_low - rescore_nats)[near_query]
    owner = near_query[rescore]
    item = _rows_at(rows, near_pos[rescore], ids.shape[0])
    if item.size and item.min() < 0:  # padding cannot pass the floor; never rescore it
        owner, item = owner[item >= 0], item[item >= 0]
    exact = _direct_scores(z[owner], None if var is None else var[owner], mu16[item],
                           log_sigma16[item])
    starts = np.searchsorted(owner, np.arange(n_queries))
    top = np.maximum.reduceat(exact, starts)
    total = np.add.reduceat(np.exp(exact - top[owner]), starts)
    far_query = near_query[~rescore]
    far = np.exp(near[~rescore] - error[far_query] - top[far_query])
    total += np.bincount(far_query, weights=far, minlength=n_queries)
    log_total = top + np.log(total)

    # Top k. Every eligible item with exact score >= kth_low has float32 score + error >=
    # kth_low; when kth_low >= top_low - rescore_nats all of them were rescored above.
    covered = kth_low >= top_low - rescore_nats
    chosen = np.empty((n_queries, k), dtype=np.int64)
    chosen_scores = np.empty((n_queries, k))
    keep = covered[owner] & (exact >= kth_low[owner])
    if label is not None:
        keep &= labels[item] == label
    done = np.flatnonzero(covered)
    chosen[done], chosen_scores[done] = _best_k(owner[keep], item[keep], exact[keep], done, k)
    todo = np.flatnonzero(~covered)
    if todo.size and label_span is not None:  # the label's own positions: one compare pass
        start, stop = label_span
        floor = _float32_below(kth_low[todo] - error[todo])
        found = np.flatnonzero(scores[todo, start:stop] >= floor[:, None])
        owner = todo[found // (stop - start)]
        item = _rows_at(rows, start + found % (stop - start), ids.shape[0])
        real = item >= 0
        owner, item = owner[real], item[real]
        exact = _direct_scores(z[owner], None if var is None else var[owner], mu16[item],
                               log_sigma16[item])
        keep = exact >= kth_low[owner]
        chosen[todo], chosen_scores[todo] = _best_k(owner[keep], item[keep], exact[keep],
                                                    todo, k)
    elif todo.size:  # the k-th best lies far below the best: read the blocks that reach it
        want = has_eligible[todo] & (
            block_max_eligible[todo] + margin[todo] >= kth_low[todo, None])
        pick, blk = np.nonzero(want)
        query = todo[pick]
        block_scores = scores.reshape(n_queries, n_blocks, block)[query, blk]
        cand_rows = _rows_at(rows, blk[:, None] * block + np.arange(block), ids.shape[0])
        ceiling = block_scores.astype(np.float64) + margin[query, blk][:, None]
        candidate = (cand_rows >= 0) & (ceiling >= kth_low[query, None])
        if label is not None:
            candidate &= labels[np.maximum(cand_rows, 0)] == label
        pair, slot = np.nonzero(candidate)
        owner = query[pair]
        item = cand_rows[pair, slot].astype(np.int64)
        exact = _direct_scores(z[owner], None if var is None else var[owner], mu16[item],
                               log_sigma16[item])
        keep = exact >= kth_low[owner]
        chosen[todo], chosen_scores[todo] = _best_k(owner[keep], item[keep], exact[keep],
                                                    todo, k)
    return {"rows": chosen, "ids": np.asarray(ids[chosen], dtype=np.int64),
            "labels": np.asarray(labels[chosen], dtype=np.int64),
            "log_likelihoods": chosen_scores,
            "probabilities": np.exp(chosen_scores - log_total[:, None])}


def _group_max(scores: np.ndarray, size: int) -> np.ndarray:
    """Maxima of the interleaved groups {j, j + C, ..., j + (size - 1) C} of scores (length
    size * C): an element-wise maximum of `size` rows, at memory speed (the maxima of
    contiguous blocks, a reduction along short rows, take about four times as long)."""
    return scores.reshape(size, -1).max(axis=0)


def _at_or_above(scores: np.ndarray, threshold: float,
                 group_max: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """Positions (ascending) of the scores >= threshold, and whether all scores were read:
    given their group maxima (_group_max), only the groups whose maximum reaches the threshold
    are read, where those are few."""
    # Gathering 1/8 of the groups costs about as much as a pass over all scores, and below
    # about 10^5 scores the pass costs less than the gather's extra numpy calls.
    if group_max is not None and scores.size >= GATHER_MIN_SCORES:
        hit = np.flatnonzero(group_max >= threshold)
        if hit.size * 8 <= group_max.size:
            return _in_groups(scores, threshold, hit, group_max.size), False
    return np.flatnonzero(scores >= threshold), True


def _in_groups(scores: np.ndarray, threshold: float, hit: np.ndarray, groups: int) -> np.ndarray:
    """Positions (ascending) of the scores >= threshold within the interleaved groups `hit`
    (sorted) of `groups` (_group_max): position = member * groups + group."""
    member, column = np.nonzero(scores.reshape(-1, groups)[:, hit] >= threshold)
    return member * groups + hit[column]


def _kth_floor(scores: np.ndarray, k: int, error: float) -> float:
    """(k-th largest real float32 score) - 2 error: every item of the top k (exact scores)
    among items that these scores bound from below scores at least this in float32.

    Padding (PAD_SCORE, below every real score) is not a real score: with fewer than k real
    values the floor is REAL_FLOOR, below every real score (all items are candidates)."""
    if scores.size < k:
        return REAL_FLOOR
    kth = float(np.partition(scores, scores.size - k)[scores.size - k])
    return REAL_FLOOR if kth <= PAD_SCORE else kth - 2.0 * error


def _heavy(log_bound: np.ndarray, bins_per_nat: int = 4) -> np.ndarray:
    """Which items to rescore in float64 for p(x|z), given the log of a bound on what each
    would move p's sum by if counted with its float32 score: the others (light) must move it
    by <= P_TOLERANCE together.

    Bounds are binned by their log (1/bins_per_nat nat wide; all below log(P_TOLERANCE / n)
    share the lowest bin, all above 0 the highest), and whole bins are made light from the
    lowest up while the exact sum of their bounds stays <= P_TOLERANCE: within one bin of the
    fewest rescored items, without a sort."""
    low = math.log(P_TOLERANCE / log_bound.size)
    n_bins = math.ceil(-low * bins_per_nat) + 2
    # Bin b from one numpy rounding of the values; light and heavy below are decided on this
    # same b, so the bounds summed are exactly those of the light items.
    bins = np.clip(np.floor((log_bound - low) * bins_per_nat) + 1.0, 0, n_bins - 1).astype(np.intp)
    sums = np.bincount(bins, weights=np.exp(np.minimum(log_bound, 0.0)), minlength=n_bins)
    # Bounds above 1 count as 1: such an item can never be light (1 > P_TOLERANCE).
    light_bins = int(np.searchsorted(np.cumsum(sums), P_TOLERANCE, side="right"))
    return bins >= light_bins


def _rows_at(rows, positions: np.ndarray, n_items: int) -> np.ndarray:
    """Catalog rows (int64) at positions, -1 for padding; rows None: positions are rows."""
    if rows is None:
        return np.where(positions < n_items, positions, -1).astype(np.int64)
    return rows[positions].astype(np.int64)


def _best_k(owner, item, score, queries, k):
    """Per query in `queries` (sorted), the k best (score desc, then row asc): rows, scores."""
    order = np.lexsort((item, -score, owner))
    starts = np.searchsorted(owner[order], queries)
    take = order[starts[:, None] + np.arange(k)[None, :]]
    return item[take], score[take]


def _below(value: float) -> float:
    """A threshold that stays <= value after numpy rounds it to float32 for a comparison."""
    return value - abs(value) * 2.0**-22 - _TINY


def _float32_below(values):
    """float32 thresholds no larger than the float64 values (so no item is lost by rounding)."""
    if np.ndim(values) == 0:
        out = np.float32(values)
        return np.nextafter(out, np.float32(-np.inf)) if float(out) > values else out
    out = np.asarray(values).astype(np.float32)
    too_big = out.astype(np.float64) > values
    out[too_big] = np.nextafter(out[too_big], np.float32(-np.inf))
    return out
