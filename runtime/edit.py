"""Add catalog items to a bundle, or take them out, on the device (no PyTorch).

New photos are fitted as training fitted the catalog and encoded with the bundle's own
encoder.onnx. Each edit writes a complete new bundle beside the old one and swaps it in with
a rename (runtime/atomic.py): a kill at any moment leaves the old bundle or the new one, and a
kiosk that loaded the old one keeps serving it (its graphs are in memory and its thumbnails
read from the file it opened, which survives the swap). Edits and exports of one bundle take
turns (a lock file beside it), so two edits at once both land.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import exclusive, recover_directory
from .bundle import Bundle, read_manifest
from .catalog import fit_catalog, items_index, read_catalog
from .core import encoder_of
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


def _add_items(root: Path, csv_path, skip_bad: bool, progress, log) -> EditReport:
    recover_directory(root, log)
    bundle = Bundle.read(root)
    index = bundle.index
    rows = read_catalog(csv_path, skip_bad=skip_bad, known_ids=frozenset(index.ids.tolist()))
    unknown = [name for name in rows.columns if name not in index.columns]
    if unknown:
        known = ", ".join(index.columns) or "none"
        raise ValueError(f"{rows.source}: column(s) {', '.join(unknown)} are not in the "
                         f"bundle's metadata columns ({known})")
    if rows.labels is None and len(index.label_names) > 1:
        raise ValueError(f"{rows.source}: has no label column; the bundle's items have labels "
                         f"({first_few([name for name in index.label_names if name], ', ')})")
    channels, size, _ = bundle.image_shape
    rows, pixels, photos = fit_catalog(rows, size, channels, skip_bad=skip_bad,
                                       progress=progress, thumbnail_size=bundle.thumbnail_size)
    encode = encoder_of(bundle)
    mu, log_sigma = zip(*(encode(pixels[lo:lo + ENCODE_BATCH])
                          for lo in range(0, len(pixels), ENCODE_BATCH)))
    items = items_index(rows, np.concatenate(mu), np.concatenate(log_sigma), photos)
    new = bundle.extended(items)
    _rewrite(bundle, new, log)
    return EditReport(added=rows.ids, skipped=rows.skipped, size=len(new.index))


def remove_items(bundle: str | Path, ids, log=print) -> EditReport:
    """Take the items with these ids out of the bundle. An id the bundle does not have is a
    ValueError (nothing written); so is removing every item (a bundle has at least one)."""
    with exclusive(Path(bundle), log):
        recover_directory(Path(bundle), log)
        ids = [str(item_id) for item_id in ids]
        old = Bundle.read(bundle)
        new = old.without(ids)
        _rewrite(old, new, log)
        return EditReport(removed=tuple(sorted(set(ids))), size=len(new.index))


def _rewrite(old: Bundle, new: Bundle, log) -> None:
    """Write `new` in place of `old`. A bundle that changed since it was read (replaced by a
    run that takes no lock) is refused, nothing written: its graphs would not be the ones
    that encoded the new items."""
    try:
        changed = read_manifest(old.root) != old.manifest or not old.unchanged_on_disk()
    except FileNotFoundError:
        changed = True
    if changed:
        raise ValueError(f"{old.root} changed while it was being edited; nothing written: "
                         "run the edit again")
    new.write(old.root)
    log(f"wrote {old.root} ({plural(len(new.index), 'item')})")
