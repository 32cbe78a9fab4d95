"""Bad input everywhere it enters: z, k and images, through the Python API and `vae-run`.

Every case must end in the documented error type (ValueError / FileNotFoundError) with a
precise message; on the CLI, exit status 2 and one line, never a traceback.
"""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from vae_edge.runtime import Runtime, parse_z
from vae_edge.runtime.checks import MAX_ABS_Z
from vae_edge.runtime.cli import main as run_main
from vae_edge.runtime.images import (
    MAX_CATALOG_PHOTO_PIXELS,
    WORKING_PIXELS,
    fit_photo,
    load_photo,
    read_image,
)

D = 8
Z8 = "0.5,-1.2,0,1,2,-2,0.1,3"
SHAPE_MSG = r"z must have shape \(8,\) or \(batch, 8\), got "
NUMERIC_MSG = r"z must be numeric: a vector of floats or a \(batch, dim\) array"

# --- z -----------------------------------------------------------------------------------

BAD_Z_TEXT = [
    ("1,2", "z has 2 values, expected 8 (the latent dimension)"),
    ("", "z is empty: expected 8 comma-separated numbers"),
    (" , ,\t", "z is empty: expected 8 comma-separated numbers"),
    ("1,2,3,4,5,6,7,x", "z value 8 is not a number: 'x'"),
    ("1,2,3,4,5,6,7,0x1f", "z value 8 is not a number: '0x1f'"),
    ("1_0,2,3,4,5,6,7,8", "z value 1 is not a number: '1_0'"),
    ("\u0661,2,3,4,5,6,7,8", "z value 1 is not a number: '\u0661'"),  # Arabic-Indic digit one
    ("1,2,3,4,5,6,7,nan", "z holds NaN or infinite values"),
    ("1,2,3,4,5,6,7,-inf", "z holds NaN or infinite values"),
    ("1,2,3,4,5,6,7,Infinity", "z holds NaN or infinite values"),
    ("1e308,2,3,4,5,6,7,8", "z value 1 is out of range [-1e+06, 1e+06]: '1e308'"),
    ("1,2,3,4,5,6,7,1e999", "z value 8 is out of range [-1e+06, 1e+06]: '1e999'"),
    (",".join(["0"] * 1_000_000), "z has 1000000 values, expected 8 (the latent dimension)"),
]


@pytest.mark.parametrize(("text", "message"), BAD_Z_TEXT, ids=range(len(BAD_Z_TEXT)))
def test_parse_z_refuses(text, message):
    with pytest.raises(ValueError) as info:
        parse_z(text, D)
    assert str(info.value) == message


def test_parse_z_refuses_non_text_and_absurd_length():
    with pytest.raises(ValueError, match="^z must be text like '0.5,-1.2,...', got list$"):
        parse_z([1.0] * D, D)
    with pytest.raises(ValueError, match=r"^z text is 16777217 characters long; at most 16777216"):
        parse_z(" " * (16 * 2**20 + 1), D)


@pytest.mark.parametrize(("text", "message"), BAD_Z_TEXT[:-1], ids=range(len(BAD_Z_TEXT) - 1))
def test_cli_z_refused_with_one_line(tiny_bundle, text, message):
    for command in (["nearest"], ["decode", "-o", "unused.png"]):
        result = CliRunner().invoke(run_main, [*command, "--bundle", str(tiny_bundle),
                                               "--z", text])
        assert result.exit_code == 2, result.output
        assert result.output == f"Error: {message}\n"


BAD_Z_ARRAYS = [
    (np.zeros(7), SHAPE_MSG + r"\(7,\)"),
    (np.zeros(0), SHAPE_MSG + r"\(0,\)"),
    (np.zeros(10**6), SHAPE_MSG + r"\(1000000,\)"),
    (np.zeros((2, 3, 8)), SHAPE_MSG + r"\(2, 3, 8\)"),
    (np.zeros((2, 9)), SHAPE_MSG + r"\(2, 9\)"),
    (np.float64(1.0), SHAPE_MSG + r"\(\)"),
    (np.zeros((0, 8)), r"z batch size must be in \[1, 65536\], got 0"),
    (np.zeros((65537, 8)), r"z batch size must be in \[1, 65536\], got 65537"),
    (np.full(8, np.nan), "z holds NaN or infinite values"),
    (np.full(8, -np.inf), "z holds NaN or infinite values"),
    (np.full(8, 1e308), r"z values must lie in \[-1e\+06, 1e\+06\], got \|z\| up to 1e\+308"),
    (np.full(8, np.iinfo(np.int64).max), r"z values must lie in .* got \|z\| up to 9.22e\+18"),
    ([10**400] * 8, NUMERIC_MSG + ", got dtype object"),
    (np.ones(8, bool), NUMERIC_MSG + ", got dtype bool"),
    (np.ones(8, complex), NUMERIC_MSG + ", got dtype complex128"),
    (["1"] * 8, NUMERIC_MSG + ", got dtype <U1"),
    ("1,2,3,4,5,6,7,8", NUMERIC_MSG + r" \(for text like '0.5,-1.2,...' use parse_z\)"),
    ([[1.0] * 8, [1.0] * 7], NUMERIC_MSG + "$"),  # ragged
    (None, NUMERIC_MSG + ", got dtype object"),
    ({"z": 1}, NUMERIC_MSG + ", got dtype object"),
]


@pytest.mark.parametrize(("z", "message"), BAD_Z_ARRAYS, ids=range(len(BAD_Z_ARRAYS)))
def test_api_z_refused(runtime, z, message):
    for call in (runtime.decode, runtime.nearest):
        with pytest.raises(ValueError, match=message):
            call(z)


def test_z_at_the_limits_works(runtime):
    z = np.full(D, MAX_ABS_Z)
    assert np.isfinite(runtime.decode(z)).all()
    assert np.isfinite(runtime.nearest(-z, k=3).log_likelihoods).all()
    np.testing.assert_array_equal(parse_z("1e6, -1E+6 .5,5. +0 -0 1e-320 7", D),
                                  [1e6, -1e6, 0.5, 5.0, 0.0, 0.0, 1e-320, 7.0])
    np.testing.assert_array_equal(runtime.decode(np.arange(8, dtype=np.uint8)),
                                  runtime.decode(np.arange(8.0)))


# --- k -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("k", "message"),
    [(0, "k must be >= 1, got 0"), (-3, "k must be >= 1, got -3"),
     (np.int64(-1), "k must be >= 1, got -1"),
     (2.5, "k must be an integer >= 1, got 2.5"), (3.0, "k must be an integer >= 1, got 3.0"),
     ("3", "k must be an integer >= 1, got '3'"), (True, "k must be an integer >= 1, got True"),
     (None, "k must be an integer >= 1, got None"),
     (float("nan"), "k must be an integer >= 1, got nan")],
)
def test_api_k_refused(runtime, k, message):
    with pytest.raises(ValueError) as info:
        runtime.nearest(np.zeros(D), k=k)
    assert str(info.value) == message


def test_k_above_the_catalog_is_clamped(runtime):
    for k in (len(runtime.index) + 1, 10**30, np.uint64(2**63)):
        matches = runtime.nearest(np.zeros(D), k=k)
        assert sorted(matches.ids.tolist()) == sorted(runtime.index.ids.tolist())
        assert np.all(np.diff(matches.log_likelihoods) <= 0)
        assert matches.probabilities.sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("k", "last_line"),
    [("0", "Error: k must be >= 1, got 0"), ("-5", "Error: k must be >= 1, got -5"),
     ("2.5", "Error: Invalid value for '-k': '2.5' is not a valid integer."),
     ("ten", "Error: Invalid value for '-k': 'ten' is not a valid integer."),
     ("", "Error: Invalid value for '-k': '' is not a valid integer.")],
)
def test_cli_k_refused(tiny_bundle, k, last_line):
    result = CliRunner().invoke(run_main, ["nearest", "--bundle", str(tiny_bundle), "--z", Z8,
                                           "-k", k])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == last_line
    assert "Traceback" not in result.output


def test_cli_huge_k_returns_the_whole_catalog(tiny_bundle):
    result = CliRunner().invoke(run_main, ["nearest", "--bundle", str(tiny_bundle), "--z", Z8,
                                           "-k", str(10**30), "--json"])
    assert result.exit_code == 0, result.output
    assert '"k": 5000' in result.output


# --- integers: ASCII digits only; --threads bounded ----------------------------------------

NOT_AN_INTEGER = "Error: Invalid value for '{}': '{}' is not a valid integer."
UNKNOWN_LABEL = ("Error: unknown label '{}': expected one of T-shirt/top, Trouser, Pullover, "
                 "Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot (or a class id 0-9)")
THREADS_RANGE = "Error: Invalid value for '--threads': {} is not in the range 1<=x<=256."


@pytest.mark.parametrize(
    ("args", "last_line"),
    [(["--z", Z8, "-k", "\u0663"], NOT_AN_INTEGER.format("-k", "\u0663")),  # Arabic-Indic 3
     (["--random", "--seed", "\u0663"], NOT_AN_INTEGER.format("--seed", "\u0663")),
     (["--z", Z8, "--label", "\u0663"], UNKNOWN_LABEL.format("\u0663")),
     (["--z", Z8, "--label", "\u00b2"], UNKNOWN_LABEL.format("\u00b2")),  # superscript 2
     (["--z", Z8, "--threads", "\u0663"], NOT_AN_INTEGER.format("--threads", "\u0663")),
     *[(["--z", Z8, "--threads", str(n)], THREADS_RANGE.format(n))
       for n in (0, 257, 3000, 2**31, 10**20)]],
)
def test_cli_integer_options_refused(tiny_bundle, args, last_line):
    result = CliRunner().invoke(run_main, ["nearest", "--bundle", str(tiny_bundle), *args])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == last_line
    assert "Traceback" not in result.output


def test_label_ids_are_ascii_digits(runtime):
    assert runtime.label_id(" 3 ") == 3
    assert set(runtime.nearest(np.zeros(D), k=4, label="3").labels.tolist()) == {3}
    for label in ("\u0663", "\u00b2", "\uff13"):  # Arabic-Indic 3, superscript 2, fullwidth 3
        with pytest.raises(ValueError, match=f"^unknown label '{label}': expected one of"):
            runtime.nearest(np.zeros(D), k=4, label=label)


# --- image arrays --------------------------------------------------------------------------

IMG = r"images must be \(28, 28\) or \(1, 28, 28\) or \(batch, 1, 28, 28\), got "
BAD_IMAGE_ARRAYS = [
    (np.zeros((27, 28), np.uint8), IMG + r"\(27, 28\)$"),
    (np.zeros((28, 28, 3), np.uint8), IMG + r"\(28, 28, 3\)$"),  # RGB as HWC
    (np.zeros((2, 3, 28, 28), np.float32), IMG + r"\(2, 3, 28, 28\)$"),
    (np.zeros(784, np.uint8), IMG + r"\(784,\)$"),
    (np.zeros((0, 28, 28), np.uint8), r"image batch size must be in \[1, 65536\], got 0"),
    (np.zeros((28, 28), np.int64), "images must be uint8 or float, got dtype int64"),
    (np.zeros((28, 28), np.uint16), "images must be uint8 or float, got dtype uint16"),
    (np.zeros((28, 28), bool), "images must be uint8 or float, got dtype bool"),
    (np.zeros((28, 28), complex), "images must be uint8 or float, got dtype complex128"),
    (None, "images must be uint8 or float, got dtype object"),
    ([[0.0] * 28] * 27 + [[0.0] * 27], "images must be a numeric array, uint8 or float"),
    (np.full((28, 28), 2.0), r"float images must lie in \[0, 1\], got \[2, 2\]"),
    (np.full((28, 28), -0.5, np.float16), r"float images must lie in \[0, 1\], got \[-0.5"),
    (np.full((28, 28), 255.0), r"float images must lie in \[0, 1\], got \[255, 255\]"),
    (np.full((28, 28), 1e308), r"float images must lie in \[0, 1\], got \[1e\+308, 1e\+308\]"),
    (np.full((28, 28), np.nan), "images hold NaN or infinite values"),
    (np.full((1, 28, 28), np.inf, np.float32), "images hold NaN or infinite values"),
]


@pytest.mark.parametrize(("images", "message"), BAD_IMAGE_ARRAYS,
                         ids=range(len(BAD_IMAGE_ARRAYS)))
def test_api_images_refused(runtime, images, message):
    with pytest.raises(ValueError, match=message):
        runtime.encode(images)


# --- image files -------------------------------------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height 8-bit gray pixels, all zero.

    Only the first rows are present (a few KB of zlib): decoding it fully would need
    width * height bytes of memory, which is what a decompression bomb is after.
    """
    rows = zlib.compress(b"\x00" * ((width + 1) * 16), 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", rows)
            + png_chunk(b"IEND", b""))


def bomb_bmp(width: int, height: int) -> bytes:
    """A 54-byte BMP header claiming a width x height 24-bit image, with no pixel data."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + info


def text_bomb_png() -> bytes:
    """A valid 28 x 28 PNG with a zTXt chunk of 8 KB that inflates to 8 MiB of text."""
    text = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\x00" * (8 << 20), 9))
    pixels = zlib.compress(b"\x00" * (29 * 28))
    ihdr = struct.pack(">IIBBBBB", 28, 28, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + text + png_chunk(b"IDAT", pixels)
            + png_chunk(b"IEND", b""))


def make_files(tmp_path):
    """name -> (path, expected error message) for every kind of bad image file."""
    cases = {}

    def add(name, message, writer):
        path = tmp_path / name
        writer(path)
        cases[name] = (path, message)

    add("deep.png", "deep.png: pixel mode I;16 is not supported; expected an 8-bit grayscale, "
        "palette or colour image (16-bit grayscale and float images are not read: save it with 8 "
        "bits per channel)",
        lambda p: Image.new("I;16", (28, 28)).save(p))
    add("empty.png", "empty.png: not a PNG, JPEG, WebP, BMP, GIF or PPM image",
        lambda p: p.write_bytes(b""))
    add("text.png", "text.png: not a PNG, JPEG, WebP, BMP, GIF or PPM image",
        lambda p: p.write_text("a,b,c\n1,2,3\n"))
    add("image.tiff", "image.tiff: not a PNG, JPEG, WebP, BMP, GIF or PPM image",  # not accepted
        lambda p: Image.new("L", (28, 28)).save(p, format="TIFF"))

    def truncated(p):
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), np.uint8)).save(p)
        p.write_bytes(p.read_bytes()[:60])

    add("cut.png", "cut.png: cannot decode image (", truncated)
    add("bomb.png", "bomb.png: image is 200000x200000 pixels, too large to decode safely (at "
        "most 50,000,000 pixels)", lambda p: p.write_bytes(bomb_png(200_000, 200_000)))
    add("bomb28.png", "bomb28.png: image is 28x2000000 pixels, too large to decode safely",
        lambda p: p.write_bytes(bomb_png(28, 2_000_000)))
    add("bomb.bmp", "bomb.bmp: image is 50000x50000 pixels, too large to decode safely (at "
        "most 50,000,000 pixels)", lambda p: p.write_bytes(bomb_bmp(50_000, 50_000)))
    # Below the pixel bound, but a line: a MemoryError, not a picture, at 1 x 49,000,000.
    add("thin.png", "thin.png: image is 1x200000 pixels, too long and thin to fit (at most 50 "
        "times longer one way than the other)", lambda p: p.write_bytes(bomb_png(1, 200_000)))
    add("wide.bmp", "wide.bmp: image is 60000x100 pixels, too long and thin to fit",
        lambda p: p.write_bytes(bomb_bmp(60_000, 100)))
    add("text-bomb.png", "text-bomb.png: cannot decode image (Decompressed data too large",
        lambda p: p.write_bytes(text_bomb_png()))
    add("folder.png", f"{tmp_path / 'folder.png'}: not a regular file", lambda p: p.mkdir())
    return cases


def test_image_files_refused(tmp_path):
    for name, (path, message) in make_files(tmp_path).items():
        with pytest.raises(ValueError) as info:
            read_image(path, 28, 1)
        assert str(info.value).startswith(message), name
    with pytest.raises(FileNotFoundError, match="^image not found: "):
        read_image(tmp_path / "missing.png", 28, 1)


def test_a_size_pillow_warns_of_is_refused_without_its_warning(tmp_path):
    """100 megapixels: above MAX_PHOTO_PIXELS and Pillow's warning size, below its error
    size. The refusal is the one line; Pillow's DecompressionBombWarning is not printed."""
    path = tmp_path / "big.bmp"
    path.write_bytes(bomb_bmp(10_000, 10_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="^big.bmp: image is 10000x10000 pixels, too large"):
            read_image(path, 28, 1)


def test_cli_image_files_refused_with_one_line(tiny_bundle, tmp_path):
    cases = make_files(tmp_path)
    good = tmp_path / "good.png"
    Image.new("L", (28, 28)).save(good)
    cases["missing.png"] = (tmp_path / "missing.png", "image not found: ")
    for name, (path, message) in cases.items():
        # A bad file among good ones still fails the whole command, naming the bad one.
        result = CliRunner().invoke(run_main, ["encode", "--bundle", str(tiny_bundle),
                                               str(good), str(path)])
        assert result.exit_code == 2, (name, result.output)
        assert result.output.startswith(f"Error: {message}"), (name, result.output)
        assert result.output.count("\n") == 1, (name, result.output)


def test_accepted_image_modes_become_the_same_gray(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (28, 28), np.uint8)
    gray = Image.fromarray(pixels)
    for mode, suffix in (("L", "png"), ("RGB", "png"), ("P", "png"), ("L", "bmp"),
                         ("L", "pgm"), ("L", "gif"), ("L", "webp")):
        path = tmp_path / f"x_{mode}.{suffix}"
        gray.convert(mode).save(path, **({"lossless": True} if suffix == "webp" else {}))
        np.testing.assert_array_equal(read_image(path, 28, 1)[0], pixels, err_msg=str(path))


def test_photos_of_any_size_are_fitted_with_their_border_colour(tmp_path):
    # A red garment on white, 60x30: scaled to 28x14, centred, padded with white above and below.
    photo = Image.new("RGB", (60, 30), (255, 255, 255))
    photo.paste((200, 0, 0), (10, 5, 50, 25))
    photo.save(tmp_path / "wide.png")
    fitted = read_image(tmp_path / "wide.png", 28, 3)
    assert fitted.shape == (3, 28, 28) and fitted.dtype == np.uint8
    assert (fitted[:, :7] == 255).all() and (fitted[:, 21:] == 255).all()
    assert tuple(fitted[:, 14, 14]) == (200, 0, 0)
    gray = read_image(tmp_path / "wide.png", 28, 1)
    assert gray.shape == (1, 28, 28) and gray[0, 0, 0] == 255
    # Transparent pixels are white; a tall dark photo is padded with its dark border.
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (read_image(tmp_path / "clear.png", 16, 3) == 255).all()
    Image.new("L", (10, 40), 3).save(tmp_path / "tall.jpg")
    assert (np.abs(read_image(tmp_path / "tall.jpg", 16, 1).astype(int) - 3) <= 2).all()


def test_a_catalog_photo_has_a_bound_of_its_own_above_pillows(tmp_path):
    """A shop's own photos are read up to MAX_CATALOG_PHOTO_PIXELS, also above the size
    Pillow itself refuses (2 x Image.MAX_IMAGE_PIXELS, 179 megapixels); a stranger's photo
    stays bound by MAX_PHOTO_PIXELS. Headers only: no pixel is decoded."""
    scan = tmp_path / "scan.bmp"
    scan.write_bytes(bomb_bmp(16_000, 14_464))
    assert 16_000 * 14_464 > 2 * Image.MAX_IMAGE_PIXELS
    assert load_photo(scan, decode=False, max_pixels=MAX_CATALOG_PHOTO_PIXELS) is None
    with pytest.raises(ValueError, match=r"^scan.bmp: image is 16000x14464 pixels, too large "
                                         r"to decode safely \(at most 50,000,000 pixels\)$"):
        read_image(scan, 28, 1)
    huge = tmp_path / "huge.png"
    huge.write_bytes(bomb_png(16_000, 16_000))
    with pytest.raises(ValueError, match=r"^huge.png: image is 16000x16000 pixels, too large to "
                                         r"decode safely \(at most 250,000,000 pixels\)$"):
        load_photo(huge, decode=False, max_pixels=MAX_CATALOG_PHOTO_PIXELS)


@pytest.mark.parametrize("name, mode", [("big.jpg", "L"), ("big.png", "L"), ("rgba.png", "RGBA"),
                                        ("palette.png", "P")])
def test_a_large_photo_is_reduced_as_it_is_decoded_and_fits_within_two_levels(tmp_path, name,
                                                                              mode):
    """Above WORKING_PIXELS a photo is decoded at a reduced scale (JPEG) or reduced once
    decoded (other formats; a transparent one premultiplied, a palette one in colour); fitted,
    a product on a plain background is within 2 levels of the same photo fitted at full size,
    its EXIF orientation applied."""
    width, height = 5000, 3400
    assert width * height > WORKING_PIXELS
    y, x = np.ogrid[0:height, 0:width]
    stripes = ((x * 7 + y * 3) % 256).astype(np.uint8)  # not one flat colour
    # ... on a plain background: the padding is the median of the outermost pixels, which a
    # reduced photo averages; where those are of many colours, the median may move further
    stripes[:100], stripes[-100:], stripes[:, :100], stripes[:, -100:] = 240, 240, 240, 240
    photo = Image.fromarray(stripes)
    if mode == "RGBA":  # transparent at the left, opaque at the right, over red stripes
        alpha = Image.fromarray(np.broadcast_to((x * 255 // width).astype(np.uint8),
                                                (height, width)))
        photo = Image.merge("RGBA", (photo, Image.new("L", photo.size, 30),
                                     Image.new("L", photo.size, 60), alpha))
    elif mode == "P":
        photo = photo.convert("RGB").quantize(16)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show it upright
    photo.save(tmp_path / name, exif=exif, **({"quality": 95} if name.endswith(".jpg") else
                                              {"compress_level": 1}))
    reduced = load_photo(tmp_path / name)
    assert reduced.width * reduced.height <= WORKING_PIXELS
    assert reduced.height > reduced.width  # upright
    full = photo.rotate(-90, expand=True) if mode != "L" else Image.open(tmp_path / name)
    if mode == "RGBA":
        white = Image.new("RGBA", full.size, (255, 255, 255, 255))
        white.alpha_composite(full)
        full = white
    elif mode == "L":
        full = full.rotate(-90, expand=True)
    for channels in (1, 3):
        expected = fit_photo(full, 28, channels).astype(int)
        assert np.abs(read_image(tmp_path / name, 28, channels) - expected).max() <= 2


def test_a_corrupt_exif_block_prints_no_warning(tmp_path):
    """A tag whose data runs past the EXIF block: Pillow warns twice on stderr. The
    orientation beside it still applies."""
    tiff = (b"II*\x00\x08\x00\x00\x00" + struct.pack("<H", 2)
            + struct.pack("<HHII", 0x0112, 3, 1, 6) + struct.pack("<HHII", 0x010E, 2, 1000, 100))
    Image.new("L", (40, 20), 200).save(tmp_path / "exif.jpg", exif=b"Exif\x00\x00" + tiff)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        photo = load_photo(tmp_path / "exif.jpg")
    assert photo.size == (20, 40)


# --- fuzz: every input works or raises ValueError ------------------------------------------

NUMBERISH = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**400), 10**400).map(str),
    st.sampled_from(["nan", "-inf", "Infinity", "1e", "e5", ".", "-", "+.5", "1.", "1_0",
                     "0x10", "\u0661", "\u00a0", "1e-400", "--1", "1,,", "\x00"]),
    st.text(max_size=6),
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.lists(NUMBERISH, max_size=12),
                 st.lists(NUMBERISH, min_size=D, max_size=D),
                 st.lists(st.floats(-1.2e6, 1.2e6).map(repr), min_size=D, max_size=D)),
       st.sampled_from([",", " ", ", ", "\t", ",\n", ";"]))
def test_fuzz_parse_z_number_lists(parts, separator):
    text = separator.join(parts)
    try:
        z = parse_z(text, D)
    except ValueError:
        event("refused")
        return
    event("accepted")
    assert z.dtype == np.float64 and z.shape == (D,)
    assert np.isfinite(z).all() and np.abs(z).max() <= MAX_ABS_Z


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.binary(), st.none(), st.integers(), st.lists(st.floats())))
def test_fuzz_parse_z_anything(value):
    try:
        z = parse_z(value, D)
    except ValueError:
        return
    assert z.shape == (D,) and np.isfinite(z).all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-MAX_ABS_Z, MAX_ABS_Z), min_size=D, max_size=D))
def test_fuzz_parse_z_round_trips_every_float(values):
    np.testing.assert_array_equal(parse_z(", ".join(map(repr, values)), D), values)


DTYPES = st.sampled_from([np.float64, np.float32, np.float16, np.int64, np.int8, np.uint8,
                          np.uint64, np.bool_, np.complex64, "U3", object])
LATENT_SHAPES = st.one_of(st.just((D,)), st.tuples(st.integers(0, 9), st.just(D)),
                          hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9))
IMAGE_SHAPES = st.one_of(st.just((28, 28)), st.tuples(st.integers(0, 3), st.just(28), st.just(28)),
                         st.tuples(st.integers(1, 3), st.integers(1, 2), st.just(28),
                                   st.just(28)),
                         hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))


def arrays(shapes):
    return DTYPES.flatmap(lambda dtype: hnp.arrays(
        dtype, shapes, elements=None if dtype is not object else st.floats()))


def latent_is_valid(z) -> bool:
    """The documented contract: int or float, (D,) or (1..65536, D), finite, |z| <= 1e6."""
    array = np.asarray(z)
    if array.dtype.kind not in "iuf" or array.ndim not in (1, 2) or array.shape[-1] != D:
        return False
    values = array.astype(np.float64)
    return (array.ndim == 1 or 1 <= array.shape[0] <= 65536) and bool(
        np.isfinite(values).all() and np.abs(values).max() <= MAX_ABS_Z)


def k_is_valid(k) -> bool:
    return isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1


def images_are_valid(images) -> bool:
    """The documented contract: uint8 or float in [0, 1], (28, 28), (B, 28, 28) or
    (B, 1, 28, 28) with 1 <= B <= 65536."""
    array = np.asarray(images)
    if array.dtype != np.uint8 and array.dtype.kind != "f":
        return False
    shape = (1, *array.shape) if array.ndim == 2 else array.shape
    if len(shape) == 3:
        shape = (shape[0], 1, *shape[1:])
    if len(shape) != 4 or shape[1:] != (1, 28, 28) or not 1 <= shape[0] <= 65536:
        return False
    return array.dtype == np.uint8 or bool(
        np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays(LATENT_SHAPES), st.one_of(st.integers(-2, 6000), st.floats(), st.booleans()))
def test_fuzz_runtime_decode_and_nearest(runtime, z, k):
    if not latent_is_valid(z):
        event("z refused")
        with pytest.raises(ValueError, match="^z ") as refused:
            runtime.decode(z)
        with pytest.raises(ValueError, match="^z ") as also_refused:
            runtime.nearest(z, k=k)
        assert str(also_refused.value) == str(refused.value)
        return
    images = runtime.decode(z)
    assert images.shape == z.shape[:-1] + (1, 28, 28)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    if not k_is_valid(k):
        event("z accepted, k refused")
        with pytest.raises(ValueError, match="^k must be"):
            runtime.nearest(z, k=k)
        return
    event("z and k accepted")
    matches = runtime.nearest(z, k=k)
    assert matches.ids.shape == z.shape[:-1] + (min(k, len(runtime.index)),)
    assert np.isfinite(matches.log_likelihoods).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays(IMAGE_SHAPES))
def test_fuzz_runtime_encode(runtime, images):
    if not images_are_valid(images):
        event("images refused")
        with pytest.raises(ValueError, match="^(images|image batch|float images) "):
            runtime.encode(images)
        return
    event("images accepted")
    mu, log_sigma = runtime.encode(images)
    one = images.ndim == 2 or (images.ndim == 3 and images.shape[0] == 1)  # (H, W), (1, H, W)
    expected = (D,) if one else (images.shape[0], D)
    assert mu.shape == log_sigma.shape == expected
    assert np.isfinite(mu).all() and np.isfinite(log_sigma).all()


# --- the commands' options and files --------------------------------------------------------

@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nearest"], "Error: give exactly one of --z NUMBERS or --random"),
        (["nearest", "--z", Z8, "--random"], "Error: give exactly one of --z NUMBERS or --random"),
        (["nearest", "--image", "missing.png", "--random"],
         "Error: give either --image PATH or a latent (--z NUMBERS / --random), not both"),
        (["nearest", "--image", "missing.png"], "Error: image not found: missing.png"),
        (["decode", "--z", Z8, "-o", "/nonexistent/dir/x.png"],
         "Error: output directory does not exist: /nonexistent/dir"),
    ],
)
def test_bad_options_exit_2_with_one_line(tiny_bundle, args, message):
    """Options that do not go together, and files that are not there (bad bundles:
    test_corrupt_bundles.py)."""
    result = CliRunner().invoke(run_main, [*args, "--bundle", str(tiny_bundle)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == message
    assert "Traceback" not in result.output


def test_train_and_export_cli_errors(tmp_path):
    from vae_edge.export.cli import main as export_main
    from vae_edge.training.cli import main as train_main

    result = CliRunner().invoke(train_main, ["--out", str(tmp_path / "r"), "--widths", "8,x"])
    assert result.exit_code == 2
    assert result.output.strip() == "Error: --widths must be comma-separated integers, got '8,x'"
    result = CliRunner().invoke(train_main, ["--out", str(tmp_path / "r"), "--data-dir",
                                             str(tmp_path / "nodata"), "--epochs", "1"])
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: --data-dir {tmp_path / 'nodata'} does not exist"
    result = CliRunner().invoke(export_main, [str(tmp_path / "none.pt"), "-o", str(tmp_path / "b")])
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: checkpoint not found: {tmp_path / 'none.pt'}"


def test_threads_validation(tiny_bundle):
    for threads in (0, 257, 3000, 2**31, 10**20, 2.0, True):
        with pytest.raises(ValueError) as info:
            Runtime.load(tiny_bundle, threads=threads)
        assert str(info.value) == f"threads must be an integer in [1, 256], got {threads!r}"


def test_pictures_are_written_as_png_files_only(tmp_path):
    result = CliRunner().invoke(run_main, ["decode", "--random", "-o",
                                           str(tmp_path / "garment.jpg")])
    assert result.exit_code == 2
    assert result.output == (f"Error: {tmp_path / 'garment.jpg'}: the picture is written as PNG; "
                             "expected a file name ending in .png, got .jpg\n")
    assert list(tmp_path.iterdir()) == []
