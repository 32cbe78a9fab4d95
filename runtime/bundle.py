"""The bundle on disk: manifest, checksums, and the float16 index (numpy only, no pickle).

Layout of a bundle directory (format version 1, see docs/bundle-format.md):

    manifest.json          what follows, with a sha256 and byte count for every file
    encoder.onnx           images (B, 1, 28, 28) float32 in [0, 1] -> mu, log_var (B, d)
    decoder.onnx           z (B, d) float32 -> images (B, 1, 28, 28) float32 in [0, 1]
    index_mu.npy           (N, d) float16, posterior means of the catalog items
    index_log_sigma.npy    (N, d) float16, log standard deviations (= log_var / 2)
    index_ids.npy          (N,) int32, catalog item ids (row in the source dataset)
    index_labels.npy       (N,) int32, class ids; names are in the manifest
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "vae-edge-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_FILES = {
    "mu": "index_mu.npy",
    "log_sigma": "index_log_sigma.npy",
    "ids": "index_ids.npy",
    "labels": "index_labels.npy",
}
INDEX_DTYPES = {"mu": "float16", "log_sigma": "float16", "ids": "int32", "labels": "int32"}
MODEL_FILES = {"encoder": "encoder.onnx", "decoder": "decoder.onnx"}


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
    """The catalog's posteriors as stored: float16 mu and log_sigma, (N, d) each."""

    mu: np.ndarray
    log_sigma: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.mu.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mu.shape[1])


def _require(mapping: dict, key: str, kind: type, where: str) -> Any:
    if key not in mapping:
        raise BundleError(f"{where}: missing key {key!r}")
    value = mapping[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BundleError(
            f"{where}: key {key!r} should be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _bundle_file(root: Path, name: str) -> Path:
    """A file named by the manifest, refused if it would leave the bundle directory."""
    if not name or os.path.isabs(name) or Path(name).name != name:
        raise BundleError(f"manifest.json: file name {name!r} is not a plain name inside the bundle")
    path = root / name
    if path.is_symlink():
        raise BundleError(f"{name}: is a symbolic link; bundle files must be regular files")
    if not path.is_file():
        raise FileNotFoundError(f"bundle {root}: file {name} is missing")
    return path


def read_manifest(root: Path) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"bundle directory not found: {root}")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"bundle {root}: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{MANIFEST_NAME}: not valid JSON ({exc})") from None
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
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise BundleError(f"{MANIFEST_NAME}: image shape must be [C, H, W], got {shape}")
    files = _require(manifest, "files", dict, MANIFEST_NAME)
    for name, entry in files.items():
        where = f"{MANIFEST_NAME} files[{name!r}]"
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: expected an object with sha256 and bytes")
        _require(entry, "sha256", str, where)
        _require(entry, "bytes", int, where)
    index = _require(manifest, "index", dict, MANIFEST_NAME)
    _require(index, "size", int, "manifest.json index")
    names = _require(index, "label_names", list, "manifest.json index")
    if not all(isinstance(n, str) for n in names):
        raise BundleError(f"{MANIFEST_NAME}: index label_names must be strings")
    return manifest


def verify_files(root: Path, manifest: dict) -> dict[str, Path]:
    """Check that every required file is listed, present, of the right size and sha256."""
    files = manifest["files"]
    required = list(MODEL_FILES.values()) + list(INDEX_FILES.values())
    for name in required:
        if name not in files:
            raise BundleError(f"{MANIFEST_NAME}: files has no entry for {name}")
    paths = {}
    for name, entry in files.items():
        path = _bundle_file(root, name)
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(
                f"{name}: size is {size} bytes, manifest says {entry['bytes']} (truncated or replaced)"
            )
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise BundleError(
                f"{name}: sha256 mismatch (manifest {entry['sha256'][:12]}..., file {actual[:12]}...)"
            )
        paths[name] = path
    return paths


def load_index(root: Path, manifest: dict, mmap: bool = False) -> CatalogIndex:
    """Load the index arrays and check their dtypes and shapes against the manifest."""
    latent_dim = manifest["latent_dim"]
    size = manifest["index"]["size"]
    arrays = {}
    for key, name in INDEX_FILES.items():
        path = _bundle_file(root, name)
        try:
            array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
        except ValueError as exc:  # object arrays need pickle: refused by allow_pickle=False
            raise BundleError(f"{name}: not a plain numeric .npy array ({exc})") from None
        except (OSError, EOFError) as exc:
            raise BundleError(f"{name}: not a readable .npy file ({exc})") from None
        expected_shape = (size, latent_dim) if key in ("mu", "log_sigma") else (size,)
        if array.dtype != np.dtype(INDEX_DTYPES[key]):
            raise BundleError(f"{name}: dtype is {array.dtype}, expected {INDEX_DTYPES[key]}")
        if array.shape != expected_shape:
            raise BundleError(f"{name}: shape is {array.shape}, expected {expected_shape}")
        arrays[key] = array
    for key in ("mu", "log_sigma"):
        if not np.isfinite(arrays[key]).all():
            raise BundleError(f"{INDEX_FILES[key]}: holds NaN or infinite values")
    label_names = tuple(manifest["index"]["label_names"])
    labels = arrays["labels"]
    if size and (labels.min() < 0 or labels.max() >= len(label_names)):
        raise BundleError(
            f"{INDEX_FILES['labels']}: labels must lie in [0, {len(label_names)}), "
            f"got [{labels.min()}, {labels.max()}]"
        )
    return CatalogIndex(label_names=label_names, **arrays)


def write_manifest(root: Path, manifest: dict) -> None:
    """Fill in sha256 and size of every file named in manifest['files'] and write it."""
    for name in manifest["files"]:
        path = Path(root) / name
        manifest["files"][name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    (Path(root) / MANIFEST_NAME).write_text(text, encoding="utf-8")
