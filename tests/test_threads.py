"""One Runtime shared by many threads (a kiosk web server does this) gives the results that
the same calls give one after another."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

THREADS, CALLS_PER_THREAD = 8, 500


def make_calls(runtime, count: int, seed: int = 0):
    """(kind, argument, k) tuples: decode / nearest / encode, single items and odd batches."""
    rng = np.random.default_rng(seed)
    d = runtime.latent_dim
    calls = []
    for _ in range(count):
        kind = ("decode", "nearest", "encode")[rng.integers(3)]
        batch = (None, 1, 3, 7)[rng.integers(4)]
        shape = (d,) if batch is None else (batch, d)
        if kind == "encode":
            shape = (28, 28) if batch is None else (batch, 1, 28, 28)
            argument = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            argument = rng.normal(0, 1.5, shape)
        calls.append((kind, argument, int(rng.integers(1, 12))))
    return calls


def call(runtime, kind, argument, k):
    if kind == "decode":
        return (runtime.decode(argument),)
    if kind == "encode":
        return runtime.encode(argument)
    matches = runtime.nearest(argument, k=k)
    return (matches.rows, matches.ids, matches.labels, matches.log_likelihoods,
            matches.probabilities)


def test_shared_runtime_matches_serial_results(runtime):
    calls = make_calls(runtime, THREADS * CALLS_PER_THREAD)
    serial = [call(runtime, *c) for c in calls]
    start = threading.Barrier(THREADS)

    def worker(part: int):
        start.wait()  # all threads hammer the runtime at once
        chunk = range(part * CALLS_PER_THREAD, (part + 1) * CALLS_PER_THREAD)
        # Every thread interleaves its own calls, so the kinds mix across threads too.
        return [(i, call(runtime, *calls[i])) for i in chunk]

    with ThreadPoolExecutor(THREADS) as pool:
        results = [r for part in pool.map(worker, range(THREADS)) for r in part]

    assert len(results) == len(calls)
    assert {kind for kind, _, _ in calls} == {"decode", "nearest", "encode"}
    for i, outputs in results:
        assert len(outputs) == len(serial[i])
        for got, expected in zip(outputs, serial[i]):
            np.testing.assert_array_equal(got, expected, err_msg=f"call {i}: {calls[i][0]}")


def test_results_do_not_alias_shared_state(runtime):
    z = np.random.default_rng(1).normal(size=runtime.latent_dim)
    first = runtime.nearest(z, k=5)
    expected = first.ids.copy()
    first.ids[:] = -1
    first.log_likelihoods[:] = np.nan
    np.testing.assert_array_equal(runtime.nearest(z, k=5).ids, expected)
    for array in (runtime.index.mu, runtime.index.log_sigma, runtime.index.ids,
                  runtime.index.labels):
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 0


def test_the_engine_built_on_first_use_is_built_once_for_threads_that_start_together(
        tiny_bundle, runtime):
    """The W2 engine (designs and photos) is built by the first query that needs it: threads
    whose first query that is, all at once, share one engine and get the serial answers."""
    from vae_edge.runtime import Runtime

    fresh = Runtime.load(tiny_bundle)
    z = np.random.default_rng(2).normal(0, 1.5, (THREADS, runtime.latent_dim))
    start = threading.Barrier(THREADS)

    def worker(part: int):
        start.wait()
        engine = fresh.wasserstein()
        matches = fresh.nearest(z[part], k=7, by="decoded")
        return engine, matches

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(worker, range(THREADS)))

    assert len({id(engine) for engine, _ in results}) == 1
    assert results[0][0] is fresh.wasserstein()
    for part, (_, matches) in enumerate(results):
        expected = runtime.nearest(z[part], k=7, by="decoded")
        np.testing.assert_array_equal(matches.rows, expected.rows)
        np.testing.assert_array_equal(matches.log_likelihoods, expected.log_likelihoods)
