"""Peak resident memory and cold start of each `vae-run` command, and where the memory goes.

    python benchmarks/footprint.py [--runs 5] [--baseline REV] [--bundle DIR]

Each command runs as a fresh process (as a shop's device or a kiosk starts it): its peak
resident set (the kernel's ru_maxrss for that process) and wall time from spawn to exit,
median of --runs. `serve idle` is `vae-run serve --port 0` up to its "kiosk on" line, and its
peak resident set while idle after that; below the table, its resident set (VmRSS) after
IDLE_SECONDS idle, what a kiosk holds while nobody uses it. --baseline REV runs the same
commands on that git revision's runtime (extracted to a temporary directory) interleaved
with this tree's, and prints the ratios. Linux only (ru_maxrss in kB, /proc/PID/status).

The breakdown below the table loads the bundle step by step in one fresh process: the imports,
Runtime.load, and the search engine's build of its item vectors (LikelihoodSearch) alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN_CLI = "import sys; from vae_edge.runtime.cli import main; sys.argv[0] = 'vae-run'; main()"
IDLE_SECONDS = 1.0

STAGES = r"""
import json, sys, time
def rss():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {key: int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}
stages = [("start", rss(), 0.0)]
def mark(name, started):
    stages.append((name, rss(), time.perf_counter() - started))
t = time.perf_counter(); import numpy as np; mark("import numpy", t)
t = time.perf_counter(); import onnxruntime; mark("import onnxruntime", t)
t = time.perf_counter(); from vae_edge.runtime import Runtime; mark("import vae_edge.runtime", t)
t = time.perf_counter(); rt = Runtime.load(sys.argv[1] or None); mark("Runtime.load", t)
z = rt.sample_prior(seed=0)
t = time.perf_counter(); rt.nearest(z, k=5); mark("first nearest", t)
t = time.perf_counter(); rt.encode(rt.decode(z)); mark("decode + encode", t)
print(json.dumps(stages))
"""

SEARCH_BUILD = r"""
import json, sys, time
import numpy as np
def rss():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {key: int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}
from vae_edge.runtime import Runtime
from vae_edge.runtime.search import LikelihoodSearch
index = Runtime.load(sys.argv[1] or None).index
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark restarts from here
before = rss()
t = time.perf_counter()
engine = LikelihoodSearch(index.mu, index.log_sigma, index.ids, index.labels)
seconds = time.perf_counter() - t
after = rss()
shared = [index.mu, index.log_sigma, index.ids, index.labels]
kept = sum(value.nbytes for value in vars(engine).values() if isinstance(value, np.ndarray)
           and not any(np.shares_memory(value, array) for array in shared))
print(json.dumps({"peak_mb": after["VmHWM"] - before["VmRSS"], "kept_mb": kept / 2**20,
                  "seconds": seconds}))
"""


def commands(image: Path, bundle: str | None) -> dict[str, list[str]]:
    extra = ["--bundle", bundle] if bundle else []
    return {
        "info": ["info", *extra],
        "decode": ["decode", "--random", "--seed", "0", "-o", str(image.with_name("out.png")),
                   *extra],
        "nearest": ["nearest", "--random", "--seed", "0", *extra],
        "nearest --by decoded": ["nearest", "--random", "--seed", "0", "--by", "decoded",
                                 *extra],
        "nearest --image": ["nearest", "--image", str(image), *extra],
        "serve (idle)": ["serve", "--port", "0", *extra],
    }


def run_once(arguments: list[str], env: dict) -> tuple[float, float, float | None] | None:
    """(seconds, peak MB, serve's resident MB when idle) of one process; None when the command
    fails (e.g. an option the baseline does not have)."""
    idle = None
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", RUN_CLI, *arguments], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if arguments[0] == "serve":
        line = child.stdout.readline()
        if "kiosk on" not in line:
            child.kill()
            os.wait4(child.pid, 0)
            return None
        seconds = time.perf_counter() - started
        time.sleep(IDLE_SECONDS)
        with open(f"/proc/{child.pid}/status") as status:
            idle = int(next(line for line in status if line.startswith("VmRSS:")).split()[1])
        idle /= 1024
        child.terminate()
        child.stdout.read()
    else:
        child.stdout.read()
        seconds = None
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if arguments[0] != "serve":
        if child.returncode != 0:
            return None
        seconds = time.perf_counter() - started
    return seconds, usage.ru_maxrss / 1024, idle


def extract_revision(revision: str, into: Path) -> Path:
    """The runtime and models of a git revision, laid out as the vae_edge package."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "runtime", "models"],
                             check=True, capture_output=True).stdout
    package = into / "vae_edge"
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(package)  # our own repository's files
    (package / "__init__.py").write_text("")
    return into


def link_tree(into: Path) -> Path:
    """This working tree's runtime and models as the vae_edge package, whatever is installed."""
    package = into / "vae_edge"
    package.mkdir(parents=True)
    for name in ("runtime", "models"):
        (package / name).symlink_to(REPO / name)
    (package / "__init__.py").write_text("")
    return into


def child_json(code: str, bundle: str | None, env: dict) -> object:
    out = subprocess.run([sys.executable, "-c", code, bundle or ""], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="git revision to compare with, side by side (e.g. main)")
    parser.add_argument("--bundle", default=None, help="bundle directory (default: shipped)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(link_tree(tmp / "tree"))}
        trees = {"this tree": env}
        if args.baseline:
            base = extract_revision(args.baseline, tmp / "baseline")
            trees[args.baseline] = {**os.environ, "PYTHONPATH": str(base)}
        image = tmp / "query.png"
        subprocess.run([sys.executable, "-c", RUN_CLI, "decode", "--random", "--seed", "1", "-o",
                        str(image), *(["--bundle", args.bundle] if args.bundle else [])],
                       env=env, check=True, capture_output=True)
        results: dict[tuple[str, str], list] = {}
        for _ in range(args.runs):  # interleaved, so that both trees share the machine's state
            for name, arguments in commands(image, args.bundle).items():
                for tree, tree_env in trees.items():
                    results.setdefault((name, tree), []).append(run_once(arguments, tree_env))

        header = f"{'command':<22} {'peak MB':>8} {'cold s':>7}"
        if args.baseline:
            header += f" | {args.baseline + ' MB':>10} {'s':>6} | {'MB ratio':>8} {'s ratio':>7}"
        print(f"python {sys.version.split()[0]}, {args.runs} runs each, medians; cold s = "
              "spawn to exit (serve: to its 'kiosk on' line)")
        print(header)
        for name in commands(image, args.bundle):
            cells = []
            for tree in trees:
                runs = [r for r in results[(name, tree)] if r is not None]
                cells.append((statistics.median(r[1] for r in runs),
                              statistics.median(r[0] for r in runs)) if runs else None)
            row = f"{name:<22} " + (f"{cells[0][0]:>8.1f} {cells[0][1]:>7.3f}" if cells[0]
                                    else f"{'fails':>16}")
            if args.baseline:
                if cells[1] is None:
                    row += f" | {'n/a':>10} {'':>6} |"
                else:
                    row += f" | {cells[1][0]:>10.1f} {cells[1][1]:>6.3f} |"
                    if cells[0]:
                        row += (f" {cells[0][0] / cells[1][0]:>8.2f} "
                                f"{cells[0][1] / cells[1][1]:>7.2f}")
            print(row)

        for tree in trees:
            idle = [r[2] for r in results[("serve (idle)", tree)] if r is not None]
            if idle:
                print(f"serve resident after {IDLE_SECONDS:g} s idle ({tree}): "
                      f"{statistics.median(idle):.1f} MB")

        print("\nwhere the memory goes (this tree, one process; MB resident after each step, "
              "and the high-water mark):")
        previous = 0.0
        for name, rss, seconds in child_json(STAGES, args.bundle, env):
            print(f"  {name:<26} {rss['VmRSS']:>7.1f} (+{rss['VmRSS'] - previous:5.1f})  "
                  f"peak {rss['VmHWM']:>7.1f}  {1e3 * seconds:7.1f} ms")
            previous = rss["VmRSS"]
        build = child_json(SEARCH_BUILD, args.bundle, env)
        print(f"  search engine build alone (LikelihoodSearch over the loaded index): "
              f"+{build['peak_mb']:.1f} MB at its peak, {build['kept_mb']:.1f} MB of arrays "
              f"kept, {1e3 * build['seconds']:.0f} ms")


if __name__ == "__main__":
    main()
