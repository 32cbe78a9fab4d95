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


def test_report_contents(report, runtime, tiny_run, splits):
    """Every figure of the report besides retrieval and the slider scenario, recomputed."""
    from vae_edge.training.train import mean_loss_parts_at_mu, model_from_checkpoint

    assert report["test_images"] == TEST_LIMIT
    assert report["catalog"] == {"split": "train", "size": CATALOG_LIMIT}
    assert report["latent_dim"] == 8
    assert report["checkpoint_vs_index_max_rel_diff"] <= 1e-3
    images = splits[1].images[:TEST_LIMIT]
    # What vae-train logs as test_recon / test_kl / mse, on the same images: the report gets
    # the same from encoder.onnx's mu and the checkpoint's decoder (onnx for the MSE).
    logged = mean_loss_parts_at_mu(model_from_checkpoint(tiny_run[1]), images)
    lik = report["likelihood"]
    assert lik["backend"] == "pytorch-checkpoint"
    assert lik["recon_at_mu"] == pytest.approx(logged["recon"], rel=1e-5)
    assert lik["kl"] == pytest.approx(logged["kl"], rel=1e-4)
    assert lik["loss_at_mu"] == pytest.approx(lik["recon_at_mu"] + lik["kl"])
    assert report["reconstruction_mse"] == pytest.approx(logged["mse"], rel=1e-4)
    assert (lik["is_images"], lik["is_samples"]) == (40, 100)
    assert lik["negative_elbo"] == pytest.approx(lik["recon"] + lik["kl_is_images"])
    # logmeanexp >= mean on the same samples: the IS bound is never looser than the ELBO's.
    assert lik["negative_log_likelihood_is"] <= lik["negative_elbo"]

    mu, _ = runtime.encode(images)
    variances = mu.astype(np.float64).var(axis=0)
    assert report["active_units"]["variance_of_mu"] == pytest.approx(variances, abs=1e-5)
    assert report["active_units"]["count"] == int((variances > 0.01).sum())


def test_slider_scenario_by_hand(report, runtime, splits):
    """Each figure recomputed from the top rows, the catalog images and np.corrcoef."""
    from vae_edge.evaluation.report import slider_queries, slider_scenario

    catalog_images = splits[0].images[runtime.index.ids.astype(np.int64)]
    section, tops = slider_scenario(runtime, catalog_images, SLIDER_QUERIES, 4.0, seed=0)
    assert section == report["slider_scenario"]  # what the report holds, seeded
    assert (section["queries_per_source"], section["range"]) == (SLIDER_QUERIES, 4.0)
    catalog = catalog_images.reshape(len(catalog_images), -1) / 255.0
    queries = slider_queries(runtime.latent_dim, SLIDER_QUERIES, 4.0, 0)
    assert list(section["sources"]) == list(queries) == ["normal", "uniform", "corners"]
    assert (np.abs(queries["corners"]) == 4.0).all()
    assert (np.abs(queries["uniform"]) <= 4.0).all()
    for source, z in queries.items():
        figures, (top_z, rows) = section["sources"][source], tops[source]
        np.testing.assert_array_equal(top_z, z)
        decoded = runtime.decode(z).reshape(len(z), -1).astype(np.float64)
        distances = ((decoded * decoded).sum(axis=1)[:, None] + (catalog * catalog).sum(axis=1)
                     - 2.0 * decoded @ catalog.T)
        np.testing.assert_array_equal(rows["latent"], runtime.nearest(z, k=1).rows[:, 0])
        np.testing.assert_array_equal(rows["decoded"],
                                      runtime.nearest(z, k=1, by="decoded").rows[:, 0])
        np.testing.assert_array_equal(rows["pixel_nearest"], np.argmin(distances, axis=1))
        assert ((0 <= rows["random"]) & (rows["random"] < len(catalog))).all()
        for name in ("latent", "decoded", "random", "pixel_nearest"):
            correlation = [np.corrcoef(decoded[i], catalog[row])[0, 1]
                           for i, row in enumerate(rows[name])]
            for statistic, value in (("median", np.median(correlation)),
                                     ("q25", np.quantile(correlation, 0.25)),
                                     ("q75", np.quantile(correlation, 0.75))):
                assert figures[name][statistic] == pytest.approx(value, abs=1e-4)
        assert figures["distance"]["median"] == pytest.approx(
            np.median(runtime.roundtrip_distance(z)), abs=1e-4)
        assert figures["distinct_top_items"] == {
            by: len(np.unique(rows[by])) for by in ("latent", "decoded")}


def test_pictures_written(report_dir, report):
    from PIL import Image

    expected = {"loss_curves", "traversal", "prior_samples", "projection", "query_sheet",
                "query_sheet_pixels", "slider_sheet"}
    assert set(report["pictures"]) == expected
    for name in report["pictures"].values():
        with Image.open(report_dir / "pictures" / name) as picture:
            assert picture.format == "PNG" and min(picture.size) > 100


def _top10(score, queries: int, chunk: int = 50) -> np.ndarray:
    """Rows of the 10 best scores, best first, lower row first on ties; score(slice) gives
    (chunk, N) scores, so no (queries, N, d) temporary is ever larger than a chunk's."""
    return np.concatenate([
        np.argsort(-score(slice(start, start + chunk)), axis=1, kind="stable")[:, :10]
        for start in range(0, queries, chunk)])


def test_retrieval_matches_brute_force(report, runtime, splits):
    """Recompute all three retrievals for the queries from their definitions."""
    from vae_edge.evaluation.report import label_metrics

    train, test = splits
    images, labels = test.images[:TEST_LIMIT], test.labels[:TEST_LIMIT].astype(np.int64)
    mu, log_sigma = runtime.encode(images)
    mu = mu.astype(np.float64)
    cat_labels = runtime.index.labels.astype(np.int64)
    m16 = runtime.index.mu.astype(np.float64)
    s16 = runtime.index.log_sigma.astype(np.float64)

    def log_q(block):  # log q(mu_test | x_item)
        return brute_force_log_q(mu[block], runtime.index.mu, runtime.index.log_sigma)

    def wasserstein(block):  # -(|m - mu|^2 + |s - sigma|^2) / 2, term by term
        s = np.exp(log_sigma[block].astype(np.float64))
        return -0.5 * (((mu[block][:, None, :] - m16[None]) ** 2).sum(axis=2)
                       + ((s[:, None, :] - np.exp(s16)[None]) ** 2).sum(axis=2))

    # Raw pixels in [0, 1]: |x - c|^2 = |x|^2 + |c|^2 - 2 x.c, one (queries, N) matrix.
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    rows = runtime.index.ids.astype(np.int64)  # a Fashion-MNIST bundle's ids are row numbers
    c = train.images[rows].reshape(len(runtime.index), -1).astype(np.float64) / 255.0
    distance = (x * x).sum(axis=1)[:, None] + (c * c).sum(axis=1)[None] - 2.0 * x @ c.T

    for key, rows in (("likelihood_mu", _top10(log_q, len(mu))),
                      ("photo", _top10(wasserstein, len(mu))),
                      ("pixels_l2", _top10(lambda block: -distance[block], len(mu)))):
        expected = label_metrics(cat_labels[rows], labels, 10)
        for name in ("nn1", "knn5", "precision_at_10"):
            assert report["retrieval"][key][name] == pytest.approx(expected[name]), (key, name)


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


@pytest.mark.slow  # trains a second model
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
            "--is-samples", "101", "--slider-queries", "5", "--no-pictures"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "raw pixels L2 (baseline)" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["likelihood"]["backend"] == "onnx-decoder"
    assert report["likelihood"]["is_samples"] == 101
    assert report["slider_scenario"]["queries_per_source"] == 5
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
