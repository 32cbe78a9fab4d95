"""A shop's catalog: a CSV of items and their photos, checked row by row before any work.

The format (docs/catalog.md): UTF-8 CSV with a header row;
- `id`: unique, non-empty text (a SKU);
- `image`: a path, relative to the CSV or absolute, to a photo (runtime.images.FORMATS_TEXT),
  any size, grayscale or colour;
- `label`: optional category text;
- every other column is kept as text metadata and comes back with search results.

read_catalog parses and checks the CSV itself; catalog_photos decodes the photos, and
fit_catalog fits them all into one uint8 array. A bad row is reported with its CSV line
number; with skip_bad it is left out and counted instead.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .catalog_index import CatalogIndex, pack_thumbnails, to_float16
from .images import MAX_CATALOG_PHOTO_PIXELS, fit_photo, load_photo, thumbnail_bytes
from .words import first_few, plural

REQUIRED_COLUMNS = ("id", "image")
MAX_ID_LENGTH = 200


@dataclass(frozen=True)
class Catalog:
    """The good rows of a catalog CSV, in file order."""

    source: Path  # the CSV file
    ids: tuple[str, ...]
    labels: tuple[str, ...] | None  # None when the CSV has no label column
    images: tuple[Path, ...]  # absolute paths
    columns: tuple[str, ...]  # metadata column names, in CSV order
    metadata: tuple[tuple[str, ...], ...]  # one tuple of texts per item, as `columns`
    lines: tuple[int, ...]  # the CSV line each item starts on
    skipped: tuple[str, ...] = field(default=())  # "line N: why" for each row left out

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, keep: list[int], skipped: list[str]) -> Catalog:
        """The catalog with only the items at positions `keep`; `skipped` adds to .skipped."""
        def pick(values):
            return tuple(values[i] for i in keep)

        return replace(self, ids=pick(self.ids),
                       labels=None if self.labels is None else pick(self.labels),
                       images=pick(self.images), metadata=pick(self.metadata),
                       lines=pick(self.lines), skipped=self.skipped + tuple(skipped))


def bad_rows_error(source: Path, problems: list[str], what: str = "row") -> ValueError:
    them = "it" if len(problems) == 1 else "them"
    return ValueError(f"{source}: {plural(len(problems), 'bad ' + what)}: "
                      f"{first_few(problems)}; fix {them} or pass --skip-bad to leave {them} out")


def _id_problem(item_id: str) -> str | None:
    if not item_id:
        return "empty id"
    if len(item_id) > MAX_ID_LENGTH:
        return f"id longer than {MAX_ID_LENGTH} characters"
    if item_id != item_id.strip() or any(ord(c) < 32 or ord(c) == 127 for c in item_id):
        return f"id {item_id[:40]!r} has surrounding spaces or control characters"
    if item_id in (".", ".."):  # a browser drops them from /api/item/<id> URLs, even encoded
        return f"id {item_id!r} cannot be used in a web address"
    return None


def read_catalog(path: str | Path, *, skip_bad: bool = False,
                 known_ids: frozenset[str] = frozenset()) -> Catalog:
    """Parse and check a catalog CSV (the photos are checked by catalog_photos).

    Refused with ValueError: a file that is not UTF-8 CSV, a header without `id` and
    `image` or with repeated or empty names, and rows with the wrong number of fields, an
    empty or repeated id (also one in known_ids: items already in a bundle) or an empty image
    path. skip_bad leaves bad rows out instead, listing them in Catalog.skipped; a malformed
    file is refused either way.
    """
    source = Path(path)
    # Lines end at \n, \r or \r\n only, as CSV says: str.splitlines would also end them at
    # U+2028, NEL, form feed and others that may sit inside a product's name.
    reader = csv.reader(io.StringIO(_csv_text(source), newline=""), strict=True)
    line = 1  # where the record being read starts
    try:
        names = _header(source, next(reader, None))
        rows, problems = [], []
        check = _RowCheck(names, known_ids)
        line = reader.line_num + 1
        for fields in reader:
            start, line = line, reader.line_num + 1
            if not any(value.strip() for value in fields):
                continue  # blank lines, as spreadsheets leave at the end
            problem = check(fields)
            if problem is not None:
                problems.append(f"line {start}: {problem}")
            else:
                rows.append((start, fields))
    except csv.Error as exc:  # named by the line its record starts on: an unclosed quote
        # runs on to the end of the file
        raise ValueError(f"{source}: malformed CSV at line {line}: {exc}") from None
    if problems and not skip_bad:
        raise bad_rows_error(source, problems)
    if not rows:
        raise ValueError(f"{source}: no items; expected at least one row after the header")
    return _catalog(source, names, rows, problems)


def _csv_text(source: Path) -> str:
    if source.is_dir():
        raise ValueError(f"{source} is a directory; expected a catalog CSV file")
    if not source.is_file():
        raise FileNotFoundError(f"catalog CSV not found: {source}")
    try:
        # -sig: spreadsheets write a BOM. newline="": a carriage return inside a quoted field
        # is the field's text, kept as it is.
        with open(source, encoding="utf-8-sig", newline="") as handle:
            return handle.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the "
                         "CSV as UTF-8") from None


def _header(source: Path, header: list[str] | None) -> list[str]:
    """The column names, once they name id and image, each once and none empty."""
    if header is None:
        raise ValueError(f"{source}: empty file; expected a header row with id and image")
    names = [name.strip() for name in header]
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        raise ValueError(f"{source}: header has no {' or '.join(missing)} column; expected "
                         f"columns id, image[, label, ...], got {', '.join(names)[:200]}")
    empty = [str(i) for i, name in enumerate(names, start=1) if not name]
    if empty:  # a spreadsheet's trailing empty columns, say
        raise ValueError(f"{source}: header has an empty column name (column "
                         f"{first_few(empty, ', ')}); name the column or delete it")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{source}: header has repeated column names: {', '.join(repeated)}")
    return names


class _RowCheck:
    """fields -> why the row cannot be an item, or None; remembers the ids it accepted."""

    def __init__(self, names: list[str], known_ids: frozenset[str]):
        self.width, self.known = len(names), known_ids
        self.id_at, self.image_at = names.index("id"), names.index("image")
        self.seen = set(known_ids)

    def __call__(self, fields: list[str]) -> str | None:
        if len(fields) != self.width:
            return f"{len(fields)} fields, expected {self.width}"
        item_id = fields[self.id_at]
        problem = _id_problem(item_id)
        if problem is None and item_id in self.known:
            problem = f"id {item_id!r} is already in the bundle"
        elif problem is None and item_id in self.seen:
            problem = f"id {item_id!r} repeated"
        elif problem is None and not fields[self.image_at].strip():
            problem = "empty image path"
        if problem is None:
            self.seen.add(item_id)
        return problem


def _catalog(source: Path, names: list[str], rows: list[tuple[int, list[str]]],
             problems: list[str]) -> Catalog:
    id_at, image_at = names.index("id"), names.index("image")
    label_at = names.index("label") if "label" in names else None
    extra = [i for i, name in enumerate(names) if name not in ("id", "image", "label")]
    return Catalog(
        source=source,
        ids=tuple(fields[id_at] for _, fields in rows),
        labels=None if label_at is None else tuple(fields[label_at].strip() for _, fields in rows),
        images=tuple((source.parent / fields[image_at].strip()).absolute() for _, fields in rows),
        columns=tuple(names[i] for i in extra),
        metadata=tuple(tuple(fields[i] for i in extra) for _, fields in rows),
        lines=tuple(start for start, _ in rows),
        skipped=tuple(problems),
    )


def catalog_photos(catalog: Catalog, decode: bool = True
                   ) -> Iterator[tuple[int, object | None, str | None]]:
    """(position, Pillow image or None, problem or None) for each item, in order; with
    decode=False only the photos' headers are checked (load_photo) and no image comes back.

    A catalog's photos are the shop's own: accepted up to MAX_CATALOG_PHOTO_PIXELS and
    decoded one at a time, each reduced as it is decoded (runtime.images.load_photo)."""
    for position, path in enumerate(catalog.images):
        try:
            yield position, load_photo(path, decode, max_pixels=MAX_CATALOG_PHOTO_PIXELS), None
        except (FileNotFoundError, ValueError) as exc:
            yield position, None, f"line {catalog.lines[position]}: {exc}"


def fit_catalog(catalog: Catalog, size: int, channels: int, *, skip_bad: bool = False,
                thumbnail_size: int | None = None, out: np.ndarray | None = None,
                progress: Callable[[int], None] | None = None, at_least_one: bool = True
                ) -> tuple[Catalog, np.ndarray, list[bytes] | None]:
    """Decode every photo once and fit it into (channels, size, size) uint8.

    Returns the catalog of the items whose photos decoded, their fitted pixels and, with
    thumbnail_size, a WebP thumbnail of each. out: a (len(catalog), channels, size, size)
    uint8 array to fill (a memory map for catalogs larger than RAM); the first len(result)
    rows hold the result. A photo that cannot be read is a bad row: ValueError naming the
    lines, unless skip_bad; the photos' headers are all checked before any is decoded, so
    only damaged pixel data can stop the decoding part way. progress(n) is called after each
    photo. at_least_one=False: a part of a catalog, which may hold no readable photo.
    """
    shape = (len(catalog), channels, size, size)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 {shape}, got {out.dtype} {out.shape}")
    # First the checks a photo's header allows (a missing file, a format, a size), for every
    # photo: a catalog with such a problem is refused before any photo is decoded.
    problems = [problem for _, _, problem in catalog_photos(catalog, decode=False) if problem]
    if problems and not skip_bad:
        raise bad_rows_error(catalog.source, problems, "photo")
    keep, problems, thumbnails = [], [], [] if thumbnail_size else None
    for position, photo, problem in catalog_photos(catalog):
        if problem is not None:
            problems.append(problem)
        else:
            out[len(keep)] = fit_photo(photo, size, channels)
            if thumbnails is not None:
                thumbnails.append(thumbnail_bytes(photo, thumbnail_size))
            keep.append(position)
        if progress is not None:
            progress(1)
    if problems and not skip_bad:
        raise bad_rows_error(catalog.source, problems, "photo")
    if not keep and at_least_one:
        raise ValueError(f"{catalog.source}: no item has a readable photo")
    return catalog.select(keep, problems), out[:len(keep)], thumbnails


def catalog_fingerprint(catalog: Catalog) -> str:
    """sha256 over the CSV's bytes and each photo's size and modification time: a cache of
    fitted photos made from the same fingerprint is still valid."""
    digest = hashlib.sha256(catalog.source.read_bytes())
    for path in catalog.images:
        try:
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


def items_index(rows: Catalog, mu: np.ndarray, log_sigma: np.ndarray,
                photos: list[bytes] | None) -> CatalogIndex:
    """The catalog's items as an index: their float32 codes stored as float16, label names
    sorted (one, "", without a label column), metadata and thumbnails (or None)."""
    label_texts = rows.labels or ("",) * len(rows)
    label_names = tuple(sorted(set(label_texts)))
    return CatalogIndex(
        mu=to_float16("mu", mu), log_sigma=to_float16("log_sigma", log_sigma),
        labels=np.searchsorted(np.array(label_names, dtype=object),
                               np.array(label_texts, dtype=object)).astype(np.int32),
        label_names=label_names, ids=np.array(rows.ids, dtype=object), columns=rows.columns,
        metadata=tuple(np.array(column, dtype=object) for column in zip(*rows.metadata)),
        **pack_thumbnails(photos))
