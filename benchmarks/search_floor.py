"""How fast could any numpy engine answer one query? The float32 product alone, and the product
plus the one scan p(x|z) needs, against FAISS and the engine, timed side by side.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/search_floor.py

Same synthetic catalogs, query features and FAISS index as benchmarks/search.py, one query,
k = 10. Four methods, each reading its own copy of the float32 item vectors w(x) = [-a/2,
a mu, c] (so no method finds another's data in cache), timed interleaved in a random order per
round, medians over the rounds:

- product: the score vector, one matrix-vector product over the item vectors in the engine's
  layout (one row per component, one column per item). Any exact numpy engine computes it.
- scan: the product, its maximum, and one comparison that lists the items within
  log N + 20 nats of the maximum: the items p(x|z) must look at (LikelihoodSearch does this,
  then rescoring and p(x|z) on those items).
- engine: LikelihoodSearch.search (exact top k in float64, and p(x|z)).
- faiss: IndexFlatIP search, float32 top k only.

Unlike benchmarks/search.py (where the filtered and the unfiltered search share the engine's
item vectors), no two methods here share data.

Where product / faiss is near 1, an engine that must also select and compute p(x|z) cannot be
faster than FAISS without reading fewer bytes per item or fusing the passes into the product
(a compiled kernel), neither of which numpy offers.
"""

from __future__ import annotations

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # before numpy loads its BLAS

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import K, catalog, features, flat_index, load_faiss, timed  # noqa: E402

from vae_edge.runtime.search import SKIP_NATS, LikelihoodSearch, item_vectors  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[60_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[10, 32])
    parser.add_argument("--rounds", type=int, default=300,
                        help="rounds at N = 60k; fewer for larger catalogs")
    args = parser.parse_args(argv)
    faiss = load_faiss()
    if faiss is None:
        return 2
    print(f"numpy {np.__version__}, faiss {faiss.__version__}, single-threaded, one query, "
          f"k = {K}")
    print(f"{'N':>9} {'d':>3} | {'product ms':>10} {'scan ms':>8} {'engine ms':>9} "
          f"{'faiss ms':>8} | {'product/faiss':>13} {'scan/faiss':>10} {'eng/faiss':>9} "
          f"{'near items':>10}")
    rng = np.random.default_rng(1)
    for n in args.sizes:
        for d in args.dims:
            mu, log_sigma, labels = catalog(n, d)
            engine = LikelihoodSearch(mu, log_sigma, np.arange(n), labels)
            vectors = item_vectors(mu, log_sigma)
            index = flat_index(faiss, vectors)
            product_copy = np.ascontiguousarray(vectors.T)
            scan_copy = product_copy.copy()
            del vectors
            window = math.log(n) + SKIP_NATS
            near_counts = []

            def scan(z, w=scan_copy, window=window, near_counts=near_counts):
                scores = features(z)[0] @ w
                near = np.flatnonzero(scores >= float(scores.max()) - window)
                near_counts.append(near.size)

            methods = {"product": lambda z, w=product_copy: features(z)[0] @ w,
                       "scan": scan,
                       "engine": lambda z, e=engine: e.search(z[0], K),
                       "faiss": lambda z, i=index: i.search(features(z), K)}
            rounds = max(20, int(args.rounds * (60_000 / n) ** 0.75))
            ms = {name: s * 1e3 for name, s in
                  timed(methods, lambda d=d: rng.standard_normal((1, d)), rounds).items()}
            print(f"{n:>9} {d:>3} | {ms['product']:10.3f} {ms['scan']:8.3f} "
                  f"{ms['engine']:9.3f} {ms['faiss']:8.3f} | "
                  f"{ms['product'] / ms['faiss']:13.2f} {ms['scan'] / ms['faiss']:10.2f} "
                  f"{ms['engine'] / ms['faiss']:9.2f} {int(np.median(near_counts)):>10}   "
                  f"({rounds} rounds)", flush=True)
            del engine, index, product_copy, scan_copy
    return 0


if __name__ == "__main__":
    sys.exit(main())
