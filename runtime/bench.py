"""Size a device: how fast and how large the runtime is on this machine, in a few seconds.

    from vae_edge.runtime import Runtime
    from vae_edge.runtime.bench import run_bench
    report = run_bench(Runtime.load(), seconds=3)   # a dict; `vae-run bench` prints it

Per operation (decode, encode, nearest in each match mode), one query and a batch: the median
(p50) and 99th percentile (p99) latency of single calls. Cold start and peak resident memory are
those of a fresh Python process that loads the bundle and answers one nearest query, as
`vae-run nearest` does. Every row runs at least once after an untimed call, so a slow device
takes longer than the budget; `calls` says how many calls a row's percentiles come from.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from .checks import MATCH_MODES, is_integer, is_number
from .core import Runtime

# A fresh process: load the bundle, answer one query, print how long it took. Peak memory
# comes from the operating system (wait4), not from the child.
_COLD_START = """
import sys, time
started = time.perf_counter()
from vae_edge.runtime import Runtime
rt = Runtime.load(sys.argv[1], threads=int(sys.argv[2]), limit_blas=True)
rt.nearest(rt.sample_prior(seed=0), k=5)
print(time.perf_counter() - started)
"""
# Share of the time budget spent on cold starts; the rest is split between the operations.
COLD_SHARE = 1 / 3


def _percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds), q)) * 1e3


def _time_calls(function, budget: float) -> list[float]:
    """Durations of repeated calls for about `budget` seconds, at least one. An untimed call
    comes first, so that first-use costs (a session made on first use) are not counted."""
    function()
    durations: list[float] = []
    deadline = time.perf_counter() + budget
    while not durations or time.perf_counter() < deadline:
        started = time.perf_counter()
        function()
        durations.append(time.perf_counter() - started)
    return durations


def _peak_rss_mb(max_rss: int) -> float:
    """ru_maxrss in MB: kilobytes on Linux, bytes on macOS."""
    return max_rss / (1 << 20) if sys.platform == "darwin" else max_rss / 1024


def _cold_starts(runtime: Runtime, runs: int, budget: float) -> dict:
    """Run fresh processes (at least one, at most `runs`, while within budget)."""
    seconds, peaks = [], []
    deadline = time.perf_counter() + budget
    while not seconds or (len(seconds) < runs and time.perf_counter() < deadline):
        elapsed, peak = _cold_start(runtime)
        seconds.append(elapsed)
        peaks.append(peak)
    return {
        "runs": len(seconds),
        "median_s": statistics.median(seconds),
        "peak_rss_mb": None if None in peaks else max(peaks),
    }


def _cold_start(runtime: Runtime) -> tuple[float, float | None]:
    """(seconds from interpreter start to the first answer, peak resident MB) of one process."""
    command = [sys.executable, "-c", _COLD_START, str(runtime.root), str(runtime.threads)]
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors)
        out = child.stdout.read()
        child.stdout.close()
        if hasattr(os, "wait4"):  # this child's own rusage, not all children's
            _, status, usage = os.wait4(child.pid, 0)
            child.returncode = os.waitstatus_to_exitcode(status)
            peak = _peak_rss_mb(usage.ru_maxrss)
        else:
            child.wait()
            peak = None
        if child.returncode != 0:
            errors.seek(0)
            lines = errors.read().decode(errors="replace").strip().splitlines() or ["no output"]
            raise ChildProcessError(f"cold-start process failed ({child.returncode}): {lines[-1]}")
    return float(out), peak


def _blas_threads() -> int | None:
    from threadpoolctl import threadpool_info

    pools = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    return max(pools) if pools else None


def run_bench(runtime: Runtime, *, seconds: float = 3.0, batch: int = 64,
              cold_runs: int = 3) -> dict:
    """Time the runtime's operations for about `seconds` in all; returns a JSON-ready dict.

    batch: queries per call in the batch rows (besides one query per call).
    cold_runs: at most this many fresh processes for the cold start (at least one, however
    long it takes: on a slow device one may exceed the whole budget).
    """
    if not is_number(seconds) or not 0 < seconds <= 3600:
        raise ValueError(f"seconds must be in (0, 3600], got {seconds!r}")
    if not is_integer(batch) or not 2 <= batch <= 4096:
        raise ValueError(f"batch must be an integer in [2, 4096], got {batch!r}")
    if not is_integer(cold_runs) or cold_runs < 1:
        raise ValueError(f"cold_runs must be an integer >= 1, got {cold_runs!r}")
    started = time.perf_counter()
    cold = _cold_starts(runtime, cold_runs, seconds * COLD_SHARE)

    z = runtime.sample_prior(batch, seed=0)
    images = runtime.decode(z)
    operations = [("decode", None, runtime.decode, z), ("encode", None, runtime.encode, images)]
    for mode in MATCH_MODES:
        operations.append(("nearest", mode,
                           lambda q, mode=mode: runtime.nearest(q, k=5, by=mode), z))
    share = max(0.0, seconds - (time.perf_counter() - started)) / (2 * len(operations))
    rows = []
    for name, mode, function, queries in operations:
        for size in (1, batch):
            argument = queries[0] if size == 1 else queries
            durations = _time_calls(lambda f=function, a=argument: f(a), share)
            rows.append({
                "operation": name, "by": mode, "batch": size, "calls": len(durations),
                "p50_ms": _percentile_ms(durations, 50), "p99_ms": _percentile_ms(durations, 99),
                "per_item_ms": _percentile_ms(durations, 50) / size,
            })
    try:
        import resource

        own_peak = _peak_rss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    except ImportError:
        own_peak = None
    return {
        "device": {
            "machine": platform.machine(), "system": platform.system(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "onnxruntime": _onnxruntime_version(),
        },
        "bundle": str(runtime.root),
        "catalog_size": len(runtime.index),
        "latent_dim": runtime.latent_dim,
        "threads": {"onnxruntime": runtime.threads, "blas": _blas_threads()},
        "cold_start": cold,
        "operations": rows,
        "bench_process_peak_rss_mb": own_peak,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def format_report(report: dict) -> str:
    """The report as a few lines of text and a table, for a terminal."""
    device, cold, threads = report["device"], report["cold_start"], report["threads"]
    lines = [
        f"device: {device['machine']} {device['system']}, {device['cpus']} CPUs, Python "
        f"{device['python']}, numpy {device['numpy']}, onnxruntime {device['onnxruntime']}",
        f"bundle: {report['bundle']} ({report['catalog_size']} catalog items, latent dim "
        f"{report['latent_dim']})",
        f"threads: onnxruntime {threads['onnxruntime']}, BLAS {threads['blas']}",
        f"cold start (load + one nearest, fresh process): median {cold['median_s']:.3f} s over "
        f"{cold['runs']} run(s), peak resident {_mb(cold['peak_rss_mb'])}",
        "",
        f"{'operation':<20} {'batch':>5} {'calls':>6} {'p50 ms':>9} {'p99 ms':>9} "
        f"{'ms/item':>9}",
    ]
    for row in report["operations"]:
        name = row["operation"] + (f" by {row['by']}" if row["by"] else "")
        lines.append(f"{name:<20} {row['batch']:>5} {row['calls']:>6} {row['p50_ms']:>9.3f} "
                     f"{row['p99_ms']:>9.3f} {row['per_item_ms']:>9.4f}")
    lines += ["", f"this process's peak resident memory: "
                  f"{_mb(report['bench_process_peak_rss_mb'])}; took {report['seconds']:.1f} s"]
    return "\n".join(lines)


def _mb(value: float | None) -> str:
    return "unknown" if value is None or math.isnan(value) else f"{value:.0f} MB"
