"""Benchmark of the likelihood search engine against plain numpy, the numpy floor and FAISS.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/search.py
    git show REV:runtime/search.py > /tmp/other.py
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/search.py --other /tmp/other.py

Synthetic catalogs (mu ~ N(0, 1), log sigma ~ U(-3, 0), stored as float16 like a bundle),
N = 60,000 and 1,000,000, d = 10 and 32, one query and a batch of 64, k = 10, single-threaded.
All methods are timed interleaved in one run (each round calls every method once on the same
fresh query, in a random order), medians over the rounds. Each method reads its own copy of
the item vectors w(x) = [-a/2, a mu, c], except that the engine and its label filter share one.

- naive: the plain numpy a user would write: one float32 product of the queries [z^2, z, 1]
  with the item vectors, argpartition, the k best sorted. Not exact (float32 cancellation
  where sigma is small) and no p(x|z).
- product (one query): the float32 score vector alone, in the engine's layout: any numpy
  engine computes it.
- floor (one query): the product, its maximum and one comparison listing the items within
  log N + 20 nats of it, the items p(x|z) needs: the least an exact numpy engine with p(x|z)
  can do.
- engine, +label: LikelihoodSearch.search, exact top k and p(x|z); with a label filter (one of
  10 classes).
- faiss: IndexFlatIP over the same float32 item vectors: float32 top k only.
- other (--other FILE): LikelihoodSearch of another runtime/search.py (it needs only numpy).

First, on the shipped bundle (models/, N = 60,000, d = 16), one query of the public call
Runtime.nearest(z, k=10) (by latent: validation, search, metadata) beside the engine alone,
the floor and FAISS on the same item vectors; --no-shipped leaves it out.
"""

from __future__ import annotations

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # before numpy loads its BLAS

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from vae_edge.runtime.search import SKIP_NATS, LikelihoodSearch, item_vectors  # noqa: E402

K = 10


def timed(methods: dict, make_query, rounds: int) -> dict:
    """Median seconds per method: each round calls every method once on the same query, in a
    fresh random order (no method always follows another)."""
    times = {name: [] for name in methods}
    order = np.random.default_rng(2)
    for _ in range(rounds):
        query = make_query()
        for name in order.permutation(list(methods)):
            start = time.perf_counter()
            methods[name](query)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def features(z):
    return np.concatenate([z * z, z, np.ones((z.shape[0], 1))], axis=1).astype(np.float32)


def catalog(n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((n, d)).astype(np.float16)
    log_sigma = rng.uniform(-3.0, 0.0, (n, d)).astype(np.float16)
    labels = rng.integers(0, 10, n)
    return mu, log_sigma, labels


def naive_search(z, vectors, k):
    """One float32 product, argpartition, the k best sorted: rows (B, k)."""
    scores = features(z) @ vectors.T
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def floor_search(z, columns, window):
    """The product, its maximum and the comparison for the items p(x|z) needs."""
    scores = features(z)[0] @ columns
    return np.flatnonzero(scores >= float(scores.max()) - window)


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location("other_search", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def catalog_rows(n, d, args, faiss, other, names, rng):
    """Time every method on one synthetic catalog; yields one table line per batch size."""
    mu, log_sigma, labels = catalog(n, d)
    engine = LikelihoodSearch(mu, log_sigma, np.arange(n), labels)
    rows_copy = item_vectors(mu, log_sigma)  # (n, 2d+1), as a user would build it
    index = faiss.IndexFlatIP(rows_copy.shape[1])
    index.add(rows_copy.copy())
    product_copy = np.ascontiguousarray(rows_copy.T)
    floor_copy = product_copy.copy()
    window = math.log(n) + SKIP_NATS
    other_engine = other.LikelihoodSearch(mu, log_sigma, np.arange(n), labels) if other else None
    for batch in args.batches:
        def one(z, batch=batch):
            return z if batch > 1 else z[0]

        methods = {
            "naive": lambda z: naive_search(z, rows_copy, K),
            "engine": lambda z: engine.search(one(z), K),
            "label": lambda z: engine.search(one(z), K, label=3),
            "faiss": lambda z: index.search(features(z), K),
        }
        if batch == 1:
            methods["product"] = lambda z: features(z)[0] @ product_copy
            methods["floor"] = lambda z: floor_search(z, floor_copy, window)
        if other_engine is not None:
            methods["other"] = lambda z: other_engine.search(one(z), K)
        work = n * batch / 60_000
        rounds = max(5, int(args.rounds / work ** 0.75))
        ms = {name: seconds * 1e3 for name, seconds in timed(
            methods, lambda shape=(batch, d): rng.standard_normal(shape), rounds).items()}
        cells = " ".join(f"{ms[name]:10.3f}" if name in ms else f"{'-':>10}" for name in names)
        floor = (f"{ms['engine'] - ms['floor']:9.3f} {ms['engine'] / ms['floor']:9.2f}"
                 if "floor" in ms else f"{'-':>9} {'-':>9}")
        line = (f"{n:>9} {d:>3} {batch:>3} | {cells} | {floor} "
                f"{ms['engine'] / ms['faiss']:9.2f} {ms['label'] / ms['engine']:9.2f}")
        if other_engine is not None:
            line += f" {ms['engine'] / ms['other']:9.2f}"
        yield f"{line}   ({rounds} rounds)"


def shipped_rows(args, faiss, rng):
    """One query of Runtime.nearest on the shipped bundle against FAISS on its item vectors."""
    from vae_edge.runtime import Runtime

    rt = Runtime.load()
    mu, log_sigma = rt.index.mu, rt.index.log_sigma
    n, d = mu.shape
    engine = LikelihoodSearch(mu, log_sigma, np.arange(n), rt.index.labels)
    rows_copy = item_vectors(mu, log_sigma)
    index = faiss.IndexFlatIP(rows_copy.shape[1])
    index.add(rows_copy.copy())
    floor_copy = np.ascontiguousarray(rows_copy.T)
    window = math.log(n) + SKIP_NATS
    methods = {
        "nearest": lambda z: rt.nearest(z[0], k=K),
        "engine": lambda z: engine.search(z[0], K),
        "floor": lambda z: floor_search(z, floor_copy, window),
        "faiss": lambda z: index.search(features(z), K),
    }
    ms = {name: seconds * 1e3 for name, seconds in timed(
        methods, lambda: rng.standard_normal((1, d)), args.rounds).items()}
    print(f"shipped bundle, N = {n}, d = {d}, one query, k = {K}, {args.rounds} rounds: " +
          ", ".join(f"{name} {value:.3f} ms" for name, value in ms.items()))
    print(f"  nearest/faiss {ms['nearest'] / ms['faiss']:.2f}, engine/faiss "
          f"{ms['engine'] / ms['faiss']:.2f}, nearest/floor {ms['nearest'] / ms['floor']:.2f}, "
          f"nearest-engine {ms['nearest'] - ms['engine']:.3f} ms\n", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[60_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[10, 32])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=300,
                        help="rounds for N = 60k, one query; fewer where a call is longer")
    parser.add_argument("--other", type=Path, metavar="FILE",
                        help="another runtime/search.py to time side by side")
    parser.add_argument("--no-shipped", dest="shipped", action="store_false",
                        help="leave out Runtime.nearest on the shipped bundle")
    args = parser.parse_args(argv)
    try:
        import faiss
    except ImportError:
        print("faiss-cpu is needed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    faiss.omp_set_num_threads(1)
    other = None
    if args.other is not None:
        if not args.other.is_file():
            print(f"no such file: {args.other}", file=sys.stderr)
            return 2
        other = load_module(args.other)

    print(f"numpy {np.__version__}, faiss {faiss.__version__}, single-threaded, k = {K}")
    rng = np.random.default_rng(1)
    if args.shipped:
        shipped_rows(args, faiss, rng)
    names = ["naive", "product", "floor", "engine", "label", "faiss"] + (["other"] if other else [])
    header = (f"{'N':>9} {'d':>3} {'B':>3} | " + " ".join(f"{name + ' ms':>10}" for name in names)
              + f" | {'eng-floor':>9} {'eng/floor':>9} {'eng/faiss':>9} {'label/eng':>9}"
              + (f" {'eng/other':>9}" if other else ""))
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        for d in args.dims:
            for line in catalog_rows(n, d, args, faiss, other, names, rng):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
