"""One-query timing of two versions of the search engine side by side, with FAISS as referee.

    git show 4395e14:runtime/search.py > /tmp/old_search.py
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/search_versions.py /tmp/old_search.py

The old module file is imported on its own (it needs only numpy); the new one is the installed
vae_edge.runtime.search. Same catalogs as benchmarks/search.py; the three methods are timed
interleaved in a random order per round, medians over the rounds.
"""

from __future__ import annotations

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # before numpy loads its BLAS

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import K, catalog, features, flat_index, load_faiss, timed  # noqa: E402

from vae_edge.runtime import search as new_search  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="an older runtime/search.py (from git show)")
    parser.add_argument("--rounds", type=int, default=400, help="rounds at N = 60k")
    args = parser.parse_args(argv)
    if not args.old.is_file():
        print(f"no such file: {args.old}", file=sys.stderr)
        return 2
    faiss = load_faiss()
    if faiss is None:
        return 2
    spec = importlib.util.spec_from_file_location("old_search", args.old)
    old_search = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old_search)
    rng = np.random.default_rng(1)
    print(f"{'N':>9} {'d':>3} | {'old ms':>8} {'new ms':>8} {'faiss ms':>8} | "
          f"{'new/old':>7} {'old/faiss':>9} {'new/faiss':>9}")
    for n, d in [(60_000, 10), (60_000, 32), (1_000_000, 10), (1_000_000, 32)]:
        mu, log_sigma, labels = catalog(n, d)
        old = old_search.LikelihoodSearch(mu, log_sigma, np.arange(n), labels)
        new = new_search.LikelihoodSearch(mu, log_sigma, np.arange(n), labels)
        index = flat_index(faiss, new_search.item_vectors(mu, log_sigma))
        methods = {"old": lambda z, e=old: e.search(z[0], K),
                   "new": lambda z, e=new: e.search(z[0], K),
                   "faiss": lambda z, i=index: i.search(features(z), K)}
        rounds = max(20, int(args.rounds * (60_000 / n) ** 0.75))
        ms = {name: s * 1e3 for name, s in
              timed(methods, lambda d=d: rng.standard_normal((1, d)), rounds).items()}
        print(f"{n:>9} {d:>3} | {ms['old']:8.3f} {ms['new']:8.3f} {ms['faiss']:8.3f} | "
              f"{ms['new'] / ms['old']:7.2f} {ms['old'] / ms['faiss']:9.2f} "
              f"{ms['new'] / ms['faiss']:9.2f}   ({rounds} rounds)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
