"""Shared fixtures: one tiny model trained on real Fashion-MNIST, exported once per session."""

from __future__ import annotations

import contextlib
import os
import textwrap
import threading

import numpy as np
import pytest

TINY_MODEL = {"latent_dim": 8, "channels": (8, 16), "hidden_dim": 32}
TINY_TRAIN = {"epochs": 1, "batch_size": 64, "subset": 2000, "test_subset": 500, "seed": 0}
CATALOG_LIMIT = 5000


def _require_data():
    from vae_edge.training.data import find_data_dir

    try:
        return find_data_dir()
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            raise  # CI installs dataset-fashion-mnist: missing data there is a failure
        pytest.skip(f"Fashion-MNIST not installed: {exc}")


BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "onnx", "onnxscript", "matplotlib"):
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Block())
    """
)


@pytest.fixture(scope="session")
def without_torch():
    """code -> the same Python source for `python -c`, run where torch, onnx, onnxscript and
    matplotlib (the training extra) cannot be imported, as on a kiosk that installed the
    runtime alone."""
    return lambda code: BLOCK_TORCH + textwrap.dedent(code)


@pytest.fixture(scope="session")
def data_dir():
    return _require_data()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_dir):
    """(run directory, checkpoint dict) of a 1-epoch, 2,000-image tiny VAE."""
    from vae_edge.training.model import VAEConfig
    from vae_edge.training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny_run")
    checkpoint = train(VAEConfig(**TINY_MODEL), TrainConfig(**TINY_TRAIN), out,
                       data_dir=data_dir, progress=False, log=lambda message: None)
    return out, checkpoint


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_run, data_dir):
    """A bundle exported from the tiny run, with a 5,000-item catalog."""
    from vae_edge.export.build import build_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    build_bundle(tiny_run[0] / "checkpoint.pt", out, data_dir=data_dir, limit=CATALOG_LIMIT,
                 log=lambda message: None)
    return out


@pytest.fixture(scope="session")
def runtime(tiny_bundle):
    from vae_edge.runtime import Runtime

    return Runtime.load(tiny_bundle)


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    """A private copy of the tiny bundle that a test may damage."""
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def brute_force_log_q(z: np.ndarray, mu16: np.ndarray, log_sigma16: np.ndarray) -> np.ndarray:
    """log q(z|x) by its definition in float64, loop-free, on the dequantized index."""
    mu = mu16.astype(np.float64)
    log_sigma = log_sigma16.astype(np.float64)
    sigma = np.exp(log_sigma)
    d = mu.shape[1]
    terms = -((z[:, None, :] - mu[None]) ** 2) / (2 * sigma[None] ** 2) - log_sigma[None]
    return terms.sum(axis=2) - d / 2 * np.log(2 * np.pi)


def start_kiosk(server):
    """A bound kiosk server (make_server) serving in a daemon thread; stop_kiosk ends it."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop_kiosk(server) -> None:
    """Stop a server start_kiosk started (its requests in flight finish) and close its socket."""
    server.shutdown()  # returns once serve_forever has
    server.server_close()


@contextlib.contextmanager
def serving(server):
    """The kiosk server serving for the block's duration."""
    start_kiosk(server)
    try:
        yield server
    finally:
        stop_kiosk(server)


@pytest.fixture(scope="session")
def shop(tmp_path_factory):
    """(catalog CSV, bundle) of a tiny model trained on a 36-item colour catalog."""
    from click.testing import CliRunner

    from tests.test_catalog_training import TINY, make_catalog, run_train
    from vae_edge.export.cli import main as export_main

    work = tmp_path_factory.mktemp("shop")
    csv = make_catalog(work / "catalog")
    trained = run_train("--catalog", csv, "--out", work / "run", "--epochs", "12",
                        "--cache-dir", work / "cache", *TINY)
    assert trained.exit_code == 0, trained.output
    bundle = work / "bundle"
    exported = CliRunner().invoke(export_main, [str(work / "run" / "checkpoint.pt"), "-o",
                                                str(bundle), "--thumbnail-size", "32"])
    assert exported.exit_code == 0, exported.output
    return csv, bundle

