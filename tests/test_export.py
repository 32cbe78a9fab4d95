"""End to end: 1 epoch on 2,000 real images -> export -> runtime agrees with torch."""

import json

import numpy as np
import onnx
import pytest
import torch

from tests.conftest import CATALOG_LIMIT, brute_force_log_q
from vae_edge.export import build
from vae_edge.export.build import ExportError, build_bundle, encode_catalog
from vae_edge.runtime import Runtime
from vae_edge.runtime.bundle import sha256_file
from vae_edge.training.data import load_split
from vae_edge.training.train import model_from_checkpoint, to_tensor


def test_bundle_files_and_manifest(tiny_bundle, tiny_run):
    names = sorted(p.name for p in tiny_bundle.iterdir())
    assert names == ["decoder.onnx", "encoder.onnx", "index_labels.npy", "index_log_sigma.npy",
                     "index_mu.npy", "items.csv", "manifest.json"]
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and manifest["latent_dim"] == 8
    assert manifest["thumbnails"] is None and manifest["items"]["columns"] == ["id"]
    ids = (tiny_bundle / "items.csv").read_text().splitlines()
    assert ids == ["id"] + [str(row) for row in range(manifest["index"]["size"])]
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(tiny_bundle / name)
    assert manifest["parity"]["max_abs_diff"] <= 1e-4
    assert set(manifest["parity"]["batches"]) == {"1", "7", "64"}
    assert manifest["metrics"]["test_loss"] == tiny_run[1]["history"][-1]["test_loss"]
    assert manifest["dataset"]["train"]["train-images-idx3-ubyte"].startswith("c59f468a")
    assert manifest["index"]["size"] == CATALOG_LIMIT
    assert manifest["versions"]["onnxruntime"] != "unknown"


def test_graphs_have_no_random_nodes_and_dynamic_batch(tiny_bundle):
    for name, input_name in (("encoder.onnx", "images"), ("decoder.onnx", "z")):
        model = onnx.load(str(tiny_bundle / name))
        onnx.checker.check_model(model, full_check=True)
        assert not [n.op_type for n in model.graph.node if n.op_type.startswith("Random")]
        assert [i.name for i in model.graph.input] == [input_name]
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
        assert not list(tiny_bundle.glob("*.data"))  # single-file graphs


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_runtime_matches_torch(runtime, tiny_run, batch):
    model = model_from_checkpoint(tiny_run[1])
    rng = np.random.default_rng(batch)
    z = rng.normal(size=(batch, 8)) * 2
    images = rng.integers(0, 256, size=(batch, 28, 28), dtype=np.uint8)
    with torch.no_grad():
        expected_images = model.decode(torch.tensor(z, dtype=torch.float32)).numpy()
        mu, log_var = model.encode(to_tensor(images))
    assert np.abs(runtime.decode(z) - expected_images).max() <= 1e-4
    got_mu, got_log_sigma = runtime.encode(images)
    assert np.abs(got_mu - mu.numpy()).max() <= 1e-4
    assert np.abs(got_log_sigma - 0.5 * log_var.numpy()).max() <= 1e-4


def test_index_is_the_float16_encoding_of_the_catalog(runtime, tiny_run, data_dir):
    """The index is the float16 rounding of the encoder's output, computed as export computes
    it (encode_catalog's batches): bit for bit. Torch's float32 kernels differ with the batch
    shape and the CPU's vector units (AVX2, AVX-512), so the encoder's output for other batches
    is promised only within float32 noise, which the float16 rounding can turn into one float16
    step: at most 2^-10 of the value, 2^-24 near zero."""
    model = model_from_checkpoint(tiny_run[1])
    split = load_split("train", data_dir)
    mu, log_sigma = encode_catalog(model, split.images[:CATALOG_LIMIT])
    assert runtime.index.mu.dtype == runtime.index.log_sigma.dtype == np.float16
    np.testing.assert_array_equal(runtime.index.mu, mu.astype(np.float16))
    np.testing.assert_array_equal(runtime.index.log_sigma, log_sigma.astype(np.float16))
    np.testing.assert_array_equal(runtime.index.labels, split.labels[:CATALOG_LIMIT])
    with torch.no_grad():  # another batch shape: other kernels
        other_mu, other_log_var = model.encode(to_tensor(split.images[:100]))
    for stored, encoded in ((runtime.index.mu[:100], other_mu.numpy()),
                            (runtime.index.log_sigma[:100], 0.5 * other_log_var.numpy())):
        one_step = np.maximum(np.abs(encoded) * 2.0**-10, 2.0**-24)
        assert (np.abs(stored.astype(np.float32) - encoded) <= one_step).all()


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_nearest_equals_float64_brute_force(runtime, batch):
    rng = np.random.default_rng(100 + batch)
    # Queries near catalog items (the real use) and from the prior.
    z = np.concatenate([runtime.index.mu[rng.integers(0, CATALOG_LIMIT, batch // 2)]
                        .astype(np.float64) + rng.normal(size=(batch // 2, 8)) * 0.05,
                        rng.normal(size=(batch - batch // 2, 8)) * 3])
    reference = brute_force_log_q(z, runtime.index.mu, runtime.index.log_sigma)
    matches = runtime.nearest(z, k=10)
    expected_rows = np.argsort(-reference, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(matches.ids, runtime.index.ids[expected_rows])
    np.testing.assert_allclose(matches.log_likelihoods,
                               np.take_along_axis(reference, expected_rows, axis=1), rtol=1e-9)


@pytest.mark.slow  # exports two bundles
def test_export_refuses_existing_bundle_and_replaces_with_force(tiny_run, tiny_bundle, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="exists: pass --force to replace it"):
        build_bundle(tiny_run[0] / "checkpoint.pt", out, limit=10, log=lambda m: None)
    build_bundle(tiny_run[0] / "checkpoint.pt", out, limit=10, force=True, log=lambda m: None)
    assert not (out / "keep.txt").exists()
    assert Runtime.load(out).index.mu.shape == (10, 8)
    # no temporary left over; the lock file edits and exports of the bundle take turns on
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.lock", "bundle"]
    # Through a symbolic link (bundles/current -> v3) the link stays, to the new bundle.
    link = tmp_path / "current"
    link.symlink_to("bundle")
    build_bundle(tiny_run[0] / "checkpoint.pt", link, limit=7, force=True, log=lambda m: None)
    assert link.is_symlink() and Runtime.load(out).index.mu.shape == (7, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.lock", "bundle", "current"]


@pytest.mark.slow  # exports two bundles
def test_failed_export_keeps_the_previous_bundle(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    build_bundle(tiny_run[0] / "checkpoint.pt", out, limit=10, log=lambda m: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = {"batches": {"1": {"encoder": 1.0, "decoder": 0.0}}, "max_abs_diff": 1.0,
           "tolerance": 1e-4}
    monkeypatch.setattr(build, "parity", lambda *args, **kwargs: bad)
    with pytest.raises(ExportError, match="ONNX outputs differ from PyTorch by 1 > 0.0001"):
        build_bundle(tiny_run[0] / "checkpoint.pt", out, limit=10, force=True,
                     log=lambda m: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.lock", "bundle"]
