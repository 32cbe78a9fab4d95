"""A bundle's catalog, CatalogIndex, and its files: the float16 index arrays, items.csv and
the thumbnails, written and read back under the checks docs/bundle-format.md lists (numpy
only, no pickle). runtime/bundle.py says which of them a bundle holds (its manifest)."""

from __future__ import annotations

import csv
import io
import itertools
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
# A bundle's .npy headers are about 128 bytes; numpy itself refuses more than 10,000 as unsafe,
# but only after reading them, and a 4-byte length field can claim 4 GiB.
MAX_NPY_HEADER_BYTES = 10_000
# sigma >= e^-40 (4e-18): the search works with 1/sigma^2, which must fit float32 (and a
# float16 log_sigma of -65504 would overflow even float64).
MIN_LOG_SIGMA = -40.0
FLOAT16_MAX = float(np.finfo(np.float16).max)


class BundleError(ValueError):
    """A bundle that is not what its manifest claims (or has no usable manifest)."""



def _check_name(name: str) -> None:
    """Refuse a manifest file name that is not a plain name inside the bundle directory."""
    if (not name or name in (".", "..") or os.path.isabs(name) or Path(name).name != name
            or any(c in name for c in "/\\\x00")):
        raise BundleError(
            f"manifest.json: file name {name!r} is not a plain name inside the bundle"
        )


def bundle_file(root: Path, name: str) -> Path:
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

    def take(self, rows) -> CatalogIndex:
        """The items at these rows, in this order, with every label name kept."""
        rows = np.asarray(rows, dtype=np.int64)
        photos = None
        if self.thumbnail_offsets is not None:
            blob, offsets = self.thumbnail_blob(), self.thumbnail_offsets
            photos = [blob[offsets[row]:offsets[row + 1]] for row in rows]
        return CatalogIndex(
            mu=self.mu[rows], log_sigma=self.log_sigma[rows], labels=self.labels[rows],
            label_names=self.label_names, ids=self.ids[rows], columns=self.columns,
            metadata=tuple(values[rows] for values in self.metadata), **pack_thumbnails(photos))

    def extended(self, items: CatalogIndex) -> CatalogIndex:
        """This index with `items` after its own: their label names that are new come after
        this index's (sorted), a metadata column they lack is left empty. ValueError for an
        id already here, a column not here, or thumbnails on one side only."""
        unknown = [name for name in items.columns if name not in self.columns]
        if unknown:
            raise ValueError(f"column(s) {', '.join(unknown)} are not among the index's "
                             f"metadata columns ({', '.join(self.columns) or 'none'})")
        if (items.thumbnail_offsets is None) != (self.thumbnail_offsets is None):
            raise ValueError("the new items must have thumbnails if and only if the index has")
        taken = set(self.ids.tolist()).intersection(items.ids.tolist())
        if taken:
            raise ValueError(f"id(s) already in the index: {', '.join(sorted(taken)[:3])}")
        names = self.label_names + tuple(sorted(set(items.label_names) - set(self.label_names)))
        code = {name: i for i, name in enumerate(names)}
        relabel = np.array([code[name] for name in items.label_names], dtype=np.int32)
        given = dict(zip(items.columns, items.metadata))
        blank = np.full(len(items), "", dtype=object)
        thumbnails = {}
        if self.thumbnail_offsets is not None:
            offsets = self.thumbnail_offsets
            thumbnails = {"thumbnails": self.thumbnail_blob() + items.thumbnail_blob(),
                          "thumbnail_offsets": np.concatenate(
                              [offsets, offsets[-1] + items.thumbnail_offsets[1:]])}
        return CatalogIndex(
            mu=np.concatenate([self.mu, items.mu]),
            log_sigma=np.concatenate([self.log_sigma, items.log_sigma]),
            labels=np.concatenate([self.labels, relabel[items.labels]]), label_names=names,
            ids=np.concatenate([self.ids, items.ids]), columns=self.columns,
            metadata=tuple(np.concatenate([values, given.get(name, blank)])
                           for name, values in zip(self.columns, self.metadata)),
            **thumbnails)

    def thumbnail_blob(self) -> bytes:
        """Every thumbnail, back to back, as one byte string."""
        end = int(self.thumbnail_offsets[-1])
        if isinstance(self.thumbnails, bytes):
            return self.thumbnails[:end]
        return self.thumbnails.read(0, end)


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
            handle.write(index.thumbnail_blob())



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


def read_index(root: Path, *, latent_dim: int, size: int, label_names, columns,
               escaped: bool, thumbnails: bool) -> CatalogIndex:
    """Load the index files a manifest describes (columns: items.csv's header, "id" first;
    escaped: items.csv was written with ITEMS_ESCAPE) and check them against it. The arrays
    come back read-only."""
    shapes = {"mu": (size, latent_dim), "log_sigma": (size, latent_dim), "labels": (size,)}
    arrays = {key: _load_array(root, INDEX_FILES[key], np.dtype(INDEX_DTYPES[key]), shape)
              for key, shape in shapes.items()}
    for key in ("mu", "log_sigma"):
        if not np.isfinite(arrays[key]).all():
            raise BundleError(f"{INDEX_FILES[key]}: holds NaN or infinite values")
    lowest = float(arrays["log_sigma"].min())
    if lowest < MIN_LOG_SIGMA:
        raise BundleError(f"{INDEX_FILES['log_sigma']}: values must be >= {MIN_LOG_SIGMA:g}, "
                          f"got {lowest:.6g}")
    label_names = tuple(label_names)
    labels = arrays["labels"]
    if labels.min() < 0 or labels.max() >= len(label_names):
        raise BundleError(
            f"{INDEX_FILES['labels']}: labels must lie in [0, {len(label_names)}), "
            f"got [{labels.min()}, {labels.max()}]"
        )
    ids, metadata = _load_items(root, list(columns), size, escaped=escaped)
    images = offsets = None
    if thumbnails:
        images, offsets = _load_thumbnails(root, size)
    return CatalogIndex(label_names=label_names, ids=ids, columns=tuple(columns[1:]),
                        metadata=metadata, thumbnails=images, thumbnail_offsets=offsets,
                        **arrays)


def _load_array(root: Path, name: str, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """One index array. Its header is checked before any data is read: an object array
    (which only pickle could load) or a shape that does not match the manifest and the file
    size is refused without allocating anything."""
    path = bundle_file(root, name)
    found, found_shape, offset = _npy_header(path, name)
    if found.hasobject:
        raise BundleError(
            f"{name}: holds Python objects (dtype {found}), which only pickle can load; "
            "refused"
        )
    if found != dtype:
        raise BundleError(f"{name}: dtype is {found}, expected {dtype}")
    if found_shape != shape:
        raise BundleError(f"{name}: shape is {found_shape}, expected {shape}")
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
    return array


def _load_items(root: Path, columns: list[str], size: int, escaped: bool):
    """items.csv: the header the manifest names, then `size` rows of as many fields, ids
    unique and non-empty. Returns the ids and one column array per metadata column.
    escaped: the file was written with ITEMS_ESCAPE, to be undone."""
    path = bundle_file(root, ITEMS_FILE)
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
    path = bundle_file(root, name)
    dtype, shape, _ = _npy_header(path, name)
    if dtype != np.dtype(np.int64) or shape != (size + 1,):
        raise BundleError(f"{name}: expected int64 ({size + 1},), got {dtype} {shape}")
    try:
        offsets = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BundleError(f"{name}: not a readable .npy file ({exc})") from None
    images = ThumbnailFile(bundle_file(root, THUMBNAIL_FILES["images"]))
    total = images.size
    if offsets[0] != 0 or offsets[-1] != total or (np.diff(offsets) < 0).any():
        raise BundleError(f"{name}: offsets must rise from 0 to the size of "
                          f"{THUMBNAIL_FILES['images']} ({total} bytes)")
    offsets.flags.writeable = False
    return images, offsets

