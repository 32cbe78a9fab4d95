import gzip
import hashlib
import http.server
import struct
import threading
from functools import partial

import numpy as np
import pytest

from vae_edge.training import data
from vae_edge.training.data import (
    FILES,
    IMAGE_MAGIC,
    LABEL_MAGIC,
    DataError,
    IdxFile,
    download,
    find_data_dir,
    load_split,
    read_idx,
)


def idx_bytes(magic, array):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_files(count=5):
    """Four small valid IDX payloads and IdxFile entries that expect exactly them."""
    rng = np.random.default_rng(0)
    payloads, entries = {}, {}
    for key, real in FILES.items():
        if real.magic == IMAGE_MAGIC:
            array = rng.integers(0, 256, size=(count, 28, 28))
        else:
            array = rng.integers(0, 10, size=(count,))
        raw = idx_bytes(real.magic, array)
        payloads[real.name] = raw
        entries[key] = IdxFile(real.name, real.magic, count, hashlib.sha256(raw).hexdigest(),
                               len(raw))
    return payloads, entries


def write_dir(directory, payloads, compress=True):
    directory.mkdir(parents=True, exist_ok=True)
    for name, raw in payloads.items():
        if compress:
            (directory / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (directory / name).write_bytes(raw)
    return directory


@pytest.mark.parametrize("compress", [True, False])
def test_read_split_from_gz_or_raw(tmp_path, compress):
    payloads, entries = fake_files()
    directory = write_dir(tmp_path / "d", payloads, compress)
    split = load_split("train", directory, files=entries)
    assert split.images.shape == (5, 28, 28) and split.images.dtype == np.uint8
    assert split.labels.shape == (5,)
    assert split.sha256["train-images-idx3-ubyte"] == entries["train-images"].sha256


def test_real_fashion_mnist_hashes(data_dir):
    split = load_split("test", data_dir)
    assert split.images.shape == (10000, 28, 28)
    assert np.bincount(split.labels).tolist() == [1000] * 10
    assert split.sha256["t10k-labels-idx1-ubyte"] == FILES["test-labels"].sha256


def test_bad_magic(tmp_path):
    entry = IdxFile("x", IMAGE_MAGIC, 1, "0" * 64, 0)
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(LABEL_MAGIC, np.zeros(1)))
    with pytest.raises(DataError, match=r"IDX magic is 0x00000801, expected 0x00000803"):
        read_idx(path, entry)


def test_wrong_count_and_truncation(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(LABEL_MAGIC, np.zeros(3)))
    with pytest.raises(DataError, match="holds 3 items, expected 4"):
        read_idx(path, IdxFile("labels", LABEL_MAGIC, 4, "0" * 64, 0))
    path.write_bytes(idx_bytes(LABEL_MAGIC, np.zeros(4))[:-1])
    with pytest.raises(DataError, match="payload is 3 bytes, expected 4"):
        read_idx(path, IdxFile("labels", LABEL_MAGIC, 4, "0" * 64, 0))


def test_checksum_mismatch(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(LABEL_MAGIC, np.zeros(2)))
    with pytest.raises(DataError, match="sha256 of the content is .* expected 0000"):
        read_idx(path, IdxFile("labels", LABEL_MAGIC, 2, "0" * 64, 0))


def test_not_found_names_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_EDGE_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "system")
    with pytest.raises(FileNotFoundError) as info:
        find_data_dir(tmp_path / "given")
    assert str(info.value) == f"--data-dir {tmp_path / 'given'} does not exist"
    (tmp_path / "given").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        find_data_dir(tmp_path / "given")
    message = str(info.value)
    for place in ("given", "env", "system", "cache/vae-edge/fashion-mnist"):
        assert str(tmp_path / place) in message
    assert "apt-get install dataset-fashion-mnist" in message and "--download" in message


def test_lookup_order(tmp_path, monkeypatch):
    payloads, _ = fake_files()
    env_dir = write_dir(tmp_path / "env", payloads)
    monkeypatch.setenv("VAE_EDGE_DATA_DIR", str(env_dir))
    assert find_data_dir() == env_dir
    given = write_dir(tmp_path / "given", payloads, compress=False)
    assert find_data_dir(given) == given


@pytest.fixture
def file_server(tmp_path):
    """A local HTTP server on loopback serving tmp_path/served."""
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_verifies_and_is_atomic(tmp_path, file_server):
    served, url = file_server
    payloads, entries = fake_files()
    write_dir(served, payloads)
    target = tmp_path / "cache"
    assert download(target, mirror=url, files=entries, log=lambda m: None) == target
    split = load_split("test", target, files=entries)
    assert len(split) == 5
    assert sorted(p.name for p in target.iterdir()) == sorted(n + ".gz" for n in payloads)


def test_download_corrupt_leaves_nothing(tmp_path, file_server):
    served, url = file_server
    payloads, entries = fake_files()
    payloads["t10k-labels-idx1-ubyte"] = idx_bytes(LABEL_MAGIC, np.full(5, 3))  # other content
    write_dir(served, payloads)
    target = tmp_path / "cache"
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*sha256 of the content"):
        download(target, mirror=url, files=entries, log=lambda m: None)
    names = sorted(p.name for p in target.iterdir())
    assert "t10k-labels-idx1-ubyte.gz" not in names
    assert not [n for n in names if n.endswith(".part")]


def test_download_missing_file_is_an_error(tmp_path, file_server):
    _, url = file_server
    _, entries = fake_files()
    with pytest.raises(OSError, match="404"):
        download(tmp_path / "cache", mirror=url, files=entries, log=lambda m: None)
    assert list((tmp_path / "cache").iterdir()) == []


def test_image_rows_read_only_their_rows_from_a_memory_map(tmp_path):
    from numpy.lib.format import open_memmap

    from vae_edge.training.data import ImageRows

    images = open_memmap(tmp_path / "images.npy", mode="w+", dtype=np.uint8, shape=(10, 3, 4, 4))
    images[:] = np.arange(10, dtype=np.uint8)[:, None, None, None]
    images.flush()
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")
    rows = ImageRows(mapped, np.array([7, 2, 5]), labels=np.arange(10) % 3)
    assert len(rows) == 3
    assert rows[np.array([2, 0])][:, 0, 0, 0].tolist() == [5, 7]
    assert rows[1:][:, 0, 0, 0].tolist() == [2, 5]
    assert rows.labels_at(np.array([0, 1])).tolist() == [1, 2]
    subset = rows.take(np.array([1]))
    assert len(subset) == 1 and subset[0:1][0, 0, 0, 0] == 2
