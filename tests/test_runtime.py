import json

import numpy as np
import pytest

from vae_edge.runtime import BundleError, Runtime, parse_z


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


def test_batch_results_equal_one_by_one(runtime):
    z = np.random.default_rng(3).normal(size=(7, 8))
    batch = runtime.nearest(z, k=4)
    for row, query in enumerate(z):
        single = runtime.nearest(query, k=4)
        np.testing.assert_array_equal(batch.ids[row], single.ids)
        np.testing.assert_array_equal(batch.log_likelihoods[row], single.log_likelihoods)


def test_k_larger_than_catalog_returns_all(runtime):
    matches = runtime.nearest(np.zeros(8), k=10**9)
    assert len(matches) == len(runtime.index)
    assert matches.probabilities.sum() == pytest.approx(1.0)
    assert np.all(np.diff(matches.probabilities) <= 0)
    assert sorted(matches.ids.tolist()) == sorted(runtime.index.ids.tolist())


def test_uint8_images_are_scaled(runtime):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    np.testing.assert_allclose(runtime.encode(pixels)[0],
                               runtime.encode(pixels.astype(np.float32) / 255)[0], atol=1e-6)


@pytest.mark.parametrize(
    ("z", "message"),
    [
        (np.zeros(7), r"z must have shape \(8,\) or \(batch, 8\), got \(7,\)"),
        (np.zeros((2, 9)), r"z must have shape \(8,\) or \(batch, 8\), got \(2, 9\)"),
        (np.full(8, np.nan), "z holds NaN or infinite values"),
        (np.full(8, np.inf), "z holds NaN or infinite values"),
        (np.full(8, 1e308), r"z values must lie in \[-1e\+06, 1e\+06\]"),
        (["a"] * 8, "z must be numeric"),
        (np.zeros((0, 8)), r"z batch size must be in \[1, 65536\], got 0"),
    ],
)
def test_bad_z(runtime, z, message):
    for call in (runtime.decode, runtime.nearest):
        with pytest.raises(ValueError, match=message):
            call(z)


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3"])
def test_bad_k(runtime, k):
    with pytest.raises(ValueError, match="k must be"):
        runtime.nearest(np.zeros(8), k=k)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((27, 28), np.uint8),
         r"images must be \(28, 28\) or \(batch, 1, 28, 28\), got \(27, 28\)"),
        (np.zeros((2, 3, 28, 28), np.uint8), r"got \(2, 3, 28, 28\)"),
        (np.full((28, 28), 2.0), r"float images must lie in \[0, 1\], got \[2, 2\]"),
        (np.full((28, 28), np.nan), "images hold NaN or infinite values"),
        (np.zeros((28, 28), np.int64), "images must be uint8 or float, got dtype int64"),
    ],
)
def test_bad_images(runtime, images, message):
    with pytest.raises(ValueError, match=message):
        runtime.encode(images)


def test_parse_z():
    np.testing.assert_array_equal(parse_z("1, -2.5 3e-1", 3), [1.0, -2.5, 0.3])
    with pytest.raises(ValueError, match="z has 2 values, expected 3 \\(the latent dimension\\)"):
        parse_z("1,2", 3)
    with pytest.raises(ValueError, match="z value 2 is not a number: 'x'"):
        parse_z("1,x,3", 3)
    with pytest.raises(ValueError, match="z is empty: expected 3 comma-separated numbers"):
        parse_z("  ", 3)
    with pytest.raises(ValueError, match="z holds NaN or infinite values"):
        parse_z("1,nan,3", 3)


def test_checksum_mismatch_is_refused(bundle_copy):
    path = bundle_copy / "index_mu.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"index_mu.npy: sha256 mismatch \(manifest "):
        Runtime.load(bundle_copy)


def test_missing_and_truncated_files(bundle_copy):
    (bundle_copy / "decoder.onnx").write_bytes((bundle_copy / "decoder.onnx").read_bytes()[:100])
    with pytest.raises(BundleError, match=r"decoder.onnx: size is 100 bytes, manifest says \d+"):
        Runtime.load(bundle_copy)
    (bundle_copy / "decoder.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="file decoder.onnx is missing"):
        Runtime.load(bundle_copy)
    with pytest.raises(FileNotFoundError, match="bundle directory not found"):
        Runtime.load(bundle_copy / "nope")


def test_manifest_problems(bundle_copy):
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(BundleError, match="format_version 99 is not supported"):
        Runtime.load(bundle_copy)
    path.write_text(json.dumps({**manifest, "files": {**manifest["files"],
                                                      "../escape": {"sha256": "x", "bytes": 1}}}))
    with pytest.raises(BundleError, match="file name '../escape' is not a plain name"):
        Runtime.load(bundle_copy)
    path.write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json: not valid JSON"):
        Runtime.load(bundle_copy)


def test_wrong_index_shape_is_refused(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["index"]["size"] += 1
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    message = r"index_mu.npy: shape is \(5000, 8\), expected \(5001, 8\)"
    with pytest.raises(BundleError, match=message):
        Runtime.load(bundle_copy)


def test_threads_validation(tiny_bundle):
    for threads in (0, 257, 3000, 2**31, 10**20, 2.0, True):
        with pytest.raises(ValueError) as info:
            Runtime.load(tiny_bundle, threads=threads)
        assert str(info.value) == f"threads must be an integer in [1, 256], got {threads!r}"


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
    np.testing.assert_array_equal(matches.ids[149], runtime.nearest(z[149], k=3, by="decoded").ids)
