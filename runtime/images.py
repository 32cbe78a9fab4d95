"""Photos in (any size, fitted to the model's square), PNG and WebP out (Pillow), and the
nearest-items contact sheet."""

from __future__ import annotations

import contextlib
import math
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
# Two bounds on a photo's pixels, both checked from its header before any pixel is decoded
# (a decompression bomb). A stranger's photo (a query: `nearest --image`, `encode`) is refused
# above MAX_PHOTO_PIXELS, beyond any product photo a customer sends. A shop's own catalog
# photos (training, export, `vae-run add`) are trusted input, refused only above
# MAX_CATALOG_PHOTO_PIXELS: well above the largest cameras' (61 and 100 megapixels) and scans.
# A photo above WORKING_PIXELS is brought down to about that many as it is decoded
# (docs/catalog.md states the peak memory this takes).
MAX_PHOTO_PIXELS = 50_000_000
MAX_CATALOG_PHOTO_PIXELS = 250_000_000
# A picture more than this many times longer one way than the other is refused from its
# header too: fitted into a square it would be a line, and its memory grows with its length
# (a 1 x 49,000,000 PNG is below the pixel bound).
MAX_ASPECT_RATIO = 50
# A photo above this many pixels is decoded at 1/2, 1/4 or 1/8 scale (JPEG) or reduced by an
# integer factor as soon as it is decoded (other formats) to about this many, before anything
# else is done with it; a photo up to this size is fitted as it is. 16 megapixels is far more
# than any fitted size or thumbnail needs, so a reduced photo fits to within a level or two of
# the same photo fitted at full size.
WORKING_PIXELS = 16_000_000
STRIPE_PIXELS = 2_000_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None for other files: 24 bytes read."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def _check_size(path: Path, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ValueError(f"{path.name}: image is {width}x{height} pixels, too large to decode "
                         f"safely (at most {max_pixels:,} pixels)")
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        raise ValueError(f"{path.name}: image is {width}x{height} pixels, too long and thin to "
                         f"fit (at most {MAX_ASPECT_RATIO} times longer one way than the other)")


def _open(handle, path: Path):
    """Image.open for IMAGE_FORMATS without Pillow's own size limit: that limit is
    Image.MAX_IMAGE_PIXELS, one setting for the whole process, below MAX_CATALOG_PHOTO_PIXELS;
    the caller checks its own bound from the header instead."""
    from PIL import Image, UnidentifiedImageError

    Image.init()
    prefix = handle.read(16)
    for name in IMAGE_FORMATS:
        factory, accept = Image.OPEN[name]
        found = True if accept is None else accept(prefix)
        if not found or isinstance(found, str):  # a str: Pillow's reason it is not this format
            continue
        handle.seek(0)
        try:
            return factory(handle, str(path))
        except (SyntaxError, IndexError, TypeError, struct.error):  # as Image.open: not this one
            continue
    raise UnidentifiedImageError(str(path))


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


def load_photo(path: str | Path, decode: bool = True, *, max_pixels: int = MAX_PHOTO_PIXELS):
    """Open and decode one photo as a Pillow image in mode "L" or "RGB", upright.

    decode=False runs only the checks that need the file's header (present, a regular file,
    a format and mode accepted, not too large) and returns None: a cheap first pass over a
    catalog before any photo is decoded.

    Formats: PNG, JPEG, WebP, BMP, GIF, PPM/PGM, any size up to max_pixels (MAX_PHOTO_PIXELS
    for a stranger's photo, MAX_CATALOG_PHOTO_PIXELS for a shop's catalog) and at most
    MAX_ASPECT_RATIO, checked from the header before decoding; 8-bit modes, grayscale or
    colour. A photo above WORKING_PIXELS comes back reduced to about that many (a JPEG
    decoded at a reduced scale). The EXIF orientation of a camera photo is applied;
    transparent pixels are put on white (a product cut-out on a transparent background shows
    on white, as in a shop). Raises FileNotFoundError or ValueError naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    with _pillow_errors(path):
        found = _png_header_size(path)
    if found is not None:  # a PNG's size, read without Pillow
        _check_size(path, found, max_pixels)
    with open(path, "rb") as handle, warnings.catch_warnings():
        # A corrupt EXIF block (a tag past its end) is warned of on stderr, as the photo is
        # opened and as its orientation is read; a readable orientation tag still applies
        # and the pixels are unaffected.
        warnings.simplefilter("ignore", UserWarning)
        return _read(handle, path, max_pixels, decode)


def _read(handle, path: Path, max_pixels: int, decode: bool):
    """load_photo once the file is open. `image` is the only reference to the pixels, so the
    full-size ones (of a format other than JPEG) are freed as soon as they are reduced."""
    from PIL import Image, ImageOps

    with _pillow_errors(path):
        image = _open(handle, path)
    _check_size(path, image.size, max_pixels)
    if image.mode not in IMAGE_MODES:
        raise ValueError(
            f"{path.name}: pixel mode {image.mode} is not supported; expected an 8-bit "
            "grayscale, palette or colour image (16-bit grayscale and float images are not "
            "read: save it with 8 bits per channel)")
    if not decode:
        return None
    with _pillow_errors(path):
        # MPO: a camera's JPEG with a second picture (a preview, a depth map) after it
        if image.format in ("JPEG", "MPO") and image.width * image.height > WORKING_PIXELS:
            scale = next((scale for scale in (2, 4) if image.width * image.height
                          <= WORKING_PIXELS * scale * scale), 8)
            image.draft(image.mode, (image.width // scale, image.height // scale))
        image.load()
        transparent = (image.mode in ("RGBA", "LA", "PA", "La", "RGBa")
                       or "transparency" in image.info)
        mode = ("RGBA" if transparent and image.mode not in ("LA", "La", "RGBa")
                else "L" if image.mode == "1" else "RGB" if image.mode == "P" else image.mode)
        factor = math.ceil(math.sqrt(image.width * image.height / WORKING_PIXELS))
        # reduce averages pixel values (not palette indices) and needs the alpha for
        # palette and tRNS transparency: the photo is in `mode` before it is reduced
        image = _reduced(image, factor, mode) if factor >= 2 else image.convert(mode)
        upright = ImageOps.exif_transpose(image)
        if transparent:
            picture = Image.new("RGBA", upright.size, (255, 255, 255, 255))
            picture.alpha_composite(upright.convert("RGBA"))
            return picture.convert("RGB")
        return upright.convert("L" if upright.mode in ("L", "1") else "RGB")


def _reduced(image, factor: int, mode: str):
    """The decoded image in `mode`, reduced by `factor` (as Image.reduce), a stripe of rows at
    a time: converting or reducing the whole (a transparent one premultiplied) would copy
    its full-size pixels; a stripe is a copy of about STRIPE_PIXELS. The stripes start at
    multiples of factor, so every block is the one the whole image's reduce would average."""
    from PIL import Image

    width, height = image.size
    reduced = Image.new(mode, (-(-width // factor), -(-height // factor)))
    # the EXIF block (its orientation) goes with the pixels, as convert would take it
    reduced.info = {key: value for key, value in image.info.items() if key != "transparency"}
    rows = factor * max(1, STRIPE_PIXELS // (width * factor))
    for top in range(0, height, rows):
        stripe = image.crop((0, top, width, min(height, top + rows))).convert(mode)
        reduced.paste(stripe.reduce(factor), (0, top // factor))
    return reduced


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


def read_image(path: str | Path, size: int, channels: int, *,
               max_pixels: int = MAX_PHOTO_PIXELS) -> np.ndarray:
    """One photo file fitted as training fits catalog photos: uint8 (channels, size, size)."""
    return fit_photo(load_photo(path, max_pixels=max_pixels), size, channels)


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
