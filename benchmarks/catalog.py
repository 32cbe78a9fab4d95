"""Benchmark of a shop's catalog from photos to model: a 64x64 colour catalog of the example
maker's photos (training/example_catalog.py, from Fashion-MNIST).

    python benchmarks/catalog.py [--items 2000] [--epochs 2] [--threads 1] [--rounds 3]
        [--memory-items 2000 20000] [--add-items 100]

Each measurement is a function of the shared Context that returns table rows (name, median,
unit, detail); later ones may use what earlier ones left in the context (the catalog, the
photo cache, the checkpoint). Rows:

- preprocessing: the photos decoded, fitted into 64x64x3 and written into a new photo cache
  (training/catalog_data.cached_photos), images per second, median over --rounds fresh caches;
  and the time to find, check and open that cache again (the catalog's fingerprint: the CSV
  read, each photo's size and modification time; the cache's record and its .npy's sha256).
- training: vae-train's default model at 64x64x3 (widths 32, 64 doubled to 4 stages) trained
  for --epochs epochs on the catalog less a held-out 10%, read from the memory-mapped cache;
  training images per second, median over the epochs (each epoch's time includes its
  evaluation on the held-out items).
- export: vae-export of the trained model with the catalog's 96x96 WebP thumbnails (graphs,
  parity check, every photo decoded again, fitted and encoded), seconds, median over --rounds;
  and the bundle's bytes per item, file by file (graphs excluded: they do not grow with items).
- add: `vae-run add` of --add-items new photos (the example maker's, another seed, under new
  ids) to the exported bundle, milliseconds per item, median over --rounds fresh copies.
- memory (Linux): the training process's peak anonymous memory (RssAnon, sampled every 20 ms)
  while a tiny model trains one epoch on catalogs of --memory-items plain 8x8 photos fitted to
  64x64x3. The cache is memory-mapped: its pages are the kernel's file cache (RssFile), which
  it drops under memory pressure, so the anonymous peak stays flat as the catalog grows.
"""

from __future__ import annotations

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # before numpy loads its BLAS

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

IMAGE_SIZE, CHANNELS = 64, 3


@dataclass
class Context:
    work: Path  # a temporary directory for everything the benchmark writes
    items: int
    epochs: int
    rounds: int
    memory_items: list[int]
    add_items: int = 100
    csv: Path | None = None  # the example catalog
    cache_dir: Path | None = None  # a photo cache of the catalog at 64x64x3
    checkpoint: Path | None = None  # the trained model
    bundle: Path | None = None  # its export
    notes: dict = field(default_factory=dict)


def make_catalog(ctx: Context) -> list[tuple]:
    from vae_edge.training.example_catalog import make_example_catalog

    started = time.perf_counter()
    ctx.csv = make_example_catalog(ctx.work / "catalog", size=ctx.items, seed=0)
    seconds = time.perf_counter() - started
    photo_bytes = sum(p.stat().st_size for p in (ctx.work / "catalog" / "photos").iterdir())
    return [("example catalog made", seconds, "s",
             f"{ctx.items} photos, {photo_bytes / ctx.items / 1024:.1f} KiB per photo")]


def measure_preprocessing(ctx: Context) -> list[tuple]:
    from vae_edge.runtime.catalog import read_catalog
    from vae_edge.training.catalog_data import cached_photos

    catalog = read_catalog(ctx.csv)
    rates = []
    for round_number in range(ctx.rounds):
        cache_dir = ctx.work / f"cache{round_number}"
        started = time.perf_counter()
        cache = cached_photos(catalog, IMAGE_SIZE, CHANNELS, cache_dir=cache_dir,
                              log=lambda message: None)
        rates.append(len(cache.catalog) / (time.perf_counter() - started))
    ctx.cache_dir = cache_dir
    reuse = []
    for _ in range(ctx.rounds):
        started = time.perf_counter()
        cache = cached_photos(read_catalog(ctx.csv), IMAGE_SIZE, CHANNELS, cache_dir=cache_dir,
                              log=lambda message: None)
        reuse.append(time.perf_counter() - started)
        assert cache.reused
    return [
        ("preprocessing (decode + fit + cache)", statistics.median(rates), "images/s",
         f"{IMAGE_SIZE}x{IMAGE_SIZE}x{CHANNELS}, {cache.path.stat().st_size / 1e6:.1f} MB cache; "
         f"rounds: {', '.join(f'{r:.0f}' for r in rates)}"),
        ("cache found and opened again", statistics.median(reuse) * 1000, "ms",
         f"CSV read, {len(cache.catalog)} photos stat'ed, the cache checked (its sha256)"),
    ]


def measure_training(ctx: Context) -> list[tuple]:
    import torch

    from vae_edge.training.catalog_data import catalog_data
    from vae_edge.training.model import VAEConfig
    from vae_edge.training.train import TrainConfig, train

    data = catalog_data(ctx.csv, IMAGE_SIZE, CHANNELS, cache_dir=ctx.cache_dir,
                        log=lambda message: None)
    model = VAEConfig(image_size=IMAGE_SIZE, image_channels=CHANNELS)
    out = ctx.work / "run"
    checkpoint = train(model, TrainConfig(epochs=ctx.epochs), out, data=data, progress=False,
                       log=lambda message: None)
    ctx.checkpoint = out / "checkpoint.pt"
    seconds = [row["seconds"] for row in checkpoint["history"]]
    rates = [len(data.train) / s for s in seconds]
    return [("training", statistics.median(rates), "images/s",
             f"{len(data.train)} images an epoch, batch 128, widths {list(model.channels)}, "
             f"{torch.get_num_threads()} torch thread(s); epochs: "
             f"{', '.join(f'{s:.1f} s' for s in seconds)}")]


class PeakMemory:
    """Samples this process's RssAnon and RssFile (kB, /proc/self/status) in a thread."""

    def __init__(self):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            with open("/proc/self/status") as status:
                for line in status:
                    name, _, value = line.partition(":")
                    if name in self.peak:
                        self.peak[name] = max(self.peak[name], int(value.split()[0]))
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def plain_catalog(directory: Path, items: int) -> Path:
    """items random 8x8 colour PNGs and their CSV (cheap to make in any number)."""
    import csv

    import numpy as np
    from PIL import Image

    (directory / "photos").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(directory / "catalog.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image"])
        for i in range(items):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(directory / "photos" / f"{i}.png")
            writer.writerow([f"SKU-{i}", f"photos/{i}.png"])
    return directory / "catalog.csv"


def measure_memory(ctx: Context) -> list[tuple]:
    if not Path("/proc/self/status").is_file():
        return []
    from vae_edge.training.catalog_data import catalog_data
    from vae_edge.training.model import VAEConfig
    from vae_edge.training.train import TrainConfig, train

    rows = []
    for items in ctx.memory_items:
        directory = ctx.work / f"plain{items}"
        data = catalog_data(plain_catalog(directory, items), IMAGE_SIZE, CHANNELS,
                            cache_dir=directory / "cache", log=lambda message: None)
        model = VAEConfig(latent_dim=4, channels=(4, 8), hidden_dim=16, image_size=IMAGE_SIZE,
                          image_channels=CHANNELS)
        with PeakMemory() as memory:
            train(model, TrainConfig(epochs=1), directory / "run", data=data, progress=False,
                  log=lambda message: None)
        cache_mb = next((directory / "cache").glob("*.npy")).stat().st_size / 1e6
        rows.append((f"training peak anonymous memory, {items} items",
                     memory.peak["RssAnon"] / 1024, "MB",
                     f"{cache_mb:.0f} MB cache; file pages mapped at peak "
                     f"{memory.peak['RssFile'] / 1024:.0f} MB"))
    return rows


def measure_export(ctx: Context) -> list[tuple]:
    from vae_edge.export.build import build_bundle
    from vae_edge.runtime.bundle import MODEL_FILES

    seconds = []
    for round_number in range(ctx.rounds):
        out = ctx.work / f"bundle{round_number}"
        started = time.perf_counter()
        build_bundle(ctx.checkpoint, out, thumbnail_size=96, log=lambda message: None)
        seconds.append(time.perf_counter() - started)
    ctx.bundle = out
    sizes = {path.name: path.stat().st_size for path in out.iterdir()
             if path.name not in MODEL_FILES.values() and path.name != "manifest.json"}
    graphs = sum((out / name).stat().st_size for name in MODEL_FILES.values())
    return [
        ("export with 96x96 thumbnails", statistics.median(seconds), "s",
         f"{ctx.items} items; rounds: {', '.join(f'{s:.1f}' for s in seconds)}"),
        ("bundle bytes per item", sum(sizes.values()) / ctx.items, "bytes",
         ", ".join(f"{name} {size / ctx.items:.0f}" for name, size in sorted(sizes.items()))
         + f"; the two graphs {graphs / 1e6:.1f} MB in all"),
    ]


def measure_add(ctx: Context) -> list[tuple]:
    import csv
    import shutil

    from vae_edge.runtime.edit import add_items
    from vae_edge.training.example_catalog import make_example_catalog

    source = make_example_catalog(ctx.work / "new", size=ctx.add_items, seed=1)
    with open(source, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    new_csv = source.with_name("new.csv")
    with open(new_csv, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "id": f"NEW-{row['id']}"} for row in rows)
    per_item = []
    for round_number in range(ctx.rounds):
        bundle = ctx.work / f"edited{round_number}"
        shutil.copytree(ctx.bundle, bundle)
        started = time.perf_counter()
        report = add_items(bundle, new_csv, log=lambda message: None)
        per_item.append((time.perf_counter() - started) / len(report.added))
    return [("vae-run add, per item", statistics.median(per_item) * 1000, "ms",
             f"{ctx.add_items} photos added to {ctx.items} items (the bundle rewritten once); "
             f"rounds: {', '.join(f'{t * 1000:.1f}' for t in per_item)}")]


MEASUREMENTS = [make_catalog, measure_preprocessing, measure_training, measure_export,
                measure_add, measure_memory]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--memory-items", type=int, nargs="*", default=[2000, 20000])
    parser.add_argument("--add-items", type=int, default=100)
    args = parser.parse_args()

    import platform

    import torch

    torch.set_num_threads(args.threads)
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"torch {torch.__version__}, {args.items} items")
    with tempfile.TemporaryDirectory(prefix="vae-edge-catalog-bench-") as work:
        ctx = Context(Path(work), args.items, args.epochs, args.rounds, args.memory_items,
                      args.add_items)
        print(f"{'measurement':40} {'median':>10}  unit      detail")
        for measure in MEASUREMENTS:
            for name, value, unit, detail in measure(ctx):
                print(f"{name:40} {value:10.1f}  {unit:8}  {detail}", flush=True)


if __name__ == "__main__":
    main()
