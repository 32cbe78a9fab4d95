"""`vae-export`: a thin click layer over vae_edge.export.build.build_bundle."""

from __future__ import annotations

from pathlib import Path

import click

from ..runtime.cli_errors import library_errors
from ..training import distributed
from ..training.cli import quiet
from .build import DEFAULT_THUMBNAIL_SIZE, build_bundle


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Bundle directory to create.")
@click.option("--catalog", default=None, metavar="CSV|train|test",
              help="What the bundle indexes: a catalog CSV (id, image[, label, ...]; "
                   "docs/catalog.md), or a Fashion-MNIST split, train or test. Default: the "
                   "catalog the model was trained on.")
@click.option("--skip-bad", is_flag=True,
              help="Leave out catalog rows that cannot be used (reported) instead of refusing "
                   "the CSV.")
@click.option("--thumbnail-size", type=click.IntRange(8, 512), default=DEFAULT_THUMBNAIL_SIZE,
              show_default=True,
              help="Side of the WebP thumbnails of a CSV catalog's photos that the bundle "
                   "carries for the kiosk (about 1-3 KB each at 96).")
@click.option("--no-thumbnails", is_flag=True,
              help="Carry no thumbnails (the kiosk then shows the decoder's view of each item).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Index only the first N catalog items (for quick tests).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Directory with the Fashion-MNIST IDX files.")
@click.option("--force", is_flag=True,
              help="Replace an existing bundle (only once the new one is complete).")
def main(checkpoint, out_dir, catalog, skip_bad, thumbnail_size, no_thumbnails, limit,
         data_dir, force):
    """Export CHECKPOINT (from vae-train) to a bundle the runtime can load.

    Writes encoder.onnx (images -> mu, log_var), decoder.onnx (z -> images), the float16
    index of every catalog item's mu and log-sigma, items.csv (ids and the catalog's other
    columns), the catalog photos' thumbnails, and manifest.json with a sha256 per file. The
    graphs are checked against PyTorch at batch 1, 7 and 64 (max abs diff <= 1e-4) before
    anything is moved into place.

    On many ranks, `torchrun --nproc-per-node N $(which vae-export) ...` fits and encodes the
    catalog's photos in N parts at once, into the same index bytes (docs/scale.md).
    """
    with distributed.joined("cpu") as (ranks, _), library_errors():
        build_bundle(checkpoint, out_dir, catalog=catalog, data_dir=data_dir, limit=limit,
                     force=force, log=click.echo if ranks.leader else quiet, skip_bad=skip_bad,
                     thumbnail_size=None if no_thumbnails else thumbnail_size)
