"""The bundle: Bundle.read (verified), Bundle.write (atomic, read back before it is swapped in)
and the edits extended and without, which return a new Bundle. `vae-export`, `vae-run add`,
`remove` and `shard` write bundles only through it, and the runtime reads them through it.

Layout of a bundle directory (docs/bundle-format.md; format 3 writes, formats 2 and 3 read):

    manifest.json          what varies between bundles, with a sha256 and byte count per file
    encoder.onnx           images (B, C, H, W) float32 in [0, 1] -> mu, log_var (B, d)
    decoder.onnx           z (B, d) float32 -> images (B, C, H, W) float32 in [0, 1]
    index_mu.npy           (N, d) float16, posterior means of the catalog items
    index_log_sigma.npy    (N, d) float16, log standard deviations (= log_var / 2)
    index_labels.npy       (N,) int32, label ids; their names are in the manifest
    items.csv              UTF-8 CSV: id (text, unique) and the catalog's metadata columns,
                           one row per item in index order
    thumbnails.bin         optional: the items' photos as WebP files back to back
    thumbnail_offsets.npy  with it: (N + 1,) int64, item i is bytes [offsets[i], offsets[i+1])

Format 3's manifest keeps what varies (latent_dim, image shape, label names, columns, sizes,
provenance); file names, dtypes, the image range and the graphs' inputs and outputs follow
from this module. Format 2 stated those too, and a format 2 manifest must state them as they
are.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .atomic import atomic_directory
from .catalog_index import (
    INDEX_DTYPES,
    INDEX_FILES,
    ITEMS_ESCAPE,
    ITEMS_FILE,
    THUMBNAIL_FILES,
    THUMBNAIL_FORMAT,
    BundleError,
    CatalogIndex,
    ThumbnailFile,
    bundle_file,
    pack_thumbnails,
    read_index,
    to_float16,
    write_index,
)
from .manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_RANGE,
    MANIFEST_NAME,
    MODEL_FILES,
    ManifestShape,
    bundle_files,
    graph_sections,
    read_manifest,
    sha256_file,
    verify_files,
    write_manifest,
)
from .onnx_check import check_onnx
from .words import first_few

__all__ = [
    "Bundle", "BundleError", "CatalogIndex", "ThumbnailFile", "INDEX_DTYPES", "INDEX_FILES",
    "IMAGE_RANGE", "ITEMS_ESCAPE", "ITEMS_FILE", "THUMBNAIL_FILES", "THUMBNAIL_FORMAT",
    "MODEL_FILES", "bundle_files", "default_bundle_path", "graph_sections", "new_manifest",
    "pack_thumbnails", "read_manifest", "sha256_file", "to_float16", "verify_files",
    "write_index", "write_manifest",
]


def default_bundle_path() -> Path:
    """The bundle shipped inside the package (models/default in the repository)."""
    from importlib.resources import files

    return Path(str(files("vae_edge.models") / "default"))


def new_manifest(*, latent_dim: int, image_shape, image_layout: str, catalog: str, ids: str,
                 thumbnail_size: int | None = None, **provenance) -> dict:
    """A new bundle's manifest before Bundle.write completes it from the index (size, label
    names, columns) and the files; `provenance` (parity, model_config, training, ...) is
    recorded as given. thumbnail_size: the side of the thumbnails, when the index has them."""
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "latent_dim": int(latent_dim),
        "image": {"shape": [int(n) for n in image_shape], "layout": image_layout},
        "index": {"catalog": catalog}, "items": {"ids": ids},
        "thumbnails": None if thumbnail_size is None else {
            "format": THUMBNAIL_FORMAT, "size": [int(thumbnail_size)] * 2},
        **provenance,
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _stamp(path: Path) -> tuple:
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@dataclass(frozen=True, eq=False)
class Bundle(ManifestShape):
    """A bundle in memory: its manifest, its catalog index and its graphs' bytes.

    root: the directory it was read from (None for a new one). Bundle.read checks everything
    the runtime relies on before any graph runs; write puts it on disk as a whole or not at
    all; extended and without return a new Bundle, for write to put in place.
    """

    manifest: dict
    index: CatalogIndex
    graphs: dict[str, bytes]  # file name -> ONNX bytes, for each of MODEL_FILES
    root: Path | None = None
    _stamps: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def read(cls, path: str | Path, *, verify: bool = True) -> Bundle:
        """The bundle at path, checked; verify=True also checks every file's size and
        sha256 against the manifest (each file read once for it). FileNotFoundError or
        BundleError, one line naming the file and the problem."""
        root = Path(path)
        manifest = read_manifest(root)
        stamps = {name: _stamp(bundle_file(root, name)) for name in manifest["files"]}
        stamps[MANIFEST_NAME] = _stamp(root / MANIFEST_NAME)
        graphs = {name: bundle_file(root, name).read_bytes() for name in MODEL_FILES.values()}
        if verify:
            verify_files(root, manifest, graphs)
        items = manifest["items"]
        index = read_index(root, latent_dim=manifest["latent_dim"],
                           size=manifest["index"]["size"],
                           label_names=manifest["index"]["label_names"],
                           columns=items["columns"], escaped="escape" in items,
                           thumbnails=manifest["thumbnails"] is not None)
        for name, data in graphs.items():  # every check passes before onnxruntime sees one
            check_onnx(name, data)
        return cls(manifest, index, graphs, root, stamps)

    @property
    def thumbnail_size(self) -> int | None:
        thumbnails = self.manifest["thumbnails"]
        return None if thumbnails is None else int(thumbnails["size"][0])

    def unchanged_on_disk(self) -> bool:
        """Whether every file at root is still the one read (same inode, size and time)."""
        try:
            return all(_stamp(self.root / name) == stamp for name, stamp in self._stamps.items())
        except OSError:
            return False

    def extended(self, items: CatalogIndex) -> Bundle:
        """This bundle with `items` after its own (CatalogIndex.extended), marked edited."""
        return self._edited(self.index.extended(items))

    def without(self, ids) -> Bundle:
        """This bundle without the items of these ids, marked edited. ValueError for an id
        it does not have, or for every item (a bundle has at least one)."""
        ids = [str(item_id) for item_id in ids]
        if not ids:
            raise ValueError("no ids given: expected one or more item ids to remove")
        present = np.isin(self.index.ids, np.array(ids, dtype=object))
        missing = sorted(set(ids) - set(self.index.ids[present].tolist()))
        if missing:
            raise ValueError(f"{self.root}: no item with id "
                             f"{first_few([repr(item_id) for item_id in missing], ', ')}")
        keep = np.flatnonzero(~present)
        if keep.size == 0:
            raise ValueError(f"{self.root}: removing every item would leave an empty catalog")
        return self._edited(self.index.take(keep))

    def _edited(self, index: CatalogIndex) -> Bundle:
        return replace(self, index=index, manifest={**self.manifest, "edited": _now()})

    def write(self, path: str | Path, *, link_graphs: bool = False) -> None:
        """Write the bundle to path as format 3: into a temporary sibling directory, read back
        there (Bundle.read) and only then swapped in by a rename (runtime/atomic.py), so an
        interruption or a failed check leaves what path held. link_graphs: hard-link the
        graphs from root where the file system allows (they are the bytes read from there)."""
        with atomic_directory(Path(path)) as tmp:
            self.write_into(tmp, link_graphs=link_graphs)
            # Hashed as written by write_manifest: the read-back checks everything else.
            Bundle.read(tmp, verify=False)

    def write_into(self, directory: Path, *, link_graphs: bool = False) -> None:
        """Write the bundle's files into an empty directory (write does it atomically)."""
        directory = Path(directory)
        known = {}
        for name, data in self.graphs.items():
            try:
                if not link_graphs or self.root is None:
                    raise OSError
                os.link(self.root / name, directory / name)
            except OSError:
                (directory / name).write_bytes(data)
            known[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        write_index(directory, self.index)
        write_manifest(directory, self.format_3_manifest(), known)

    def format_3_manifest(self) -> dict:
        """The manifest to write, its files' entries empty: this bundle's own, with what the
        index says (size, label names, columns, thumbnails) and nothing format 2 stated."""
        m = self.manifest
        has_thumbnails = self.index.thumbnail_offsets is not None
        if has_thumbnails != (m.get("thumbnails") is not None):
            raise ValueError("a manifest's thumbnails size goes with an index that has "
                             "thumbnails, and only then")
        manifest = _without(m, *MODEL_FILES)  # format 2's "encoder" and "decoder" sections
        manifest.update(
            format=FORMAT_NAME, format_version=FORMAT_VERSION,
            image={"shape": list(m["image"]["shape"]), "layout": m["image"].get("layout")},
            index={**_without(m["index"], "files", "dtypes", "log_sigma"),
                   "size": len(self.index), "label_names": list(self.index.label_names)},
            items={**_without(m["items"], "file"), "columns": ["id", *self.index.columns],
                   "escape": ITEMS_ESCAPE},  # as write_index writes items.csv
            thumbnails=None if not has_thumbnails else {
                "format": THUMBNAIL_FORMAT, "size": list(m["thumbnails"]["size"])},
            files={name: {} for name in bundle_files(has_thumbnails)})
        return manifest


def _without(section: dict, *keys: str) -> dict:
    return {key: value for key, value in section.items() if key not in keys}
