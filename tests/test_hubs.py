"""No hub items: a few items with broad posteriors (thin line art, tiny objects) among sharp
ones must not come first for most design and photo queries (docs/matching.md).

The synthetic index reproduces what a real heterogeneous catalog gives: 10 of 2,000 items have
posteriors 15 times as broad as the others. Ranked by the expected log-likelihood those 10 win
almost every query; the ranking the runtime uses for designs and photos
(Runtime.nearest(by="decoded"), Runtime.nearest_image: WassersteinSearch, checked against its
definition in test_match_modes.py and test_search.py) must spread them over the catalog.
"""

from __future__ import annotations

import numpy as np
import pytest

from vae_edge.runtime.search import LikelihoodSearch
from vae_edge.runtime.wasserstein import WassersteinSearch

N, D, BROAD = 2000, 8, 10


@pytest.fixture(scope="module")
def index():
    rng = np.random.default_rng(0)
    mu = rng.standard_normal((N, D))
    mu[:BROAD] *= 0.3
    log_sigma = np.full((N, D), np.log(0.1))
    log_sigma[:BROAD] = np.log(1.5)
    return mu.astype(np.float16), log_sigma.astype(np.float16), np.zeros(N, np.int64)


def design_posteriors(source: str):
    """300 sharp query posteriors, as the encoder gives for decoded designs."""
    rng = np.random.default_rng(1)
    m = rng.standard_normal((300, D)) if source == "normal" else rng.uniform(-3, 3, (300, D))
    return m, np.full(m.shape, np.log(0.1))


@pytest.mark.parametrize("source", ["normal", "uniform"])
def test_broad_posteriors_do_not_become_hubs(index, source):
    m, log_s = design_posteriors(source)
    first = WassersteinSearch(*index[:2], np.arange(N), index[2]).search_gaussian(
        m, log_s, 1).rows[:, 0]
    assert np.mean(first < BROAD) < 0.05, "broad items ranked first"
    assert np.bincount(first).max() < 0.05 * len(first), "one item ranked first for many"
    assert np.unique(first).size >= 0.6 * len(first), "too few distinct first items"


def test_the_index_reproduces_hubs_under_the_expected_log_likelihood(index):
    """The fixture is a real test: ranked by E log q(z|x), its broad items win."""
    m, log_s = design_posteriors("uniform")
    first = LikelihoodSearch(*index[:2], np.arange(N), index[2]).search_gaussian(
        m, log_s, 1).rows[:, 0]
    assert np.mean(first < BROAD) > 0.9
