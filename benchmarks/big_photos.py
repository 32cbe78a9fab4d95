"""Peak memory of vae-train, vae-export and vae-run add on a catalog with very large photos,
side by side with the same commands on a catalog of small photos only; and what the photo
cache's verification costs.

    python benchmarks/big_photos.py [--work DIR] [--verify-items 20000] [--rounds 3]

The big catalog is 6 small photos (PNG and JPEG, 300x400), a 100-megapixel JPEG (12240x8160,
quality 90) and a 16000x14464 RGB PNG (231 megapixels, above Pillow's own limit of 179); the
others are the 6 small photos with the JPEG, and alone. For each catalog, in order, each
command is run under /usr/bin/time -v and its "Maximum resident set size" printed:

- vae-train: a tiny model (latent 4, widths 4,8) at 64x64x3, 1 epoch, a fresh photo cache;
- vae-export: that run's checkpoint, with the catalog's 96x96 thumbnails;
- vae-run add: the catalog's photos again under new ids, into that bundle.

Cache verification: a photo cache of --verify-items plain 8x8 photos fitted to 64x64x3
(training/catalog_data.cached_photos), then found and opened again --rounds times (the
catalog's fingerprint, the record's checks and the .npy's sha256; median), and the sha256 of
the .npy alone (median), with the .npy in the page cache.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

TRAIN = ["--image-size", "64", "--latent-dim", "4", "--widths", "4,8", "--hidden-dim", "16",
         "--batch-size", "8", "--epochs", "1", "--no-progress"]


def smooth_photo(width: int, height: int, seed: int) -> Image.Image:
    """A width x height RGB picture: random colours 16x12 scaled up smoothly, and a dark
    rectangle in the middle (a garment on a background)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    picture = small.resize((width, height), Image.BILINEAR)
    picture.paste((30, 30, 60), (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return picture


def write_catalog(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image", "label"])
        writer.writerows(rows)
    return path


def make_catalogs(work: Path) -> dict[str, list[tuple[str, str, str]]]:
    photos = work / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    small = []
    for i in range(6):
        name = f"small{i}.{'png' if i % 2 else 'jpg'}"
        smooth_photo(300, 400, i).save(photos / name, quality=90)
        small.append((f"S{i}", f"photos/{name}", "ab"[i % 2]))
    started = time.perf_counter()
    if not (photos / "camera.jpg").is_file():
        smooth_photo(12_240, 8_160, 10).save(photos / "camera.jpg", quality=90)
    if not (photos / "scan.png").is_file():
        smooth_photo(16_000, 14_464, 11).save(photos / "scan.png", compress_level=1)
    print(f"photos made in {time.perf_counter() - started:.0f} s: camera.jpg "
          f"{(photos / 'camera.jpg').stat().st_size / 1e6:.0f} MB, scan.png "
          f"{(photos / 'scan.png').stat().st_size / 1e6:.0f} MB")
    camera = ("CAMERA", "photos/camera.jpg", "a")
    return {"small photos only": small, "with the 100 MP JPEG": small + [camera],
            "with 100 MP JPEG + 231 MP PNG": small + [camera, ("SCAN", "photos/scan.png", "b")]}


def peak_rss(command: list[str]) -> tuple[float, float]:
    """(peak resident set size in MB, wall seconds) of one command, which must succeed."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)[1])
    return kb / 1024, seconds


def measure_commands(work: Path) -> None:
    bin_dir = Path(sys.executable).parent
    catalogs = make_catalogs(work)
    out = Path(tempfile.mkdtemp(prefix="runs-", dir=work))  # fresh runs, caches and bundles
    print(f"\n{'catalog':32} {'command':12} {'peak RSS':>10} {'wall':>7}")
    for n, (title, rows) in enumerate(catalogs.items()):
        csv_path = write_catalog(work / f"catalog{n}.csv", rows)
        added = write_catalog(work / f"add{n}.csv", [(f"NEW-{i}", image, label)
                                                     for i, image, label in rows])
        run, bundle = out / f"run{n}", out / f"bundle{n}"
        commands = {
            "vae-train": [str(bin_dir / "vae-train"), "--catalog", str(csv_path), "--out",
                          str(run), "--cache-dir", str(out / f"cache{n}"), *TRAIN],
            "vae-export": [str(bin_dir / "vae-export"), str(run / "checkpoint.pt"), "-o",
                           str(bundle)],
            "vae-run add": [str(bin_dir / "vae-run"), "add", "--bundle", str(bundle),
                            str(added)],
        }
        for name, command in commands.items():
            mb, seconds = peak_rss(command)
            print(f"{title:32} {name:12} {mb:7.0f} MB {seconds:5.1f} s", flush=True)


def measure_verification(work: Path, items: int, rounds: int) -> None:
    from vae_edge.runtime.catalog import read_catalog
    from vae_edge.training.catalog_data import cached_photos

    directory = Path(tempfile.mkdtemp(prefix=f"plain{items}-", dir=work))
    (directory / "photos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(items):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            directory / "photos" / f"{i}.png")
        rows.append((f"SKU-{i}", f"photos/{i}.png", ""))
    csv_path = write_catalog(directory / "catalog.csv", rows)
    cache = cached_photos(read_catalog(csv_path), 64, 3, cache_dir=directory / "cache",
                          log=lambda message: None)
    reopen, digest = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        again = cached_photos(read_catalog(csv_path), 64, 3, cache_dir=directory / "cache",
                              log=lambda message: None)
        reopen.append(time.perf_counter() - started)
        assert again.reused
        started = time.perf_counter()
        with open(cache.path, "rb") as handle:
            hashlib.file_digest(handle, "sha256")
        digest.append(time.perf_counter() - started)
    size = cache.path.stat().st_size / 1e6
    print(f"\ncache of {items} photos at 64x64x3 ({size:.0f} MB): found, verified and opened "
          f"again in {statistics.median(reopen) * 1000:.0f} ms (median of "
          f"{', '.join(f'{s * 1000:.0f}' for s in reopen)}); its sha256 alone "
          f"{statistics.median(digest) * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="where to write (default: a temporary "
                        "directory, removed at the end); the big photos are kept and reused")
    parser.add_argument("--verify-items", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        measure_commands(work)
        if args.verify_items:
            measure_verification(work, args.verify_items, args.rounds)


if __name__ == "__main__":
    main()
