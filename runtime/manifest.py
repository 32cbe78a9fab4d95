"""A bundle's manifest.json: the schema's constants, and the manifest read and checked
(formats 2 and 3) and written. runtime/bundle.py's Bundle is what reads and writes bundles;
docs/bundle-format.md describes both formats."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .catalog_index import (
    INDEX_DTYPES,
    INDEX_FILES,
    ITEMS_ESCAPE,
    ITEMS_FILE,
    THUMBNAIL_FILES,
    THUMBNAIL_FORMAT,
    BundleError,
    _check_name,
    bundle_file,
)
from .checks import is_integer, is_number

FORMAT_NAME = "vae-edge-bundle"
FORMAT_VERSION = 3
READ_VERSIONS = (2, 3)
MANIFEST_NAME = "manifest.json"
MODEL_FILES = {"encoder": "encoder.onnx", "decoder": "decoder.onnx"}
IMAGE_DTYPE = "float32"
IMAGE_RANGE = [0.0, 1.0]
# A real manifest is a few KB; anything this large is not one, and is not read into memory.
MAX_MANIFEST_BYTES = 1 << 20
_SHA256_HEX = frozenset("0123456789abcdef")


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def graph_sections(latent_dim: int, image_shape) -> dict:
    """Each graph's file and its named inputs and outputs with their shapes ("batch" is the
    dynamic batch axis): what the runtime checks the graphs against, and what a format 2
    manifest states as its "encoder" and "decoder"."""
    images = ["batch", *[int(n) for n in image_shape]]
    latent = ["batch", int(latent_dim)]
    return {
        "encoder": {"file": MODEL_FILES["encoder"], "inputs": {"images": images},
                    "outputs": {"mu": latent, "log_var": latent}},
        "decoder": {"file": MODEL_FILES["decoder"], "inputs": {"z": latent},
                    "outputs": {"images": images}},
    }


def bundle_files(thumbnails: bool) -> list[str]:
    """Every file of a bundle besides its manifest."""
    return (list(MODEL_FILES.values()) + list(INDEX_FILES.values()) + [ITEMS_FILE]
            + (list(THUMBNAIL_FILES.values()) if thumbnails else []))


def _require(mapping: dict, key: str, kind: type, where: str) -> Any:
    if key not in mapping:
        raise BundleError(f"{where}: missing key {key!r}")
    value = mapping[key]
    if not (is_integer(value) if kind is int else isinstance(value, kind)):
        raise BundleError(
            f"{where}: key {key!r} should be {kind.__name__}, got {type(value).__name__}"
        )
    return value



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


def _check_provenance(manifest: dict) -> None:
    """The provenance the runtime shows (vae-run info, the kiosk's /api/info): absent, or of
    the type it is shown as. The rest of the provenance is recorded, never read."""
    for key in ("created", "edited"):
        if key in manifest and not isinstance(manifest[key], str):
            raise BundleError(f"{MANIFEST_NAME}: {key} should be a date text, got "
                              f"{type(manifest[key]).__name__}")
    parity = manifest.get("parity", {})
    if not isinstance(parity, dict) or not is_number(parity.get("max_abs_diff", 0)):
        raise BundleError(f"{MANIFEST_NAME}: parity should be an object with a number "
                          f"max_abs_diff, got {json.dumps(parity)[:80]}")
    metrics = manifest.get("metrics", {})
    if not isinstance(metrics, dict) or not all(is_number(v) for v in metrics.values()):
        raise BundleError(f"{MANIFEST_NAME}: metrics should be an object of numbers, got "
                          f"{json.dumps(metrics)[:80]}")


def read_manifest(root: Path) -> dict:
    """The manifest of the bundle at root (format 2 or 3), checked: its keys and their
    types, the names it gives files, and (format 2) the constants it states."""
    manifest = _parse_manifest(Path(root))
    fmt = _require(manifest, "format", str, MANIFEST_NAME)
    if fmt != FORMAT_NAME:
        raise BundleError(f"{MANIFEST_NAME}: format is {fmt!r}, expected {FORMAT_NAME!r}")
    version = _require(manifest, "format_version", int, MANIFEST_NAME)
    if version not in READ_VERSIONS:
        raise BundleError(f"{MANIFEST_NAME}: format_version {version} is not supported "
                          f"(this runtime reads versions {READ_VERSIONS[0]} and "
                          f"{READ_VERSIONS[1]})")
    latent_dim = _require(manifest, "latent_dim", int, MANIFEST_NAME)
    if latent_dim < 1:
        raise BundleError(f"{MANIFEST_NAME}: latent_dim must be >= 1, got {latent_dim}")
    image = _require(manifest, "image", dict, MANIFEST_NAME)
    shape = _require(image, "shape", list, "manifest.json image")
    if len(shape) != 3 or not all(_is_count(s) for s in shape):
        raise BundleError(f"{MANIFEST_NAME}: image shape must be [C, H, W], got {shape}")
    if version == 2:
        _check_format_2(manifest, latent_dim, shape)
    _check_files(_require(manifest, "files", dict, MANIFEST_NAME))
    _check_items(_require(manifest, "items", dict, MANIFEST_NAME))
    thumbnails = _check_thumbnails(manifest, version)
    _check_listed(manifest["files"], thumbnails)
    _check_index(_require(manifest, "index", dict, MANIFEST_NAME))
    _check_provenance(manifest)
    return manifest


def _parse_manifest(root: Path) -> dict:
    if not root.is_dir():
        raise FileNotFoundError(f"bundle directory not found: {root}")
    path = root / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"bundle {root}: {MANIFEST_NAME} is missing")
    path = bundle_file(root, MANIFEST_NAME)
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{MANIFEST_NAME}: {size} bytes is too large for a manifest "
                          f"(at most {MAX_MANIFEST_BYTES})")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_unique_keys,
                              parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{MANIFEST_NAME}: not valid JSON ({exc})") from None
    except RecursionError:
        raise BundleError(f"{MANIFEST_NAME}: not valid JSON (nested too deeply)") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST_NAME}: expected a JSON object, got {type(manifest).__name__}")
    return manifest


def _is_count(value) -> bool:
    return is_integer(value) and value > 0


def _format_2_sections(latent_dim: int, shape) -> dict:
    """What a format 2 manifest states besides what varies: (section, key) -> value."""
    stated = {("image", "dtype"): IMAGE_DTYPE, ("image", "range"): IMAGE_RANGE}
    for graph, section in graph_sections(latent_dim, shape).items():
        stated.update({(graph, key): value for key, value in section.items()})
    stated.update({("index", "files"): INDEX_FILES, ("index", "dtypes"): INDEX_DTYPES,
                   ("items", "file"): ITEMS_FILE})
    return stated


def _check_format_2(manifest: dict, latent_dim: int, shape) -> None:
    for (section, key), expected in _format_2_sections(latent_dim, shape).items():
        stated = _require(manifest, section, dict, MANIFEST_NAME).get(key)
        if stated != expected:
            raise BundleError(f"{MANIFEST_NAME}: {section} {key} must be {expected}, got "
                              f"{stated!r}")


def _check_files(files: dict) -> None:
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


def _check_items(items: dict) -> None:
    columns = _require(items, "columns", list, "manifest.json items")
    if (not columns or columns[0] != "id" or not all(isinstance(c, str) and c for c in columns)
            or len(set(columns)) != len(columns)):
        raise BundleError(f"{MANIFEST_NAME}: items columns must be distinct non-empty names "
                          f"starting with 'id', got {columns!r}")
    if items.get("escape", ITEMS_ESCAPE) != ITEMS_ESCAPE:
        raise BundleError(f"{MANIFEST_NAME}: items escape must be {ITEMS_ESCAPE!r} or absent, "
                          f"got {json.dumps(items['escape'])[:80]}")


def _check_thumbnails(manifest: dict, version: int) -> bool:
    """Whether the bundle has thumbnails; BundleError for a thumbnails section that is not
    null or the format and size (format 2: and file names) of WebP thumbnails."""
    if "thumbnails" not in manifest:
        raise BundleError(f"{MANIFEST_NAME}: missing key 'thumbnails' (null when there are none)")
    thumbnails = manifest["thumbnails"]
    if thumbnails is None:
        return False
    if not isinstance(thumbnails, dict):
        raise BundleError(f"{MANIFEST_NAME}: thumbnails must be an object or null")
    size = thumbnails.get("size")
    named = version == 3 or thumbnails.get("files") == THUMBNAIL_FILES
    if (not named or thumbnails.get("format") != THUMBNAIL_FORMAT
            or not isinstance(size, list) or len(size) != 2 or not all(map(_is_count, size))):
        raise BundleError(f"{MANIFEST_NAME}: thumbnails must be files of format "
                          f"{THUMBNAIL_FORMAT!r} and size [W, H]"
                          f"{'' if version == 3 else f' named {THUMBNAIL_FILES}'}, "
                          f"got {thumbnails!r}")
    return True


def _check_listed(files: dict, thumbnails: bool) -> None:
    required = bundle_files(thumbnails)
    for name in required:
        if name not in files:
            raise BundleError(f"{MANIFEST_NAME}: files has no entry for {name}")
    for name in files:  # refused before any file is read: a listed extra would be hashed
        if name not in required:
            raise BundleError(f"{MANIFEST_NAME}: files lists {name!r}, which is not a bundle "
                              f"file (expected exactly {', '.join(required)})")


def _check_index(index: dict) -> None:
    size = _require(index, "size", int, "manifest.json index")
    if size < 1:
        raise BundleError(f"{MANIFEST_NAME}: index size must be >= 1, got {size}")
    names = _require(index, "label_names", list, "manifest.json index")
    if not all(isinstance(n, str) for n in names):
        raise BundleError(f"{MANIFEST_NAME}: index label_names must be strings")
    if not isinstance(index.get("catalog", ""), str):
        raise BundleError(f"{MANIFEST_NAME}: index catalog should be a name, got "
                          f"{type(index['catalog']).__name__}")


def verify_files(root: Path, manifest: dict, contents: dict[str, bytes] | None = None) -> None:
    """Check that every file the manifest lists (read_manifest made sure those are exactly
    the bundle's files) is present, of the right size and sha256. contents: files already
    read, by name, checked from those bytes rather than read again."""
    contents = contents or {}
    for name, entry in manifest["files"].items():
        if name in contents:
            size, digest = len(contents[name]), None
        else:
            size = bundle_file(root, name).stat().st_size
        if size != entry["bytes"]:
            raise BundleError(f"{name}: size is {size} bytes, manifest says {entry['bytes']} "
                              "(truncated or replaced)")
        if name in contents:
            digest = hashlib.sha256(contents[name]).hexdigest()
        else:
            digest = sha256_file(root / name)
        if digest != entry["sha256"]:
            raise BundleError(f"{name}: sha256 mismatch (manifest {entry['sha256'][:12]}..., "
                              f"file {digest[:12]}...)")


def write_manifest(root: Path, manifest: dict, known: dict[str, dict] | None = None) -> None:
    """Fill in sha256 and size of every file named in manifest['files'] and write it.
    known: entries already computed (from bytes in memory), by file name."""
    for name in manifest["files"]:
        if known and name in known:
            manifest["files"][name] = known[name]
        else:
            path = Path(root) / name
            manifest["files"][name] = {"sha256": sha256_file(path),
                                       "bytes": path.stat().st_size}
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    (Path(root) / MANIFEST_NAME).write_text(text, encoding="utf-8")


class ManifestShape:
    """The latent size and image shape of whatever holds a bundle's `manifest` (a Bundle, a
    Runtime, a sharded runtime)."""

    manifest: dict

    @property
    def latent_dim(self) -> int:
        return int(self.manifest["latent_dim"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["image"]["shape"])
