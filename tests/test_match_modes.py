"""The two match modes of Runtime.nearest and the distance from the catalog.

by="decoded" ranks items by -W2^2 / (2 tau^2), the squared 2-Wasserstein distance between the
posterior of the decoded garment, rt.encode(rt.decode(z)), and each item's: checked here against
that score evaluated in float64 on the float16 index files, through the library, the CLI and the
kiosk API.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from vae_edge.runtime import Runtime
from vae_edge.runtime.cli import main as vae_run
from vae_edge.runtime.server import KioskApp


def wasserstein_scores(query_mu, query_log_sigma, mu16, log_sigma16) -> np.ndarray:
    """-(|m - mu|^2 + |s - sigma|^2) / (2 tau^2) for queries (B, d) against items (N, d),
    tau^2 = exp(2 median(log sigma)) over the catalog: (B, N)."""
    m = np.asarray(query_mu, np.float64)[:, None, :]
    s = np.exp(np.asarray(query_log_sigma, np.float64))[:, None, :]
    mu = mu16.astype(np.float64)[None]
    sigma = np.exp(log_sigma16.astype(np.float64))[None]
    tau2 = np.exp(2.0 * np.median(log_sigma16.astype(np.float64)))
    return -0.5 * ((m - mu) ** 2 + (s - sigma) ** 2).sum(axis=2) / tau2


def reference(runtime: Runtime, z: np.ndarray, k: int, label: int | None = None):
    """Rows, scores and p(x|z) of the decoded-garment ranking, from the files, in float64."""
    mu, log_sigma = runtime.encode(runtime.decode(z))
    scores = wasserstein_scores(mu, log_sigma, runtime.index.mu, runtime.index.log_sigma)
    top = scores.max(axis=1, keepdims=True)
    log_total = top[:, 0] + np.log(np.exp(scores - top).sum(axis=1))
    eligible = np.ones(scores.shape[1], bool) if label is None else runtime.index.labels == label
    rows, chosen, probabilities = [], [], []
    for b in range(len(z)):
        candidates = np.flatnonzero(eligible)
        order = np.lexsort((candidates, -scores[b, candidates]))[:k]  # score desc, row asc
        rows.append(candidates[order])
        chosen.append(scores[b, candidates[order]])
        probabilities.append(np.exp(chosen[-1] - log_total[b]))
    return np.array(rows), np.array(chosen), np.array(probabilities)


@pytest.fixture(scope="module")
def queries(runtime):
    """Slider positions as a shopper makes them: typical, anywhere in [-5, 5], corners."""
    rng = np.random.default_rng(12)
    d = runtime.latent_dim
    return np.concatenate([rng.standard_normal((3, d)), rng.uniform(-5, 5, (3, d)),
                           rng.choice([-5.0, 5.0], (2, d))])


@pytest.mark.parametrize("label", [None, 3])
def test_decoded_mode_equals_the_float64_reference(runtime, queries, label):
    matches = runtime.nearest(queries, k=7, label=label, by="decoded")
    rows, scores, probabilities = reference(runtime, queries, 7, label)
    np.testing.assert_array_equal(matches.rows, rows)
    np.testing.assert_array_equal(matches.ids, runtime.index.ids[rows])
    np.testing.assert_array_equal(matches.labels, runtime.index.labels[rows])
    np.testing.assert_allclose(matches.log_likelihoods, scores, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(matches.probabilities, probabilities, rtol=1e-6, atol=1e-12)
    if label is not None:
        assert (matches.labels == label).all()


def test_one_query_equals_its_row_of_a_batch(runtime, queries):
    """The latent ranking is float64 numpy, row by row: a query alone gets its batch row bit
    for bit. The decoded ranking goes through onnxruntime's float32 kernels, which may round
    differently for another batch shape: a query alone is exact for its own round trip, and
    its scores agree with its batch row within that float32 noise."""
    latent = runtime.nearest(queries, k=4, with_distance=True)
    decoded = runtime.nearest(queries, k=4, by="decoded")
    for b, z in enumerate(queries):
        one = runtime.nearest(z, k=4, with_distance=True)
        assert one.ids.shape == (4,) and one.distances.shape == ()
        np.testing.assert_array_equal(one.ids, latent.ids[b])
        np.testing.assert_array_equal(one.log_likelihoods, latent.log_likelihoods[b])
        one = runtime.nearest(z, k=4, by="decoded")
        rows, scores, _ = reference(runtime, z[None], 4)
        np.testing.assert_array_equal(one.rows, rows[0])
        np.testing.assert_allclose(one.log_likelihoods, scores[0], rtol=1e-9, atol=1e-6)
        np.testing.assert_allclose(one.log_likelihoods, decoded.log_likelihoods[b], rtol=1e-4)
        np.testing.assert_allclose(one.distances, decoded.distances[b], rtol=1e-4, atol=1e-5)


def test_latent_mode_is_the_default_and_unchanged(runtime, queries):
    default = runtime.nearest(queries, k=5)
    latent = runtime.nearest(queries, k=5, by="latent")
    np.testing.assert_array_equal(default.ids, latent.ids)
    np.testing.assert_array_equal(default.log_likelihoods, latent.log_likelihoods)
    decoded = runtime.nearest(queries, k=5, by="decoded")
    assert not np.array_equal(decoded.ids, latent.ids)  # two rankings, not one under two names


def test_distance_is_the_round_trip_through_decoder_and_encoder(runtime, queries):
    mu, _ = runtime.encode(runtime.decode(queries))
    expected = np.linalg.norm(queries - mu.astype(np.float64), axis=1)
    for matches in (runtime.nearest(queries, k=1, with_distance=True),
                    runtime.nearest(queries, k=1, by="decoded"),
                    runtime.nearest(queries, k=1, by="decoded", with_distance=False)):
        np.testing.assert_allclose(matches.distances, expected, rtol=1e-12)
    np.testing.assert_allclose(runtime.roundtrip_distance(queries), expected, rtol=1e-12)
    assert runtime.nearest_image(runtime.decode(queries[0]), k=1).distances is None


@pytest.mark.parametrize("by", ["latent", "decoded"])
def test_view_is_decode_and_nearest_with_one_decode(runtime, queries, by, monkeypatch):
    """Runtime.view: the garment and its matches as decode and nearest give them, from one
    run of the decoder and one of the encoder."""
    import onnxruntime

    run = onnxruntime.InferenceSession.run
    graph_runs = []

    def counting_run(session, *args, **kwargs):
        graph_runs.append(args[0])
        return run(session, *args, **kwargs)

    for z in queries[:3]:
        expected = runtime.nearest(z, k=5, label=3, by=by, with_distance=True)
        picture = runtime.decode(z)
        monkeypatch.setattr(onnxruntime.InferenceSession, "run", counting_run)
        image, matches = runtime.view(z, k=5, label=3, by=by)
        monkeypatch.undo()
        assert len(graph_runs) == 2
        graph_runs.clear()
        np.testing.assert_array_equal(image, picture)
        for field in ("rows", "ids", "log_likelihoods", "probabilities", "distances"):
            np.testing.assert_array_equal(getattr(matches, field), getattr(expected, field))
        assert matches.metadata == expected.metadata
    with pytest.raises(ValueError, match=r"z must have shape \(8,\) \(one z\), got \(3, 8\)"):
        runtime.view(queries[:3])


def test_latent_search_runs_no_graph_unless_the_distance_is_asked_for(runtime, queries,
                                                                      monkeypatch):
    """The latent ranking is the search alone: the round trip through decoder and encoder
    (more than the search costs) runs only for with_distance=True."""
    import onnxruntime

    graph_runs = []
    run = onnxruntime.InferenceSession.run

    def counting_run(session, *args, **kwargs):
        graph_runs.append(args[0])
        return run(session, *args, **kwargs)

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", counting_run)
    plain = runtime.nearest(queries, k=3)
    assert plain.distances is None and graph_runs == []
    asked = runtime.nearest(queries, k=3, with_distance=True)
    assert len(graph_runs) == 2 and asked.distances.shape == (len(queries),)
    np.testing.assert_array_equal(asked.ids, plain.ids)
    with pytest.raises(ValueError, match="with_distance must be True or False, got 1"):
        runtime.nearest(queries, k=3, with_distance=1)


@pytest.mark.parametrize("by", ["Decoded", "pixels", "", None, 1])
def test_unknown_mode_is_refused(runtime, by):
    with pytest.raises(ValueError, match="by must be one of latent, decoded"):
        runtime.nearest(np.zeros(runtime.latent_dim), k=1, by=by)


def test_shipped_model_far_and_near():
    """On the shipped model, corners of the slider box lie far from every catalog item."""
    shipped = Runtime.load()
    rng = np.random.default_rng(0)
    typical = shipped.roundtrip_distance(rng.standard_normal((200, shipped.latent_dim)))
    corners = shipped.roundtrip_distance(rng.choice([-5.0, 5.0], (200, shipped.latent_dim)))
    items = shipped.roundtrip_distance(shipped.index.mu[:200].astype(np.float64))
    assert np.median(items) < np.median(typical) < np.median(corners)
    assert corners.min() > np.quantile(typical, 0.99)


def test_cli_by_and_json(tiny_bundle, runtime):
    z = np.linspace(-4, 4, runtime.latent_dim)
    z_text = ",".join(repr(float(v)) for v in z)
    runner = CliRunner()
    for by in ("latent", "decoded"):
        result = runner.invoke(vae_run, ["nearest", "--bundle", str(tiny_bundle), "--z", z_text,
                                         "-k", "3", "--by", by, "--json"])
        assert result.exit_code == 0, result.output
        payload = json.loads(result.output)
        expected = runtime.nearest(z, k=3, by=by, with_distance=True)
        assert payload["by"] == by
        assert payload["distance"] == pytest.approx(float(expected.distances), rel=1e-12)
        assert [r["id"] for r in payload["results"]] == expected.ids.tolist()
    text = runner.invoke(vae_run, ["nearest", "--bundle", str(tiny_bundle), "--z", z_text,
                                   "--by", "decoded"])
    assert text.exit_code == 0 and "ranked by decoded" in text.output
    bad = runner.invoke(vae_run, ["nearest", "--bundle", str(tiny_bundle), "--z", z_text,
                                  "--by", "pixels"])
    assert bad.exit_code == 2 and "'pixels' is not one of 'latent', 'decoded'" in bad.output


def test_cli_by_is_for_latent_queries_only(tiny_bundle, runtime, tmp_path):
    from vae_edge.runtime.images import save_png

    photo = save_png(tmp_path / "garment.png", runtime.decode(np.zeros(runtime.latent_dim)))
    result = CliRunner().invoke(vae_run, ["nearest", "--bundle", str(tiny_bundle), "--image",
                                          str(photo), "--by", "decoded"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "Error: --by ranks latent queries (--z / --random); --image always ranks by the "
        "photo's posterior")


def test_kiosk_app_reports_mode_distance_and_far(runtime):
    app = KioskApp(runtime)
    info = app.info()
    assert info["match_modes"] == ["latent", "decoded"]
    typical = runtime.roundtrip_distance(runtime.sample_prior(256, seed=0))
    assert info["far_distance"] == pytest.approx(float(np.quantile(typical, 0.99)))
    for z in (np.zeros(runtime.latent_dim), np.full(runtime.latent_dim, 5.0)):
        for by in ("latent", "decoded"):
            answer = app.nearest(z, 4, by)
            expected = runtime.nearest(z, k=4, by=by, with_distance=True)
            assert answer["by"] == by
            assert [r["id"] for r in answer["results"]] == expected.ids.tolist()
            assert answer["distance"] == float(expected.distances)
            assert answer["far"] == (answer["distance"] > info["far_distance"])
