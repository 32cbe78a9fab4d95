"""Training throughput of vae-train on 1 and N CPU ranks (torchrun, gloo), and on a GPU when
PyTorch sees one, measured side by side in one run.

    python benchmarks/train_ranks.py [--ranks 1,2] [--threads 1] [--subset 6000] [--epochs 3]
                                     [--repeats 3]

Each configuration is a fresh `vae-train` (under `python -m torch.distributed.run
--standalone --nproc-per-node N` for N > 1) on Fashion-MNIST with the default model, the
same options and the same global batch; the configurations take turns, --repeats times. Each
rank runs --threads torch threads (OMP_NUM_THREADS): on a machine shared with other work, more
threads per process than free cores make OpenMP wait on its own barriers, so the default is one
thread per rank and N ranks use N cores. Images per second is the training images over the
epoch's seconds (metrics.jsonl; the evaluation on --test-subset images is included, kept
small), the median and the best (the quickest epoch: the least disturbed by other work on a
shared machine) over the epochs after the first of every repeat. A GPU configuration
(--device cuda, one rank) is added when torch.cuda.is_available().
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TRAIN = Path(sys.executable).parent / "vae-train"


def configurations(ranks: list[int]) -> list[tuple[str, int]]:
    import torch

    found = [("cpu", n) for n in ranks]
    if torch.cuda.is_available():
        found.append(("cuda", 1))
    return found


def run(device: str, n: int, threads: int, options: list[str], out: Path) -> list[float]:
    """Seconds of each epoch of one vae-train run."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    launcher = [] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc-per-node", str(n)]
    subprocess.run([*launcher, str(TRAIN), "--out", str(out), "--device", device, *options],
                   env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["seconds"] for row in rows]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2", help="CPU rank counts to compare")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--subset", type=int, default=6000)
    parser.add_argument("--test-subset", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    options = ["--subset", str(args.subset), "--test-subset", str(args.test_subset), "--epochs",
               str(args.epochs), "--batch-size", str(args.batch_size), "--no-progress"]
    found = configurations([int(n) for n in args.ranks.split(",")])
    seconds: dict[tuple[str, int], list[float]] = {config: [] for config in found}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for device, n in found:
                out = Path(tmp) / f"{device}-{n}-{repeat}"
                seconds[(device, n)] += run(device, n, args.threads, options, out)[1:]
    print(f"vae-train, default model, {args.subset} Fashion-MNIST images, batch "
          f"{args.batch_size}, {args.threads} thread(s) per rank, {os.cpu_count()} cores; "
          f"median of {args.repeats} x "
          f"{args.epochs - 1} epochs")
    print(f"{'device':<8}{'ranks':>6}{'images/s median':>17}{'best':>7}"
          f"{'median vs 1 CPU rank':>22}{'best vs 1 CPU rank':>20}")
    rates = {config: (args.subset / statistics.median(times), args.subset / min(times))
             for config, times in seconds.items()}
    base = rates[found[0]]
    for (device, n), (median, best) in rates.items():
        print(f"{device:<8}{n:>6}{median:>17.0f}{best:>7.0f}{median / base[0]:>21.2f}x"
              f"{best / base[1]:>19.2f}x")


if __name__ == "__main__":
    main()
