"""The evaluation on the tiny bundle (5,000-item catalog) with a few hundred test queries."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from .conftest import CATALOG_LIMIT, brute_force_log_q

SLIDER_QUERIES = 24
TEST_LIMIT = 300


@pytest.fixture(scope="module")
def splits(data_dir):
    from vae_edge.training.data import load_split

    return load_split("train", data_dir), load_split("test", data_dir)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, tiny_bundle, tiny_run, splits):
    from vae_edge.evaluation.report import EvalConfig, evaluate_bundle

    out = tmp_path_factory.mktemp("eval") / "report"
    evaluate_bundle(tiny_bundle, out, checkpoint=tiny_run[0] / "checkpoint.pt",
             config=EvalConfig(test_limit=TEST_LIMIT, is_images=40, is_samples=100,
                               slider_queries=SLIDER_QUERIES, slider_range=4.0),
             log=None, catalog_split=splits[0], test_split=splits[1])
    return out


@pytest.fixture(scope="module")
def report(report_dir):
    return json.loads((report_dir / "report.json").read_text())


def test_report_contents(report, tiny_run):
    assert report["test_images"] == TEST_LIMIT
    assert report["catalog"] == {"split": "train", "size": CATALOG_LIMIT}
    assert report["latent_dim"] == 8
    assert report["checkpoint_vs_index_max_rel_diff"] <= 1e-3
    lik = report["likelihood"]
    assert lik["backend"] == "pytorch-checkpoint"
    assert (lik["is_images"], lik["is_samples"]) == (40, 100)
    assert lik["kl"] > 0 and lik["recon_at_mu"] > 0
    assert lik["negative_elbo"] == pytest.approx(lik["recon"] + lik["kl_is_images"])
    # logmeanexp >= mean on the same samples: the IS bound is never looser than the ELBO's.
    assert lik["negative_log_likelihood_is"] <= lik["negative_elbo"]
    # recon at mu agrees with the training loop's own test metric on its 500 test images
    # only loosely (other images); both are hundreds of nats for a 1-epoch model.
    assert 50 < lik["recon_at_mu"] < 600
    for key in ("likelihood_mu", "expected_likelihood", "pixels_l2"):
        metrics = report["retrieval"][key]
        for name in ("nn1", "knn5", "precision_at_10"):
            assert 0.0 <= metrics[name] <= 1.0
    # The 1-epoch tiny model is nearly collapsed, so only raw pixels must beat chance clearly.
    assert report["retrieval"]["pixels_l2"]["nn1"] > 0.6
    assert 0 <= report["active_units"]["count"] <= 8
    assert len(report["active_units"]["variance_of_mu"]) == 8
    assert 0.0 < report["reconstruction_mse"] < 0.2


def test_slider_scenario_by_hand(report, runtime, splits):
    """Each figure recomputed from the runtime, the catalog images and np.corrcoef."""
    from vae_edge.evaluation.report import slider_queries

    section = report["slider_scenario"]
    assert (section["queries_per_source"], section["range"]) == (SLIDER_QUERIES, 4.0)
    catalog = splits[0].images[runtime.index.ids].reshape(len(runtime.index), -1) / 255.0
    for source, z in slider_queries(runtime.latent_dim, SLIDER_QUERIES, 4.0, 0).items():
        figures = section["sources"][source]
        if source == "corners":
            assert (np.abs(z) == 4.0).all()
        decoded = runtime.decode(z).reshape(len(z), -1).astype(np.float64)
        pixel_nearest = [int(np.argmin(((catalog - image) ** 2).sum(axis=1)))
                         for image in decoded]
        for name, rows in (("latent", runtime.nearest(z, k=1).rows[:, 0]),
                           ("decoded", runtime.nearest(z, k=1, by="decoded").rows[:, 0]),
                           ("pixel_nearest", pixel_nearest)):
            correlation = [np.corrcoef(decoded[i], catalog[row])[0, 1]
                           for i, row in enumerate(rows)]
            assert figures[name]["median"] == pytest.approx(np.median(correlation), abs=1e-4)
            assert figures[name]["q25"] == pytest.approx(np.quantile(correlation, 0.25),
                                                         abs=1e-4)
        assert figures["distance"]["median"] == pytest.approx(
            np.median(runtime.roundtrip_distance(z)), abs=1e-4)
        assert -1.0 <= figures["random"]["median"] <= 1.0


def test_pictures_written(report_dir, report):
    from PIL import Image

    expected = {"loss_curves", "traversal", "prior_samples", "projection", "query_sheet",
                "query_sheet_pixels", "slider_sheet"}
    assert set(report["pictures"]) == expected
    for name in report["pictures"].values():
        with Image.open(report_dir / "pictures" / name) as picture:
            assert picture.format == "PNG" and min(picture.size) > 100


def test_retrieval_matches_brute_force(report, tiny_bundle, splits):
    """Recompute all three retrievals for the queries from scratch and compare the figures."""
    from vae_edge.evaluation.report import label_metrics
    from vae_edge.runtime import Runtime

    rt = Runtime.load(tiny_bundle)
    train, test = splits
    images, labels = test.images[:TEST_LIMIT], test.labels[:TEST_LIMIT].astype(np.int64)
    mu, log_sigma = rt.encode(images)
    cat_labels = rt.index.labels.astype(np.int64)

    scores = brute_force_log_q(mu.astype(np.float64), rt.index.mu, rt.index.log_sigma)
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    assert report["retrieval"]["likelihood_mu"]["nn1"] == pytest.approx(
        label_metrics(cat_labels[rows], labels, 10)["nn1"])
    assert report["retrieval"]["likelihood_mu"]["precision_at_10"] == pytest.approx(
        label_metrics(cat_labels[rows], labels, 10)["precision_at_10"])

    # Expected log-likelihood by Monte Carlo-free definition, term by term.
    m16, s16 = rt.index.mu.astype(np.float64), rt.index.log_sigma.astype(np.float64)
    s2 = np.exp(2.0 * log_sigma.astype(np.float64))
    quad = ((mu.astype(np.float64)[:, None, :] - m16[None]) ** 2 + s2[:, None, :]) / (
        2.0 * np.exp(2.0 * s16)[None])
    expected = -quad.sum(axis=2) - s16.sum(axis=1)[None]
    rows = np.argsort(-expected, axis=1, kind="stable")[:, :10]
    assert report["retrieval"]["expected_likelihood"]["precision_at_10"] == pytest.approx(
        label_metrics(cat_labels[rows], labels, 10)["precision_at_10"])

    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    c = train.images[:CATALOG_LIMIT].reshape(CATALOG_LIMIT, -1).astype(np.float64) / 255.0
    dist = ((x[:, None, :] - c[None]) ** 2).sum(axis=2)
    rows = np.argsort(dist, axis=1, kind="stable")[:, :10]
    pixel = label_metrics(train.labels[:CATALOG_LIMIT].astype(np.int64)[rows], labels, 10)
    for name in ("nn1", "knn5", "precision_at_10"):
        assert report["retrieval"]["pixels_l2"][name] == pytest.approx(pixel[name])


def test_label_metrics_by_hand():
    from vae_edge.evaluation.report import label_metrics

    neighbours = np.array([[1, 2, 2, 1, 0, 0, 0, 0, 0, 0],  # 5-vote: 1 and 2 tie -> 1 ranks first
                           [3, 3, 3, 3, 3, 3, 3, 3, 3, 3]])
    result = label_metrics(neighbours, np.array([1, 4]), 10)
    assert result == {"nn1": 0.5, "knn5": 0.5, "precision_at_10": pytest.approx(0.1)}
    with pytest.raises(ValueError, match=r"neighbour labels must be \(Q, k\) with Q = 3"):
        label_metrics(neighbours, np.array([1, 2, 3]), 10)


def test_onnx_backend_agrees_with_pytorch(tiny_bundle, tiny_run, splits):
    """Without a checkpoint the likelihoods come from decoder.onnx: the same up to float32."""
    from vae_edge.evaluation.report import OnnxDecoder, TorchDecoder, importance_sampled
    from vae_edge.runtime import Runtime
    from vae_edge.training.train import load_checkpoint

    rt = Runtime.load(tiny_bundle)
    images = splits[1].images[:7]
    x = images.reshape(7, -1).astype(np.float32) / 255.0
    mu, log_sigma = rt.encode(images)
    checkpoint = load_checkpoint(tiny_run[0] / "checkpoint.pt")
    results = [importance_sampled(decoder, x, mu, log_sigma, samples=100, seed=3)
               for decoder in (TorchDecoder(checkpoint), OnnxDecoder(rt))]
    np.testing.assert_allclose(results[0]["log_px"], results[1]["log_px"], rtol=1e-4)
    np.testing.assert_allclose(results[0]["recon"], results[1]["recon"], rtol=1e-4)


def test_wrong_checkpoint_is_refused(tiny_bundle, tmp_path, splits, data_dir):
    from vae_edge.evaluation.report import EvalConfig, evaluate_bundle
    from vae_edge.training.model import VAEConfig
    from vae_edge.training.train import TrainConfig, train

    other = tmp_path / "other"
    train(VAEConfig(latent_dim=8, channels=(8, 16), hidden_dim=32),
          TrainConfig(epochs=1, batch_size=64, subset=200, test_subset=50, seed=1), other,
          data_dir=data_dir, progress=False, log=lambda message: None)
    with pytest.raises(ValueError, match="is not the model of bundle"):
        evaluate_bundle(tiny_bundle, tmp_path / "report", checkpoint=other / "checkpoint.pt",
                 config=EvalConfig(test_limit=7, is_images=1, is_samples=2, pictures=False),
                 log=None, catalog_split=splits[0], test_split=splits[1])
    assert not (tmp_path / "report").exists()


def test_config_validation():
    from vae_edge.evaluation.report import EvalConfig

    with pytest.raises(ValueError, match="test_limit must be None or >= 1, got 0"):
        EvalConfig(test_limit=0)
    with pytest.raises(ValueError, match="is_samples must be >= 1, got 0"):
        EvalConfig(is_samples=0)


def test_cli_without_checkpoint(tiny_bundle, tmp_path):
    from vae_edge.evaluation.cli import main

    out = tmp_path / "report"
    args = [str(tiny_bundle), "--out", str(out), "--test-limit", "64", "--is-images", "7",
            "--is-samples", "101", "--no-pictures"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "raw pixels L2 (baseline)" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["likelihood"]["backend"] == "onnx-decoder"
    assert report["likelihood"]["is_samples"] == 101
    assert "pictures" not in report and not (out / "pictures").exists()

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2
    assert f"{out} exists: pass --force to replace it" in again.output


def test_cli_errors(tmp_path):
    from vae_edge.evaluation.cli import main

    missing = tmp_path / "nope"
    result = CliRunner().invoke(main, [str(missing), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert f"bundle directory not found: {missing}" in result.output
    result = CliRunner().invoke(main, ["--out", str(tmp_path / "r"), "--is-samples", "0"])
    assert result.exit_code == 2
    assert "Invalid value for '--is-samples'" in result.output
