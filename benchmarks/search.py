"""Benchmark of the likelihood search engine (issue 3): naive numpy vs the engine vs FAISS.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/search.py
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/search.py --warm 10

Synthetic catalogs (mu ~ N(0, 1), log sigma ~ U(-3, 0), stored as float16 like a bundle),
N = 60,000 and 1,000,000, d = 10 and 32, one query and a batch of 64, k = 10. Single-threaded.
The methods are timed interleaved (one call of each per round, queries drawn afresh) so that
load from other processes hits them alike; figures are medians over the rounds. Interleaved,
each method mostly finds its data evicted by the others (at 60k the item vectors, 5 and 16 MB,
could stay in the 32 MB L3 cache), except that the engine and its label filter read the same
item vectors. With --warm CALLS each method runs CALLS times in a row per round instead (one
untimed call first): each is timed warm, as on a kiosk that runs only it.

- naive: the seeds' float64 broadcasting, (B, N, d) temporaries, argpartition and logsumexp.
- engine: LikelihoodSearch.search (exact top k, float64 scores and p(x|z)).
- engine+label: the same with a label filter (one of 10 classes).
- faiss: IndexFlatIP over the same float32 item vectors w(x) = [-a/2, a mu, c], query
  [z^2, z, 1]: float32 top k only, no rescoring and no p(x|z).
- bound: the streaming bound, bytes of the float32 item vectors / measured memory bandwidth.
"""

from __future__ import annotations

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # before numpy loads its BLAS

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from vae_edge.runtime.search import (  # noqa: E402
    LikelihoodSearch,
    item_vectors,
    log_likelihood_reference,
    top_k_rows,
)

K = 10
# The naive (B, N, d) float64 temporaries are skipped above this many elements.
NAIVE_LIMIT = 2e8


def naive_search(z, mu16, log_sigma16, k):
    """What the seeds write: broadcast the direct formula, argpartition, logsumexp."""
    scores = log_likelihood_reference(z, mu16, log_sigma16)
    rows = top_k_rows(scores, k)
    top = scores.max(axis=1, keepdims=True)
    log_total = top + np.log(np.exp(scores - top).sum(axis=1, keepdims=True))
    best = np.take_along_axis(scores, rows, axis=1)
    return rows, np.exp(best - log_total)


def memory_bandwidth(megabytes: int = 512, rounds: int = 7) -> float:
    """Single-threaded read bandwidth in bytes/s: median time to reduce a large float32 array."""
    data = np.ones(megabytes * (1 << 20) // 4, dtype=np.float32)
    data.max()  # touch every page first
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        data.max()
        times.append(time.perf_counter() - start)
    return data.nbytes / statistics.median(times)


def timed(methods: dict, make_query, rounds: int, warm: int = 0) -> dict:
    """Median seconds per method, interleaved: each round calls every method once on the same
    query, in a fresh random order (no method always follows another).

    warm > 0: each round calls every method warm + 1 times in a row instead (fresh queries),
    and drops the first call: each method is timed with its own data as warm as the caches
    keep it, as on a kiosk that runs one engine (interleaving single calls lets methods evict
    each other's data, and the engine and its label filter share their item vectors)."""
    names = list(methods)
    times = {name: [] for name in names}
    order = np.random.default_rng(2)
    for _ in range(rounds):
        query = make_query()
        for name in order.permutation(names):
            for call in range(warm + 1):
                if call:
                    query = make_query()
                start = time.perf_counter()
                methods[name](query)
                elapsed = time.perf_counter() - start
                if call or not warm:
                    times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def features(z):
    return np.concatenate([z * z, z, np.ones((z.shape[0], 1))], axis=1).astype(np.float32)


def methods_for(engine, index, batch):
    def one(z):
        return z if batch > 1 else z[0]

    return {
        "engine": lambda z: engine.search(one(z), K),
        "label": lambda z: engine.search(one(z), K, label=3),
        "faiss": lambda z: index.search(features(z), K),
    }


def load_faiss():
    """The faiss module, single-threaded; None (and a message) where faiss-cpu is missing."""
    try:
        import faiss
    except ImportError:
        print("faiss-cpu is needed: pip install -e '.[bench]'", file=sys.stderr)
        return None
    faiss.omp_set_num_threads(1)
    return faiss


def flat_index(faiss, vectors: np.ndarray):
    """FAISS IndexFlatIP over float32 item vectors (n, 2d+1): exact inner-product search."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def catalog(n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((n, d)).astype(np.float16)
    log_sigma = rng.uniform(-3.0, 0.0, (n, d)).astype(np.float16)
    labels = rng.integers(0, 10, n)
    return mu, log_sigma, labels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[60_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[10, 32])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=300,
                        help="rounds for N = 60k, one query; fewer where a call is longer")
    parser.add_argument("--warm", type=int, default=0, metavar="CALLS",
                        help="time CALLS calls in a row per method and round (after one "
                             "untimed call) instead of one call each, interleaved; rounds are "
                             "divided by CALLS")
    args = parser.parse_args(argv)
    if args.warm < 0:
        parser.error(f"--warm must be >= 0, got {args.warm}")
    faiss = load_faiss()
    if faiss is None:
        return 2

    bandwidth = memory_bandwidth()
    mode = f"warm: {args.warm} calls in a row per method" if args.warm else "interleaved"
    print(f"numpy {np.__version__}, faiss {faiss.__version__}, single-threaded, k = {K}, {mode}")
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    header = (f"{'N':>9} {'d':>3} {'B':>3} | {'naive ms':>9} {'engine ms':>9} {'+label ms':>9} "
              f"{'faiss ms':>9} {'bound ms':>8} | {'eng/faiss':>9} {'eng/bound':>9} "
              f"{'label/eng':>9} {'naive/eng':>9}")
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(1)
    for n in args.sizes:
        for d in args.dims:
            mu, log_sigma, labels = catalog(n, d)
            engine = LikelihoodSearch(mu, log_sigma, np.arange(n), labels)
            vectors = item_vectors(mu, log_sigma)
            index = flat_index(faiss, vectors)
            bound = vectors.nbytes / bandwidth
            for batch in args.batches:
                work = n * batch / 60_000
                rounds = max(5, int(args.rounds / work ** 0.75))
                if args.warm:
                    rounds = max(3, rounds // args.warm)
                shape = (batch, d)
                result = timed(methods_for(engine, index, batch),
                               lambda shape=shape: rng.standard_normal(shape), rounds, args.warm)
                # naive apart: its (B, N, d) temporaries would flush the others' caches
                naive_ok = batch * n * d <= NAIVE_LIMIT
                if naive_ok:
                    result.update(timed(
                        {"naive": lambda z, mu=mu, ls=log_sigma: naive_search(z, mu, ls, K)},
                        lambda shape=shape: rng.standard_normal(shape), max(3, rounds // 10)))
                ms = {name: seconds * 1e3 for name, seconds in result.items()}
                naive = f"{ms['naive']:9.2f}" if naive_ok else f"{'skipped':>9}"
                ratio = f"{ms['naive'] / ms['engine']:9.1f}" if naive_ok else f"{'-':>9}"
                bound_cell = f"{bound * 1e3:8.2f}" if batch == 1 else f"{'-':>8}"
                bound_ratio = f"{result['engine'] / bound:9.2f}" if batch == 1 else f"{'-':>9}"
                print(f"{n:>9} {d:>3} {batch:>3} | {naive} {ms['engine']:9.3f} "
                      f"{ms['label']:9.3f} {ms['faiss']:9.3f} {bound_cell} | "
                      f"{ms['engine'] / ms['faiss']:9.2f} {bound_ratio} "
                      f"{ms['label'] / ms['engine']:9.2f} {ratio}   ({rounds} rounds)",
                      flush=True)
            del engine, index, vectors
    return 0


if __name__ == "__main__":
    sys.exit(main())
