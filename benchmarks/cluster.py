"""Benchmark: one query on a 1M-item catalog in one process, and the same catalog sharded over
2 and 4 local Ray actors (vae_edge.runtime.cluster), side by side in one run.

    python benchmarks/cluster.py                       # N = 1,000,000
    python benchmarks/cluster.py --items 200000 --rounds 50

The catalog is synthetic (mu ~ N(0, 1), log sigma ~ U(-3, 0), float16, 10 labels) with the
shipped model's graphs, so d = 16; it is written as a bundle and split by `vae-run shard`'s
shard_bundle into 2 and 4 shards, in a temporary directory. A local Ray starts with one logical
CPU per actor and a 100 MB object store. Each round calls every method once on the same fresh
query z ~ N(0, I), in a random order; medians over the rounds. k = 10, by latent, no distance:

- one process: Runtime.nearest over the whole catalog.
- half in one process: Runtime.nearest over the first of the 2 shards (what each of 2 actors
  searches), in this process.
- 2 actors, 4 actors: ShardedRuntime.nearest (answers checked equal to one process first).
- hop 2, hop 4: a call that does nothing on every actor, awaited together (the Ray round trip
  a query pays besides its search).

Memory: this process's resident set before and after loading the one-process Runtime, and
each actor's resident set (its Ray worker, onnxruntime and its shard) after the rounds.
"""

from __future__ import annotations

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # before numpy loads its BLAS

import argparse  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import ray  # noqa: E402

from vae_edge.runtime import Runtime  # noqa: E402
from vae_edge.runtime.bundle import (  # noqa: E402
    MODEL_FILES,
    CatalogIndex,
    bundle_files,
    default_bundle_path,
    read_manifest,
    write_index,
    write_manifest,
)
from vae_edge.runtime.cluster import ShardedRuntime  # noqa: E402
from vae_edge.runtime.shard import shard_bundle  # noqa: E402

K = 10


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def synthetic_bundle(out: Path, n: int) -> None:
    shipped = default_bundle_path()
    manifest = read_manifest(shipped)
    d = manifest["latent_dim"]
    rng = np.random.default_rng(0)
    out.mkdir()
    for name in MODEL_FILES.values():
        shutil.copyfile(shipped / name, out / name)
    write_index(out, CatalogIndex(
        mu=rng.standard_normal((n, d)).astype(np.float16),
        log_sigma=rng.uniform(-3.0, 0.0, (n, d)).astype(np.float16),
        labels=rng.integers(0, 10, n).astype(np.int32),
        label_names=tuple(manifest["index"]["label_names"]),
        ids=np.array([str(i) for i in range(n)], dtype=object)))
    manifest["index"]["size"] = n
    manifest["index"]["catalog"] = f"synthetic ({n} items)"
    manifest["files"] = {name: {} for name in bundle_files(False)}
    write_manifest(out, manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vae-cluster-bench-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        synthetic_bundle(root / "bundle", args.items)
        sets = {parts: shard_bundle(root / "bundle", parts, root / f"shards-{parts}",
                                    log=lambda message: None) for parts in (2, 4)}
        print(f"catalog: {args.items} items, written and sharded in "
              f"{time.perf_counter() - start:.0f} s")
        before = rss_mb()
        one = Runtime.load(root / "bundle")
        loaded = rss_mb()
        half = Runtime.load(sets[2].shards[0].path)
        ray.init(num_cpus=6, object_store_memory=100 << 20, include_dashboard=False,
                 log_to_driver=False)
        clusters = {parts: ShardedRuntime.load(root / f"shards-{parts}") for parts in (2, 4)}
        d = one.latent_dim
        check = np.random.default_rng(1).standard_normal((20, d))
        for parts, cluster in clusters.items():
            for z in check:
                expected, got = one.nearest(z, k=K), cluster.nearest(z, k=K)
                assert (expected.ids == got.ids).all(), parts
                assert (expected.log_likelihoods == got.log_likelihoods).all(), parts
        print("answers of 2 and 4 actors identical to one process on 20 queries: yes")

        def hop(cluster):
            return lambda z: ray.get([actor.pid.remote() for actor in cluster.actors])

        methods = {
            "one process": lambda z: one.nearest(z, k=K),
            "half in one process": lambda z: half.nearest(z, k=K),
            "2 actors": lambda z: clusters[2].nearest(z, k=K),
            "4 actors": lambda z: clusters[4].nearest(z, k=K),
            "hop 2": hop(clusters[2]),
            "hop 4": hop(clusters[4]),
        }
        times = {name: [] for name in methods}
        rng = np.random.default_rng(2)
        for _ in range(args.rounds):
            z = rng.standard_normal(d)
            for name in rng.permutation(list(methods)):
                begin = time.perf_counter()
                methods[name](z)
                times[name].append(time.perf_counter() - begin)
        print(f"\nmedian ms per query over {args.rounds} rounds (k = {K}, d = {d}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}):")
        for name, values in times.items():
            print(f"  {name:<22} {1e3 * statistics.median(values):8.2f}")
        print(f"\none process: resident set {before:.0f} MB before loading, {loaded:.0f} MB "
              f"after (+{loaded - before:.0f} MB for {args.items} items)")
        for parts, cluster in clusters.items():
            sizes = [rss_mb(pid) for pid in ray.get([a.pid.remote() for a in cluster.actors])]
            print(f"{parts} actors: resident set per actor "
                  f"{', '.join(f'{size:.0f}' for size in sizes)} MB "
                  f"({args.items // parts} items each)")
        for cluster in clusters.values():
            cluster.close()
        ray.shutdown()


if __name__ == "__main__":
    main()
