"""PNG in and out (Pillow), and the nearest-items contact sheet."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from .atomic import atomic_file

# Pillow can parse dozens of formats; a kiosk needs a few, and every parser left out is
# one less that untrusted bytes can reach.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "PPM")
# 8-bit modes that convert to grayscale without guessing: "I;16" would be clipped to white
# and an alpha channel leaves the background undefined, so those are refused instead.
IMAGE_MODES = ("L", "1", "P", "RGB")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None for other files: 24 bytes read."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def read_image(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Read one image file as uint8 grayscale (H, W); it must already be size = (H, W).

    Formats: PNG, JPEG, BMP, GIF, PPM/PGM; modes: 8-bit grayscale, bilevel, palette or RGB
    (converted to grayscale). The size is checked from the header before any pixel is
    decoded, so a huge file (a decompression bomb) is refused cheaply. Raises
    FileNotFoundError or ValueError naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    height, width = size

    # Pillow's own errors are caught around the calls into it only: a ValueError raised
    # while parsing (an oversized text chunk) needs the file name, ours already have it.
    try:
        found = _png_header_size(path)
        mode = transparent = pixels = None
        if found in (None, (width, height)):
            with Image.open(path, formats=IMAGE_FORMATS) as image:
                found, mode = image.size, image.mode
                transparent = "transparency" in image.info  # a tRNS chunk or GIF key colour
                if found == (width, height) and mode in IMAGE_MODES and not transparent:
                    pixels = np.asarray(image.convert("L"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise ValueError(f"{path.name}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as exc:  # header of a non-PNG format claims a huge size
        raise ValueError(f"{path.name}: refused before decoding, far too large ({exc})") from None
    except (OSError, SyntaxError, ValueError, struct.error) as exc:  # truncated or corrupt data
        raise ValueError(f"{path.name}: cannot decode image ({exc})") from None
    if found != (width, height):
        raise ValueError(f"{path.name}: image is {found[0]}x{found[1]} pixels, "
                         f"expected {width}x{height}")
    if pixels is None:
        with_transparency = " with transparency" if transparent else ""
        raise ValueError(
            f"{path.name}: pixel mode {mode}{with_transparency} is not supported; expected "
            "8-bit grayscale (L), bilevel, palette or RGB without transparency"
        )
    return pixels


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image(s) in [0, 1] -> uint8, dropping a leading channel axis of size 1."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write a grayscale image (uint8, or float in [0, 1]) as PNG, atomically."""
    from PIL import Image

    pixels = image if image.dtype == np.uint8 else to_uint8(image)
    return _atomic_save(Image.fromarray(pixels, mode="L"), Path(path))


def _atomic_save(picture, path: Path) -> Path:
    with atomic_file(path) as handle:
        picture.save(handle, format="PNG")
    return path

def save_sheet(path: str | Path, query: np.ndarray, items: np.ndarray, captions: list[str],
               title: str) -> Path:
    """Query image, then its nearest items, one row, each with a caption underneath."""
    from PIL import Image, ImageDraw

    scale, cell, caption_h, title_h = 4, 28 * 4 + 8, 30, 18
    pictures = [query] + list(items)
    width = cell * len(pictures) + 8
    sheet = Image.new("L", (width, title_h + cell + caption_h), 255)
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 3), title, fill=0)
    for i, (picture, caption) in enumerate(zip(pictures, captions)):
        tile = Image.fromarray(to_uint8(picture), mode="L").resize(
            (28 * scale, 28 * scale), Image.NEAREST
        )
        x = 8 + i * cell
        sheet.paste(tile, (x, title_h))
        for line_no, line in enumerate(caption.split("\n")[:2]):
            draw.text((x, title_h + 28 * scale + 2 + 12 * line_no), line, fill=0)
    return _atomic_save(sheet, Path(path))
