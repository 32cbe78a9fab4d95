"""A shop's catalog as training data: its photos decoded once into a memory-mapped uint8 cache,
and a seeded held-out fraction for the test figures.

The cache of a catalog at one image size and channel count is PHOTOS/KEY.npy, uint8
(N, channels, size, size), with KEY.json beside it naming the items it holds and the photos
that could not be read. KEY is derived from the catalog's fingerprint (the CSV's bytes, each
photo's path, size and modification time), the size and the channels, so an edited CSV or a
replaced photo gets a new cache and an unchanged catalog is never decoded twice. PHOTOS is
$XDG_CACHE_HOME/vae-edge/photos unless a directory is given: the user cache rather than the
run directory, so that every training run on the same catalog (another --out, other options, a
resumed run) reuses it. vae-export decodes the photos itself, since it makes each item's
thumbnail from the photo. The .npy is filled under a temporary name and renamed into place
last, after its .json, so a killed run leaves no cache that looks complete.
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
                  cache_dir: str | Path | None = None, progress: bool = False,
                  log=print) -> PhotoCache:
    """The catalog's photos fitted to (channels, size, size), from the cache or decoded into it.

    A photo that cannot be read is a bad row: ValueError naming its CSV line (also when an
    earlier run with skip_bad had left it out), unless skip_bad.
    """
    from numpy.lib.format import open_memmap
    from tqdm import tqdm

    fingerprint = catalog_fingerprint(catalog)
    key = hashlib.sha256(f"{CACHE_FORMAT}\0{fingerprint}\0{size}\0{channels}".encode()
                         ).hexdigest()[:32]
    directory = Path(cache_dir) if cache_dir is not None else photo_cache_dir()
    path, record_path = directory / f"{key}.npy", directory / f"{key}.json"
    shape = (len(catalog), channels, size, size)
    if path.is_file() and record_path.is_file():
        try:
            kept, skipped = _verified(path, record_path, fingerprint, shape)
        except _Unverified as exc:
            log(f"photos: the cache {path} does not verify ({exc}); decoding it again")
        else:
            if skipped and not skip_bad:
                raise bad_rows_error(catalog.source, skipped, "photo")
            log(f"photos: reusing the cache {path} ({len(kept)} items)")
            pixels = np.load(path, mmap_mode="r")
            return PhotoCache(path, fingerprint, catalog.select(kept, skipped),
                              pixels[: len(kept)], reused=True)

    directory.mkdir(parents=True, exist_ok=True)
    for target in (path, record_path):  # what a killed run left half-written
        remove_stale_temporaries(target, ".tmp", log)
    log(f"photos: decoding {len(catalog)} photos into {path}")
    with atomic_file(path) as handle:
        out = open_memmap(handle.name, mode="w+", dtype=np.uint8, shape=shape)
        with tqdm(total=len(catalog), desc="photos", unit="photo", disable=not progress,
                  leave=False) as bar:
            good, _, _ = fit_catalog(catalog, size, channels, skip_bad=skip_bad, out=out,
                                     progress=bar.update)
        out.flush()
        del out
        digest = _file_sha256(Path(handle.name))
        position = {item_id: i for i, item_id in enumerate(catalog.ids)}  # ids are unique
        kept = [position[item_id] for item_id in good.ids]
        skipped = list(good.skipped[len(catalog.skipped):])
        with atomic_file(record_path) as record_file:
            record_file.write(json.dumps({
                "fingerprint": fingerprint, "size": size, "channels": channels,
                "source": str(catalog.source), "kept": kept, "skipped": skipped,
                "sha256": digest,
            }).encode("utf-8"))
    pixels = np.load(path, mmap_mode="r")
    return PhotoCache(path, fingerprint, good, pixels[: len(good)], reused=False)


class _Unverified(Exception):
    """A cache file that is not what its record says: why, in a few words."""


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(path: Path, record_path: Path, fingerprint: str,
              shape: tuple[int, ...]) -> tuple[list[int], list[str]]:
    """The kept rows and skipped photos a cache's record names, once the record and the .npy
    agree with it and with the catalog; _Unverified says why not. The .npy's sha256, written
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
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            raise _Unverified(f"{record_path.name} has no {kind.__name__} {key!r}")
    if record["fingerprint"] != fingerprint:
        raise _Unverified("its fingerprint is not the catalog's")
    if (record["channels"], record["size"]) != shape[1:3]:
        raise _Unverified(f"made for {record['channels']} channels at {record['size']} pixels")
    kept, skipped = record["kept"], record["skipped"]
    if not all(isinstance(row, int) and not isinstance(row, bool) for row in kept):
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
    return kept, skipped


def catalog_data(csv_path: str | Path, image_size: int, channels: int = 3, *,
                 holdout: float = DEFAULT_HOLDOUT, seed: int = 0, skip_bad: bool = False,
                 require_labels: bool = False, cache_dir: str | Path | None = None,
                 progress: bool = False, log=print) -> TrainingData:
    """A catalog CSV as TrainingData: a seeded random `holdout` fraction of its items is the
    test set, the rest trains. Class names are the sorted distinct texts of the label column.

    Bad rows (runtime.catalog) are refused with one ValueError naming their CSV lines before
    any photo is decoded, and bad photos before any training; skip_bad leaves them out and
    logs how many. require_labels: every item needs a label (for the label-aware objective).
    """
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be a fraction between 0 and 1 (exclusive), got {holdout}")
    catalog = read_catalog(csv_path, skip_bad=skip_bad)
    if require_labels:
        _check_labels(catalog)
    cache = cached_photos(catalog, image_size, channels, skip_bad=skip_bad,
                          cache_dir=cache_dir, progress=progress, log=log)
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
