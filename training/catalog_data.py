"""A shop's catalog as training data: its photos decoded once into a memory-mapped uint8 cache,
and a seeded held-out fraction for the test figures.

The cache of a catalog at one image size and channel count is PHOTOS/KEY.npy, uint8
(N, channels, size, size), with KEY.json beside it naming the items it holds and the photos
that could not be read. KEY is derived from the catalog's fingerprint (the CSV's bytes, each
photo's path, size and modification time), the size and the channels, so an edited CSV or a
replaced photo gets a new cache and an unchanged catalog is never decoded twice. PHOTOS is
$XDG_CACHE_HOME/vae-edge/photos unless a directory is given: the user cache rather than the
run directory, so that every run on the same catalog (another --out, other options, a resumed
run) reuses it. vae-train also keeps each photo's WebP thumbnail (KEY.webp), made while the
photo is decoded, so that vae-export of the same catalog takes pixels and thumbnails from the
cache and decodes no photo again (exported_photos). The .npy is filled under a temporary name
and renamed into place last, after its .json and .webp, so a killed run leaves no cache that
looks complete.
A cache is not trusted blindly: its .json records the .npy's sha256, and on use the record's
keys and types, its fingerprint, its rows (in range, each once) and the .npy's dtype, shape and
sha256 are checked; a cache that does not verify is decoded again, with one line saying why.

Training reads the cache through a read-only memory map a batch at a time, so a catalog larger
than the machine's memory still trains.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.atomic import atomic_file, remove_stale_temporaries
from ..runtime.catalog import (
    Catalog,
    bad_rows_error,
    catalog_fingerprint,
    fit_catalog,
    read_catalog,
)
from ..runtime.checks import is_integer
from ..runtime.words import first_few, plural
from .data import ImageRows, TrainingData, user_cache_dir

DEFAULT_HOLDOUT = 0.1
# Part of every cache's key: raise it when fitting a photo (runtime.images.fit_photo) or the
# cache's layout changes, so that no cache of the old pixels is reused.
CACHE_FORMAT = 2


def photo_cache_dir() -> Path:
    return user_cache_dir() / "photos"


@dataclass(frozen=True)
class PhotoCache:
    path: Path  # the .npy file
    fingerprint: str  # catalog_fingerprint of the catalog it was made from
    catalog: Catalog  # the items whose photos it holds, in its row order
    pixels: np.ndarray  # read-only memory map, uint8 (len(catalog), channels, size, size)
    reused: bool  # True when an earlier run had made it


def cached_photos(catalog: Catalog, size: int, channels: int, *, skip_bad: bool = False,
                  thumbnail_size: int | None = None, cache_dir: str | Path | None = None,
                  progress: bool = False, log=print) -> PhotoCache:
    """The catalog's photos fitted to (channels, size, size), from the cache or decoded into it.

    thumbnail_size: while each photo is decoded, also keep its WebP thumbnail of that side
    (KEY.webp), so that vae-export (exported_photos) need not decode the photos again.
    A photo that cannot be read is a bad row: ValueError naming its CSV line (also when an
    earlier run with skip_bad had left it out), unless skip_bad.
    """
    path, record_path = _cache_paths(catalog, size, channels, cache_dir)
    fingerprint = catalog_fingerprint(catalog)
    shape = (len(catalog), channels, size, size)
    if path.is_file() and record_path.is_file():
        try:
            record = _verified(path, record_path, fingerprint, shape)
        except _Unverified as exc:
            log(f"photos: the cache {path} does not verify ({exc}); decoding it again")
        else:
            kept, skipped = record["kept"], record["skipped"]
            if skipped and not skip_bad:
                raise bad_rows_error(catalog.source, skipped, "photo")
            log(f"photos: reusing the cache {path} ({len(kept)} items)")
            pixels = np.load(path, mmap_mode="r")
            return PhotoCache(path, fingerprint, catalog.select(kept, skipped),
                              pixels[: len(kept)], reused=True)
    good = _decode_into_cache(catalog, shape, path, record_path, fingerprint, skip_bad,
                              thumbnail_size, progress, log)
    pixels = np.load(path, mmap_mode="r")
    return PhotoCache(path, fingerprint, good, pixels[: len(good)], reused=False)


def _cache_paths(catalog: Catalog, size: int, channels: int,
                 cache_dir: str | Path | None) -> tuple[Path, Path]:
    """The .npy and .json of the catalog's cache at this size and channel count."""
    key = hashlib.sha256(
        f"{CACHE_FORMAT}\0{catalog_fingerprint(catalog)}\0{size}\0{channels}".encode()
    ).hexdigest()[:32]
    directory = Path(cache_dir) if cache_dir is not None else photo_cache_dir()
    return directory / f"{key}.npy", directory / f"{key}.json"


def _decode_into_cache(catalog: Catalog, shape, path: Path, record_path: Path,
                       fingerprint: str, skip_bad: bool, thumbnail_size: int | None,
                       progress: bool, log) -> Catalog:
    """fit_catalog into a new cache; the catalog of the items it holds."""
    from numpy.lib.format import open_memmap
    from tqdm import tqdm

    thumbnail_path = path.with_suffix(".webp")
    path.parent.mkdir(parents=True, exist_ok=True)
    for target in (path, record_path, thumbnail_path):  # what a killed run left half-written
        remove_stale_temporaries(target, ".tmp", log)
    log(f"photos: decoding {len(catalog)} photos into {path}")
    with atomic_file(path) as handle:
        out = open_memmap(handle.name, mode="w+", dtype=np.uint8, shape=shape)
        with tqdm(total=len(catalog), desc="photos", unit="photo", disable=not progress,
                  leave=False) as bar:
            good, _, thumbnails = fit_catalog(catalog, shape[2], shape[1], skip_bad=skip_bad,
                                              out=out, thumbnail_size=thumbnail_size,
                                              progress=bar.update)
        out.flush()
        del out
        position = {item_id: i for i, item_id in enumerate(catalog.ids)}  # ids are unique
        record = {
            "fingerprint": fingerprint, "size": shape[2], "channels": shape[1],
            "source": str(catalog.source), "kept": [position[item_id] for item_id in good.ids],
            "skipped": list(good.skipped[len(catalog.skipped):]),
            "sha256": _file_sha256(Path(handle.name)),
        }
        if thumbnails is not None:
            with atomic_file(thumbnail_path) as thumbnail_file:
                thumbnail_file.write(b"".join(thumbnails))
            record |= {"thumbnail_size": thumbnail_size,
                       "thumbnail_lengths": [len(thumbnail) for thumbnail in thumbnails],
                       "thumbnails_sha256": _file_sha256(thumbnail_path)}
        with atomic_file(record_path) as record_file:
            record_file.write(json.dumps(record).encode("utf-8"))
    return good


def exported_photos(catalog: Catalog, size: int, channels: int, *, skip_bad: bool = False,
                    thumbnail_size: int | None = None, progress=None,
                    cache_dir: str | Path | None = None, log=print
                    ) -> tuple[Catalog, np.ndarray, list[bytes] | None]:
    """What fit_catalog returns (the usable items, their fitted pixels, their thumbnails), for
    an export: from the photo cache that training made of this catalog, when the catalog is
    unchanged, its cache verifies and holds thumbnails of thumbnail_size (or none are
    wanted): then no photo is decoded again. Otherwise fit_catalog decodes the photos.
    """
    path, record_path = _cache_paths(catalog, size, channels, cache_dir)
    shape = (len(catalog), channels, size, size)
    if path.is_file() and record_path.is_file():
        try:
            record = _verified(path, record_path, catalog_fingerprint(catalog), shape)
            thumbnails = _cached_thumbnails(path.with_suffix(".webp"), record, thumbnail_size)
        except _Unverified as exc:
            log(f"photos: the cache {path} cannot be used ({exc}); decoding the photos")
        else:
            kept, skipped = record["kept"], record["skipped"]
            if skipped and not skip_bad:
                raise bad_rows_error(catalog.source, skipped, "photo")
            log(f"photos: reusing the cache {path} ({len(kept)} items)")
            if progress is not None:
                progress(len(catalog))
            pixels = np.load(path, mmap_mode="r")[: len(kept)]
            return catalog.select(kept, skipped), pixels, thumbnails
    return fit_catalog(catalog, size, channels, skip_bad=skip_bad,
                       thumbnail_size=thumbnail_size, progress=progress)


def _cached_thumbnails(path: Path, record: dict, size: int | None) -> list[bytes] | None:
    """The cache's thumbnails when `size` is wanted (None: none are); _Unverified when the
    cache holds none of that size or its file is not the one written."""
    if size is None:
        return None
    if record.get("thumbnail_size") != size:
        raise _Unverified(f"it holds no {size}x{size} thumbnails")
    lengths = record.get("thumbnail_lengths")
    if not isinstance(lengths, list) or len(lengths) != len(record["kept"]) or \
            not all(is_integer(n) and n > 0 for n in lengths):
        raise _Unverified("its thumbnail lengths are not one whole number per item")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _Unverified(f"{path.name} cannot be read: {exc}") from None
    if len(data) != sum(lengths) or \
            hashlib.sha256(data).hexdigest() != record.get("thumbnails_sha256"):
        raise _Unverified(f"{path.name} is not the file written (its sha256 differs)")
    ends = np.cumsum([0, *lengths])
    return [data[start:end] for start, end in zip(ends[:-1], ends[1:])]


class _Unverified(Exception):
    """A cache file that is not what its record says: why, in a few words."""


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(path: Path, record_path: Path, fingerprint: str, shape: tuple[int, ...]) -> dict:
    """A cache's record (its kept rows, skipped photos and the rest), once the record and the
    .npy agree with it and with the catalog; _Unverified says why not. The .npy's sha256, written
    with it, finds pixels replaced in place (0.4 s for 20,000 photos of 64x64x3:
    docs/catalog.md)."""
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _Unverified(f"{record_path.name} is not JSON: {exc}") from None
    types = {"fingerprint": str, "size": int, "channels": int, "kept": list, "skipped": list,
             "sha256": str}
    if not isinstance(record, dict):
        raise _Unverified(f"{record_path.name} holds a {type(record).__name__}, not an object")
    for key, kind in types.items():
        value = record.get(key)
        if not (is_integer(value) if kind is int else isinstance(value, kind)):
            raise _Unverified(f"{record_path.name} has no {kind.__name__} {key!r}")
    if record["fingerprint"] != fingerprint:
        raise _Unverified("its fingerprint is not the catalog's")
    if (record["channels"], record["size"]) != shape[1:3]:
        raise _Unverified(f"made for {record['channels']} channels at {record['size']} pixels")
    kept, skipped = record["kept"], record["skipped"]
    if not all(is_integer(row) for row in kept):
        raise _Unverified("its rows are not all whole numbers")
    if any(not 0 <= row < shape[0] for row in kept):
        raise _Unverified(f"a row outside 0-{shape[0] - 1}")
    if any(a >= b for a, b in zip(kept, kept[1:])):
        raise _Unverified("its rows repeat or are out of order")
    if not all(isinstance(why, str) for why in skipped) or len(kept) + len(skipped) != shape[0]:
        raise _Unverified(f"{len(kept)} rows kept and {len(skipped)} skipped, for {shape[0]} "
                          "items")
    from numpy.lib.format import open_memmap

    try:
        pixels = open_memmap(path, mode="r")  # a .npy only: np.load also opens zip files
    except (OSError, ValueError, EOFError) as exc:
        raise _Unverified(f"{path.name} is not a .npy array: {exc}") from None
    if pixels.dtype != np.uint8 or pixels.shape != shape:
        raise _Unverified(f"{path.name} is {pixels.dtype} {pixels.shape}, expected uint8 {shape}")
    del pixels
    if _file_sha256(path) != record["sha256"]:
        raise _Unverified(f"{path.name} is not the file written (its sha256 differs)")
    return record


def catalog_data(csv_path: str | Path, image_size: int, channels: int = 3, *,
                 holdout: float = DEFAULT_HOLDOUT, seed: int = 0, skip_bad: bool = False,
                 require_labels: bool = False, thumbnail_size: int | None = None,
                 cache_dir: str | Path | None = None, progress: bool = False,
                 log=print) -> TrainingData:
    """A catalog CSV as TrainingData: a seeded random `holdout` fraction of its items is the
    test set, the rest trains. Class names are the sorted distinct texts of the label column.

    Bad rows (runtime.catalog) are refused with one ValueError naming their CSV lines before
    any photo is decoded, and bad photos before any training; skip_bad leaves them out and
    logs how many. require_labels: every item needs a label (for the label-aware objective).
    thumbnail_size: the cache also keeps each photo's thumbnail (cached_photos), for vae-export.
    """
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be a fraction between 0 and 1 (exclusive), got {holdout}")
    catalog = read_catalog(csv_path, skip_bad=skip_bad)
    if require_labels:
        _check_labels(catalog)
    cache = cached_photos(catalog, image_size, channels, skip_bad=skip_bad,
                          thumbnail_size=thumbnail_size, cache_dir=cache_dir,
                          progress=progress, log=log)
    catalog = cache.catalog
    if catalog.skipped:
        log(f"--skip-bad: left out {plural(len(catalog.skipped), 'bad row')} "
            f"({first_few(catalog.skipped)})")
    n = len(catalog)
    n_test = max(1, round(n * holdout))
    if n_test >= n:
        raise ValueError(f"{catalog.source}: --holdout {holdout:g} of "
                         f"{plural(n, 'usable item')} holds out {n_test}, leaving none to train "
                         "on; expected a smaller --holdout or more items")
    order = np.random.default_rng(seed).permutation(n)
    test_rows, train_rows = np.sort(order[:n_test]), np.sort(order[n_test:])

    class_names: tuple[str, ...] = ()
    labels = None
    if catalog.labels is not None:
        class_names = tuple(sorted({label for label in catalog.labels if label}))
        index = {name: i for i, name in enumerate(class_names)}
        labels = np.array([index.get(label, -1) for label in catalog.labels], dtype=np.int64)
    record = {
        "kind": "catalog",
        "csv": str(catalog.source.resolve()),
        "fingerprint": cache.fingerprint,
        "image_size": image_size,
        "image_channels": channels,
        "items": n,
        "skipped": len(catalog.skipped),
        "holdout": holdout,
        "holdout_seed": seed,
        "holdout_ids": [catalog.ids[i] for i in test_rows],
        "class_names": list(class_names),
    }
    return TrainingData(ImageRows(cache.pixels, train_rows, labels),
                        ImageRows(cache.pixels, test_rows, labels),
                        (channels, image_size, image_size), class_names, record)


def _check_labels(catalog: Catalog) -> None:
    if catalog.labels is None:
        raise ValueError(f"{catalog.source}: the label-aware objective needs class labels, and "
                         f"the CSV has no label column (columns: id, image"
                         f"{''.join(', ' + name for name in catalog.columns)})")
    empty = [line for line, label in zip(catalog.lines, catalog.labels) if not label]
    if empty:
        raise ValueError(f"{catalog.source}: the label-aware objective needs a label for every "
                         f"item; empty on {'line' if len(empty) == 1 else 'lines'} "
                         f"{first_few(empty, ', ')}")
