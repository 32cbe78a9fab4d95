"""Add catalog items to a bundle, or take them out, on the device (no PyTorch).

New photos are fitted as training fitted the catalog and encoded with the bundle's own
encoder.onnx. Each edit writes a complete new bundle beside the old one and swaps it in with
a rename (runtime/atomic.py): a kill at any moment leaves the old bundle or the new one, and a
kiosk that loaded the old one keeps serving it (its graphs are in memory and its thumbnails
read from the file it opened, which survives the swap). Edits and exports of one bundle take
turns (a lock file beside it), so two edits at once both land.
"""

from __future__ import annotations

import copy
import datetime
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_directory, exclusive, recover_directory
from .bundle import (
    ITEMS_ESCAPE,
    MODEL_FILES,
    CatalogIndex,
    pack_thumbnails,
    read_manifest,
    sha256_file,
    to_float16,
    write_index,
    write_manifest,
)
from .catalog import fit_catalog, read_catalog
from .core import Runtime
from .words import first_few, plural

ENCODE_BATCH = 256


@dataclass(frozen=True)
class EditReport:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()  # "line N: why" for each bad row left out (skip_bad)
    size: int = 0  # items in the bundle afterwards


def add_items(bundle: str | Path, csv_path: str | Path, *, skip_bad: bool = False,
              progress: Callable[[int], None] | None = None, log=print) -> EditReport:
    """Encode the photos of a catalog CSV and add them to the bundle.

    The CSV is checked as for training (docs/catalog.md); an id already in the bundle is a
    bad row. Its columns must be among the bundle's metadata columns (a column the CSV lacks
    is left empty); a new label becomes a new label name. Bad rows refuse the whole CSV with
    ValueError naming their lines, nothing written, unless skip_bad.
    """
    with exclusive(Path(bundle), log):
        return _add_items(Path(bundle), csv_path, skip_bad, progress, log)


def _add_items(bundle: Path, csv_path, skip_bad: bool, progress, log) -> EditReport:
    recover_directory(bundle, log)
    rt = Runtime.load(bundle)
    index = rt.index
    rows = read_catalog(csv_path, skip_bad=skip_bad, known_ids=frozenset(index.ids.tolist()))
    unknown = [name for name in rows.columns if name not in index.columns]
    if unknown:
        known = ", ".join(index.columns) or "none"
        raise ValueError(f"{rows.source}: column(s) {', '.join(unknown)} are not in the "
                         f"bundle's metadata columns ({known})")
    if rows.labels is None and len(index.label_names) > 1:
        raise ValueError(f"{rows.source}: has no label column; the bundle's items have labels "
                         f"({first_few([name for name in index.label_names if name], ', ')})")
    channels, size, _ = rt.image_shape
    thumbnails = rt.manifest["thumbnails"]
    rows, pixels, photos = fit_catalog(
        rows, size, channels, skip_bad=skip_bad, progress=progress,
        thumbnail_size=None if thumbnails is None else thumbnails["size"][0])
    mu, log_sigma = zip(*(rt.encode(pixels[lo:lo + ENCODE_BATCH])
                          for lo in range(0, len(pixels), ENCODE_BATCH)))
    label_texts = rows.labels or ("",) * len(rows)
    label_names = list(index.label_names)
    label_names += sorted(set(label_texts) - set(label_names))
    code = {name: i for i, name in enumerate(label_names)}
    given = {name: i for i, name in enumerate(rows.columns)}
    metadata = tuple(
        np.concatenate([values, np.array([item[given[name]] if name in given else ""
                                          for item in rows.metadata], dtype=object)])
        for name, values in zip(index.columns, index.metadata))
    if photos is not None:
        photos = [index.thumbnail(row) for row in range(len(index))] + photos
    new = CatalogIndex(
        mu=np.concatenate([index.mu, to_float16("mu", np.concatenate(mu))]),
        log_sigma=np.concatenate([index.log_sigma,
                                  to_float16("log_sigma", np.concatenate(log_sigma))]),
        labels=np.concatenate([index.labels, np.array([code[t] for t in label_texts],
                                                      dtype=np.int32)]),
        label_names=tuple(label_names),
        ids=np.concatenate([index.ids, np.array(rows.ids, dtype=object)]),
        columns=index.columns, metadata=metadata, **pack_thumbnails(photos))
    _rewrite(rt, new, log)
    return EditReport(added=rows.ids, skipped=rows.skipped, size=len(new))


def remove_items(bundle: str | Path, ids, log=print) -> EditReport:
    """Take the items with these ids out of the bundle. An id the bundle does not have is a
    ValueError (nothing written); so is removing every item (a bundle has at least one)."""
    with exclusive(Path(bundle), log):
        return _remove_items(bundle, [str(item_id) for item_id in ids], log)


def _remove_items(bundle: Path, ids: list[str], log) -> EditReport:
    recover_directory(bundle, log)
    if not ids:
        raise ValueError("no ids given: expected one or more item ids to remove")
    rt = Runtime.load(bundle)
    index = rt.index
    present = np.isin(index.ids, np.array(ids, dtype=object))
    missing = sorted(set(ids) - set(index.ids[present].tolist()))
    if missing:
        raise ValueError(f"{bundle}: no item with id "
                         f"{first_few([repr(item_id) for item_id in missing], ', ')}")
    keep = np.flatnonzero(~present)
    if keep.size == 0:
        raise ValueError(f"{bundle}: removing every item would leave an empty catalog")
    photos = None if index.thumbnail_offsets is None else [index.thumbnail(row) for row in keep]
    new = CatalogIndex(
        mu=index.mu[keep], log_sigma=index.log_sigma[keep], labels=index.labels[keep],
        label_names=index.label_names, ids=index.ids[keep], columns=index.columns,
        metadata=tuple(values[keep] for values in index.metadata), **pack_thumbnails(photos))
    _rewrite(rt, new, log)
    return EditReport(removed=tuple(sorted(set(ids))), size=len(new))


def _rewrite(rt: Runtime, index: CatalogIndex, log) -> None:
    """Write the bundle with this index, the graphs and the rest of the manifest as rt
    loaded them, and swap it in once the runtime accepts it. A bundle that changed since rt
    loaded it (replaced by a run that takes no lock) is refused, nothing written: its graphs
    would not be the ones that encoded the new items."""
    manifest = copy.deepcopy(rt.manifest)  # rt.manifest stays as loaded
    changed = ValueError(f"{rt.root} changed while it was being edited; nothing written: "
                         "run the edit again")
    try:
        if read_manifest(rt.root) != rt.manifest:
            raise changed
    except FileNotFoundError:
        raise changed from None
    manifest["index"]["size"] = len(index)
    manifest["items"]["escape"] = ITEMS_ESCAPE  # as write_index writes items.csv
    manifest["index"]["label_names"] = list(index.label_names)
    manifest["edited"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")
    with atomic_directory(rt.root) as tmp:
        for name in MODEL_FILES.values():
            shutil.copyfile(rt.root / name, tmp / name)
            if sha256_file(tmp / name) != rt.manifest["files"][name]["sha256"]:
                raise changed
        write_index(tmp, index)
        write_manifest(tmp, manifest)
        Runtime.load(tmp)  # the runtime must accept what we wrote
    log(f"wrote {rt.root} ({plural(len(index), 'item')})")
