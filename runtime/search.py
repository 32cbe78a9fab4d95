"""Exact likelihood search over a catalog of diagonal Gaussians q(z|x) (design: docs/search.md).

For a query z and each catalog item x with posterior N(mu(x), sigma(x)^2):

    log q(z|x) = sum_i [ -(z_i - mu_i)^2 / (2 sigma_i^2) - log sigma_i ] - (d/2) log 2pi

With a = 1/sigma^2 this is the inner product of the item vector w(x) = [-a/2, a mu, c(x)],
c(x) = -sum(a mu^2/2 + log sigma) - (d/2) log 2pi, with the query vector q = [z^2, z, 1]
(an image query N(z, var): q = [z^2 + var, z, 1] gives the expected log-likelihood). The
item vectors are stored in float32, so one float32 product scores the catalog; a batch of
queries is one matrix product, and the steps below run on the whole score matrix at once,
with one threshold per query (one query without a label filter runs them on scalars):

1. Error bound. q and w are rounded to float32 (one unit u = 2^-24 each) and summed in any
   order, so |float32 score - exact score| <= gamma_{m+2} |w| |q| for m = 2d+1 terms
   (Higham 3.1-3.5, gamma_n = nu / (1 - nu)); doubled, it also covers the float64 rounding of
   w and of the direct formula. E = that bound with the catalog's largest |w|: every item's
   float32 score t lies within E of its exact score s.
2. p(x|z) = q(z|x) / S, S the sum of q(z|x') over the catalog (a uniform prior over items).
   For any item's float32 score T the best exact score b is >= T - E; T is max t, or
   unfiltered the largest of step 3's maxima (the same pass). Every item within
   L = log N + 20 nats of b has t >= T - L - 2E: one comparison finds them (with the
   threshold rounded to float32: rounding is monotone, so no float32 score at or above a
   threshold lies below its rounding). Each item left out scores below b - L, so together
   they weigh < N e^-L = e^-20 of S. Of the n items found, those with t >= T - H are
   rescored in float64, the others count with their float32 scores: each weighs
   < e^(2E - H) of S and is off by a factor within e^(+-E), so together they move S by
   < n e^(2E - H) (e^E - 1) <= n E e^(3E - H), which H = log(n E) + 3E + log 1e7 makes
   <= 1e-7. So p is within 1.1e-7 relative of exact, plus float64 rounding of the scores.
3. Top k. Any k items whose float32 scores reach t_k have exact scores >= t_k - E, so every
   item of the top k has t >= t_k - 2E (the floor). t_k is the k-th largest maximum of the
   1024 disjoint groups {j, j + 1024, ...} of the scores (of all scores where they are too
   few), so k distinct items reach it; one query without a label filter and k <= 16 takes
   the least of the maxima of k disjoint chunks of its scores, which k distinct items reach
   too (a lower floor, near the (k ln k)-th best item, for two reductions instead of a
   sort). Unfiltered, step 2's comparison uses the lower of its threshold and the floor, and
   the items found at or above the lower of T - H and the floor are rescored; with a label
   filter, t_k comes from the label's scores and one more comparison over them lists its
   candidates. The candidates, rescored in float64, are sorted by (exact score desc, row
   asc): ties go to the lower row (bundle ids ascend with rows).

Range. The float32 stage needs max|w| |q| < 1e37 (no overflow to inf, 34x below the float32
limit); a query beyond that is refused with ValueError, never answered wrongly. No trained
bundle comes near it: |z| <= 1e6 (the runtime's limit) gives |q| <= 1e12 sqrt(d), and items
with log sigma >= -20 and |mu| <= 100 have |w| < 2e21 d, so the product stays below 2e33 d^1.5,
under 1e37 for every d up to 290 (the shipped bundle: log sigma >= -3.5, |mu| <= 5.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOG_2PI = math.log(2.0 * math.pi)
UNIT_ROUNDOFF = 2.0**-24  # float32
SKIP_NATS = 20.0  # items below best - log N - SKIP_NATS weigh < e^-SKIP_NATS of p's sum
P_TOLERANCE = 1e-7  # items counted with float32 scores move p's sum by at most this
SAFE_MAGNITUDE = 1e37  # float32 scores only while max|w| |q| stays below this
GROUPS = 1024  # group maxima: a floor under the k-th best score in one pass (_group_maxima)
CHUNKED_K = 16  # one query's floor up to this k: the least of k chunk maxima (step 3)


@dataclass(frozen=True)
class Matches:
    """Search results, best first.

    For one query every array has shape (k,); for a batch of B queries, (B, k).
    `rows` index the catalog arrays; `ids` are the catalog's own item ids.
    """

    rows: np.ndarray  # int64
    ids: np.ndarray  # the catalog's item ids (a bundle's: str, its SKUs)
    labels: np.ndarray  # int64
    log_likelihoods: np.ndarray  # float64, log q(z|x)
    # p(x|z) = q(z|x) / sum over the whole catalog of q(z|x'): a uniform prior over items.
    probabilities: np.ndarray  # float64
    # Runtime.nearest: |z - mu(decode(z))| per query, () or (B,), float64; how far z lies
    # from where the catalog is (Runtime.roundtrip_distance). None for photo queries, and for
    # latent queries unless asked for (Runtime.nearest(with_distance=True)).
    distances: np.ndarray | None = None
    # Runtime.nearest and nearest_image: each item's catalog metadata (the CSV's other
    # columns) as a dict of text, in tuples shaped like ids.
    metadata: tuple | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[-1])


def match_records(matches: Matches, label_names: tuple[str, ...]) -> list[dict]:
    """One query's matches as the JSON records `vae-run nearest --json` and the kiosk give,
    best first; Matches.metadata must be filled in (Runtime.nearest and nearest_image do)."""
    return [
        {"rank": rank, "id": str(item_id), "label": label_names[label],
         "label_id": int(label), "log_likelihood": float(score),
         "probability": float(probability), "metadata": metadata}
        for rank, (item_id, label, score, probability, metadata) in enumerate(
            zip(matches.ids, matches.labels, matches.log_likelihoods, matches.probabilities,
                matches.metadata),
            start=1)
    ]


def item_vectors(mu: np.ndarray, log_sigma: np.ndarray) -> np.ndarray:
    """w(x) = [-a/2, a*mu, c] per item, (n, 2d+1) float32, computed in float64.

    Raises ValueError when a vector does not fit float32 (sigma so small that 1/sigma^2
    overflows): the float32 stage could then not bound its own error.
    """
    mu = np.asarray(mu, dtype=np.float64)
    log_sigma = np.asarray(log_sigma, dtype=np.float64)
    d = mu.shape[1]
    a = np.exp(-2.0 * log_sigma)
    c = -(0.5 * a * mu * mu + log_sigma).sum(axis=1, keepdims=True) - 0.5 * d * LOG_2PI
    with np.errstate(over="ignore", invalid="ignore"):
        w = np.concatenate((-0.5 * a, a * mu, c), axis=1).astype(np.float32)
    bad = ~np.isfinite(w).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"catalog item at row {row} does not fit float32 item vectors (log_sigma min "
            f"{float(log_sigma[row].min()):.4g}, |mu| max {float(np.abs(mu[row]).max()):.4g}): "
            "expected log_sigma >= -40 and |mu| small enough that mu^2/sigma^2 < 1e38"
        )
    return w


def _group_maxima(scores: np.ndarray) -> np.ndarray:
    """Per query, the maxima of the GROUPS disjoint groups {j, j + GROUPS, j + 2 GROUPS, ...}
    of its scores (B, N) -> (B, GROUPS), the last N mod GROUPS scores left out, or the scores
    themselves where they are too few for groups. The element-wise maximum over rows of
    GROUPS runs at memory speed, and the k-th largest of the maxima is reached by k distinct
    items (np.partition of all the scores takes 50 to 70 times as long)."""
    whole = scores.shape[1] // GROUPS * GROUPS
    if whole < 2 * GROUPS:
        return scores
    return scores[:, :whole].reshape(scores.shape[0], -1, GROUPS).max(axis=1)


class LikelihoodSearch:
    """Exact log q(z|x) search over a float16 index (see the module docstring).

    mu, log_sigma: (N, d) arrays (float16 in a bundle), referenced, not copied; ids, labels: (N,).
    Resident memory: the float32 item vectors, (2d+1) x 4 bytes per item, and the rows of
    each label. Queries only read this state, so one engine may serve many threads.
    """

    def __init__(self, mu: np.ndarray, log_sigma: np.ndarray, ids: np.ndarray,
                 labels: np.ndarray) -> None:
        n, d = mu.shape
        self._mu, self._log_sigma = mu, log_sigma
        ids = np.asarray(ids)  # Matches hold them as they are, integer ids widened to int64
        self.ids = ids.astype(np.int64) if ids.dtype.kind in "iu" else ids
        self.labels = np.asarray(labels).astype(np.int64)
        self._vectors = np.empty((self._width(d), n), dtype=np.float32)  # one column per item
        self._max_norm = 0.0  # the largest |w| of the float32 item vectors
        step = 4096  # float64 temporaries of a few MB: the build adds little to peak memory
        for lo in range(0, n, step):
            w = self._item_vectors(mu[lo:lo + step], log_sigma[lo:lo + step])
            self._vectors[:, lo:lo + step] = w.T
            norm = math.sqrt(float(np.square(w, dtype=np.float64).sum(axis=1).max()))
            self._max_norm = max(self._max_norm, norm)
        self._skip_nats = math.log(n) + SKIP_NATS
        gamma = 2.0 * (self._width(d) + 2) * UNIT_ROUNDOFF  # doubled gamma_{m+2}, m terms (step 1)
        self._margin_per_norm = 2.0 * gamma / (1.0 - gamma) * self._max_norm \
            * (1.0 + 4 * UNIT_ROUNDOFF)
        self._log_half_inverse_tolerance = -math.log(2.0 * P_TOLERANCE)  # log(n E) = log(n 2E / 2)
        self._log_norm = 0.5 * d * LOG_2PI
        values, inverse = np.unique(self.labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        self._label_rows = dict(zip(values.tolist(), np.split(order, np.cumsum(
            np.bincount(inverse))[:-1])))

    @staticmethod
    def _width(d: int) -> int:
        """The length m of the item vectors for latent size d."""
        return 2 * d + 1

    @staticmethod
    def _item_vectors(mu: np.ndarray, log_sigma: np.ndarray) -> np.ndarray:
        return item_vectors(mu, log_sigma)

    @staticmethod
    def _features(z: np.ndarray, var: np.ndarray | None) -> np.ndarray:
        """The float64 query vectors [z^2 (+ var), z, 1]: (m,) for z (d,), (B, m) for (B, d)."""
        ones = (1.0,) if z.ndim == 1 else np.ones((z.shape[0], 1))
        return np.concatenate((z * z if var is None else z * z + var, z, ones), axis=-1)

    def label_count(self, label: int | None) -> int:
        if label is None:
            return int(self._mu.shape[0])
        rows = self._label_rows.get(int(label))
        return 0 if rows is None else int(rows.size)

    def search(self, z: np.ndarray, k: int, label: int | None = None) -> Matches:
        """The k most likely items for each query z, (d,) or (B, d).

        k larger than the catalog (or than the label's items) returns them all.
        label: only items of this class id are returned; p(x|z) stays over the whole catalog.
        """
        return self._run(np.asarray(z, dtype=np.float64), None, k, label)

    def search_gaussian(self, mu: np.ndarray, log_sigma: np.ndarray, k: int,
                        label: int | None = None) -> Matches:
        """Rank by the expected log-likelihood E_{z ~ N(mu, sigma^2)} log q(z|x)
        = log q(mu|x) - sum sigma^2 / (2 sigma_x^2), for an encoded image query (mu, log_sigma),
        (d,) or (B, d). `probabilities` are the softmax of these over the catalog."""
        mu = np.asarray(mu, dtype=np.float64)
        return self._run(mu, self.spread(log_sigma), k, label)

    @staticmethod
    def spread(log_sigma: np.ndarray) -> np.ndarray:
        """The second part of a Gaussian query N(mu, sigma^2) for this engine (search_gaussian,
        partial's var), float64: sigma^2."""
        return np.exp(2.0 * np.asarray(log_sigma, dtype=np.float64))

    def partial(self, z: np.ndarray, k: int, label: int | None = None,
                var: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What this catalog contributes when it is one shard of a larger one, for queries z
        (B, d) (with var: Gaussian queries N(z, var), as search_gaussian): the rows (B, k') of
        its top k' = min(k, label's items) items, best first (ties: lower row first), their
        exact float64 scores (B, k') and log S (B,), the log of the sum of q(z|x) over all of
        its items (within P_TOLERANCE, as for p). The top k of the whole catalog are the top k
        of its shards' lists, and its log S is the log-sum-exp of theirs.
        A label none of these items has gives no rows, and log S all the same."""
        z = np.asarray(z, dtype=np.float64).reshape(-1, self._mu.shape[1])
        var = None if var is None else np.asarray(var, dtype=np.float64).reshape(z.shape)
        if self.label_count(label) == 0:
            _, _, log_total = self._ranked(z, var, 1, None)
            return np.empty((len(z), 0), np.int64), np.empty((len(z), 0)), log_total
        return self._ranked(z, var, min(int(k), self.label_count(label)), label)

    def _run(self, z: np.ndarray, var: np.ndarray | None, k: int, label: int | None) -> Matches:
        if z.ndim == 1 and label is None:
            rows, scores, log_total = self._one(z, var, min(int(k), self._mu.shape[0]))
        else:
            k = min(int(k), self.label_count(label))
            single = z.ndim == 1
            z = z.reshape(-1, self._mu.shape[1])
            var = None if var is None else var.reshape(z.shape)
            rows, scores, log_total = self._ranked(z, var, k, label)
            if single:
                rows, scores, log_total = rows[0], scores[0], log_total[0]
            log_total = log_total[..., None]
        return Matches(rows=rows, ids=self.ids[rows], labels=self.labels[rows],
                       log_likelihoods=scores, probabilities=np.exp(scores - log_total))

    def _check_range(self, norm: float) -> None:
        """ValueError where a query vector of this norm could overflow the float32 stage."""
        if norm * self._max_norm >= SAFE_MAGNITUDE:
            raise ValueError(
                f"query too large for this catalog's float32 scores: query vector norm up to "
                f"{norm:.3g} times item vector norm {self._max_norm:.3g}, "
                f"expected the product below {SAFE_MAGNITUDE:g}")

    def _ranked(self, z: np.ndarray, var: np.ndarray | None, k: int, label: int | None):
        """Rows (B, k), exact scores (B, k) and log S (B,) for queries z (B, d)."""
        if z.shape[0] == 1 and label is None:
            rows, scores, log_total = self._one(z[0], None if var is None else var[0], k)
            return rows[None], scores[None], np.array([log_total])
        features = self._features(z, var)
        norms = np.sqrt(np.einsum("bm,bm->b", features, features))
        self._check_range(float(norms.max()))
        margins = norms * self._margin_per_norm  # 2E per query (step 1)
        features = features.astype(np.float32)
        # Queries in groups whose score matrix is no larger than the item vectors (or 16 MB).
        group = max(1, max(self._vectors.size, 1 << 22) // self._vectors.shape[1])
        parts = [self._select(features[lo:lo + group] @ self._vectors, z[lo:lo + group],
                              None if var is None else var[lo:lo + group],
                              margins[lo:lo + group], k, label)
                 for lo in range(0, z.shape[0], group)]
        return parts[0] if len(parts) == 1 else \
            tuple(np.concatenate(column) for column in zip(*parts))

    def _select(self, scores, z, var, margin, k: int, label: int | None):
        """Steps 2 and 3 for queries z (B, d) from their float32 scores (B, N) and 2E (B,):
        the top k rows (B, k), their exact scores and log S (B,)."""
        count, n = scores.shape
        pool = scores if label is None else scores[:, self._label_rows[label]]
        maxima = _group_maxima(pool)
        if maxima.shape[1] < k:
            maxima = pool
        kth = np.partition(maxima, -k, axis=1)[:, -k]  # k distinct items reach it
        # top32: a float32 score (the largest but for the last N mod GROUPS), so b >= top32 - E
        top32 = (maxima if label is None else scores).max(axis=1)
        k_floor = kth - margin  # step 3: every item of the top k is at or above it
        p_floor = top32 - (margin + self._skip_nats)  # step 2: the items p(x|z) needs
        floor = p_floor if label is not None else np.minimum(p_floor, k_floor)
        flat = np.flatnonzero(scores >= floor.astype(np.float32)[:, None])
        query, rows = np.divmod(flat, n)
        near = scores.take(flat).astype(np.float64)
        # Step 2: H = log(n E) + 3E + log(1 / P_TOLERANCE) nats below top32 and further,
        # items count with their float32 scores (e^E - 1 <= E e^E).
        heavy = top32 - (np.log(np.bincount(query, minlength=count) * margin) + 1.5 * margin
                         + self._log_half_inverse_tolerance)
        if label is None:  # the candidates for the top k are among the items found
            rescore = np.flatnonzero(near >= np.minimum(heavy, k_floor)[query])
            ranked = query[rescore], rows[rescore]
            exact = self._exact_scores(z[ranked[0]], None if var is None else var[ranked[0]],
                                       ranked[1])
            near[rescore] = exact
        else:  # the label's items at or above its floor
            rescore = np.flatnonzero(near >= heavy[query])
            found = np.flatnonzero(pool >= k_floor.astype(np.float32)[:, None])
            label_query, position = np.divmod(found, pool.shape[1])
            ranked = label_query, self._label_rows[label][position]
            pairs = np.concatenate((query[rescore], ranked[0]))
            exact = self._exact_scores(z[pairs], None if var is None else var[pairs],
                                       np.concatenate((rows[rescore], ranked[1])))
            near[rescore], exact = exact[:rescore.size], exact[rescore.size:]
        starts = np.searchsorted(query, np.arange(count))  # every query finds its best
        top = np.maximum.reduceat(near, starts)
        log_total = top + np.log(np.add.reduceat(np.exp(near - top[query]), starts))
        # Every query has k ranked items or more, in row order: best first, lower row first.
        order = np.lexsort((-exact, ranked[0]))
        best = order[np.searchsorted(ranked[0], np.arange(count))[:, None] + np.arange(k)]
        return ranked[1][best], exact[best], log_total

    def _one(self, z: np.ndarray, var: np.ndarray | None, k: int):
        """_ranked for one query z (d,) without a label filter, the same steps on scalars, in as
        few numpy calls as they take: after the product has streamed the item vectors through
        the caches, each call costs several microseconds, so the calls below go to numpy's C
        functions directly (ufunc.reduce, ndarray.nonzero, ndarray.argsort) where ndarray.max,
        np.flatnonzero or np.argsort would pass through Python wrappers. Rows (k,), exact
        scores (k,), log S."""
        features = self._features(z, var)
        norm = math.sqrt(features @ features)
        self._check_range(norm)
        margin = norm * self._margin_per_norm  # 2E (step 1)
        scores = features.astype(np.float32) @ self._vectors
        if 0 < k <= CHUNKED_K:  # the maxima of k disjoint chunks: k distinct items reach the least
            maxima = np.maximum.reduce(scores[:scores.size // k * k].reshape(k, -1), axis=1)
            top32, t_k = float(np.maximum.reduce(maxima)), float(np.minimum.reduce(maxima))
        else:
            maxima = _group_maxima(scores[None])[0]
            ordered = np.sort(maxima if maxima.size >= k else scores)
            top32, t_k = float(ordered[-1]), float(ordered[-k])
        k_floor = t_k - margin  # step 3
        floor = min(top32 - (margin + self._skip_nats), k_floor)  # and step 2
        rows = (scores >= np.float32(floor)).nonzero()[0]
        near = scores[rows].astype(np.float64)
        heavy = top32 - (math.log(rows.size * margin) + 1.5 * margin
                         + self._log_half_inverse_tolerance)
        rescore = near >= min(heavy, k_floor)
        ranked = rows[rescore]  # ascending, as nonzero finds them
        exact = self._exact_scores(z, var, ranked)
        near[rescore] = exact
        top = float(np.maximum.reduce(near))
        log_total = top + math.log(float(np.add.reduce(np.exp(near - top))))
        best = (-exact).argsort(kind="stable")[:k]  # score desc, lower row first
        return ranked[best], exact[best], log_total

    def _exact_scores(self, z, var, rows) -> np.ndarray:
        """The direct formula in float64 for the items `rows` and their queries z (and var):
        (len(rows), d) or one (d,) for all: (len(rows),)."""
        # take: a quarter of the time of fancy indexing for a few rows of a 2-D array
        log_sigma = self._log_sigma.take(rows, axis=0).astype(np.float64)
        terms = self._mu.take(rows, axis=0).astype(np.float64)  # float16 widens exactly
        terms -= z
        if var is None:
            terms /= np.exp(log_sigma)
            terms *= terms
        else:
            terms *= terms
            terms += var
            terms /= np.exp(2.0 * log_sigma)
        terms += log_sigma
        terms += log_sigma  # -1/2 sum [((z - mu)/sigma)^2 + 2 log sigma] - (d/2) log 2pi
        return np.add.reduce(terms, axis=1) * -0.5 - self._log_norm  # sum, no Python wrapper
