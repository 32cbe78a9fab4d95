"""The likelihood search engine against the float64 direct formula, through its public API."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vae_edge.runtime.search import LikelihoodSearch
from vae_edge.runtime.wasserstein import WassersteinSearch

from .conftest import brute_force_log_q

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def catalogs(draw, max_items=300):
    """Random float16 catalogs: log sigma down to -10, |mu| up to 50, some duplicate items."""
    n = draw(st.integers(1, max_items))
    d = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(n, d)) * draw(st.sampled_from([0.1, 1.0, 50.0]))
    low = draw(st.sampled_from([-10.0, -3.0, -0.5]))
    log_sigma = rng.uniform(low, 1.0, size=(n, d))
    if n > 1 and draw(st.booleans()):  # duplicates: exact ties
        copies = rng.integers(0, n, size=n // 2 + 1)
        mu[rng.integers(0, n, size=copies.size)] = mu[copies]
        log_sigma[rng.integers(0, n, size=copies.size)] = log_sigma[copies]
    labels = rng.integers(0, 3, size=n)
    return mu.astype(np.float16), log_sigma.astype(np.float16), labels, rng


@st.composite
def queries(draw, mu, rng, batch):
    """Queries near items (cancellation in float32), from N(0, 1), or far out (|z| to 1e3)."""
    d = mu.shape[1]
    kind = draw(st.sampled_from(["near", "prior", "far"]))
    if kind == "near":
        base = mu[rng.integers(0, mu.shape[0], size=batch)].astype(np.float64)
        return base + rng.normal(size=(batch, d)) * draw(st.sampled_from([0.0, 1e-5, 1e-2]))
    scale = 1.0 if kind == "prior" else 1e3
    return np.clip(rng.normal(size=(batch, d)) * scale, -1e3, 1e3)


def expected_rows(reference: np.ndarray, k: int) -> np.ndarray:
    """Top-k rows of the float64 reference: best first, lower row first on ties."""
    return np.argsort(-reference, axis=-1, kind="stable")[..., :k]


def check_against_reference(matches, reference: np.ndarray, k: int, total: np.ndarray):
    """Same scores (1e-6 relative) and the same rows, ties aside; ties go to the lower row."""
    rows = expected_rows(reference, k)
    want = np.take_along_axis(reference, rows, axis=-1)
    np.testing.assert_allclose(matches.log_likelihoods, want, rtol=1e-6, atol=1e-9)
    # The rows returned really score that (up to the two formulas' float64 rounding).
    got = np.take_along_axis(reference, matches.rows, axis=-1)
    np.testing.assert_allclose(got, matches.log_likelihoods, rtol=1e-9, atol=1e-9)
    scale = np.abs(want) + 1.0
    separated = np.ones(want.shape, dtype=bool)  # no other item within rounding distance
    for i in range(k):
        close = np.abs(reference - want[..., i:i + 1]) <= 1e-9 * scale[..., i:i + 1]
        separated[..., i] = close.sum(axis=-1) == 1
    np.testing.assert_array_equal(matches.rows[separated], rows[separated])
    # Exact ties (duplicates): lower row first.
    same = np.diff(matches.log_likelihoods, axis=-1) == 0
    assert np.all(np.diff(matches.rows, axis=-1)[same] > 0)
    # p(x|z) against the softmax of the reference over the whole catalog; where scores are
    # huge (1e11 nats) the two formulas' float64 rounding alone moves p by 1e-16 * |score|.
    rounding = 1e-15 * float(np.abs(want[np.isfinite(want)]).max(initial=0.0))
    np.testing.assert_allclose(matches.probabilities, np.exp(got - total[..., None]),
                               rtol=1e-6 + rounding, atol=1e-300)


def log_total(reference: np.ndarray) -> np.ndarray:
    top = reference.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(reference - top).sum(axis=-1, keepdims=True)))[..., 0]


@SETTINGS
@given(data=st.data())
def test_engine_equals_float64_reference(data):
    mu, log_sigma, labels, rng = data.draw(catalogs())
    n = mu.shape[0]
    engine = LikelihoodSearch(mu, log_sigma, np.arange(n) + 100, labels)
    z = data.draw(queries(mu, rng, batch=data.draw(st.sampled_from([1, 7]))))
    reference = brute_force_log_q(z, mu, log_sigma)
    k = data.draw(st.sampled_from([1, 2, n, n + 5]))
    matches = engine.search(z, k)
    assert matches.rows.shape == (z.shape[0], min(k, n))  # k > N is clamped to N
    check_against_reference(matches, reference, min(k, n), log_total(reference))
    np.testing.assert_array_equal(matches.ids, matches.rows + 100)
    np.testing.assert_array_equal(matches.labels, labels[matches.rows])


@SETTINGS
@given(data=st.data())
def test_one_query_has_shape_k(data):
    mu, log_sigma, labels, rng = data.draw(catalogs())
    engine = LikelihoodSearch(mu, log_sigma, np.arange(mu.shape[0]), labels)
    z = data.draw(queries(mu, rng, batch=1))[0]
    k = data.draw(st.integers(1, mu.shape[0] + 2))
    matches = engine.search(z, k)
    k = min(k, mu.shape[0])
    for field in ("rows", "ids", "labels", "log_likelihoods", "probabilities"):
        assert getattr(matches, field).shape == (k,)
    reference = brute_force_log_q(z[None], mu, log_sigma)[0]
    check_against_reference(matches, reference, k, log_total(reference))


@SETTINGS
@given(data=st.data())
def test_batch_equals_one_by_one(data):
    mu, log_sigma, labels, rng = data.draw(catalogs())
    engine = LikelihoodSearch(mu, log_sigma, np.arange(mu.shape[0]), labels)
    z = data.draw(queries(mu, rng, batch=7))
    k = data.draw(st.integers(1, mu.shape[0] + 2))
    label = data.draw(st.sampled_from([None, int(labels[0])]))
    batch = engine.search(z, k, label)
    for row, query in enumerate(z):
        single = engine.search(query, k, label)
        np.testing.assert_array_equal(batch.rows[row], single.rows)
        np.testing.assert_array_equal(batch.ids[row], single.ids)
        np.testing.assert_array_equal(batch.log_likelihoods[row], single.log_likelihoods)
        np.testing.assert_allclose(batch.probabilities[row], single.probabilities,
                                   rtol=1e-6, atol=1e-300)


@SETTINGS
@given(data=st.data())
def test_label_filter_is_exact(data):
    mu, log_sigma, labels, rng = data.draw(catalogs())
    engine = LikelihoodSearch(mu, log_sigma, np.arange(mu.shape[0]), labels)
    label = int(labels[data.draw(st.integers(0, labels.size - 1))])
    z = data.draw(queries(mu, rng, batch=data.draw(st.sampled_from([1, 7]))))
    reference = brute_force_log_q(z, mu, log_sigma)
    count = int((labels == label).sum())
    assert engine.label_count(label) == count
    k = data.draw(st.sampled_from([1, 3, count, count + 4]))
    matches = engine.search(z, k, label=label)
    assert np.all(matches.labels == label) and matches.rows.shape[-1] == min(k, count)
    filtered = np.where(labels == label, reference, -np.inf)
    # p(x|z) stays over the whole catalog.
    check_against_reference(matches, filtered, min(k, count), log_total(reference))


@pytest.mark.parametrize("k", [1, 5, 300])
def test_filtered_query_whose_best_lie_far_below_the_catalogs(k):
    """The label's best are thousands of nats below the catalog's best, far outside the
    items p(x|z) needs."""
    rng = np.random.default_rng(7)
    n, d = 600, 4
    labels = np.repeat([0, 1], n // 2)
    mu = np.where(labels[:, None] == 0, 0.0, 8.0) + 0.3 * rng.standard_normal((n, d))
    mu = mu.astype(np.float16)
    log_sigma = rng.uniform(-3.0, -1.0, (n, d)).astype(np.float16)
    engine = LikelihoodSearch(mu, log_sigma, np.arange(n), labels)
    z = np.zeros(d)
    reference = brute_force_log_q(z[None], mu, log_sigma)[0]
    assert reference[labels == 0].max() - reference[labels == 1].max() > 1000
    matches = engine.search(z, k, label=1)
    assert np.all(matches.labels == 1)
    filtered = np.where(labels == 1, reference, -np.inf)
    check_against_reference(matches, filtered, min(k, n // 2), log_total(reference))


@pytest.mark.parametrize("k", [1, 10, 50])
def test_top_k_far_below_the_items_p_needs(k):
    """At d = 24 scores spread over hundreds of nats: p(x|z) needs a few items near the best,
    and the k-th best lies far below them."""
    rng = np.random.default_rng(3)
    n, d = 3000, 24
    mu = rng.standard_normal((n, d)).astype(np.float16)
    log_sigma = rng.uniform(-3.0, 0.0, (n, d)).astype(np.float16)
    labels = rng.integers(0, 3, n)
    engine = LikelihoodSearch(mu, log_sigma, np.arange(n), labels)
    z = rng.standard_normal((3, d))
    reference = brute_force_log_q(z, mu, log_sigma)
    check_against_reference(engine.search(z, k), reference, k, log_total(reference))
    filtered = np.where(labels == 2, reference, -np.inf)
    check_against_reference(engine.search(z, k, label=2), filtered, k, log_total(reference))


@SETTINGS
@given(data=st.data())
def test_image_query_ranks_by_expected_log_likelihood(data):
    mu, log_sigma, labels, rng = data.draw(catalogs())
    engine = LikelihoodSearch(mu, log_sigma, np.arange(mu.shape[0]), labels)
    batch = data.draw(st.sampled_from([1, 3]))
    query_mu = data.draw(queries(mu, rng, batch=batch))
    query_log_sigma = rng.uniform(-4, 1, size=query_mu.shape)
    # E_{z ~ N(m, s^2)} log q(z|x) = log q(m|x) - sum s^2 / (2 sigma^2)
    inv_var = np.exp(-2.0 * log_sigma.astype(np.float64))
    reference = (brute_force_log_q(query_mu, mu, log_sigma)
                 - 0.5 * np.exp(2 * query_log_sigma) @ inv_var.T)
    k = data.draw(st.sampled_from([1, 4]))
    label = data.draw(st.sampled_from([None, int(labels[0])]))
    ranked = reference if label is None else np.where(labels == label, reference, -np.inf)
    count = engine.label_count(label)
    if batch == 1:
        query_mu, query_log_sigma, reference, ranked = (
            query_mu[0], query_log_sigma[0], reference[0], ranked[0])
    matches = engine.search_gaussian(query_mu, query_log_sigma, k, label)
    check_against_reference(matches, ranked, min(k, count), log_total(reference))


@pytest.mark.parametrize("d", [3, 16])
@pytest.mark.parametrize("k", [1, 10, 1500])
@pytest.mark.parametrize("label", [None, 1])
def test_catalog_large_enough_for_group_maxima(d, k, label):
    """2,085 items: the top-k floor comes from maxima of groups of the scores, and the last
    N mod 1024 items belong to no group; k = 1500 exceeds the number of groups."""
    rng = np.random.default_rng(d)
    n = 2 * 1024 + 37
    mu = rng.standard_normal((n, d)).astype(np.float16)
    log_sigma = rng.uniform(-3.0, 0.0, (n, d)).astype(np.float16)
    labels = rng.integers(0, 3, n)
    mu[-1] = mu[0]  # the best item of the first query lies in the tail, tied with row 0
    log_sigma[-1] = log_sigma[0]
    engine = LikelihoodSearch(mu, log_sigma, np.arange(n), labels)
    z = np.concatenate((mu[[0]].astype(np.float64), rng.standard_normal((4, d))))
    reference = brute_force_log_q(z, mu, log_sigma)
    ranked = reference if label is None else np.where(labels == label, reference, -np.inf)
    count = engine.label_count(label)
    matches = engine.search(z, k, label)
    check_against_reference(matches, ranked, min(k, count), log_total(reference))
    for row, query in enumerate(z):
        single = engine.search(query, k, label)
        np.testing.assert_array_equal(matches.rows[row], single.rows)
        np.testing.assert_array_equal(matches.log_likelihoods[row], single.log_likelihoods)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_cancellation_with_tiny_sigma(batch):
    # a = e^20: the expanded form's terms a*mu^2 ~ 1e9 cancel to differences of ~1 in float32.
    rng = np.random.default_rng(batch)
    n, d = 500, 6
    centre = rng.normal(size=d) * 30
    mu = (centre + rng.normal(size=(n, d)) * 1e-3).astype(np.float16)
    log_sigma = np.full((n, d), -10.0, dtype=np.float16)
    log_sigma[::3] = -9.5
    engine = LikelihoodSearch(mu, log_sigma, np.arange(n), np.zeros(n, dtype=np.int64))
    z = mu[rng.integers(0, n, batch)].astype(np.float64) + rng.normal(size=(batch, d)) * 1e-4
    reference = brute_force_log_q(z, mu, log_sigma)
    matches = engine.search(z, 10)
    check_against_reference(matches, reference, 10, log_total(reference))


def test_duplicates_tie_to_the_lower_row():
    mu = np.tile(np.array([[0.5, -1.0], [2.0, 0.0]], np.float16), (20, 1))  # rows 0,2,4.. equal
    log_sigma = np.zeros_like(mu)
    labels = np.arange(40) % 3
    engine = LikelihoodSearch(mu, log_sigma, np.arange(40) + 10, labels)
    z = np.array([0.5, -1.0])
    assert engine.search(z, 4).rows.tolist() == [0, 2, 4, 6]
    assert engine.search(z, 4).ids.tolist() == [10, 12, 14, 16]
    assert engine.search(z, 3, label=1).rows.tolist() == [4, 10, 16]
    assert engine.search(np.stack([z, z]), 4).rows.tolist() == [[0, 2, 4, 6]] * 2
    # log q(z|x) at z = mu with sigma = 1 in 2-D is -log(2 pi).
    np.testing.assert_allclose(engine.search(z, 1).log_likelihoods, [-np.log(2 * np.pi)])
    # Equal items get equal p(x|z), and the catalog sums to one.
    probabilities = engine.search(z, 40).probabilities
    assert np.all(probabilities[:20] == probabilities[0])
    assert probabilities.sum() == pytest.approx(1.0)


def test_probabilities_sum_to_one_over_the_catalog():
    rng = np.random.default_rng(5)
    mu = rng.normal(size=(3000, 4)).astype(np.float16)
    log_sigma = rng.uniform(-1, 0.5, size=(3000, 4)).astype(np.float16)
    engine = LikelihoodSearch(mu, log_sigma, np.arange(3000), rng.integers(0, 10, 3000))
    matches = engine.search(np.zeros((7, 4)), 3000)
    np.testing.assert_allclose(matches.probabilities.sum(axis=1), 1.0, rtol=1e-6)


def test_extreme_query_is_exact_or_refused():
    """|z| at the runtime's 1e6 limit against items with a = e^60: within float32 range the
    answer is exact; where the float32 scores could overflow the query is refused."""
    mu = np.array([[0.0], [1.0], [2.0]], np.float16)
    log_sigma = np.array([[-30.0], [-30.0], [0.0]], np.float16)
    engine = LikelihoodSearch(mu, log_sigma, np.arange(3), np.zeros(3, np.int64))
    z = np.array([[1.5]])
    reference = brute_force_log_q(z, mu, log_sigma)
    check_against_reference(engine.search(z, 3), reference, 3, log_total(reference))
    with pytest.raises(ValueError, match="query too large for this catalog's float32 scores"):
        engine.search(np.array([1e6]), 3)


def test_item_that_does_not_fit_float32_is_refused():
    with pytest.raises(ValueError, match=r"catalog item at row 1 does not fit float32 item "
                                         r"vectors \(log_sigma min -60"):
        LikelihoodSearch(np.zeros((2, 2)), np.array([[0.0, 0.0], [-60.0, 0.0]]), np.arange(2),
                         np.zeros(2))


def brute_force_w2(m: np.ndarray, log_s: np.ndarray, mu16: np.ndarray,
                   log_sigma16: np.ndarray) -> np.ndarray:
    """-(|m - mu|^2 + |s - sigma|^2) / (2 tau^2) by its definition in float64, tau^2 the
    catalog's typical sigma^2, exp(2 median(log sigma)): (B, N)."""
    mean = m[:, None, :] - mu16.astype(np.float64)[None]
    sigma = np.exp(log_sigma16.astype(np.float64))
    spread = np.exp(log_s)[:, None, :] - sigma[None]
    tau2 = np.exp(2.0 * np.median(log_sigma16.astype(np.float64)))
    return -0.5 * (mean**2 + spread**2).sum(axis=2) / tau2


@SETTINGS
@given(data=st.data())
def test_wasserstein_engine_equals_float64_reference(data):
    """Exact as the likelihood engine: rows, scores and p against the float64 definition,
    one query or a batch, with and without the label filter."""
    mu, log_sigma, labels, rng = data.draw(catalogs())
    engine = WassersteinSearch(mu, log_sigma, np.arange(mu.shape[0]) + 100, labels)
    batch = data.draw(st.sampled_from([1, 7]))
    query_mu = np.clip(data.draw(queries(mu, rng, batch=batch)), -60, 60)
    query_log_sigma = rng.uniform(-10, 1, size=query_mu.shape)
    if data.draw(st.booleans()):  # a query right on an item's posterior
        row = rng.integers(0, mu.shape[0])
        query_mu[0], query_log_sigma[0] = mu[row], log_sigma[row]
    reference = brute_force_w2(query_mu, query_log_sigma, mu, log_sigma)
    k = data.draw(st.sampled_from([1, 4, mu.shape[0] + 2]))
    label = data.draw(st.sampled_from([None, int(labels[0])]))
    ranked = reference if label is None else np.where(labels == label, reference, -np.inf)
    count = engine.label_count(label)
    matches = engine.search_gaussian(query_mu, query_log_sigma, k, label)
    check_against_reference(matches, ranked, min(k, count), log_total(reference))
    np.testing.assert_array_equal(matches.ids, matches.rows + 100)
    single = engine.search_gaussian(query_mu[-1], query_log_sigma[-1], k, label)
    np.testing.assert_array_equal(single.rows, matches.rows[-1])
    np.testing.assert_array_equal(single.log_likelihoods, matches.log_likelihoods[-1])


@pytest.mark.parametrize("k", [1, 10])
def test_wasserstein_engine_with_group_maxima(k):
    rng = np.random.default_rng(k)
    n, d = 5000, 16
    mu = rng.standard_normal((n, d)).astype(np.float16)
    log_sigma = rng.uniform(-4.0, 0.5, (n, d)).astype(np.float16)
    labels = rng.integers(0, 3, n)
    engine = WassersteinSearch(mu, log_sigma, np.arange(n), labels)
    query_mu = rng.uniform(-5, 5, (9, d))
    query_log_sigma = rng.uniform(-4.0, 0.5, (9, d))
    reference = brute_force_w2(query_mu, query_log_sigma, mu, log_sigma)
    matches = engine.search_gaussian(query_mu, query_log_sigma, k)
    check_against_reference(matches, reference, k, log_total(reference))
    filtered = np.where(labels == 2, reference, -np.inf)
    check_against_reference(engine.search_gaussian(query_mu, query_log_sigma, k, 2), filtered,
                            k, log_total(reference))


def test_wasserstein_point_query_is_a_posterior_of_zero_width():
    rng = np.random.default_rng(0)
    mu = rng.standard_normal((300, 5)).astype(np.float16)
    log_sigma = rng.uniform(-3.0, 0.5, (300, 5)).astype(np.float16)
    engine = WassersteinSearch(mu, log_sigma, np.arange(300), np.zeros(300, np.int64))
    z = rng.standard_normal((4, 5))
    reference = brute_force_w2(z, np.full(z.shape, -np.inf), mu, log_sigma)
    check_against_reference(engine.search(z, 6), reference, 6, log_total(reference))


# -- through the runtime (needs the tiny trained bundle) ---------------------------------------

@pytest.mark.parametrize("batch", [1, 7, 64])
def test_runtime_label_filter_and_image_query(runtime, batch):
    rng = np.random.default_rng(batch)
    z = rng.normal(size=(batch, runtime.latent_dim))
    index = runtime.index
    reference = brute_force_log_q(z, index.mu, index.log_sigma)
    sneaker = runtime.label_names.index("Sneaker")
    by_name = runtime.nearest(z, k=5, label="sneaker")
    by_id = runtime.nearest(z, k=5, label=sneaker)
    np.testing.assert_array_equal(by_name.ids, by_id.ids)
    assert np.all(by_name.labels == sneaker)
    filtered = np.where(index.labels == sneaker, reference, -np.inf)
    check_against_reference(by_name, filtered, 5, log_total(reference))

    images = runtime.decode(z)
    mu, log_sigma = runtime.encode(images)
    matches = runtime.nearest_image(images, k=5)
    expected = brute_force_w2(mu.astype(np.float64), log_sigma.astype(np.float64), index.mu,
                              index.log_sigma)
    check_against_reference(matches, expected, 5, log_total(expected))


@pytest.mark.parametrize("label", ["Shoe", 10, -1, True, 2.0])
def test_unknown_label(runtime, label):
    names = ", ".join(runtime.label_names)
    with pytest.raises(ValueError) as error:
        runtime.nearest(np.zeros(runtime.latent_dim), k=3, label=label)
    assert str(error.value) == (f"unknown label {label!r}: expected one of {names} "
                                f"(or a class id 0-9)")
