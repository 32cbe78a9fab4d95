"""A catalog sharded over a local Ray (2 actors) answers as one Runtime over the whole of it."""

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import ray
from click.testing import CliRunner
from PIL import Image

from tests.test_server import start_serve
from vae_edge.runtime import Runtime
from vae_edge.runtime.bundle import (
    INDEX_FILES,
    MODEL_FILES,
    THUMBNAIL_FILES,
    BundleError,
    CatalogIndex,
    bundle_files,
    pack_thumbnails,
    read_manifest,
    write_index,
    write_manifest,
)
from vae_edge.runtime.cli import main as run_main
from vae_edge.runtime.cluster import ShardedRuntime, ShardUnavailable
from vae_edge.runtime.images import thumbnail_bytes
from vae_edge.runtime.search import P_TOLERANCE
from vae_edge.runtime.server import KioskApp

# The engine promises p within 1.1 P_TOLERANCE relative of exact (runtime/search.py, step 2),
# for the whole catalog and for each shard's log S alike: two such values differ by twice that.
P_RTOL = 2.2 * P_TOLERANCE
ONLY_IN_SHARD_0 = 0  # label id whose items all lie in the first shard
ABSENT = 9  # label id no item has
DUPLICATES = 50  # items of the first shard repeated in the second: exact ties across shards


def run(*args):
    return CliRunner().invoke(run_main, [str(a) for a in args])


@pytest.fixture(scope="module")
def shop(tiny_bundle, tmp_path_factory):
    """A bundle from the tiny one: label 0 at the front (in shard 0 only), label 9 left out,
    the last DUPLICATES items copies of first-shard items, metadata columns and thumbnails."""
    manifest = read_manifest(tiny_bundle)
    index = Runtime.load(tiny_bundle).index
    rows = np.flatnonzero(index.labels[:1800] != ABSENT)
    rows = rows[np.argsort(index.labels[rows] != ONLY_IN_SHARD_0, kind="stable")]
    first_half = rows[:(len(rows) + DUPLICATES) // 2]
    copies = first_half[index.labels[first_half] != ONLY_IN_SHARD_0][-DUPLICATES:]
    rows = np.concatenate([rows, copies])
    n = len(rows)
    out = tmp_path_factory.mktemp("cluster") / "shop"
    out.mkdir()
    for name in MODEL_FILES.values():
        shutil.copyfile(tiny_bundle / name, out / name)
    colours = np.array(["red", "blue", "green"], dtype=object)
    write_index(out, CatalogIndex(
        mu=index.mu[rows], log_sigma=index.log_sigma[rows], labels=index.labels[rows],
        label_names=index.label_names, ids=np.array([f"sku-{i}" for i in range(n)], object),
        columns=("name", "colour"),
        metadata=(np.array([f"item {i}" for i in range(n)], object), colours[np.arange(n) % 3]),
        **pack_thumbnails([thumbnail_bytes(Image.new("L", (28, 28), i % 256), 28)
                           for i in range(n)])))
    manifest["index"]["size"] = n
    manifest["items"]["columns"] = ["id", "name", "colour"]
    manifest["thumbnails"] = {"files": dict(THUMBNAIL_FILES), "format": "webp", "size": [28, 28]}
    manifest["files"] = {name: {} for name in bundle_files(True)}
    write_manifest(out, manifest)
    return out


@pytest.fixture(scope="module")
def whole(shop):
    return Runtime.load(shop)


@pytest.fixture(scope="module")
def shards(shop, tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster") / "shards"
    result = run("shard", "--bundle", shop, "--parts", 2, "-o", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def local_ray():
    # Logical CPUs for 4 actors (these 2 and the served kiosk's 2); a small object store.
    ray.init(num_cpus=4, object_store_memory=100 << 20, include_dashboard=False,
             log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="class")
def cluster(local_ray, shards):
    """Gone before the tests that start actors of their own: fewer Ray processes at once."""
    sharded = ShardedRuntime.load(shards)
    yield sharded
    sharded.close()


def assert_same(expected, got, distances=False):
    np.testing.assert_array_equal(got.rows, expected.rows)
    np.testing.assert_array_equal(got.ids, expected.ids)
    np.testing.assert_array_equal(got.labels, expected.labels)
    np.testing.assert_array_equal(got.log_likelihoods, expected.log_likelihoods)  # bit for bit
    np.testing.assert_allclose(got.probabilities, expected.probabilities, rtol=P_RTOL, atol=0)
    assert got.metadata == expected.metadata
    if distances:
        np.testing.assert_array_equal(got.distances, expected.distances)
    else:
        assert got.distances is None and expected.distances is None


def test_shard_writes_bundles_that_load_and_a_set_that_names_them(shop, shards, whole):
    record = json.loads((shards / "shards.json").read_text())
    sizes = [entry["size"] for entry in record["shards"]]
    assert sum(sizes) == len(whole.index) and abs(sizes[0] - sizes[1]) <= 1
    for entry in record["shards"]:
        part = Runtime.load(shards / entry["dir"])  # verifies every file's sha256
        lo = entry["offset"]
        np.testing.assert_array_equal(part.index.mu, whole.index.mu[lo:lo + entry["size"]])
        assert part.index.ids.tolist() == whole.index.ids[lo:lo + entry["size"]].tolist()
        assert part.index.thumbnail(3) == whole.index.thumbnail(lo + 3)
        for name in MODEL_FILES.values():  # the graphs: hard links to the bundle's
            assert (shards / entry["dir"] / name).stat().st_ino == (shop / name).stat().st_ino
    first, second = (Runtime.load(shards / e["dir"]).index for e in record["shards"])
    assert ONLY_IN_SHARD_0 in first.labels and ONLY_IN_SHARD_0 not in second.labels


def test_shard_refuses_bad_requests_in_one_line(shop, shards, tmp_path):
    for args, expected in (((shop, 0, tmp_path / "a"), "--parts"),
                           ((shards / "shard-0", 1000, tmp_path / "b"), "at most the catalog size"),
                           ((shop, 2, shards), "exists"),
                           ((tmp_path / "none", 2, tmp_path / "c"), "not found")):
        result = run("shard", "--bundle", args[0], "--parts", args[1], "-o", args[2])
        assert result.exit_code == 2, result.output
        assert expected in result.output and "Traceback" not in result.output


def test_the_runtime_and_its_cli_import_no_ray(shop, tmp_path):
    code = (f"import sys\nfrom click.testing import CliRunner\n"
            f"from vae_edge.runtime import Runtime\nfrom vae_edge.runtime.cli import main\n"
            f"import vae_edge.runtime.server\n"
            f"Runtime.load({str(shop)!r}).nearest([0.0] * 8)\n"
            f"result = CliRunner().invoke(main, ['shard', '--bundle', {str(shop)!r}, "
            f"'--parts', '2', '-o', {str(tmp_path / 'set')!r}])\n"
            f"assert result.exit_code == 0, result.output\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def queries(whole, count, seed):
    """count latent queries: near items, far out, and at duplicated items' means (ties)."""
    rng = np.random.default_rng(seed)
    d = whole.latent_dim
    mu = whole.index.mu.astype(np.float64)
    kind = rng.integers(0, 3, count)
    z = np.where(kind[:, None] == 0, mu[rng.integers(0, len(mu), count)]
                 + 0.3 * rng.standard_normal((count, d)), 3.0 * rng.standard_normal((count, d)))
    tied = kind == 2
    z[tied] = mu[len(mu) - 1 - rng.integers(0, DUPLICATES, tied.sum())]
    return z


class TestAsOneRuntime:
    """Queries to 2 actors answered as one Runtime answers them."""

    def test_a_thousand_mixed_queries_equal_one_runtime(self, whole, cluster):
        rng = np.random.default_rng(0)
        names = whole.label_names
        labels = [None, None, ONLY_IN_SHARD_0, names[ONLY_IN_SHARD_0], 3, "sneaker"]
        z = queries(whole, 700, seed=1)
        images = whole.decode(queries(whole, 300, seed=2))
        answered = position = 0
        while position < len(z):  # one z, then batches of up to 16
            size = 1 if rng.random() < 0.5 else int(rng.integers(1, 17))
            batch = z[position:position + size]
            query = batch[0] if size == 1 else batch
            args = {"k": int(rng.choice([1, 5, 20, 500])),
                    "label": labels[rng.integers(len(labels))],
                    "by": str(rng.choice(["latent", "decoded"]))}
            args["with_distance"] = bool(rng.random() < 0.5)
            assert_same(whole.nearest(query, **args), cluster.nearest(query, **args),
                        distances=args["by"] == "decoded" or args["with_distance"])
            answered += len(batch)
            position += size
        position = 0
        while position < len(images):
            size = int(rng.integers(1, 9))
            batch = images[position:position + size]
            query = batch[0] if size == 1 else batch
            args = {"k": int(rng.choice([1, 6, 50])), "label": labels[rng.integers(len(labels))]}
            assert_same(whole.nearest_image(query, **args), cluster.nearest_image(query, **args))
            answered += len(batch)
            position += size
        assert answered == 1000


    def test_ties_across_shards_go_to_the_lower_row(self, whole, cluster):
        n = len(whole.index)
        copy = n - 1  # in the second shard, a copy of an item of the first
        original = int(np.flatnonzero((whole.index.mu == whole.index.mu[copy]).all(axis=1)
                                      & (whole.index.log_sigma == whole.index.log_sigma[copy])
                                      .all(axis=1))[0])
        assert original < n // 2 <= copy
        z = whole.index.mu[copy].astype(np.float64)
        got = cluster.nearest(z, k=n)  # the whole ranking
        assert_same(whole.nearest(z, k=n), got)
        place = list(got.rows).index(original)
        assert got.rows[place + 1] == copy and got.log_likelihoods[place] == got.log_likelihoods[
            place + 1]


    def test_bad_queries_are_refused_as_by_one_runtime(self, whole, cluster):
        z = np.zeros(whole.latent_dim)
        for call in (lambda rt: rt.nearest(z, label=ABSENT),
                     lambda rt: rt.nearest(z, label="Hat"),
                     lambda rt: rt.nearest(z, k=0), lambda rt: rt.nearest(z, by="pixels"),
                     lambda rt: rt.nearest(np.zeros(3)),
                     lambda rt: rt.nearest_image(np.zeros((5, 5))),
                     lambda rt: rt.nearest(z, with_distance=1)):
            with pytest.raises(ValueError) as expected:
                call(whole)
            with pytest.raises(ValueError) as got:
                call(cluster)
            assert str(got.value) == str(expected.value)


    def test_view_is_one_runtimes_view(self, whole, cluster):
        z = np.asarray(KioskApp(whole).opening_z)
        for by, label in (("latent", None), ("decoded", None), ("decoded", ONLY_IN_SHARD_0)):
            image, expected = whole.view(z, k=6, label=label, by=by)
            got_image, got = cluster.view(z, k=6, label=label, by=by)
            np.testing.assert_array_equal(got_image, image)
            assert_same(expected, got, distances=True)

    def test_the_kiosk_app_answers_from_the_cluster_as_from_one_runtime(self, whole, cluster):
        one, sharded = KioskApp(whole), KioskApp(cluster)
        assert sharded.info() == one.info()
        z = np.asarray(one.opening_z)
        for by in ("latent", "decoded"):
            expected, got = one.nearest(z, 8, by=by), sharded.nearest(z, 8, by=by)
            for answer in (expected, got):  # picture URLs name each bundle's files
                for result in answer["results"]:
                    result["image"] = result["image"].split("?")[0]
            assert [r.pop("probability") for r in got["results"]] == pytest.approx(
                [r.pop("probability") for r in expected["results"]], rel=P_RTOL)
            assert got == expected
        for item_id in ("sku-0", f"sku-{len(whole.index) - 1}"):
            expected, got = one.item(item_id), sharded.item(item_id)
            assert got.pop("image").split("?")[0] == expected.pop("image").split("?")[0]
            assert got == expected
            assert sharded.item_image(item_id) == one.item_image(item_id)


def test_shards_of_unlike_posteriors_rank_designs_and_photos_by_the_whole_catalogs_scale(
        local_ray, shop, tmp_path):
    """The W2 ranking (by="decoded", photos) scales scores by tau^2, the median posterior
    variance: here the first shard's posteriors are narrower than the second's, so each
    shard's own median differs from the whole catalog's, and the cluster must still answer
    as one Runtime."""
    bundle = tmp_path / "unlike"
    shutil.copytree(shop, bundle)
    narrower = Runtime.load(shop).index.log_sigma.astype(np.float32)
    narrower[:len(narrower) // 2] -= 1.0
    np.save(bundle / INDEX_FILES["log_sigma"], narrower.astype(np.float16))
    manifest = read_manifest(bundle)
    manifest["files"] = {name: {} for name in bundle_files(True)}
    write_manifest(bundle, manifest)
    out = tmp_path / "shards"
    assert run("shard", "--bundle", bundle, "--parts", 2, "-o", out).exit_code == 0
    whole = Runtime.load(bundle)
    scales = {Runtime.load(out / name).wasserstein().temperature
              for name in ("shard-0", "shard-1")}
    assert whole.wasserstein().temperature not in scales and len(scales) == 2

    sharded = ShardedRuntime.load(out)
    try:
        z = queries(whole, 40, seed=3)
        for query in (z[0], z):
            for label in (None, 3):
                assert_same(whole.nearest(query, k=6, label=label, by="decoded"),
                            sharded.nearest(query, k=6, label=label, by="decoded"),
                            distances=True)
        images = whole.decode(z[:8])
        for query in (images[0], images):
            assert_same(whole.nearest_image(query, k=6), sharded.nearest_image(query, k=6))
    finally:
        sharded.close()


def test_vae_run_serve_from_the_cluster(local_ray, shards, whole, tmp_path):
    process, _, port = start_serve(["--shards", str(shards), "--cluster", local_ray], tmp_path)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        z = whole.index.mu[7].astype(np.float64).tolist()
        connection.request("POST", "/api/nearest", json.dumps({"z": z, "k": 4}),
                           {"Content-Type": "application/json"})
        answer = json.loads(connection.getresponse().read())
        assert [r["id"] for r in answer["results"]] == whole.nearest(z, k=4).ids.tolist()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_a_killed_actor_is_restarted_and_a_dead_one_is_reported(local_ray, shards, whole):
    sharded = ShardedRuntime.load(shards)
    z = queries(whole, 8, seed=3)
    os.kill(ray.get(sharded.actors[1].pid.remote()), signal.SIGKILL)
    assert_same(whole.nearest(z, k=5), sharded.nearest(z, k=5))  # Ray restarted it
    ray.kill(sharded.actors[1], no_restart=True)
    with pytest.raises(ShardUnavailable, match="shard-1") as error:
        sharded.nearest(z, k=5)
    assert "shard-0" not in str(error.value)  # only the shard that is gone
    sharded.close()


def test_a_wrong_or_incomplete_shard_set_is_refused(local_ray, shop, shards, tmp_path):
    other = tmp_path / "other"
    assert run("shard", "--bundle", shop, "--parts", 3, "-o", other).exit_code == 0
    mixed = tmp_path / "mixed"
    shutil.copytree(shards, mixed)
    shutil.rmtree(mixed / "shard-1")
    shutil.copytree(other / "shard-1", mixed / "shard-1")
    with pytest.raises(BundleError, match="shard-1: is not the shard shards.json lists"):
        ShardedRuntime.load(mixed)
    shutil.rmtree(mixed / "shard-1")
    with pytest.raises(FileNotFoundError, match="shard-1"):
        ShardedRuntime.load(mixed)
    shutil.copytree(shards / "shard-1", mixed / "shard-1")
    with open(mixed / "shard-1" / "items.csv", "a") as handle:  # changed after sharding
        handle.write("\n")
    with pytest.raises(BundleError, match="items.csv: size is"):
        ShardedRuntime.load(mixed)
    result = run("serve", "--shards", mixed, "--cluster", local_ray)
    assert result.exit_code == 2 and "items.csv: size is" in result.output
