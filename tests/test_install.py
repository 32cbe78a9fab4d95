"""`pip install .` (not editable) into a fresh venv without torch, then `vae-run` from anywhere."""

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # builds and installs a wheel

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("venv")
    venv.create(root, with_pip=True, clear=True)
    python = root / "bin" / "python"
    # Build from a copy so the test never writes build/ or *.egg-info into the checkout.
    source = tmp_path_factory.mktemp("source") / "vae-edge"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".venv*", ".*_cache"))
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-input", str(source)],
        capture_output=True, text=True, timeout=900, cwd=root,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def test_vae_run_nearest_from_a_fresh_install(fresh_venv, tmp_path):
    """The installed CLI answers with the shipped bundle exactly as the Runtime here does."""
    from vae_edge.runtime import Runtime

    python = fresh_venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0, "torch must not be installed by the base package"
    probe = subprocess.run([str(python), "-c", "import onnx"], capture_output=True)
    assert probe.returncode != 0, "onnx must not be installed by the base package"

    info = subprocess.run([str(fresh_venv / "bin" / "vae-run"), "info", "--json"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "site-packages" in json.loads(info.stdout)["bundle"]
    shipped = Runtime.load()  # the same models/default, from the checkout
    assert json.loads(info.stdout)["catalog_size"] == len(shipped.index)

    z = np.resize([0.5, -1.2], shipped.latent_dim)
    result = subprocess.run([str(fresh_venv / "bin" / "vae-run"), "nearest", "-k", "5", "--json",
                             "--z", ",".join(map(str, z))],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    installed = json.loads(result.stdout)["results"]
    expected = shipped.nearest(z, k=5)
    assert [r["id"] for r in installed] == expected.ids.tolist()
    assert [r["label_id"] for r in installed] == expected.labels.tolist()
    # Another numpy build may round the float64 rescoring differently in the last bits.
    np.testing.assert_allclose([r["log_likelihood"] for r in installed],
                               expected.log_likelihoods, rtol=1e-9)
    np.testing.assert_allclose([r["probability"] for r in installed],
                               expected.probabilities, rtol=1e-9)


def test_repo_is_not_on_the_path(fresh_venv, tmp_path):
    code = "import vae_edge.runtime as r, sys; print(r.__file__)"
    result = subprocess.run([str(fresh_venv / "bin" / "python"), "-c", code],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "site-packages" in result.stdout
    assert sys.prefix not in result.stdout


def test_export_web_from_a_fresh_install(fresh_venv, tmp_path):
    """The wheel carries the page and the vendored onnxruntime-web files export-web copies
    (each checked against its pinned sha256 on the way)."""
    site = tmp_path / "site"
    result = subprocess.run([str(fresh_venv / "bin" / "vae-run"), "export-web", "-o", str(site)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    info = json.loads((site / "api" / "info").read_text())
    for name in info["site"]["cache"]:
        assert (site / name).is_file(), name
    assert (site / "static" / "ort" / "ort-wasm-simd-threaded.wasm").stat().st_size > 1e6
