import numpy as np
import pytest

from vae_edge.runtime import Runtime


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_decode_and_encode_shapes(runtime, batch):
    z = np.random.default_rng(batch).normal(size=(batch, 8))
    images = runtime.decode(z)
    assert images.shape == (batch, 1, 28, 28) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    mu, log_sigma = runtime.encode(images)
    assert mu.shape == log_sigma.shape == (batch, 8)


def test_single_vectors_and_images(runtime):
    image = runtime.decode(np.zeros(8))
    assert image.shape == (1, 28, 28)
    mu, log_sigma = runtime.encode(image[0])
    assert mu.shape == (8,) and log_sigma.shape == (8,)
    np.testing.assert_allclose(runtime.encode(image[0])[0], runtime.encode(image[None])[0][0])
    match = runtime.nearest(mu, k=3)
    assert match.ids.shape == match.labels.shape == match.log_likelihoods.shape == (3,)
    assert np.all(np.diff(match.log_likelihoods) <= 0)


def test_uint8_images_are_scaled(runtime):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    np.testing.assert_allclose(runtime.encode(pixels)[0],
                               runtime.encode(pixels.astype(np.float32) / 255)[0], atol=1e-6)


def test_default_bundle_loads():
    runtime = Runtime.load()
    matches = runtime.nearest(np.zeros(runtime.latent_dim), k=5)
    assert len(matches) == 5 and len(runtime.index) == 60000


def test_load_caps_blas_threads_only_when_asked(tiny_bundle):
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    with threadpool_limits(limits=2, user_api="blas"):  # restores the test process's pool after
        Runtime.load(tiny_bundle)
        assert blas_threads() == {2}
        Runtime.load(tiny_bundle, threads=1, limit_blas=True)
        assert blas_threads() == {1}


def test_decode_stays_in_unit_interval_where_the_sigmoid_saturates():
    """Slider corners and far-out z drive the decoder's sigmoid to 0 and 1; the images stay in
    the documented [0, 1], so that encode() takes them back (encode refuses anything else)."""
    rt = Runtime.load()  # the shipped model
    d = rt.latent_dim
    corners = np.where(np.random.default_rng(0).random((32, d)) < 0.5, -5.0, 5.0)
    z = np.concatenate([corners, np.full((1, d), 1e3), np.full((1, d), -1e3)])
    images = rt.decode(z)
    assert images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    mu, log_sigma = rt.encode(images)
    assert mu.shape == log_sigma.shape == (len(z), d)
    assert np.isfinite(mu).all() and np.isfinite(log_sigma).all()
    assert len(rt.nearest(z[0], k=3, by="decoded")) == 3


def test_roundtrip_of_a_large_batch_equals_one_by_one(runtime):
    """A batch longer than the round trip's chunks gives each z the distance it gets alone."""
    z = np.random.default_rng(4).normal(size=(150, 8))
    batch = runtime.roundtrip_distance(z)
    assert batch.shape == (150,)
    alone = np.array([runtime.roundtrip_distance(row) for row in z])
    np.testing.assert_allclose(batch, alone, rtol=1e-6, atol=1e-6)
    matches = runtime.nearest(z, k=3, by="decoded")
    assert matches.ids.shape == (150, 3)
    alone = runtime.nearest(z[149], k=3, by="decoded")  # another batch shape: float32 noise
    np.testing.assert_allclose(matches.log_likelihoods[149], alone.log_likelihoods, rtol=1e-4)
