"""Interrupted work loses nothing: real subprocesses, killed with SIGKILL mid-write.

- vae-train killed during its second epoch, then --resume: the same weights, optimizer
  state and metrics, bit for bit, as a run that was never interrupted.
- vae-export killed while writing a new bundle over an old one: the old one is untouched,
  and the next export removes what the killed one left behind.
- the data download killed mid-file: the previous file is untouched, no file that looks
  complete appears, and the next download removes the partial file.
- vae-train --catalog killed while decoding photos into the cache: no cache that looks
  complete appears, and the next run removes the partial one and decodes the photos again.
"""

from __future__ import annotations

import gzip
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vae_edge.runtime import Runtime
from vae_edge.runtime.atomic import recover_directory, stale_temporaries
from vae_edge.training.data import FILES, IMAGE_MAGIC, IdxFile, download, load_split
from vae_edge.training.train import load_checkpoint

# One thread: the same arithmetic in every process (and a fair share of a busy CI box).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TRAIN_ARGS = ["--latent-dim", "4", "--widths", "4,8", "--hidden-dim", "16", "--epochs", "3",
              "--batch-size", "32", "--subset", "3000", "--test-subset", "200", "--seed", "3",
              "--kl-warmup-epochs", "2", "--no-progress"]
POLL = 0.02
STEP = 0.002  # kill_once_it_writes runs the process this long between looks


def console(name: str, module: str) -> list[str]:
    """The installed console script beside this Python, else the same entry point via -c."""
    script = Path(sys.executable).parent / name
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", f"from vae_edge.{module}.cli import main; main()"]


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 300.0):
    """Poll until condition() is truthy; fail clearly if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if process.poll() is not None:
            raise AssertionError(f"process ended (status {process.returncode}) before {what}:\n"
                                 f"{process.stdout.read() if process.stdout else ''}")
        time.sleep(POLL)
    process.kill()
    raise AssertionError(f"timed out waiting for {what}")


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def strip_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.slow  # trains twice
def test_train_killed_mid_epoch_resumes_bit_identical(tmp_path, data_dir):
    train = console("vae-train", "training")
    common = [*TRAIN_ARGS, "--data-dir", str(data_dir)]
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([*train, "--out", str(straight_dir), *common], env=ENV, check=True,
                   capture_output=True, text=True, timeout=600)

    process = subprocess.Popen([*train, "--out", str(killed_dir), *common], env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The epoch-1 line is printed once its checkpoint is on disk; epoch 2 starts at once.
        line = process.stdout.readline()
        while line and not line.startswith("epoch 1/3"):
            line = process.stdout.readline()
        assert line.startswith("epoch 1/3"), line
        epoch_seconds = float(line.rsplit(None, 1)[-1].rstrip("s"))
        time.sleep(0.3 * epoch_seconds)  # about a third into epoch 2
        kill(process)
    finally:
        process.kill()
        process.stdout.close()
    assert load_checkpoint(killed_dir / "checkpoint.pt")["epoch"] == 1  # killed within epoch 2
    # Whatever else a kill can leave: a temporary written by the now-dead process.
    stale = killed_dir / f".checkpoint.pt.{process.pid}.x1y2z3.tmp"
    stale.write_bytes(b"half a checkpoint")

    resumed = subprocess.run([*train, "--out", str(killed_dir), *common, "--resume"], env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"removed {stale.name}, left behind by an interrupted run" in resumed.stdout
    assert "resuming after epoch 1 of 3" in resumed.stdout

    a = load_checkpoint(straight_dir / "checkpoint.pt")
    b = load_checkpoint(killed_dir / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 3
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for state_a, state_b in zip(a["optimizer"]["state"].values(),
                                b["optimizer"]["state"].values()):
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), key
    assert strip_seconds(a["history"]) == strip_seconds(b["history"])
    rows = [json.loads(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert strip_seconds(rows) == strip_seconds(a["history"])
    assert sorted(p.name for p in killed_dir.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]


def bundle_bytes(bundle: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(bundle.iterdir())}


def kill_once_it_writes(command: list[str], bundle: Path) -> list[Path]:
    """Run command, SIGKILL it once its new bundle directory beside `bundle` holds a file;
    returns that `.partial` directory (in a list). The process runs in slices of STEP
    seconds and is stopped (SIGSTOP) while the directory is looked at, so a write that takes
    a few milliseconds on a fast machine is caught as surely as a slow one."""
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)

    def partial_with_a_file():
        return [p for p in bundle.parent.glob(f".{bundle.name}.*.partial") if any(p.iterdir())]

    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            stop_and_wait(process)
            partial = partial_with_a_file()
            if partial:
                kill(process)
                return partial
            if process.poll() is not None:
                raise AssertionError(f"process ended (status {process.returncode}) before "
                                     f"the new bundle's first file:\n{process.stdout.read()}")
            os.kill(process.pid, signal.SIGCONT)
            time.sleep(STEP)
        raise AssertionError("timed out waiting for the new bundle's first file")
    finally:
        process.kill()
        process.stdout.close()


def stop_and_wait(process: subprocess.Popen) -> None:
    """SIGSTOP the process and wait until it has stopped (or ended)."""
    os.kill(process.pid, signal.SIGSTOP)
    stat = Path(f"/proc/{process.pid}/stat")
    while True:
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        if state in "TtZX":
            return
        time.sleep(0.0005)


@pytest.mark.slow  # exports twice
def test_export_killed_mid_write_keeps_the_previous_bundle(tmp_path, tiny_run, bundle_copy,
                                                           data_dir):
    previous = bundle_bytes(bundle_copy)
    command = [*console("vae-export", "export"), str(tiny_run[0] / "checkpoint.pt"),
               "-o", str(bundle_copy), "--force", "--limit", "10", "--data-dir", str(data_dir)]
    partial = kill_once_it_writes(command, bundle_copy)
    assert bundle_bytes(bundle_copy) == previous  # the old bundle, byte for byte
    assert len(Runtime.load(bundle_copy).index) == 5000
    assert partial[0].exists()  # SIGKILL gives no chance to clean up ...

    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"removed {partial[0].name}, left behind by an interrupted run" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.lock", "bundle"]  # ... so
    assert len(Runtime.load(bundle_copy).index) == 10  # the next run cleans up and succeeds


def test_export_killed_between_its_renames_restores_the_previous_bundle(tmp_path, bundle_copy):
    """The one window real kills cannot hit on purpose: the old bundle moved aside, the new
    one not yet renamed in. Built by hand with the names a dead export (pid) leaves."""
    previous = bundle_bytes(bundle_copy)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    parked = tmp_path / f".bundle.{pid}.abcd1234.old"
    bundle_copy.rename(parked)
    (tmp_path / f".bundle.{pid}.efgh5678.partial").mkdir()
    messages = []
    recover_directory(bundle_copy, messages.append)
    assert bundle_bytes(bundle_copy) == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert any(m.startswith(f"restored the previous {bundle_copy} from {parked.name}")
               for m in messages), messages


def test_temporaries_of_live_writers_are_left_alone(tmp_path):
    target = tmp_path / "bundle"
    mine = tmp_path / f".bundle.{os.getpid()}.abc.partial"
    legacy = tmp_path / ".bundle.k3j4h5g6.partial"  # written before pids were recorded
    other = tmp_path / ".bundles.1.abc.partial"  # another target's
    for path in (mine, legacy, other):
        path.mkdir()
    assert stale_temporaries(target, ".partial") == [legacy]


# --- the data download ---------------------------------------------------------------------

class SlowFiles:
    """Serves gzipped payloads; one file sends its first 64 KiB, then waits for release."""

    def __init__(self, payloads: dict[str, bytes], slow: str):
        self.payloads, self.slow = payloads, slow
        self.release = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = owner.payloads.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    if self.path.lstrip("/") == owner.slow and not owner.release.is_set():
                        self.wfile.write(body[: 1 << 16])
                        self.wfile.flush()
                        owner.release.wait(60)
                        return  # the client was killed: drop the connection
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def fake_dataset(count: int = 300):
    """Four IDX payloads (random, so they do not compress) and entries expecting them."""
    import hashlib

    rng = np.random.default_rng(0)
    payloads, entries = {}, {}
    for key, real in FILES.items():
        dims = (count, 28, 28) if real.magic == IMAGE_MAGIC else (count,)
        array = rng.integers(0, 256 if len(dims) == 3 else 10, dims).astype(np.uint8)
        raw = real.magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in dims)
        raw += array.tobytes()
        payloads[real.name + ".gz"] = gzip.compress(raw, mtime=0)
        entries[key] = IdxFile(real.name, real.magic, count, hashlib.sha256(raw).hexdigest(),
                               len(raw))
    return payloads, entries


DOWNLOAD_SCRIPT = """
import json, sys
from vae_edge.training.data import IdxFile, download
entries = {k: IdxFile(**v) for k, v in json.loads(sys.argv[3]).items()}
download(sys.argv[1], mirror=sys.argv[2], files=entries, log=print)
"""


def test_download_killed_mid_file_keeps_the_previous_file(tmp_path):
    payloads, entries = fake_dataset()
    slow = "t10k-images-idx3-ubyte.gz"
    server = SlowFiles(payloads, slow)
    target = tmp_path / "cache"
    target.mkdir()
    previous = b"an older, invalid copy"  # present but invalid: it will be downloaded again
    (target / slow).write_bytes(previous)
    spec = json.dumps({k: vars(v) for k, v in entries.items()})
    process = subprocess.Popen([sys.executable, "-c", DOWNLOAD_SCRIPT, str(target), server.url,
                                spec], env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)

    def partial_with_data():
        return [p for p in target.glob(f".{slow}.*.part") if p.stat().st_size > 0]

    try:
        partial = wait_for(partial_with_data, process, "the download wrote part of the file")
        kill(process)
    finally:
        process.kill()
        process.stdout.close()
        server.release.set()
    try:
        assert (target / slow).read_bytes() == previous
        assert partial[0].stat().st_size == 1 << 16  # what a SIGKILL leaves: a .part file
        done = sorted(p.name for p in target.iterdir() if not p.name.startswith("."))
        assert slow in done and "t10k-labels-idx1-ubyte.gz" not in done  # nothing after it

        messages = []
        download(target, mirror=server.url, files=entries, log=messages.append)
    finally:
        server.close()
    assert f"removed {partial[0].name}, left behind by an interrupted run" in messages
    assert sorted(p.name for p in target.iterdir()) == sorted(payloads)
    assert len(load_split("test", target, files=entries)) == 300


@pytest.mark.slow
def test_killed_photo_cache_is_never_taken_for_complete(tmp_path):
    from tests.test_catalog_training import make_catalog

    csv_path, cache = make_catalog(tmp_path / "shop", items=600), tmp_path / "cache"
    args = [*console("vae-train", "training"), "--catalog", str(csv_path), "--cache-dir",
            str(cache), "--image-size", "64", *TRAIN_ARGS[:6], "--epochs", "1", "--no-progress"]
    process = subprocess.Popen([*args, "--out", str(tmp_path / "killed")], env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: list(cache.glob(".*.npy.*.tmp")), process, "the cache was started")
        kill(process)
    finally:
        process.kill()
        process.stdout.close()
    assert list(cache.glob(".*.npy.*.tmp"))  # killed while writing it
    assert not list(cache.glob("*.npy"))  # and no file that looks like a cache
    assert not (tmp_path / "killed" / "checkpoint.pt").exists()

    result = subprocess.run([*args, "--out", str(tmp_path / "run")], env=ENV, text=True,
                            capture_output=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "left behind by an interrupted run" in result.stdout
    assert "photos: decoding 600 photos" in result.stdout
    # the pixels, their record and the thumbnails an export takes from the cache
    assert [p.suffix for p in sorted(cache.iterdir())] == [".json", ".npy", ".webp"]
