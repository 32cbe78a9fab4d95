"""What the photo cache saves an export, and what its thumbnails cost training, side by side.

    python benchmarks/export_photos.py [--items 2000] [--rounds 3]

On the example catalog (training/example_catalog.py, 64x64x3 as vae-train --catalog fits it):

- training's preprocessing (training/catalog_data.cached_photos into a fresh cache), without
  thumbnails and with the 96x96 WebP thumbnails vae-train keeps for the export;
- the export's photos (the fitted pixels and 96x96 thumbnails vae-export indexes): decoded
  (runtime/catalog.fit_catalog) and from that cache (training/catalog_data.exported_photos).

Seconds, median over --rounds, every row in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

SIZE, CHANNELS, THUMBNAIL = 64, 3, 96


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from vae_edge.runtime.catalog import fit_catalog, read_catalog
    from vae_edge.training.catalog_data import cached_photos, exported_photos
    from vae_edge.training.example_catalog import make_example_catalog

    quiet = lambda message: None  # noqa: E731
    times: dict[str, list[float]] = {}

    def timed(name, call, *call_args, **options):
        started = time.perf_counter()
        call(*call_args, **options)
        times.setdefault(name, []).append(time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        catalog = read_catalog(make_example_catalog(work / "catalog", size=args.items, seed=0))
        shape = (catalog, SIZE, CHANNELS)
        for round_ in range(args.rounds):
            cache_dir = work / f"thumbnails-{round_}"
            timed("training's preprocessing, no thumbnails", cached_photos, *shape,
                  cache_dir=work / f"plain-{round_}", log=quiet)
            timed("training's preprocessing, with thumbnails", cached_photos, *shape,
                  thumbnail_size=THUMBNAIL, cache_dir=cache_dir, log=quiet)
            timed("export's photos, decoded", fit_catalog, *shape, thumbnail_size=THUMBNAIL)
            timed("export's photos, from the cache", exported_photos, *shape,
                  thumbnail_size=THUMBNAIL, cache_dir=cache_dir, log=quiet)
    print(f"{args.items} example photos at {SIZE}x{SIZE}x{CHANNELS}, {THUMBNAIL}x{THUMBNAIL} "
          f"thumbnails, median of {args.rounds}")
    for name, seconds in times.items():
        rounds = ", ".join(f"{s:.2f}" for s in seconds)
        print(f"{name:45s} {statistics.median(seconds):7.2f} s   (rounds {rounds})")


if __name__ == "__main__":
    main()
