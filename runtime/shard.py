"""Split a bundle's catalog into shards, and read a shard set back (no Ray needed here).

`vae-run shard --bundle B --parts N -o DIR` writes DIR/shard-0 ... DIR/shard-{N-1}: complete
bundles that Runtime.load accepts, each with a contiguous run of B's items (rows offset to
offset + size) and B's graphs, hard-linked where DIR is on B's file system and copied
otherwise. Each shard's manifest.json gains a "shard" section (set, part, parts, offset,
catalog_size), and DIR/shards.json names the set: every shard's directory, offset, size and
the sha256 of its manifest.json, which in turn pins every file of the shard. A shard from
another set, a shard missing, or one changed after it was written is refused by read_shards;
vae_edge.runtime.cluster searches the set as one catalog (docs/scale.md).
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .atomic import atomic_directory
from .bundle import MANIFEST_NAME, Bundle, BundleError, read_manifest, sha256_file
from .checks import is_integer

SET_FILE = "shards.json"
SET_FORMAT = "vae-edge-shards"
SET_VERSION = 1
MAX_PARTS = 1024


@dataclass(frozen=True)
class Shard:
    part: int
    path: Path  # the shard's bundle directory
    offset: int  # its first item's row in the whole catalog
    size: int
    manifest_sha256: str


@dataclass(frozen=True)
class ShardSet:
    root: Path
    set_id: str
    size: int  # items in the whole catalog
    shards: tuple[Shard, ...]


def shard_name(part: int) -> str:
    return f"shard-{part}"


def shard_bundle(bundle: str | Path, parts: int, out_dir: str | Path, *, force: bool = False,
                 log=print) -> ShardSet:
    """Split the bundle's items into `parts` contiguous runs of sizes within one of each
    other, one bundle each, under out_dir (written whole or not at all). ValueError for a
    parts count outside [1, catalog size] or an existing out_dir without force."""
    bundle, out_dir = Path(bundle), Path(out_dir)
    if not is_integer(parts) or not 1 <= parts <= MAX_PARTS:
        raise ValueError(f"parts must be an integer in [1, {MAX_PARTS}], got {parts!r}")
    if out_dir.exists() and not force:
        raise ValueError(f"{out_dir} exists: choose another directory, or replace it (force=True, "
                         "vae-run shard --force)")
    whole = Bundle.read(bundle)
    index = whole.index
    if parts > len(index):
        raise ValueError(f"parts must be at most the catalog size ({len(index)} items), "
                         f"got {parts}")
    source = sha256_file(bundle / MANIFEST_NAME)
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
    # Two splits of one bundle are two sets: their shards' manifests differ (the time).
    set_id = hashlib.sha256(f"{source}\0{parts}\0{when}".encode()).hexdigest()[:16]
    bounds = np.linspace(0, len(index), parts + 1).round().astype(np.int64)
    listing = []
    with atomic_directory(out_dir) as tmp:
        for part in range(parts):
            lo, hi = int(bounds[part]), int(bounds[part + 1])
            path = tmp / shard_name(part)
            path.mkdir()
            # The graphs are the same for every shard: one copy on disk where possible.
            replace(whole, index=index.take(range(lo, hi)), manifest={**whole.manifest, "shard": {
                "set": set_id, "part": part, "parts": parts, "offset": lo,
                "catalog_size": len(index), "sharded": when}}).write_into(path, link_graphs=True)
            listing.append({"dir": shard_name(part), "offset": lo, "size": hi - lo,
                            "manifest_sha256": sha256_file(path / MANIFEST_NAME)})
        record = {"format": SET_FORMAT, "format_version": SET_VERSION, "set": set_id,
                  "source_manifest_sha256": source, "size": len(index), "shards": listing}
        (tmp / SET_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out_dir}: {parts} shard{'' if parts == 1 else 's'} of {len(index)} items")
    return read_shards(out_dir)


def read_shards(root: str | Path) -> ShardSet:
    """The shard set in root, checked against its shards.json: every shard present, of this
    set, at its place, its manifest.json the one listed (the files themselves are verified by
    Runtime.load where each shard is loaded). FileNotFoundError or BundleError otherwise."""
    root = Path(root)
    path = root / SET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{root}: {SET_FILE} is missing (expected a directory written "
                                "by vae-run shard)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record["format"] != SET_FORMAT or record["format_version"] != SET_VERSION:
            raise BundleError(f"{path}: format {record['format']!r} version "
                              f"{record['format_version']!r}, expected {SET_FORMAT!r} "
                              f"version {SET_VERSION}")
        set_id, size = str(record["set"]), int(record["size"])
        listed = [(str(e["dir"]), int(e["offset"]), int(e["size"]), str(e["manifest_sha256"]))
                  for e in record["shards"]]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"{path}: not a shard set record ({exc!r})") from None
    shards, offset = [], 0
    for part, (name, start, count, digest) in enumerate(listed):
        if name != shard_name(part) or start != offset or count < 1:
            raise BundleError(f"{path}: shard {part} is listed as {name!r} at offset {start} "
                              f"with {count} items, expected {shard_name(part)!r} at {offset}")
        shard_dir = root / name
        manifest = read_manifest(shard_dir)
        actual = sha256_file(shard_dir / MANIFEST_NAME)
        if actual != digest:
            found = manifest.get("shard") or {}
            raise BundleError(
                f"{shard_dir}: is not the shard {SET_FILE} lists (manifest sha256 "
                f"{actual[:12]}..., listed {digest[:12]}...; it holds part {found.get('part')} "
                f"of set {found.get('set')}, expected part {part} of set {set_id})")
        shards.append(Shard(part, shard_dir, start, count, digest))
        offset += count
    if not shards or offset != size:
        raise BundleError(f"{path}: its shards hold {offset} items, expected {size}")
    return ShardSet(root, set_id, size, tuple(shards))
