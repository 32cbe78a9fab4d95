"""An example colour catalog made from Fashion-MNIST, to try `vae-train --catalog` offline.

    python -m vae_edge.training.example_catalog OUT_DIR [--size 200] [--seed 0]

Each item is a Fashion-MNIST training garment tinted with one of eight colours and enlarged to
a photo of its own size (60 to 240 pixels on the longer side) and aspect ratio (3:4, 1:1 or
4:3), on white for most photos and on light grey or charcoal for the rest, saved as PNG, JPEG
or WebP in turn, every tenth one as a grayscale PNG: the mix a shop's export holds.
OUT_DIR/catalog.csv has the columns id (a SKU such as TSH-NAV-01234), image
(photos/<sku>.<ext>), label (the Fashion-MNIST class), name, price and url.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import click
import numpy as np

from ..runtime.atomic import atomic_directory
from ..runtime.cli_errors import library_errors
from .data import CLASS_NAMES, load_split

CLASS_CODES = ("TSH", "TRS", "PUL", "DRS", "COA", "SND", "SHR", "SNK", "BAG", "BOT")
COLOURS = {
    "navy": (30, 45, 110), "red": (180, 30, 40), "olive": (110, 120, 40),
    "mustard": (210, 160, 40), "teal": (20, 120, 120), "black": (30, 30, 30),
    "pink": (230, 130, 160), "grey": (125, 125, 125),
}
# (colour, share of photos): a product photo is most often on white
BACKGROUNDS = (((255, 255, 255), 0.6), ((235, 235, 235), 0.25), ((45, 45, 45), 0.15))
ASPECTS = ((3, 4), (1, 1), (4, 3))  # width : height
FORMATS = (("png", "PNG", {}), ("jpg", "JPEG", {"quality": 90}),
           ("webp", "WEBP", {"quality": 85}))
COLUMNS = ("id", "image", "label", "name", "price", "url")


def garment_photo(garment: np.ndarray, colour, background, width: int, height: int):
    """A 28x28 Fashion-MNIST garment (white on black) as a colour photo of width x height:
    its intensity blends the colour over the background, centred, filling 90% of the shorter
    side."""
    from PIL import Image

    alpha = garment.astype(np.float32)[..., None] / 255.0
    tinted = (np.asarray(background, np.float32) * (1 - alpha)
              + np.asarray(colour, np.float32) * alpha)
    side = max(1, round(0.9 * min(width, height)))
    picture = Image.fromarray(np.rint(tinted).astype(np.uint8), mode="RGB").resize(
        (side, side), Image.BICUBIC)
    canvas = Image.new("RGB", (width, height), tuple(background))
    canvas.paste(picture, ((width - side) // 2, (height - side) // 2))
    return canvas


def make_example_catalog(out_dir: str | Path, size: int = 200, seed: int = 0,
                         data_dir: str | Path | None = None, progress: bool = False) -> Path:
    """Write the example catalog into out_dir (refused if it exists); returns the CSV's path.

    Written into a temporary sibling directory and renamed into place when complete.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; the example catalog is written to a new "
                              "directory")
    if not 1 <= size <= 60000:
        raise ValueError(f"size must be from 1 to 60000 items, got {size}")
    split = load_split("train", data_dir)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(split), size, replace=False))
    colour_names = list(COLOURS)
    shares = np.array([share for _, share in BACKGROUNDS])
    with atomic_directory(out_dir) as tmp:
        (tmp / "photos").mkdir()
        records = []
        for i, row in enumerate(tqdm(rows, desc="photos", unit="photo", disable=not progress)):
            label = int(split.labels[row])
            colour = colour_names[rng.integers(len(colour_names))]
            background = BACKGROUNDS[rng.choice(len(BACKGROUNDS), p=shares)][0]
            longer = int(rng.integers(60, 241))
            aspect_w, aspect_h = ASPECTS[rng.integers(len(ASPECTS))]
            width = longer if aspect_w >= aspect_h else round(longer * aspect_w / aspect_h)
            height = longer if aspect_h >= aspect_w else round(longer * aspect_h / aspect_w)
            photo = garment_photo(split.images[row], COLOURS[colour], background, width, height)
            extension, pillow_format, options = FORMATS[i % len(FORMATS)]
            if i % 10 == 9:
                photo, extension, pillow_format, options = photo.convert("L"), "png", "PNG", {}
            sku = f"{CLASS_CODES[label]}-{colour[:3].upper()}-{int(row):05d}"
            image = f"photos/{sku.lower()}.{extension}"
            photo.save(tmp / image, format=pillow_format, **options)
            name = f"{colour.title()} {CLASS_NAMES[label]}"
            records.append((sku, image, CLASS_NAMES[label], name, f"{rng.uniform(9, 150):.2f}",
                            f"https://shop.example/products/{sku.lower()}"))
        with open(tmp / "catalog.csv", "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            writer.writerows(records)
    return out_dir / "catalog.csv"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--size", type=click.IntRange(1, 60000), default=200, show_default=True,
              help="Number of items.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Directory with the Fashion-MNIST IDX files (.gz or raw).")
def main(out_dir, size, seed, data_dir):
    """Make an example colour catalog (photos + catalog.csv) in OUT_DIR from Fashion-MNIST."""
    with library_errors():
        csv_path = make_example_catalog(out_dir, size, seed, data_dir,
                                        progress=sys.stderr.isatty())
    click.echo(f"wrote {csv_path} ({size} items)")


if __name__ == "__main__":
    main()
