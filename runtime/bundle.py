"""The bundle schema, written by vae-export and `vae-run add/remove`, and read by the runtime
(numpy only, no pickle).

One module says what a bundle is: new_manifest, write_index and write_manifest write it, and
read_manifest, verify_files and load_index check it, so the runtime then follows the manifest
(file names, graph input and output names, image shape and value range) knowing that it says
what this schema says. Layout of a bundle directory (format version 2, docs/bundle-format.md):

    manifest.json          what follows, with a sha256 and byte count for every file
    encoder.onnx           images (B, C, H, W) float32 in [0, 1] -> mu, log_var (B, d)
    decoder.onnx           z (B, d) float32 -> images (B, C, H, W) float32 in [0, 1]
    index_mu.npy           (N, d) float16, posterior means of the catalog items
    index_log_sigma.npy    (N, d) float16, log standard deviations (= log_var / 2)
    index_labels.npy       (N,) int32, label ids; their names are in the manifest
    items.csv              UTF-8 CSV: id (text, unique) and the catalog's metadata columns,
                           one row per item in index order
    thumbnails.bin         optional: the items' photos as WebP files back to back
    thumbnail_offsets.npy  with it: (N + 1,) int64, item i is bytes [offsets[i], offsets[i+1])
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "vae-edge-bundle"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
INDEX_FILES = {
    "mu": "index_mu.npy",
    "log_sigma": "index_log_sigma.npy",
    "labels": "index_labels.npy",
}
INDEX_DTYPES = {"mu": "float16", "log_sigma": "float16", "labels": "int32"}
ITEMS_FILE = "items.csv"
# items.csv cells a spreadsheet would run as a formula (= + - @, or tab or CR before one) are
# written with an apostrophe in front, as are cells that start with one, so that reading
# strips exactly one back off; the manifest's items "escape" says the file was written so
# (bundles written without it are read verbatim).
ITEMS_ESCAPE = "apostrophe"
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
THUMBNAIL_FILES = {"images": "thumbnails.bin", "offsets": "thumbnail_offsets.npy"}
THUMBNAIL_FORMAT = "webp"
MODEL_FILES = {"encoder": "encoder.onnx", "decoder": "decoder.onnx"}
IMAGE_DTYPE = "float32"
IMAGE_RANGE = [0.0, 1.0]
# A real manifest is a few KB; anything this large is not one, and is not read into memory.
MAX_MANIFEST_BYTES = 1 << 20
# A bundle's .npy headers are about 128 bytes; numpy itself refuses more than 10,000 as unsafe,
# but only after reading them, and a 4-byte length field can claim 4 GiB.
MAX_NPY_HEADER_BYTES = 10_000
# sigma >= e^-40 (4e-18): the search works with 1/sigma^2, which must fit float32 (and a
# float16 log_sigma of -65504 would overflow even float64).
MIN_LOG_SIGMA = -40.0
FLOAT16_MAX = float(np.finfo(np.float16).max)
_SHA256_HEX = frozenset("0123456789abcdef")


class BundleError(ValueError):
    """A bundle that is not what its manifest claims (or has no usable manifest)."""


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def default_bundle_path() -> Path:
    """The bundle shipped inside the package (models/default in the repository)."""
    from importlib.resources import files

    return Path(str(files("vae_edge.models") / "default"))


@dataclass(frozen=True)
class CatalogIndex:
    """A bundle's catalog: float16 posteriors (N, d), label ids (N,), and the items' table.

    ids: (N,) object array of str. metadata: one (N,) object array of str per column of
    `columns`. thumbnails: the WebP bytes of every item back to back (the bundle's open
    ThumbnailFile, or bytes) and (N + 1,) offsets, or both None.
    """

    mu: np.ndarray
    log_sigma: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...]
    ids: np.ndarray
    columns: tuple[str, ...] = ()
    metadata: tuple[np.ndarray, ...] = ()
    thumbnails: ThumbnailFile | bytes | None = None
    thumbnail_offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.mu.shape[0])

    def item_metadata(self, row: int) -> dict[str, str]:
        return {name: str(values[row]) for name, values in zip(self.columns, self.metadata)}

    def thumbnail(self, row: int) -> bytes | None:
        """The item's photo (WebP bytes, as stored: Runtime.thumbnail checks them), or None
        in a bundle without thumbnails."""
        if self.thumbnail_offsets is None:
            return None
        start, end = int(self.thumbnail_offsets[row]), int(self.thumbnail_offsets[row + 1])
        if isinstance(self.thumbnails, bytes):
            return self.thumbnails[start:end]
        return self.thumbnails.read(start, end)


class ThumbnailFile:
    """thumbnails.bin, kept open from load for positional reads: the photos stay on disk
    until asked for, and a bundle replaced by a rename (vae-run add) leaves this one readable
    for as long as it is loaded. Not a memory map: a file truncated in place under a map
    kills the process (SIGBUS) at the next read, while here it is a BundleError for that
    photo. A file changed in place (size or modification time) is refused the same way."""

    def __init__(self, path: Path):
        self.name = path.name
        fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, fd)
        self._fd = fd
        stat = os.fstat(fd)
        self.size = stat.st_size
        self._identity = (stat.st_size, stat.st_mtime_ns)

    def read(self, start: int, end: int) -> bytes:
        stat = os.fstat(self._fd)
        data = os.pread(self._fd, end - start, start)
        if (stat.st_size, stat.st_mtime_ns) != self._identity or len(data) != end - start:
            raise BundleError(f"{self.name}: changed on disk since the bundle was loaded "
                              "(truncated or overwritten in place); load the bundle again")
        return data


def graph_sections(latent_dim: int, image_shape) -> dict:
    """The manifest's "encoder" and "decoder": each graph's file and its named inputs and
    outputs with their shapes ("batch" is the dynamic batch axis)."""
    images = ["batch", *[int(n) for n in image_shape]]
    latent = ["batch", int(latent_dim)]
    return {
        "encoder": {"file": MODEL_FILES["encoder"], "inputs": {"images": images},
                    "outputs": {"mu": latent, "log_var": latent}},
        "decoder": {"file": MODEL_FILES["decoder"], "inputs": {"z": latent},
                    "outputs": {"images": images}},
    }


def new_manifest(*, latent_dim: int, image_shape, image_layout: str, catalog: str,
                 index: CatalogIndex, ids: str, thumbnail_size: int | None = None,
                 **provenance) -> dict:
    """A manifest with every section read_manifest checks, for write_manifest to complete
    with the files' sizes and hashes; `provenance` (parity, model_config, training, ...) is
    recorded as given. thumbnail_size: the side of the thumbnails, when index has them."""
    has_thumbnails = index.thumbnail_offsets is not None
    if has_thumbnails != (thumbnail_size is not None):
        raise ValueError("thumbnail_size goes with an index that has thumbnails, and only then")
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "latent_dim": int(latent_dim),
        "image": {"shape": [int(n) for n in image_shape], "dtype": IMAGE_DTYPE,
                  "range": list(IMAGE_RANGE), "layout": image_layout},
        **graph_sections(latent_dim, image_shape),
        "index": {
            "catalog": catalog,
            "size": len(index),
            "files": dict(INDEX_FILES),
            "dtypes": dict(INDEX_DTYPES),
            "log_sigma": "0.5 * log_var of q(z|x); sigma = exp(log_sigma)",
            "label_names": list(index.label_names),
        },
        "items": {"file": ITEMS_FILE, "columns": ["id", *index.columns], "ids": ids,
                  "escape": ITEMS_ESCAPE},
        "thumbnails": None if not has_thumbnails else {
            "files": dict(THUMBNAIL_FILES), "format": THUMBNAIL_FORMAT,
            "size": [int(thumbnail_size), int(thumbnail_size)]},
        **provenance,
        "files": {name: {} for name in bundle_files(has_thumbnails)},
    }


def bundle_files(thumbnails: bool) -> list[str]:
    """Every file of a bundle besides its manifest."""
    return (list(MODEL_FILES.values()) + list(INDEX_FILES.values()) + [ITEMS_FILE]
            + (list(THUMBNAIL_FILES.values()) if thumbnails else []))


def pack_thumbnails(photos: list[bytes] | None) -> dict:
    """The CatalogIndex fields for items' WebP photos, in item order: one byte string of
    them back to back and the (N + 1,) offsets of each (both None without photos)."""
    if photos is None:
        return {"thumbnails": None, "thumbnail_offsets": None}
    offsets = np.zeros(len(photos) + 1, dtype=np.int64)
    np.cumsum([len(photo) for photo in photos], out=offsets[1:])
    return {"thumbnails": b"".join(photos), "thumbnail_offsets": offsets}


def to_float16(name: str, array: np.ndarray) -> np.ndarray:
    """An index array as the schema stores it; ValueError where float16 would overflow."""
    largest = float(np.abs(array).max(initial=0.0))
    if not largest <= FLOAT16_MAX:
        raise ValueError(f"{name}: values up to {largest:.3g} overflow float16")
    return array.astype(np.float16)


def _escape(cell: str) -> str:
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


def _unescape(cell: str) -> str:
    return cell[1:] if cell.startswith("'") else cell


def write_index(root: Path, index: CatalogIndex) -> None:
    """Write the index arrays, items.csv and the thumbnails (if any) under their file names.
    Arrays must have the schema's dtypes (refused otherwise: a cast here would hide a bug).
    items.csv is written with ITEMS_ESCAPE, which the manifest's items must state."""
    root = Path(root)
    arrays = {"mu": index.mu, "log_sigma": index.log_sigma, "labels": index.labels}
    for key, name in INDEX_FILES.items():
        array = arrays[key]
        if array.dtype != np.dtype(INDEX_DTYPES[key]):
            raise ValueError(f"index {key}: dtype is {array.dtype}, expected {INDEX_DTYPES[key]}")
        np.save(root / name, array, allow_pickle=False)
    with open(root / ITEMS_FILE, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        # csv quotes a field holding the line terminator, "\n", but not a carriage return,
        # which a reader then takes for the end of the line: such rows are quoted in full.
        quoted = csv.writer(handle, lineterminator="\n", quoting=csv.QUOTE_ALL)
        items = ((index.ids[row], *(values[row] for values in index.metadata))
                 for row in range(len(index)))
        for row in itertools.chain([("id", *index.columns)], items):
            cells = [_escape(cell) for cell in row]
            (quoted if any("\r" in cell for cell in cells) else writer).writerow(cells)
    if index.thumbnail_offsets is not None:
        np.save(root / THUMBNAIL_FILES["offsets"],
                np.asarray(index.thumbnail_offsets, dtype=np.int64), allow_pickle=False)
        with open(root / THUMBNAIL_FILES["images"], "wb") as handle:
            handle.write(memoryview(index.thumbnails)[:int(index.thumbnail_offsets[-1])])


def _require(mapping: dict, key: str, kind: type, where: str) -> Any:
    if key not in mapping:
        raise BundleError(f"{where}: missing key {key!r}")
    value = mapping[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BundleError(
            f"{where}: key {key!r} should be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _check_name(name: str) -> None:
    """Refuse a manifest file name that is not a plain name inside the bundle directory."""
    if (not name or name in (".", "..") or os.path.isabs(name) or Path(name).name != name
            or any(c in name for c in "/\\\x00")):
        raise BundleError(
            f"manifest.json: file name {name!r} is not a plain name inside the bundle"
        )


def _bundle_file(root: Path, name: str) -> Path:
    """A file named by the manifest, refused if it would leave the bundle directory."""
    _check_name(name)
    path = root / name
    if path.is_symlink():
        raise BundleError(f"{name}: is a symbolic link; bundle files must be regular files")
    if not path.is_file():
        if path.exists():
            raise BundleError(f"{name}: is not a regular file")
        raise FileNotFoundError(f"bundle {root}: file {name} is missing")
    return path


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object that names no key twice: json keeps the last silently, so two readers
    of one manifest could see two different bundles."""
    unique = {}
    for key, value in pairs:
        if key in unique:
            raise BundleError(f"{MANIFEST_NAME}: key {key!r} appears twice in one object")
        unique[key] = value
    return unique


def _no_constant(name: str):
    """NaN and Infinity: Python's json reads them, but they are not JSON and compare unequal
    to themselves."""
    raise BundleError(f"{MANIFEST_NAME}: {name} is not a JSON number")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_provenance(manifest: dict) -> None:
    """The provenance the runtime shows (vae-run info, the kiosk's /api/info): absent, or of
    the type it is shown as. The rest of the provenance is recorded, never read."""
    for key in ("created", "edited"):
        if key in manifest and not isinstance(manifest[key], str):
            raise BundleError(f"{MANIFEST_NAME}: {key} should be a date text, got "
                              f"{type(manifest[key]).__name__}")
    parity = manifest.get("parity", {})
    if not isinstance(parity, dict) or not _is_number(parity.get("max_abs_diff", 0)):
        raise BundleError(f"{MANIFEST_NAME}: parity should be an object with a number "
                          f"max_abs_diff, got {json.dumps(parity)[:80]}")
    metrics = manifest.get("metrics", {})
    if not isinstance(metrics, dict) or not all(_is_number(v) for v in metrics.values()):
        raise BundleError(f"{MANIFEST_NAME}: metrics should be an object of numbers, got "
                          f"{json.dumps(metrics)[:80]}")


def read_manifest(root: Path) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"bundle directory not found: {root}")
    path = root / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"bundle {root}: {MANIFEST_NAME} is missing")
    path = _bundle_file(root, MANIFEST_NAME)
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(
            f"{MANIFEST_NAME}: {size} bytes is too large for a manifest "
            f"(at most {MAX_MANIFEST_BYTES})"
        )
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_unique_keys,
                              parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{MANIFEST_NAME}: not valid JSON ({exc})") from None
    except RecursionError:
        raise BundleError(f"{MANIFEST_NAME}: not valid JSON (nested too deeply)") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST_NAME}: expected a JSON object, got {type(manifest).__name__}")
    fmt = _require(manifest, "format", str, MANIFEST_NAME)
    if fmt != FORMAT_NAME:
        raise BundleError(f"{MANIFEST_NAME}: format is {fmt!r}, expected {FORMAT_NAME!r}")
    version = _require(manifest, "format_version", int, MANIFEST_NAME)
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{MANIFEST_NAME}: format_version {version} is not supported "
            f"(this runtime reads version {FORMAT_VERSION})"
        )
    latent_dim = _require(manifest, "latent_dim", int, MANIFEST_NAME)
    if latent_dim < 1:
        raise BundleError(f"{MANIFEST_NAME}: latent_dim must be >= 1, got {latent_dim}")
    image = _require(manifest, "image", dict, MANIFEST_NAME)
    shape = _require(image, "shape", list, "manifest.json image")
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                  for s in shape):
        raise BundleError(f"{MANIFEST_NAME}: image shape must be [C, H, W], got {shape}")
    for key, expected in (("dtype", IMAGE_DTYPE), ("range", IMAGE_RANGE)):
        if image.get(key) != expected:
            raise BundleError(f"{MANIFEST_NAME}: image {key} must be {expected}, got "
                              f"{image.get(key)!r}")
    for graph, expected in graph_sections(latent_dim, shape).items():
        section = _require(manifest, graph, dict, MANIFEST_NAME)
        for key in ("file", "inputs", "outputs"):
            if section.get(key) != expected[key]:
                raise BundleError(f"{MANIFEST_NAME}: {graph} {key} must be {expected[key]}, "
                                  f"got {section.get(key)!r}")
    files = _require(manifest, "files", dict, MANIFEST_NAME)
    for name, entry in files.items():
        _check_name(name)
        where = f"{MANIFEST_NAME} files[{name!r}]"
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: expected an object with sha256 and bytes")
        digest = _require(entry, "sha256", str, where)
        if len(digest) != 64 or not set(digest) <= _SHA256_HEX:
            raise BundleError(f"{where}: sha256 must be 64 lowercase hex digits, got {digest!r}")
        if _require(entry, "bytes", int, where) < 0:
            raise BundleError(f"{where}: bytes must be >= 0, got {entry['bytes']}")
    items = _require(manifest, "items", dict, MANIFEST_NAME)
    if items.get("file") != ITEMS_FILE:
        raise BundleError(f"{MANIFEST_NAME}: items file must be {ITEMS_FILE!r}, got "
                          f"{items.get('file')!r}")
    columns = _require(items, "columns", list, "manifest.json items")
    if (not columns or columns[0] != "id" or not all(isinstance(c, str) and c for c in columns)
            or len(set(columns)) != len(columns)):
        raise BundleError(f"{MANIFEST_NAME}: items columns must be distinct non-empty names "
                          f"starting with 'id', got {columns!r}")
    if items.get("escape", ITEMS_ESCAPE) != ITEMS_ESCAPE:
        raise BundleError(f"{MANIFEST_NAME}: items escape must be {ITEMS_ESCAPE!r} or absent, "
                          f"got {json.dumps(items['escape'])[:80]}")
    if "thumbnails" not in manifest:
        raise BundleError(f"{MANIFEST_NAME}: missing key 'thumbnails' (null when there are none)")
    thumbnails = manifest["thumbnails"]
    if thumbnails is not None:
        if not isinstance(thumbnails, dict):
            raise BundleError(f"{MANIFEST_NAME}: thumbnails must be an object or null")
        size = thumbnails.get("size")
        if (thumbnails.get("files") != THUMBNAIL_FILES
                or thumbnails.get("format") != THUMBNAIL_FORMAT
                or not isinstance(size, list) or len(size) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                           for n in size)):
            raise BundleError(f"{MANIFEST_NAME}: thumbnails must be files {THUMBNAIL_FILES}, "
                              f"format {THUMBNAIL_FORMAT!r} and size [W, H], got {thumbnails!r}")
    required = bundle_files(thumbnails is not None)
    for name in required:
        if name not in files:
            raise BundleError(f"{MANIFEST_NAME}: files has no entry for {name}")
    for name in files:  # refused before any file is read: a listed extra would be hashed
        if name not in required:
            raise BundleError(f"{MANIFEST_NAME}: files lists {name!r}, which is not a bundle "
                              f"file (expected exactly {', '.join(required)})")
    index = _require(manifest, "index", dict, MANIFEST_NAME)
    for key, expected in (("files", INDEX_FILES), ("dtypes", INDEX_DTYPES)):
        if index.get(key) != expected:
            raise BundleError(f"{MANIFEST_NAME}: index {key} must be {expected}, got "
                              f"{index.get(key)!r}")
    size = _require(index, "size", int, "manifest.json index")
    if size < 1:
        raise BundleError(f"{MANIFEST_NAME}: index size must be >= 1, got {size}")
    names = _require(index, "label_names", list, "manifest.json index")
    if not all(isinstance(n, str) for n in names):
        raise BundleError(f"{MANIFEST_NAME}: index label_names must be strings")
    if not isinstance(index.get("catalog", ""), str):
        raise BundleError(f"{MANIFEST_NAME}: index catalog should be a name, got "
                          f"{type(index['catalog']).__name__}")
    _check_provenance(manifest)
    return manifest


def verify_files(root: Path, manifest: dict) -> dict[str, Path]:
    """Check that every file the manifest lists (read_manifest made sure those are exactly
    the bundle's files) is present, of the right size and sha256."""
    files = manifest["files"]
    paths = {}
    for name, entry in files.items():
        path = _bundle_file(root, name)
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(
                f"{name}: size is {size} bytes, manifest says {entry['bytes']} "
                "(truncated or replaced)"
            )
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise BundleError(
                f"{name}: sha256 mismatch (manifest {entry['sha256'][:12]}..., "
                f"file {actual[:12]}...)"
            )
        paths[name] = path
    return paths


def _npy_header(path: Path, name: str) -> tuple[np.dtype, tuple, int]:
    """dtype, shape and data offset of a .npy file, read without touching its data."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as handle:
            version = fmt.read_magic(handle)
            if version not in ((1, 0), (2, 0)):
                raise BundleError(f"{name}: .npy format version {version} is not supported")
            field = handle.read(2 if version == (1, 0) else 4)
            header_bytes = int.from_bytes(field, "little")
            if header_bytes > MAX_NPY_HEADER_BYTES:
                raise BundleError(f"{name}: .npy header claims {header_bytes} bytes, at most "
                                  f"{MAX_NPY_HEADER_BYTES} accepted")
            handle.seek(-len(field), os.SEEK_CUR)
            read_header = (fmt.read_array_header_1_0 if version == (1, 0)
                           else fmt.read_array_header_2_0)
            shape, _, dtype = read_header(handle)
            return dtype, shape, handle.tell()
    except (ValueError, SyntaxError, EOFError, OSError) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"{name}: not a readable .npy file ({exc})") from None


def load_index(root: Path, manifest: dict) -> CatalogIndex:
    """Load the index arrays and check their dtypes and shapes against the manifest.

    Each header is checked before any data is read: an object array (which only pickle
    could load) or a shape that does not match the manifest and the file size is refused
    without allocating anything. The arrays come back read-only.
    """
    latent_dim = manifest["latent_dim"]
    index = manifest["index"]
    size = index["size"]
    arrays = {}
    for key, name in index["files"].items():
        path = _bundle_file(root, name)
        dtype, shape, offset = _npy_header(path, name)
        expected_shape = (size, latent_dim) if key in ("mu", "log_sigma") else (size,)
        if dtype.hasobject:
            raise BundleError(
                f"{name}: holds Python objects (dtype {dtype}), which only pickle can load; "
                "refused"
            )
        if dtype != np.dtype(index["dtypes"][key]):
            raise BundleError(f"{name}: dtype is {dtype}, expected {index['dtypes'][key]}")
        if shape != expected_shape:
            raise BundleError(f"{name}: shape is {shape}, expected {expected_shape}")
        expected_bytes = offset + int(np.prod(shape)) * dtype.itemsize
        actual_bytes = path.stat().st_size
        if actual_bytes != expected_bytes:
            raise BundleError(
                f"{name}: file is {actual_bytes} bytes, its header promises {expected_bytes}"
            )
        try:
            # allow_pickle=False again: the header check above is not the only guard.
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise BundleError(f"{name}: not a plain numeric .npy array ({exc})") from None
        except (OSError, EOFError) as exc:
            raise BundleError(f"{name}: not a readable .npy file ({exc})") from None
        if array.dtype != dtype or array.shape != shape:  # the file changed under us
            raise BundleError(f"{name}: changed while it was being read")
        # Shared by every thread using the Runtime: nobody may change it in place.
        array.flags.writeable = False
        arrays[key] = array
    files = index["files"]
    for key in ("mu", "log_sigma"):
        if not np.isfinite(arrays[key]).all():
            raise BundleError(f"{files[key]}: holds NaN or infinite values")
    lowest = float(arrays["log_sigma"].min())
    if lowest < MIN_LOG_SIGMA:
        raise BundleError(f"{files['log_sigma']}: values must be >= {MIN_LOG_SIGMA:g}, "
                          f"got {lowest:.6g}")
    label_names = tuple(index["label_names"])
    labels = arrays["labels"]
    if labels.min() < 0 or labels.max() >= len(label_names):
        raise BundleError(
            f"{files['labels']}: labels must lie in [0, {len(label_names)}), "
            f"got [{labels.min()}, {labels.max()}]"
        )
    ids, metadata = _load_items(root, manifest["items"]["columns"], size,
                                escaped="escape" in manifest["items"])
    thumbnails = offsets = None
    if manifest["thumbnails"] is not None:
        thumbnails, offsets = _load_thumbnails(root, size)
    return CatalogIndex(label_names=label_names, ids=ids,
                        columns=tuple(manifest["items"]["columns"][1:]), metadata=metadata,
                        thumbnails=thumbnails, thumbnail_offsets=offsets, **arrays)


def _load_items(root: Path, columns: list[str], size: int, escaped: bool):
    """items.csv: the header the manifest names, then `size` rows of as many fields, ids
    unique and non-empty. Returns the ids and one column array per metadata column.
    escaped: the file was written with ITEMS_ESCAPE, to be undone."""
    path = _bundle_file(root, ITEMS_FILE)
    try:
        # newline="": a carriage return inside a quoted field is text, kept as it is
        with open(path, encoding="utf-8", newline="") as handle:
            text = handle.read()
        rows = csv.reader(io.StringIO(text, newline=""), strict=True)
        reader = ([_unescape(cell) for cell in row] for row in rows) if escaped else rows
        header = next(reader, None)
        if header != columns:
            raise BundleError(f"{ITEMS_FILE}: header must be {columns}, got "
                              f"{header if header is not None else 'nothing'}")
        # Column by column as the rows stream by: no list of rows is ever held (half the
        # time and a third of the peak memory of a 60,000-item table).
        table = [[] for _ in columns]
        for line, row in enumerate(reader, start=2):
            if len(row) != len(columns):
                raise BundleError(f"{ITEMS_FILE}: line {line} has {len(row)} fields, "
                                  f"expected {len(columns)}")
            for column, value in zip(table, row):
                column.append(value)
    except UnicodeDecodeError as exc:
        raise BundleError(f"{ITEMS_FILE}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise BundleError(f"{ITEMS_FILE}: malformed CSV ({exc})") from None
    if len(table[0]) != size:
        raise BundleError(f"{ITEMS_FILE}: {len(table[0])} items, the index has {size}")
    ids = table[0]
    if len(set(ids)) != size or "" in ids:
        raise BundleError(f"{ITEMS_FILE}: ids must be unique and non-empty")
    arrays = [np.array(column, dtype=object) for column in table]
    for array in arrays:
        array.flags.writeable = False
    return arrays[0], tuple(arrays[1:])


def _load_thumbnails(root: Path, size: int):
    """thumbnail_offsets.npy ((size + 1,) int64, from 0, never decreasing, ending at the
    size of thumbnails.bin) and thumbnails.bin, open for reading (ThumbnailFile)."""
    name = THUMBNAIL_FILES["offsets"]
    path = _bundle_file(root, name)
    dtype, shape, _ = _npy_header(path, name)
    if dtype != np.dtype(np.int64) or shape != (size + 1,):
        raise BundleError(f"{name}: expected int64 ({size + 1},), got {dtype} {shape}")
    try:
        offsets = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BundleError(f"{name}: not a readable .npy file ({exc})") from None
    images = ThumbnailFile(_bundle_file(root, THUMBNAIL_FILES["images"]))
    total = images.size
    if offsets[0] != 0 or offsets[-1] != total or (np.diff(offsets) < 0).any():
        raise BundleError(f"{name}: offsets must rise from 0 to the size of "
                          f"{THUMBNAIL_FILES['images']} ({total} bytes)")
    offsets.flags.writeable = False
    return images, offsets


# ONNX protobuf field numbers (onnx.proto) on every path that can lead to a tensor.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODES, _GRAPH_INITIALIZERS, _GRAPH_SPARSE_INITIALIZERS = 1, 5, 15
_FUNCTION_NODES = 7
_NODE_ATTRIBUTES = 5
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_ATTR_SPARSE_TENSOR, _ATTR_SPARSE_TENSORS = 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_MAX_GRAPH_DEPTH = 64


class _ProtoError(ValueError):
    pass


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _ProtoError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview):
    """(field number, wire type, value) of one protobuf message; values of wire type 2 are
    memoryviews into data, nothing is copied or interpreted beyond that."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        else:
            raise _ProtoError(f"unsupported wire type {wire}")
        if pos > len(data) or field == 0:
            raise _ProtoError("truncated message")
        yield field, wire, value


def _external_tensor(data: memoryview, kind: str, depth: int = 0) -> str | None:
    """The name of the first tensor stored outside the file, walking every graph, node
    attribute, subgraph and function of an ONNX message of the given kind; else None."""
    if depth > _MAX_GRAPH_DEPTH:
        raise _ProtoError(f"graphs nested more than {_MAX_GRAPH_DEPTH} deep")
    children = {
        "model": {_MODEL_GRAPH: "graph", _MODEL_FUNCTIONS: "function"},
        "graph": {_GRAPH_NODES: "node", _GRAPH_INITIALIZERS: "tensor",
                  _GRAPH_SPARSE_INITIALIZERS: "sparse"},
        "function": {_FUNCTION_NODES: "node"},
        "node": {_NODE_ATTRIBUTES: "attribute"},
        "attribute": {_ATTR_TENSOR: "tensor", _ATTR_TENSORS: "tensor", _ATTR_GRAPH: "graph",
                      _ATTR_GRAPHS: "graph", _ATTR_SPARSE_TENSOR: "sparse",
                      _ATTR_SPARSE_TENSORS: "sparse"},
        "sparse": {_SPARSE_VALUES: "tensor", _SPARSE_INDICES: "tensor"},
        "tensor": {},
    }[kind]
    name, external = "?", False
    for field, wire, value in _fields(data):
        if kind == "tensor":
            if field == _TENSOR_NAME and wire == 2:
                name = bytes(value).decode("utf-8", "replace")
            elif field == _TENSOR_EXTERNAL_DATA or (
                    field == _TENSOR_DATA_LOCATION and wire == 0 and value != 0):
                external = True
        elif field in children and wire == 2:
            found = _external_tensor(value, children[field], depth + 1)
            if found is not None:
                return found
    return name if external else None


def check_onnx_file(root: Path, name: str) -> None:
    """Refuse an .onnx file that is not a protobuf message or that keeps tensor data in
    other files: onnxruntime would read those by path, and a bundle must be self-contained.

    Runs before any onnxruntime session exists for the file."""
    data = _bundle_file(root, name).read_bytes()
    try:
        found = _external_tensor(memoryview(data), "model")
    except _ProtoError as exc:
        raise BundleError(f"{name}: not a valid ONNX model ({exc})") from None
    if found is not None:
        raise BundleError(
            f"{name}: tensor {found!r} keeps its data in an external file; "
            "bundle graphs must be self-contained"
        )


def write_manifest(root: Path, manifest: dict) -> None:
    """Fill in sha256 and size of every file named in manifest['files'] and write it."""
    for name in manifest["files"]:
        path = Path(root) / name
        manifest["files"][name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    (Path(root) / MANIFEST_NAME).write_text(text, encoding="utf-8")
