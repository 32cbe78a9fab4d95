"""Photos in (any size, fitted to the model's square), PNG and WebP out (Pillow), and the
nearest-items contact sheet."""

from __future__ import annotations

import contextlib
import struct
import warnings
from pathlib import Path

import numpy as np

from .atomic import atomic_file

# Pillow can parse dozens of formats; a catalog needs a few, and every parser left out is
# one less that untrusted bytes can reach.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "PPM")
FORMATS_TEXT = "PNG, JPEG, WebP, BMP, GIF or PPM"
# 8-bit modes (alpha included). 16-bit and float modes ("I;16", "I", "F") are refused: their
# value range is not fixed, so converting them to 8 bits would be a guess.
IMAGE_MODES = ("L", "1", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "La", "RGBa")
# A photo larger than this is refused from its header, before any pixel is decoded
# (a decompression bomb); 50 megapixels is beyond any product photo.
MAX_PHOTO_PIXELS = 50_000_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None for other files: 24 bytes read."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def _check_size(path: Path, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_PHOTO_PIXELS:
        raise ValueError(f"{path.name}: image is {width}x{height} pixels, too large to decode "
                         f"safely (at most {MAX_PHOTO_PIXELS:,} pixels)")


@contextlib.contextmanager
def _pillow_errors(path: Path):
    """Pillow's failures on untrusted bytes as one-line ValueErrors naming the file. Only
    calls into Pillow go inside: the errors raised here already name it."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except UnidentifiedImageError:
        # Pillow may well read it (TIFF, HEIC with a plugin): only IMAGE_FORMATS are opened
        raise ValueError(f"{path.name}: not a {FORMATS_TEXT} image") from None
    except Image.DecompressionBombError as exc:  # header of a non-PNG format claims a huge size
        raise ValueError(f"{path.name}: refused before decoding, far too large ({exc})") from None
    except (OSError, SyntaxError, ValueError, struct.error) as exc:  # truncated or corrupt
        raise ValueError(f"{path.name}: cannot decode image ({exc})") from None


def load_photo(path: str | Path, decode: bool = True):
    """Open and decode one photo as a Pillow image in mode "L" or "RGB", upright.

    decode=False runs only the checks that need the file's header (present, a regular file,
    a format and mode accepted, not too large) and returns None: a cheap first pass over a
    catalog before any photo is decoded.

    Formats: PNG, JPEG, WebP, BMP, GIF, PPM/PGM, any size up to MAX_PHOTO_PIXELS (checked
    from the header before decoding); 8-bit modes, grayscale or colour. The EXIF orientation
    of a camera photo is applied; transparent pixels are put on white (a product cut-out on
    a transparent background shows on white, as in a shop). Raises FileNotFoundError or
    ValueError naming the file.
    """
    from PIL import Image, ImageOps

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    with _pillow_errors(path):
        found = _png_header_size(path)
    if found is not None:  # a PNG's size, read without Pillow
        _check_size(path, found)
    with _pillow_errors(path), warnings.catch_warnings():
        # Pillow warns (on stderr) of sizes its own limit calls large; _check_size refuses them
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(path, formats=IMAGE_FORMATS)
    with image:
        _check_size(path, image.size)
        if image.mode not in IMAGE_MODES:
            raise ValueError(
                f"{path.name}: pixel mode {image.mode} is not supported; expected an 8-bit "
                "grayscale, palette or colour image (16-bit grayscale and float images are not "
                "read: save it with 8 bits per channel)")
        if not decode:
            return None
        with _pillow_errors(path):
            image.load()
            upright = ImageOps.exif_transpose(image)
            if upright.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in upright.info:
                picture = Image.new("RGBA", upright.size, (255, 255, 255, 255))
                picture.alpha_composite(upright.convert("RGBA"))
                return picture.convert("RGB")
            return upright.convert("L" if upright.mode in ("L", "1") else "RGB")


def fit_photo(image, size: int, channels: int) -> np.ndarray:
    """A photo (Pillow image) fitted into a size x size square: uint8 (channels, size, size).

    The aspect ratio is kept: the longer side is scaled to `size` (Lanczos), the picture is
    centred and the rest is padded with the median colour of the photo's outermost pixels, so
    a product shot on white is padded with white and a garment on black with black. A photo
    that is already size x size is used as it is. channels 1 gives grayscale (ITU-R 601-2
    luma), 3 colour.
    """
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    picture = image.convert("L" if channels == 1 else "RGB")
    width, height = picture.size
    if (width, height) != (size, size):
        scale = size / max(width, height)
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        pixels = np.asarray(picture)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        background = tuple(int(v) for v in np.median(border.reshape(len(border), -1), axis=0))
        canvas = Image.new(picture.mode, (size, size),
                           background[0] if channels == 1 else background)
        canvas.paste(picture.resize(new, Image.LANCZOS),
                     ((size - new[0]) // 2, (size - new[1]) // 2))
        picture = canvas
    pixels = np.asarray(picture, dtype=np.uint8)
    return pixels[None] if channels == 1 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def read_image(path: str | Path, size: int, channels: int) -> np.ndarray:
    """One photo file fitted as training fits catalog photos: uint8 (channels, size, size)."""
    return fit_photo(load_photo(path), size, channels)


def thumbnail_bytes(image, size: int, quality: int = 80) -> bytes:
    """A colour (or grayscale) photo fitted into size x size, as WebP bytes."""
    from io import BytesIO

    from PIL import Image

    channels = 1 if image.mode == "L" else 3
    pixels = fit_photo(image, size, channels)
    picture = Image.fromarray(pixels[0] if channels == 1 else pixels.transpose(1, 2, 0))
    out = BytesIO()
    picture.save(out, format="WEBP", quality=quality, method=6)
    return out.getvalue()


def webp_size(data: bytes) -> tuple[int, int]:
    """(width, height) of WebP bytes, read from their header: no pixel is decoded (a 10 KB
    WebP can claim 16383x16383). ValueError for bytes that are not a WebP picture."""
    from io import BytesIO

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(BytesIO(data), formats=("WEBP",)) as picture:
                return picture.size
    except UnidentifiedImageError:
        raise ValueError("not a WebP picture") from None
    except Image.DecompressionBombError:  # the claimed size, from Pillow's message
        raise ValueError("claims a size too large to decode") from None
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        raise ValueError(f"not a readable WebP picture ({exc})") from None


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image(s) in [0, 1] -> uint8, dropping a leading channel axis of size 1."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)


def to_picture(image: np.ndarray):
    """One image, (H, W) or (C, H, W) with C 1 or 3, uint8 or float in [0, 1] -> a Pillow
    image in mode L or RGB."""
    from PIL import Image

    pixels = image if image.dtype == np.uint8 else to_uint8(image)
    if pixels.ndim == 3 and pixels.shape[0] == 1:
        pixels = pixels[0]
    if pixels.ndim == 3:
        return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), mode="RGB")
    return Image.fromarray(pixels, mode="L")


def png_bytes(image: np.ndarray) -> bytes:
    """One image (as to_picture takes it) as PNG bytes."""
    from io import BytesIO

    buffer = BytesIO()
    to_picture(image).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write one image (as to_picture takes it) as PNG, atomically."""
    return _atomic_save(to_picture(image), Path(path))


def _atomic_save(picture, path: Path) -> Path:
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: the picture is written as PNG; expected a file name ending "
                         f"in .png, got {path.suffix or 'none'}")
    with atomic_file(path) as handle:
        picture.save(handle, format="PNG")
    return path


def save_sheet(path: str | Path, query: np.ndarray, items: list, captions: list[str],
               title: str) -> Path:
    """Query image, then its nearest items, one row, each with a caption underneath. The
    pictures are images as to_picture takes them, or Pillow images (thumbnails)."""
    from PIL import Image, ImageDraw

    side, caption_h, title_h = 112, 30, 18
    cell = side + 8
    pictures = [query] + list(items)
    width = cell * len(pictures) + 8
    sheet = Image.new("RGB", (width, title_h + cell + caption_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 3), title, fill=(0, 0, 0))
    for i, (picture, caption) in enumerate(zip(pictures, captions)):
        if isinstance(picture, np.ndarray):
            picture = to_picture(picture)
        # Small model images keep their pixels sharp; photos are scaled smoothly.
        resample = Image.NEAREST if max(picture.size) <= side // 2 else Image.LANCZOS
        tile = picture.convert("RGB").resize((side, side), resample)
        x = 8 + i * cell
        sheet.paste(tile, (x, title_h))
        for line_no, line in enumerate(caption.split("\n")[:2]):
            draw.text((x, title_h + side + 2 + 12 * line_no), line, fill=(0, 0, 0))
    return _atomic_save(sheet, Path(path))
