"""The checks the library's public calls run on what a caller or a client gives: latent
vectors, images, k, match modes, labels, and numbers that come from JSON (Python counts True as
the integer 1, so a flag must never pass for a number). Each raises ValueError naming what was
expected and what came."""

from __future__ import annotations

import re

import numpy as np

# Latent values beyond this are not slider positions but mistakes; they would also
# overflow float32 arithmetic in the decoder.
MAX_ABS_Z = 1e6
MAX_BATCH = 65536
# How nearest() ranks the catalog for a latent query (see Runtime.nearest).
MATCH_MODES = ("latent", "decoded")
# onnxruntime threads per session: each is an OS thread, so more is a typo, not a machine
# (and 2^31 does not fit onnxruntime's option). A fixed bound, not the CPU count, keeps a
# service file valid when it moves to a smaller board.
MAX_THREADS = 256
# parse_z refuses longer text before splitting it: a million values still get a precise
# count, a gigabyte does not get copied around.
MAX_Z_TEXT = 16 << 20
# Plain decimal numbers only: Python's float() would also take "1_0", "0x..."-like
# surprises or non-ASCII digits, none of which a kiosk slider ever sends.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.ASCII | re.IGNORECASE)


def parse_z(text: str, latent_dim: int) -> np.ndarray:
    """Parse "0.5,-1.2,..." (commas and/or spaces) into a float64 vector of length latent_dim.

    Raises ValueError (and only ValueError) for anything else, naming what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"z must be text like '0.5,-1.2,...', got {type(text).__name__}")
    if len(text) > MAX_Z_TEXT:
        raise ValueError(f"z text is {len(text)} characters long; at most {MAX_Z_TEXT} accepted")
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if not parts:
        raise ValueError(f"z is empty: expected {latent_dim} comma-separated numbers")
    if len(parts) != latent_dim:
        raise ValueError(f"z has {len(parts)} values, expected {latent_dim} (the latent dimension)")
    values = []
    for position, part in enumerate(parts, start=1):
        if _NON_FINITE.fullmatch(part):
            values.append(float(part))  # refused below with the NaN/inf message
            continue
        if not _NUMBER.fullmatch(part):
            raise ValueError(f"z value {position} is not a number: {part[:40]!r}")
        value = float(part)
        if not abs(value) <= MAX_ABS_Z:  # also a finite-looking literal that overflows
            raise ValueError(
                f"z value {position} is out of range [-{MAX_ABS_Z:g}, {MAX_ABS_Z:g}]: "
                f"{part[:40]!r}"
            )
        values.append(value)
    return check_latent(np.array(values, dtype=np.float64), latent_dim)


def check_latent(z, latent_dim: int, one: bool = False) -> np.ndarray:
    """Validate latent vectors: (d,) or (B, d) (one=True: (d,) only), finite,
    |z| <= MAX_ABS_Z. Returns float64.

    Accepts int or float arrays and (nested) lists of numbers; anything else (text, bool,
    complex, objects, ragged lists) raises ValueError.
    """
    if isinstance(z, (str, bytes)):
        raise ValueError("z must be numeric: a vector of floats or a (batch, dim) array "
                         "(for text like '0.5,-1.2,...' use parse_z)")
    try:
        array = np.asarray(z)
    except (TypeError, ValueError, OverflowError):  # ragged lists and the like
        raise ValueError("z must be numeric: a vector of floats or a (batch, dim) array") from None
    if array.dtype.kind not in "iuf":
        raise ValueError(
            "z must be numeric: a vector of floats or a (batch, dim) array, "
            f"got dtype {array.dtype}"
        )
    if one and array.shape != (latent_dim,):
        raise ValueError(f"z must have shape ({latent_dim},) (one z), got {array.shape}")
    if array.ndim not in (1, 2) or array.shape[-1] != latent_dim:
        raise ValueError(
            f"z must have shape ({latent_dim},) or (batch, {latent_dim}), got {array.shape}"
        )
    if array.ndim == 2 and not 1 <= array.shape[0] <= MAX_BATCH:
        raise ValueError(f"z batch size must be in [1, {MAX_BATCH}], got {array.shape[0]}")
    if array.dtype.itemsize > 8:  # float128 beyond float64 becomes inf, refused below
        with np.errstate(over="ignore"):
            array = array.astype(np.float64)
    else:  # float64 stays the caller's array: nothing downstream writes to it
        array = array.astype(np.float64, copy=False)
    # The sum of squares bounds every |z| (NaN and inf fail it): one call on the good path.
    if np.vdot(array, array) <= MAX_ABS_Z * MAX_ABS_Z:
        return array
    largest = float(np.abs(array).max())
    if not largest <= MAX_ABS_Z:  # NaN fails it too
        if not np.isfinite(array).all():
            raise ValueError("z holds NaN or infinite values")
        raise ValueError(
            f"z values must lie in [-{MAX_ABS_Z:g}, {MAX_ABS_Z:g}], got |z| up to {largest:.3g}"
        )
    return array


def check_k(k) -> int:
    """k as a positive int; a k above the catalog size is clamped to it by the search."""
    if not is_integer(k):
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def check_mode(by: str, with_distance: bool) -> None:
    """nearest's match mode and distance flag, or ValueError."""
    if by not in MATCH_MODES:
        raise ValueError(f"by must be one of {', '.join(MATCH_MODES)}, got {by!r}")
    if not isinstance(with_distance, bool):
        raise ValueError(f"with_distance must be True or False, got {with_distance!r}")


def check_images(images, image_shape: tuple[int, int, int],
                 value_range=(0.0, 1.0)) -> tuple[np.ndarray, bool]:
    """One image as (C, H, W) (or (H, W) for grayscale), a batch as (B, C, H, W) (or
    (B, H, W) for grayscale); uint8 0..255 or float in value_range (the bundle's: [0, 1]).
    A 3-D array whose first axis is C is one image: (1, H, W) is one grayscale image, as
    Runtime.read_photo returns it.

    Returns float32 (B, C, H, W) and whether a single image was given.
    """
    lowest, highest = (float(v) for v in value_range)
    channels, height, width = image_shape
    try:
        array = np.asarray(images)
    except (TypeError, ValueError, OverflowError):  # ragged lists and the like
        raise ValueError("images must be a numeric array, uint8 or float") from None
    if array.dtype != np.uint8 and array.dtype.kind != "f":
        raise ValueError(f"images must be uint8 or float, got dtype {array.dtype}")
    original_shape = array.shape
    if array.ndim == 2 and channels == 1:
        array = array[None]  # (H, W): one grayscale image
    single = array.ndim == 3 and array.shape[0] == channels
    if single:
        array = array[None]
    elif array.ndim == 3 and channels == 1:
        array = array[:, None]  # (B, H, W): a grayscale batch
    expected = (channels, height, width)
    if array.ndim != 4 or tuple(array.shape[1:]) != expected:
        one = f"({height}, {width}) or " if channels == 1 else ""
        raise ValueError(
            f"images must be {one}({channels}, {height}, {width}) or "
            f"(batch, {channels}, {height}, {width}), got {original_shape}"
        )
    if not 1 <= array.shape[0] <= MAX_BATCH:
        raise ValueError(f"image batch size must be in [1, {MAX_BATCH}], got {array.shape[0]}")
    if array.dtype == np.uint8:  # the schema's range is [0, 1] (bundle.IMAGE_RANGE)
        array = array.astype(np.float32) / 255.0
    else:
        # Checked before the cast: float64 1e308 is out of range, not "infinite".
        if not np.isfinite(array).all():
            raise ValueError("images hold NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < lowest or high > highest:
            raise ValueError(f"float images must lie in [{lowest:g}, {highest:g}], got "
                             f"[{low:.3g}, {high:.3g}]")
        array = array.astype(np.float32)
    return np.ascontiguousarray(array), single


def find_label(names: tuple[str, ...], label: int | str | None) -> int | None:
    """A class name or id -> its id among names (None stays None); ValueError names the
    valid ones."""
    if label is None:
        return None
    if is_integer(label):
        if 0 <= label < len(names):
            return int(label)
    elif isinstance(label, str):
        text = label.strip()
        if text in names:
            return names.index(text)
        # Otherwise a name that differs in case only, where exactly one does.
        folded = [i for i, name in enumerate(names) if name.casefold() == text.casefold()]
        if len(folded) == 1:
            return folded[0]
        if text.isascii() and text.isdigit() and int(text) < len(names):
            return int(text)
    raise ValueError(f"unknown label {label!r}: expected one of {', '.join(names)} "
                     f"(or a class id 0-{len(names) - 1})")


def is_number(value) -> bool:
    """An int or float, never a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value) -> bool:
    """An int (numpy's too), never a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
