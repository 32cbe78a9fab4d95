"""One query's cost by match mode on a bundle, single thread: what by="decoded" adds.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/match_modes.py [--bundle DIR]
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/match_modes.py --baseline REV

Runtime.nearest(z, by="latent") searches by log q(z|x) (without the round-trip distance,
which it computes only when asked); by="decoded" decodes z, encodes the garment and searches
by -W2^2 / (2 tau^2) between its posterior and each item's, and reports |z - mu(decode(z))|.
Beside them, each search alone on the garment's posterior: by W2 and by the expected
log-likelihood (the likelihood engine's search_gaussian, by which by="decoded" ranked before
W2), and each after the decoder and the encoder: the two rankings' cost for one design, side
by side. Each round times every step once for a fresh z uniform in the slider box, the steps
in an order rotated by one each round, so that no step always follows the one whose item
vectors are in the cache; medians over the rounds.

--baseline REV then times the public call nearest(z, by="decoded") alone, of this tree and of
the git revision REV (its runtime and shipped bundle), each in its own processes, the two
alternating run after run: what a kiosk's query costs here against REV.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vae_edge.runtime import Runtime
from vae_edge.runtime.search import LikelihoodSearch
from vae_edge.runtime.wasserstein import WassersteinSearch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from footprint import extract_revision, link_tree  # noqa: E402

# One run of the public call in a child process: the median seconds of `rounds` designs.
NEAREST_BY_DECODED = """
import statistics, sys, time
import numpy as np
from vae_edge.runtime import Runtime
bundle, rounds, k, extent, seed = sys.argv[1] or None, *map(float, sys.argv[2:])
rt = Runtime.load(bundle, threads=1)
rng = np.random.default_rng(int(seed))
designs = rng.uniform(-extent, extent, (int(rounds) + 10, rt.latent_dim))  # 10 to warm up
seconds = []
for z in designs:
    started = time.perf_counter()
    rt.nearest(z, k=int(k), by="decoded")
    seconds.append(time.perf_counter() - started)
print(statistics.median(seconds[10:]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None, help="bundle directory (default: shipped)")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("-k", type=int, default=6)
    parser.add_argument("--range", type=float, default=5.0, help="z uniform in [-RANGE, RANGE]")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="also time nearest(by='decoded') of this tree against git revision "
                             "REV, side by side in alternating processes")
    parser.add_argument("--runs", type=int, default=12,
                        help="with --baseline: processes per tree (default: %(default)s)")
    args = parser.parse_args()

    rt = Runtime.load(args.bundle, threads=1)
    index = rt.index
    engine = LikelihoodSearch(index.mu, index.log_sigma, index.ids, index.labels)
    wasserstein = WassersteinSearch(index.mu, index.log_sigma, index.ids, index.labels)
    rng = np.random.default_rng(0)
    k = args.k
    steps = {
        "decode": lambda z: rt.decode(z),
        "decode + encode": lambda z: rt.encode(rt.decode(z)),
        "search by z alone (engine)": lambda z: engine.search(z, k),
        # the posterior of the decoded garment, computed outside the timing
        "search by a posterior alone (engine)": lambda z: engine.search_gaussian(
            *posteriors[z.tobytes()], k),
        "search by a posterior alone (W2 engine)": lambda z: wasserstein.search_gaussian(
            *posteriors[z.tobytes()], k),
        "decode + encode + expected log-likelihood": lambda z: engine.search_gaussian(
            *rt.encode(rt.decode(z)), k),
        "decode + encode + W2": lambda z: wasserstein.search_gaussian(
            *rt.encode(rt.decode(z)), k),
        "nearest, by latent": lambda z: rt.nearest(z, k=k, by="latent"),
        "nearest, by decoded": lambda z: rt.nearest(z, k=k, by="decoded"),
    }
    times = {name: [] for name in steps}
    posteriors = {}
    names = list(steps)
    for round_ in range(-10, args.rounds):  # 10 rounds of warm-up
        z = rng.uniform(-args.range, args.range, rt.latent_dim)
        posteriors = {z.tobytes(): rt.encode(rt.decode(z))}
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            steps[name](z)
            if round_ >= 0:
                times[name].append(time.perf_counter() - started)
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    print(f"bundle {rt.root}: {len(index)} items, d = {rt.latent_dim}, k = {k}, one thread, "
          f"{args.rounds} rounds, medians")
    for name, ms in medians.items():
        print(f"  {name:<42}{ms:8.3f} ms")
    beyond = medians["nearest, by decoded"] - medians["search by a posterior alone (W2 engine)"]
    ratio = medians["nearest, by decoded"] / medians["nearest, by latent"]
    print(f"  by decoded, beyond its search: {beyond:.3f} ms; by decoded / by latent: "
          f"{ratio:.2f}")
    alone = (medians["search by a posterior alone (W2 engine)"]
             / medians["search by a posterior alone (engine)"])
    after = medians["decode + encode + W2"] / medians["decode + encode + expected log-likelihood"]
    print(f"  W2 / expected log-likelihood: search alone {alone:.2f}, after decode + encode "
          f"{after:.2f}")
    if args.baseline:
        against_revision(args)


def against_revision(args) -> None:
    """nearest(z, by="decoded") of this tree and of args.baseline, alternating processes."""
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this tree": link_tree(Path(tmp) / "tree"),
                 args.baseline: extract_revision(args.baseline, Path(tmp) / "baseline")}
        medians = {tree: [] for tree in trees}
        for run in range(args.runs):
            order = list(trees) if run % 2 else list(trees)[::-1]
            for tree in order:  # the same designs for both trees in each run
                out = subprocess.run(
                    [sys.executable, "-c", NEAREST_BY_DECODED, args.bundle or "",
                     str(args.rounds), str(args.k), str(args.range), str(run)],
                    env={**os.environ, "PYTHONPATH": str(trees[tree])}, check=True,
                    capture_output=True, text=True).stdout
                medians[tree].append(1e3 * float(out))
    print(f"nearest(z, by='decoded'), {args.runs} processes per tree of {args.rounds} designs "
          "each, alternating; medians of the processes' medians:")
    for tree, values in medians.items():
        print(f"  {tree:<20} {statistics.median(values):.3f} ms (processes {min(values):.3f} "
              f"to {max(values):.3f})")
    this, base = (statistics.median(values) for values in medians.values())
    print(f"  this tree / {args.baseline}: {this / base:.2f}")


if __name__ == "__main__":
    main()
