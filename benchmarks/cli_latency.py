"""Wall time of `vae-run nearest --z ...` on a bundle, process start to exit (median of runs).

    python benchmarks/cli_latency.py [--bundle DIR] [--runs 15]

Also splits one in-process call into import, Runtime.load (checksums, sessions) and nearest.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None, help="bundle directory (default: shipped)")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()

    started = time.perf_counter()
    from vae_edge.runtime import Runtime

    imported = time.perf_counter()
    rt = Runtime.load(args.bundle)
    loaded = time.perf_counter()
    z = [0.5 * ((-1) ** i) for i in range(rt.latent_dim)]
    rt.nearest(z, k=5)
    searched = time.perf_counter()
    print(f"in process: import {1e3 * (imported - started):.0f} ms, load "
          f"{1e3 * (loaded - imported):.0f} ms, nearest {1e3 * (searched - loaded):.1f} ms "
          f"(catalog {len(rt.index)}, d={rt.latent_dim})")

    exe = shutil.which("vae-run") or sys.exit("vae-run is not on PATH: pip install . first")
    command = [exe, "nearest", "--z", ",".join(str(v) for v in z), "-k", "5"]
    if args.bundle:
        command += ["--bundle", args.bundle]
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    print(f"vae-run nearest, {args.runs} runs: median {statistics.median(times):.3f} s, "
          f"min {min(times):.3f} s, max {max(times):.3f} s")


if __name__ == "__main__":
    main()
