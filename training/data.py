"""What training reads (ImageRows, TrainingData), and Fashion-MNIST: find, verify, read (IDX,
.gz or raw) and download with checksums. A shop's catalog is read by training/catalog_data.py.

Where the files are looked for, in order:
  1. --data-dir / the data_dir argument
  2. $VAE_EDGE_DATA_DIR
  3. /usr/share/datasets/fashion-mnist   (Debian/Ubuntu: apt-get install dataset-fashion-mnist)
  4. the user cache, $XDG_CACHE_HOME/vae-edge/fashion-mnist (where --download writes)

Checksums are of the decompressed content: Debian re-compresses the .gz files, so their
bytes differ from upstream's while the content is identical.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.atomic import atomic_file, remove_stale_temporaries

ENV_VAR = "VAE_EDGE_DATA_DIR"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801


@dataclass(frozen=True)
class IdxFile:
    name: str  # decompressed file name; the .gz sits beside it as name + ".gz"
    magic: int
    count: int
    sha256: str  # of the decompressed bytes
    size: int  # decompressed bytes


FILES = {
    "train-images": IdxFile("train-images-idx3-ubyte", IMAGE_MAGIC, 60000,
                            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                            47040016),
    "train-labels": IdxFile("train-labels-idx1-ubyte", LABEL_MAGIC, 60000,
                            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                            60008),
    "test-images": IdxFile("t10k-images-idx3-ubyte", IMAGE_MAGIC, 10000,
                           "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                           7840016),
    "test-labels": IdxFile("t10k-labels-idx1-ubyte", LABEL_MAGIC, 10000,
                           "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                           10008),
}


class DataError(ValueError):
    """A data file that is not the Fashion-MNIST file it should be."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) uint8
    sha256: dict  # file name -> sha256 of its decompressed content

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class ImageRows:
    """Some rows of a uint8 image array, (N, H, W) or (N, C, H, W), in memory or memory-mapped:
    indexing reads only the rows asked for, so a memory-mapped catalog is never loaded whole."""

    array: np.ndarray
    rows: np.ndarray  # int64 row numbers into array
    labels: np.ndarray | None = None  # int64 class per row of array, or None (unlabelled)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, positions) -> np.ndarray:
        """uint8 images at these positions (a slice or an integer array) of the rows."""
        return self.array[self.rows[positions]]

    def labels_at(self, positions) -> np.ndarray:
        return self.labels[self.rows[positions]]

    def take(self, positions) -> ImageRows:
        return ImageRows(self.array, self.rows[positions], self.labels)


@dataclass(frozen=True)
class TrainingData:
    """The images a run trains and tests on, and what its checkpoint records about them."""

    train: ImageRows
    test: ImageRows
    image_shape: tuple[int, int, int]  # (channels, height, width)
    class_names: tuple[str, ...]  # () when the data has no labels
    record: dict  # checkpoint["dataset"]: kind, source, checksums, ...


def fashion_mnist_data(data_dir: str | Path | None = None,
                       splits: tuple[Split, Split] | None = None) -> TrainingData:
    """Fashion-MNIST's train and test splits (or the given ones), in memory."""
    train, test = splits or (load_split("train", data_dir), load_split("test", data_dir))

    def rows(split):
        return ImageRows(split.images, np.arange(len(split)), split.labels.astype(np.int64))

    return TrainingData(rows(train), rows(test), (1, 28, 28), CLASS_NAMES,
                        {"kind": "fashion-mnist", "train": train.sha256, "test": test.sha256,
                         "class_names": list(CLASS_NAMES)})


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/vae-edge (default ~/.cache/vae-edge)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vae-edge"


def cache_dir() -> Path:
    return user_cache_dir() / "fashion-mnist"


def candidate_dirs(data_dir: str | Path | None = None) -> list[Path]:
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir))
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]))
    dirs += [SYSTEM_DIR, cache_dir()]
    return dirs


def _file_in(directory: Path, entry: IdxFile) -> Path | None:
    for name in (entry.name + ".gz", entry.name):
        if (directory / name).is_file():
            return directory / name
    return None


def find_data_dir(data_dir: str | Path | None = None) -> Path:
    """The first candidate directory that holds all four files (.gz or raw)."""
    if data_dir is not None and not Path(data_dir).is_dir():
        # A mistyped --data-dir must not silently fall back to some other copy.
        raise FileNotFoundError(f"--data-dir {data_dir} does not exist")
    searched = candidate_dirs(data_dir)
    for directory in searched:
        if all(_file_in(directory, entry) for entry in FILES.values()):
            return directory
    raise FileNotFoundError(
        "Fashion-MNIST not found; looked for the four IDX files (.gz or raw) in: "
        + ", ".join(str(d) for d in searched)
        + ". Get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
        f"or pass --download to fetch it into {cache_dir()}, or set ${ENV_VAR}."
    )


def read_idx(path: Path, entry: IdxFile, verify: bool = True) -> tuple[np.ndarray, str]:
    """Read one IDX file (gzip or raw), check magic, shape, count and sha256.

    Returns the array ((N, 28, 28) or (N,), uint8) and the content sha256.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            gzipped = handle.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) < 8:
        raise DataError(f"{path}: {len(data)} bytes is too short for an IDX header")
    magic, count = struct.unpack(">II", data[:8])
    if magic != entry.magic:
        raise DataError(f"{path}: IDX magic is 0x{magic:08x}, expected 0x{entry.magic:08x}")
    dims = (count,)
    offset = 8
    if entry.magic == IMAGE_MAGIC:
        if len(data) < 16:
            raise DataError(f"{path}: too short for an image IDX header")
        rows, cols = struct.unpack(">II", data[8:16])
        if (rows, cols) != (28, 28):
            raise DataError(f"{path}: images are {rows}x{cols}, expected 28x28")
        dims, offset = (count, rows, cols), 16
    if count != entry.count:
        raise DataError(f"{path}: holds {count} items, expected {entry.count}")
    payload = int(np.prod(dims))
    if len(data) - offset != payload:
        raise DataError(f"{path}: payload is {len(data) - offset} bytes, expected {payload}")
    if verify and digest != entry.sha256:
        raise DataError(
            f"{path}: sha256 of the content is {digest}, expected {entry.sha256} "
            "(corrupt or not Fashion-MNIST)"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)
    return array, digest


def load_split(
    split: str, data_dir: str | Path | None = None, verify: bool = True,
    files: dict[str, IdxFile] | None = None,
) -> Split:
    """Load 'train' or 'test' as uint8 arrays, verifying the content hashes."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    files = files or FILES
    directory = find_data_dir(data_dir) if files is FILES else Path(data_dir)
    images, image_hash = read_idx(_file_in(directory, files[f"{split}-images"]),
                                  files[f"{split}-images"], verify)
    labels, label_hash = read_idx(_file_in(directory, files[f"{split}-labels"]),
                                  files[f"{split}-labels"], verify)
    if labels.max(initial=0) >= len(CLASS_NAMES):
        raise DataError(f"{split} labels exceed the {len(CLASS_NAMES)} Fashion-MNIST classes")
    return Split(images, labels, {files[f"{split}-images"].name: image_hash,
                                  files[f"{split}-labels"].name: label_hash})


def download(
    destination: str | Path | None = None, mirror: str = MIRROR,
    files: dict[str, IdxFile] | None = None, log=None,
) -> Path:
    """Fetch the four .gz files from the mirror, verify each, and move it into place.

    Each file is written to a temporary name in the destination and renamed only once its
    content matches the expected size and sha256, so an interrupted or corrupt download
    never leaves a file that looks complete, and a file already there (valid or not) stays
    as it was until its replacement is complete. Temporaries left by a killed download are
    removed by the next one. Files already present and valid are kept.
    """
    files = files or FILES
    log = log or (lambda message: print(message, file=sys.stderr))
    destination = Path(destination) if destination is not None else cache_dir()
    destination.mkdir(parents=True, exist_ok=True)
    for entry in files.values():
        target = destination / (entry.name + ".gz")
        remove_stale_temporaries(target, ".part", log)
        if target.is_file():
            try:
                read_idx(target, entry)
                log(f"{target.name}: present and verified")
                continue
            except DataError:
                log(f"{target.name}: present but invalid, downloading again")
        url = mirror.rstrip("/") + "/" + entry.name + ".gz"
        log(f"downloading {url}")
        with atomic_file(target, suffix=".part") as out:
            with urllib.request.urlopen(url, timeout=60) as response:
                _copy_with_progress(response, out, target.name, log)
            out.flush()
            read_idx(Path(out.name), entry)  # size, shape and sha256, before it is renamed
    return destination


def _copy_with_progress(response, out, name: str, log, block: int = 1 << 16) -> None:
    """Copy an HTTP response to a file, logging every further 25% when the size is known."""
    total = int(response.headers.get("Content-Length") or 0)
    done, next_report = 0, 0.25
    while chunk := response.read(block):
        out.write(chunk)
        done += len(chunk)
        if total and done / total >= next_report and done < total:
            log(f"{name}: {done * 100 // total}% of {total} bytes")
            next_report = (done * 4 // total + 1) / 4
