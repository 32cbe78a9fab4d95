"""vae-train --catalog on a small colour catalog made here with Pillow: photos of mixed sizes,
modes and formats, and a CSV with extra columns."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from vae_edge.runtime.catalog import catalog_fingerprint, read_catalog
from vae_edge.runtime.images import read_image
from vae_edge.training.catalog_data import cached_photos, catalog_data
from vae_edge.training.cli import (
    CATALOG_IMAGES_SEEN,
    CATALOG_RECIPE,
    catalog_epochs,
)
from vae_edge.training.cli import main as train_main
from vae_edge.training.train import load_checkpoint, model_from_checkpoint, to_tensor

ITEMS = 36
LABELS = ("bag", "dress", "shoe")
TINY = ["--image-size", "16", "--latent-dim", "4", "--widths", "4,8", "--hidden-dim", "16",
        "--batch-size", "8", "--no-progress"]


def make_catalog(directory, items=ITEMS, labels=True):
    """A colour catalog: a shape per label on white or grey, PNG (some grayscale, one with
    transparency), JPEG and WebP, sizes from 12x20 to 90x60. Returns the CSV's path."""
    from PIL import Image, ImageDraw

    photos = directory / "photos"
    photos.mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(items):
        label = LABELS[i % len(LABELS)]
        width, height = int(rng.integers(12, 91)), int(rng.integers(20, 61))
        background = (255, 255, 255) if i % 4 else (200, 200, 200)
        picture = Image.new("RGB", (width, height), background)
        colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        box = (width // 5, height // 5, width - width // 5, height - height // 5)
        draw = ImageDraw.Draw(picture)
        (draw.ellipse if label == "bag" else draw.rectangle)(box, fill=colour)
        if label == "shoe":
            draw.line((0, height - 2, width, height - 2), fill=colour, width=2)
        extension, options = [("png", {}), ("jpg", {"quality": 90}),
                              ("webp", {"quality": 85})][i % 3]
        if i % 7 == 6:
            picture = picture.convert("L")
        if i == 3:  # a PNG
            picture = picture.convert("RGBA")
            picture.putalpha(Image.new("L", picture.size, 200))
        name = f"photos/item-{i:03d}.{extension}"
        picture.save(directory / name, **options)
        row = {"id": f"SKU-{1000 + i}", "image": name, "name": f"{label.title()} number {i}",
               "price": f"{10 + i}.99", "url": f"https://shop.example/p/{1000 + i}"}
        if labels:
            row["label"] = label
        rows.append(row)
    return write_csv(directory / "catalog.csv", rows)


def write_csv(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_rows(path):
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def run_train(*args):
    return CliRunner().invoke(train_main, [str(a) for a in args])


@pytest.fixture
def catalog_csv(tmp_path):
    return make_catalog(tmp_path / "shop")


def test_catalog_trains_end_to_end_and_decodes_photos_once(tmp_path, catalog_csv):
    cache = tmp_path / "cache"
    args = ["--catalog", catalog_csv, "--epochs", "2", "--label-weight", "1",
            "--cache-dir", cache, *TINY]
    first = run_train(*args, "--out", tmp_path / "run1")
    assert first.exit_code == 0, first.output
    assert f"photos: decoding {ITEMS} photos into {cache}" in first.output
    assert "catalog: 32 items train, 4 held out, 3 labels" in first.output

    checkpoint = load_checkpoint(tmp_path / "run1" / "checkpoint.pt")
    assert checkpoint["config"] == {"latent_dim": 4, "channels": [4, 8], "hidden_dim": 16,
                                    "image_size": 16, "num_classes": 3, "image_channels": 3}
    # The catalog recipe's defaults, beside the epochs and batch size given.
    recipe = {name: checkpoint["train_config"][name] for name in ("beta", "patience")}
    assert recipe == {name: CATALOG_RECIPE[name] for name in ("beta", "patience")}
    train_config = checkpoint["train_config"]
    assert (train_config["epochs"], train_config["batch_size"]) == (2, 8)
    dataset = checkpoint["dataset"]
    ids = [row["id"] for row in read_rows(catalog_csv)]
    assert dataset["kind"] == "catalog"
    assert dataset["csv"] == str(catalog_csv.resolve())
    assert dataset["fingerprint"] == catalog_fingerprint(read_catalog(catalog_csv))
    assert dataset["class_names"] == list(LABELS)
    assert (dataset["items"], dataset["train_rows"], dataset["test_rows"]) == (ITEMS, 32, 4)
    assert dataset["skipped"] == 0
    assert len(set(dataset["holdout_ids"])) == 4 and set(dataset["holdout_ids"]) <= set(ids)
    for row in checkpoint["history"]:
        assert np.isfinite([row["train_loss"], row["test_loss"]]).all()

    model = model_from_checkpoint(checkpoint)
    photo = read_image(catalog_csv.parent / "photos" / "item-001.jpg", 16, 3)
    with torch.no_grad():
        assert model.decode(model.encode(to_tensor(photo[None]))[0]).shape == (1, 3, 16, 16)

    # Another run on the unchanged catalog reads the cache, and trains on the same pixels.
    second = run_train(*args, "--out", tmp_path / "run2")
    assert second.exit_code == 0, second.output
    assert f"photos: reusing the cache {cache}" in second.output
    assert "decoding" not in second.output
    again = load_checkpoint(tmp_path / "run2" / "checkpoint.pt")
    for name, tensor in checkpoint["model"].items():
        assert torch.equal(tensor, again["model"][name]), name

    # A replaced photo changes the fingerprint: decoded again, into a new cache.
    photo_path = catalog_csv.parent / "photos" / "item-002.webp"
    stat = photo_path.stat()
    os.utime(photo_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    third = run_train(*args, "--epochs", "1", "--out", tmp_path / "run3")
    assert third.exit_code == 0, third.output
    assert f"photos: decoding {ITEMS} photos" in third.output
    assert len(list(cache.glob("*.npy"))) == 2


def test_a_catalog_gets_the_recipes_hidden_layer_unless_given(tmp_path, catalog_csv):
    at = TINY.index("--hidden-dim")
    small = ["--catalog", catalog_csv, "--epochs", "1", "--cache-dir", tmp_path / "cache",
             *TINY[:at], *TINY[at + 2:]]
    assert run_train(*small, "--out", tmp_path / "run1").exit_code == 0
    config = load_checkpoint(tmp_path / "run1" / "checkpoint.pt")["config"]
    assert config["hidden_dim"] == CATALOG_RECIPE["hidden_dim"] == 512
    assert run_train(*small, "--hidden-dim", "24", "--out", tmp_path / "run2").exit_code == 0
    assert load_checkpoint(tmp_path / "run2" / "checkpoint.pt")["config"]["hidden_dim"] == 24


def test_bad_rows_are_refused_with_their_lines_and_nothing_is_written(tmp_path, catalog_csv):
    rows = read_rows(catalog_csv)
    rows[3]["id"] = rows[1]["id"]  # CSV line 5
    rows[6]["id"] = ""  # line 8
    write_csv(catalog_csv, rows)
    out, cache = tmp_path / "run", tmp_path / "cache"
    result = run_train("--catalog", catalog_csv, "--out", out, "--cache-dir", cache, *TINY)
    assert result.exit_code == 2
    assert result.output == (f"Error: {catalog_csv}: 2 bad rows: line 5: id 'SKU-1001' "
                             "repeated; line 8: empty id; fix them or pass --skip-bad to "
                             "leave them out\n")
    assert not out.exists() and not cache.exists()

    # Photos: a missing one and one that is not an image, found before any training.
    rows = read_rows(catalog_csv.with_name("catalog.csv"))
    rows[3]["id"], rows[6]["id"] = "SKU-2003", "SKU-2006"
    rows[9]["image"] = "photos/missing.png"  # line 11
    (catalog_csv.parent / "photos" / "item-021.png").write_bytes(b"not a png")  # line 23
    write_csv(catalog_csv, rows)
    result = run_train("--catalog", catalog_csv, "--out", out, "--cache-dir", cache, *TINY)
    assert result.exit_code == 2
    decoding, message = result.output.strip().split("\n")
    assert decoding.startswith(f"photos: decoding {ITEMS} photos into {cache}")
    assert message.startswith(f"Error: {catalog_csv}: 2 bad photos: line 11: image not found: ")
    assert "; line 23: item-021.png: not a PNG, JPEG, WebP, BMP, GIF or PPM image;" in message
    assert not out.exists()
    assert not list(cache.iterdir())  # no cache, and no temporary left behind

    # With --skip-bad the cache records which photos could not be read, so a later run
    # without it refuses them again, from the cache, without decoding anything.
    skipped = run_train("--catalog", catalog_csv, "--skip-bad", "--epochs", "1", "--out", out,
                        "--cache-dir", cache, *TINY)
    assert skipped.exit_code == 0, skipped.output
    assert "--skip-bad: left out 2 bad rows (line 11: image not found: " in skipped.output
    again = run_train("--catalog", catalog_csv, "--out", tmp_path / "run2", "--cache-dir",
                      cache, *TINY)
    assert again.exit_code == 2
    assert again.output == message + "\n"
    assert not (tmp_path / "run2").exists()


def test_skip_bad_leaves_bad_rows_out_and_says_how_many(tmp_path, catalog_csv):
    rows = read_rows(catalog_csv)
    rows[3]["id"] = rows[1]["id"]
    rows[9]["image"] = "photos/missing.png"
    (catalog_csv.parent / "photos" / "item-021.png").write_bytes(b"not a png")
    write_csv(catalog_csv, rows)
    args = ["--catalog", catalog_csv, "--skip-bad", "--epochs", "1",
            "--cache-dir", tmp_path / "cache", *TINY]
    result = run_train(*args, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "--skip-bad: left out 3 bad rows (line 5: id 'SKU-1001' repeated; line 11: " in (
        result.output)
    dataset = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["dataset"]
    assert (dataset["items"], dataset["skipped"]) == (ITEMS - 3, 3)
    assert dataset["train_rows"] + dataset["test_rows"] == ITEMS - 3


def test_holdout_is_seeded_and_labels_are_required_for_label_weight(tmp_path, catalog_csv):
    def holdout(seed, fraction=0.25):
        data = catalog_data(catalog_csv, 16, 1, holdout=fraction, seed=seed,
                            cache_dir=tmp_path / "cache", log=lambda message: None)
        assert len(data.train) + len(data.test) == ITEMS
        assert data.train[np.arange(2)].shape == (2, 1, 16, 16)
        return data.record["holdout_ids"]

    assert len(holdout(0)) == 9
    assert holdout(0) == holdout(0) != holdout(1)
    for fraction in (0, 1, -0.5):
        with pytest.raises(ValueError, match=f"holdout must be a fraction between 0 and 1 "
                           rf"\(exclusive\), got {fraction}"):
            holdout(0, fraction)

    unlabelled = make_catalog(tmp_path / "unlabelled", items=6, labels=False)
    result = run_train("--catalog", unlabelled, "--label-weight", "1", "--out",
                       tmp_path / "run", *TINY)
    assert result.exit_code == 2
    assert result.output == (f"Error: {unlabelled}: the label-aware objective needs class "
                             "labels, and the CSV has no label column (columns: id, image, "
                             "name, price, url)\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--image-size", "64"], "--image-size needs --catalog"),
    (["--channels", "3", "--skip-bad"], "--channels, --skip-bad need --catalog"),
    (["--catalog", "shop.csv", "--data-dir", "."], "--data-dir and --download are for "
                                                   "Fashion-MNIST"),
    (["--catalog", "shop.csv", "--image-size", "30"], "image_size must be a multiple of 4 "
                                                      "from 16 to 256, got 30"),
    (["--catalog", "missing.csv"], "catalog CSV not found: missing.csv"),
])
def test_catalog_options_are_checked_first(tmp_path, args, message):
    result = run_train(*args, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert message in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_example_catalog_is_a_mixed_colour_catalog(tmp_path, data_dir):
    from PIL import Image

    from vae_edge.runtime.catalog import fit_catalog
    from vae_edge.training.example_catalog import make_example_catalog

    csv_path = make_example_catalog(tmp_path / "example", size=20, seed=3, data_dir=data_dir)
    catalog = read_catalog(csv_path)
    assert len(catalog) == 20 and catalog.columns == ("name", "price", "url")
    assert {path.suffix for path in catalog.images} == {".png", ".jpg", ".webp"}
    assert len({Image.open(path).size for path in catalog.images}) > 10
    _, pixels, _ = fit_catalog(catalog, 32, 3)
    assert (pixels[:, 0] != pixels[:, 2]).any()  # colour, not gray
    with pytest.raises(FileExistsError, match="exists"):
        make_example_catalog(tmp_path / "example", size=5, data_dir=data_dir)


def test_resuming_on_other_data_or_options_says_what_changed(tmp_path, catalog_csv):
    import shutil

    cache, out = tmp_path / "cache", tmp_path / "run"
    args = ["--epochs", "1", "--cache-dir", cache, "--out", out, *TINY]
    assert run_train("--catalog", catalog_csv, *args).exit_code == 0
    moved = tmp_path / "moved"
    shutil.copytree(catalog_csv.parent, moved)
    result = run_train("--catalog", moved / "catalog.csv", *args, "--resume")
    assert result.exit_code == 2
    message = result.output.strip().split("\n")[-1]
    assert message.startswith(f"Error: {out / 'checkpoint.pt'} was made from other data; resume "
                              f"with the same data and options (recorded -> now: csv "
                              f"'{catalog_csv.resolve()}' -> '{(moved / 'catalog.csv').resolve()}'"
                              ", fingerprint '"), message
    assert "holdout_ids" not in message and len(message) < 600
    result = run_train("--catalog", catalog_csv, *args[:1], "2", *args[2:], "--resume")
    assert result.exit_code == 2
    assert result.output.strip().endswith("was made with another configuration; resume with the "
                                          "same options (recorded -> now: epochs 1 -> 2)")


def _replace_pixels(npy, record):
    pixels = np.load(npy, mmap_mode="r+")
    pixels[0] = 255 - pixels[0]  # same shape, same dtype: only the sha256 tells
    pixels.flush()


def _rewrite(record, **changes):
    data = json.loads(record.read_text())
    data.update(changes)
    record.write_text(json.dumps(data))


def _without(record, key):
    data = json.loads(record.read_text())
    del data[key]
    record.write_text(json.dumps(data))


def _kept(record, rows):
    data = json.loads(record.read_text())
    data["kept"] = rows(data["kept"])
    record.write_text(json.dumps(data))


UNVERIFIED_CACHES = [
    ("pixels replaced", _replace_pixels, "cache.npy is not the file written (its sha256 differs)"),
    ("another fingerprint", lambda npy, record: _rewrite(record, fingerprint="0" * 64),
     "its fingerprint is not the catalog's"),
    ("duplicate rows", lambda npy, record: _kept(record, lambda rows: [0] + rows[:-1]),
     "its rows repeat or are out of order"),
    ("negative rows", lambda npy, record: _kept(record, lambda rows: [-1] + rows[1:]),
     "a row outside 0-5"),
    ("rows out of range", lambda npy, record: _kept(record, lambda rows: rows[:-1] + [6]),
     "a row outside 0-5"),
    ("fewer rows kept", lambda npy, record: _kept(record, lambda rows: rows[:-1]),
     "5 rows kept and 0 skipped, for 6 items"),
    ("rows as text", lambda npy, record: _kept(record, lambda rows: [str(r) for r in rows]),
     "its rows are not all whole numbers"),
    ("a JSON list", lambda npy, record: record.write_text("[1, 2]"),
     "cache.json holds a list, not an object"),
    ("not JSON", lambda npy, record: record.write_bytes(b"\xff{"),
     "cache.json is not JSON: "),
    ("a missing key", lambda npy, record: _without(record, "sha256"),
     "cache.json has no str 'sha256'"),
    ("a wrong type", lambda npy, record: _rewrite(record, size="16"),
     "cache.json has no int 'size'"),
    ("fewer rows", lambda npy, record: np.save(npy, np.zeros((5, 3, 16, 16), np.uint8)),
     "cache.npy is uint8 (5, 3, 16, 16), expected uint8 (6, 3, 16, 16)"),
    ("wrong size", lambda npy, record: np.save(npy, np.zeros((6, 3, 8, 8), np.uint8)),
     "cache.npy is uint8 (6, 3, 8, 8), expected uint8 (6, 3, 16, 16)"),
    ("wrong channels", lambda npy, record: np.save(npy, np.zeros((6, 1, 16, 16), np.uint8)),
     "cache.npy is uint8 (6, 1, 16, 16), expected uint8 (6, 3, 16, 16)"),
    ("wrong dtype", lambda npy, record: np.save(npy, np.zeros((6, 3, 16, 16), np.float32)),
     "cache.npy is float32 (6, 3, 16, 16), expected uint8 (6, 3, 16, 16)"),
    ("0-d", lambda npy, record: np.save(npy, np.uint8(3)),
     "cache.npy is uint8 (), expected uint8 (6, 3, 16, 16)"),
    ("not a .npy", lambda npy, record: npy.write_bytes(b"PK\x03\x04 not numpy"),
     "cache.npy is not a .npy array: "),
]


@pytest.mark.parametrize("name, damage, reason", UNVERIFIED_CACHES,
                         ids=[case[0] for case in UNVERIFIED_CACHES])
def test_a_cache_that_does_not_verify_is_decoded_again_saying_why(tmp_path, name, damage,
                                                                   reason):
    catalog = read_catalog(make_catalog(tmp_path / "shop", items=6))
    cache_dir = tmp_path / "cache"
    fresh = cached_photos(catalog, 16, 3, cache_dir=cache_dir, log=lambda message: None)
    expected = np.array(fresh.pixels)
    npy, record = fresh.path, fresh.path.with_suffix(".json")
    del fresh
    damage(npy, record)
    lines = []
    again = cached_photos(catalog, 16, 3, cache_dir=cache_dir, log=lines.append)
    assert lines[0].startswith(f"photos: the cache {npy} does not verify ("), lines
    assert lines[0].endswith("); decoding it again"), lines
    why = lines[0][len(f"photos: the cache {npy} does not verify ("):-len("); decoding it again")]
    assert why.replace(npy.stem, "cache").startswith(reason), why  # the names are a hash
    assert lines[1:] == [f"photos: decoding 6 photos into {npy}"]
    assert not again.reused and again.catalog.ids == catalog.ids
    np.testing.assert_array_equal(again.pixels, expected)
    lines.clear()
    cached_photos(catalog, 16, 3, cache_dir=cache_dir, log=lines.append)
    assert lines == [f"photos: reusing the cache {npy} (6 items)"]


def test_an_export_of_the_trained_catalog_takes_photos_and_thumbnails_from_the_cache(tmp_path):
    from vae_edge.runtime.catalog import fit_catalog
    from vae_edge.training.catalog_data import exported_photos

    catalog = read_catalog(make_catalog(tmp_path / "shop", items=6))
    cache_dir = tmp_path / "cache"
    cached_photos(catalog, 16, 3, thumbnail_size=24, cache_dir=cache_dir, log=lambda line: None)
    expected = fit_catalog(catalog, 16, 3, thumbnail_size=24)
    # Every photo becomes unreadable while the catalog's fingerprint (sizes, times) stays:
    # what still comes back was not decoded again.
    for path in catalog.images:
        stat = path.stat()
        path.write_bytes(b"\0" * stat.st_size)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert catalog_fingerprint(catalog) == catalog_fingerprint(read_catalog(catalog.source))
    lines = []
    rows, pixels, thumbnails = exported_photos(catalog, 16, 3, thumbnail_size=24,
                                               cache_dir=cache_dir, log=lines.append)
    assert lines == [f"photos: reusing the cache {lines[0].split()[4]} (6 items)"]
    assert rows == expected[0]
    np.testing.assert_array_equal(pixels, expected[1])
    assert thumbnails == expected[2]
    rows, pixels, thumbnails = exported_photos(catalog, 16, 3, cache_dir=cache_dir,
                                               log=lines.append)
    assert thumbnails is None and rows == expected[0]
    np.testing.assert_array_equal(pixels, expected[1])
    # Thumbnails of another size are not in the cache: the photos are decoded, and fail.
    lines.clear()
    with pytest.raises(ValueError, match="6 bad photos"):
        exported_photos(catalog, 16, 3, thumbnail_size=32, cache_dir=cache_dir,
                        log=lines.append)
    assert lines[0].endswith("cannot be used (it holds no 32x32 thumbnails); decoding the "
                             "photos"), lines


def test_catalog_epochs_by_default_see_the_image_budget_and_at_least_ten_epochs():
    assert catalog_epochs(CATALOG_IMAGES_SEEN) == 10
    assert catalog_epochs(2603) * 2603 >= CATALOG_IMAGES_SEEN > (catalog_epochs(2603) - 1) * 2603
    assert catalog_epochs(9000) == 34
    assert catalog_epochs(36) == CATALOG_IMAGES_SEEN // 36 + 1
