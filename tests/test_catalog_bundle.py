"""A shop's colour catalog end to end: vae-train --catalog, vae-export, then the runtime alone
(no torch) finds each photo's SKU with its metadata, shows its thumbnail, and takes items in
and out with vae-run add / remove."""

from __future__ import annotations

import csv as csv_module
import http.client
import io
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tests.test_catalog_training import read_rows, write_csv
from vae_edge.runtime import Runtime
from vae_edge.runtime.cli import main as run_main
from vae_edge.runtime.server import KioskApp


def run_without_torch(without_torch, *args):
    code = without_torch(f"""
        from vae_edge.runtime.cli import main
        main({[str(a) for a in args]!r}, standalone_mode=False)
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_bundle_describes_the_catalog(shop):
    csv, bundle = shop
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["image"]["shape"] == [3, 16, 16]
    assert manifest["items"]["columns"] == ["id", "name", "price", "url"]
    assert manifest["thumbnails"]["size"] == [32, 32]
    assert manifest["index"]["label_names"] == ["bag", "dress", "shoe"]
    assert manifest["dataset"]["kind"] == "catalog"
    rows = read_rows(csv)
    runtime = Runtime.load(bundle)
    assert runtime.index.ids.tolist() == [row["id"] for row in rows]
    for row_number, row in enumerate(rows):
        assert runtime.index.item_metadata(row_number) == {
            "name": row["name"], "price": row["price"], "url": row["url"]}
        with Image.open(io.BytesIO(runtime.index.thumbnail(row_number))) as photo:
            assert photo.format == "WEBP" and photo.size == (32, 32) and photo.mode == "RGB"


def test_each_photo_finds_its_sku_on_the_runtime_alone(shop, without_torch):
    csv, bundle = shop
    rows = read_rows(csv)
    for row in rows[:12]:
        answer = json.loads(run_without_torch(
            without_torch, "nearest", "--bundle", bundle,
            "--image", csv.parent / row["image"], "-k", "3", "--json"))
        best = answer["results"][0]
        assert best["id"] == row["id"], (row["image"], answer["results"])
        assert best["label"] == row["label"]
        assert best["metadata"] == {"name": row["name"], "price": row["price"],
                                    "url": row["url"]}


def test_the_kiosk_api_serves_photos_and_metadata(shop):
    csv, bundle = shop
    runtime = Runtime.load(bundle)
    app = KioskApp(runtime)
    assert app.info()["thumbnails"] is True
    assert app.info()["metadata_columns"] == ["name", "price", "url"]
    answer = app.nearest(runtime.sample_prior(seed=2), k=3, by="decoded")
    for result in answer["results"]:
        assert set(result["metadata"]) == {"name", "price", "url"}
        body, content_type = app.item_image(result["id"])
        assert content_type == "image/webp"
        assert body == runtime.index.thumbnail(result["row"])


def test_add_and_remove_items_with_their_photos(shop, tmp_path, without_torch):
    csv, original = shop
    bundle = tmp_path / "bundle"
    shutil.copytree(original, bundle)
    photos = tmp_path / "new"
    photos.mkdir()
    rows = []
    for i, colour in enumerate([(30, 160, 40), (220, 30, 200)]):
        picture = Image.new("RGB", (70 + 20 * i, 50), (255, 255, 255))
        picture.paste(colour, (10, 8, 60, 44))
        picture.save(photos / f"new{i}.jpg", quality=92)
        rows.append({"id": f"NEW {i}/x", "image": f"new{i}.jpg", "label": "scarf",
                     "name": f"Scarf {i}"})
    new_csv = write_csv(photos / "new.csv", rows)
    out = run_without_torch(without_torch, "add", "--bundle", bundle, new_csv)
    assert out.endswith(f"added 2 items; {bundle} holds 38\n")
    runtime = Runtime.load(bundle)
    assert runtime.index.ids[-2:].tolist() == ["NEW 0/x", "NEW 1/x"]
    assert runtime.label_names == ("bag", "dress", "shoe", "scarf")
    assert runtime.index.item_metadata(36) == {"name": "Scarf 0", "price": "", "url": ""}
    old = Runtime.load(original)
    np.testing.assert_array_equal(runtime.index.mu[:36], old.index.mu)
    assert [runtime.index.thumbnail(r) for r in range(36)] == \
        [old.index.thumbnail(r) for r in range(36)]
    for i in range(2):
        answer = json.loads(run_without_torch(
            without_torch, "nearest", "--bundle", bundle, "--image", photos / f"new{i}.jpg",
            "-k", "1", "--json"))
        assert answer["results"][0]["id"] == f"NEW {i}/x"
        assert answer["results"][0]["metadata"]["name"] == f"Scarf {i}"

    before = Runtime.load(bundle)
    removed = run_without_torch(without_torch, "remove", "--bundle", bundle, "NEW 0/x",
                                read_rows(csv)[5]["id"])
    assert removed.endswith(f"removed 2 items; {bundle} holds 36\n")
    after = Runtime.load(bundle)
    kept = [r for r in range(38) if r not in (5, 36)]
    assert after.index.ids.tolist() == before.index.ids[kept].tolist()
    assert after.label_names == before.label_names
    np.testing.assert_array_equal(after.index.mu, before.index.mu[kept])
    assert [after.index.thumbnail(r) for r in range(36)] == \
        [before.index.thumbnail(r) for r in kept]
    assert [after.index.item_metadata(r) for r in range(36)] == \
        [before.index.item_metadata(r) for r in kept]


def test_vae_eval_reports_any_catalog_bundle(shop, tmp_path):
    """vae-eval --catalog: slider scenario, photo queries and a sheet per mode, for a bundle of
    64x64 colour photos rather than Fashion-MNIST."""
    from vae_edge.evaluation.cli import main as eval_main

    csv, bundle = shop
    out = tmp_path / "eval"
    result = CliRunner().invoke(eval_main, [str(bundle), "--catalog", str(csv), "-o", str(out),
                                            "--slider-queries", "12", "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["items"] == 36
    for source in ("normal", "uniform", "corners"):
        entry = report["slider_scenario"][source]
        for by in ("latent", "decoded"):
            # r of the top match never beats the best r of any item.
            assert entry[by]["median"] <= entry["bound"]["median"] + 1e-12
            assert 0 < entry[by]["distinct_top_items"] <= 1
    photo = report["photo_queries"]
    assert photo["queries"] == 36 and 0 <= photo["label_agreement"] <= 1
    # Every photo finds its own item first: the tiny model tells its 36 photos apart.
    assert photo["self_retrieval"] == 1.0
    with Image.open(out / "pictures" / "slider_decoded.png") as sheet:
        assert sheet.mode == "RGB" and sheet.size[0] > 6 * 16
    assert "photos: label agreement" in result.output


def test_vae_eval_reports_the_held_out_items_and_prior_samples(shop, tmp_path):
    """vae-eval --catalog: the likelihood of the items training held out, and a grid of decodes
    of N(0, I) at the bundle's image size."""
    from vae_edge.evaluation.cli import main as eval_main
    from vae_edge.evaluation.pictures import PRIOR_GRID, prior_grid
    from vae_edge.runtime.images import to_uint8

    csv, bundle = shop
    out = tmp_path / "eval"
    result = CliRunner().invoke(eval_main, [str(bundle), "--catalog", str(csv), "-o", str(out),
                                            "--slider-queries", "4", "--is-samples", "20",
                                            "--seed", "3", "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    runtime = Runtime.load(bundle)
    held_ids = set(manifest["dataset"]["holdout_ids"])
    present = sum(item in held_ids for item in runtime.index.ids.tolist())
    held = report["held_out"]
    assert present > 0 and held["images"] == held["is_images"] == present
    assert held["is_samples"] == 20 and held["backend"] == "onnx-decoder"
    for key in ("recon_at_mu", "kl", "loss_at_mu", "negative_elbo",
                "negative_log_likelihood_is"):
        assert np.isfinite(held[key]) and held[key] > 0, key
    # The held-out items are training's test set: their loss at mu is the test loss training
    # logged last, here from decoder.onnx rather than PyTorch.
    assert held["loss_at_mu"] == pytest.approx(manifest["metrics"]["test_loss"], abs=0.05)
    # The importance-sampled bound is at least the ELBO; the slack is the Monte-Carlo noise of
    # the sampled KL against the closed-form one.
    assert held["negative_log_likelihood_is"] <= held["negative_elbo"] + 1.0
    assert f"held out: {present} items, nats/image: -ELBO" in result.output

    assert report["pictures"]["prior_samples"] == "prior_samples.png"
    channels, size, _ = runtime.image_shape
    side = PRIOR_GRID * (size + 2) + 2
    with Image.open(out / "pictures" / "prior_samples.png") as sheet:
        assert sheet.mode == "RGB" and sheet.size == (side, side)
        pixels = np.asarray(sheet).transpose(2, 0, 1)
    assert np.array_equal(pixels, to_uint8(prior_grid(runtime, seed=3)))


def test_vae_eval_reports_held_out_null_for_a_bundle_without_holdout_ids(shop, tmp_path):
    from vae_edge.evaluation.catalog import evaluate_catalog_bundle, summary

    csv, bundle = shop
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["dataset"]["holdout_ids"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    logged = []
    report = evaluate_catalog_bundle(copy, csv, tmp_path / "eval", queries=4, threads=1,
                                     pictures=False, log=logged.append)
    assert report["held_out"] is None
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["held_out"] is None
    assert "held-out ELBO: the manifest records no holdout_ids; held_out is null" in logged
    assert "held out: none (no holdout_ids of the manifest in the index)" in summary(report)


def test_vae_eval_refuses_a_catalog_without_the_bundles_items(shop, tmp_path):
    from vae_edge.evaluation.cli import main as eval_main

    csv, bundle = shop
    rows = read_rows(csv)
    other = write_csv(csv.parent / "fewer.csv", rows[:1] + rows[2:])
    result = CliRunner().invoke(eval_main, [str(bundle), "--catalog", str(other), "-o",
                                            str(tmp_path / "eval"), "--slider-queries", "4"])
    assert result.exit_code == 2
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "1 of the bundle's 36 items have no readable photo there" in result.output
    assert not (tmp_path / "eval").exists()


def test_a_thumbnail_file_changed_under_a_running_kiosk_fails_that_picture_only(shop, tmp_path):
    """`: > B/thumbnails.bin`, then the same bytes copied back (`cp -r new/* B/`), while
    `vae-run serve` runs: each picture request after that is an error answer naming the file;
    the kiosk keeps running and serving everything else."""
    from tests.test_interrupts import ENV, console

    _, original = shop
    bundle = tmp_path / "bundle"
    shutil.copytree(original, bundle)
    ids = Runtime.load(bundle).index.ids
    process = subprocess.Popen([*console("vae-run", "run"), "serve", "--bundle", str(bundle),
                                "--port", "0"], env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(re.match(r"kiosk on http://127\.0\.0\.1:(\d+)/ ",
                            process.stdout.readline()).group(1))

        def get(path):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", path)
            response = conn.getresponse()
            answer = response.status, response.read()
            conn.close()
            return answer

        status, photo = get(f"/api/item/{ids[0]}/image")
        assert status == 200 and photo[:4] == b"RIFF"
        content = (bundle / "thumbnails.bin").read_bytes()
        for change in (b"", content):
            (bundle / "thumbnails.bin").write_bytes(change)
            for item_id in ids[:3]:
                status, body = get(f"/api/item/{item_id}/image")
                assert (status, json.loads(body)) == (500, {"error": (
                    "thumbnails.bin: changed on disk since the bundle was loaded (truncated or "
                    "overwritten in place); load the bundle again")})
            assert get("/api/info")[0] == 200
            assert get(f"/api/item/{ids[1]}")[0] == 200
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=60)
        process.stdout.close()


def webp_claiming(side: int) -> bytes:
    """A 10-byte-payload lossless WebP whose header claims side x side pixels."""
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(out, format="WEBP", lossless=True)
    data = out.getvalue()
    assert data[12:16] == b"VP8L"
    field = int.from_bytes(data[21:25], "little")
    field = (side - 1) | ((side - 1) << 14) | (field & ~((1 << 28) - 1))
    return data[:21] + field.to_bytes(4, "little") + data[25:]


@pytest.mark.parametrize("side, problem", [
    (16383, "claims a size too large to decode"),
    (9000, "picture is 9000x9000, the manifest's thumbnails are 32x32"),
    (31, "picture is 31x31, the manifest's thumbnails are 32x32"),
])
def test_thumbnails_larger_than_the_manifest_says_are_refused_before_use(shop, tmp_path, side,
                                                                          problem):
    """A re-signed bundle whose thumbnails claim another size: `nearest --sheet` and the
    kiosk's picture route refuse them from their header, before any pixel is decoded."""
    from vae_edge.runtime.bundle import pack_thumbnails, write_manifest
    from vae_edge.runtime.server import ApiError

    _, original = shop
    bundle = tmp_path / "bundle"
    shutil.copytree(original, bundle)
    packed = pack_thumbnails([webp_claiming(side)] * 36)
    (bundle / "thumbnails.bin").write_bytes(packed["thumbnails"])
    np.save(bundle / "thumbnail_offsets.npy", packed["thumbnail_offsets"])
    write_manifest(bundle, json.loads((bundle / "manifest.json").read_text()))
    runtime = Runtime.load(bundle)
    first = runtime.index.ids[0]
    message = f"thumbnails.bin: item {first!r}: {problem}"

    result = CliRunner().invoke(run_main, ["nearest", "--bundle", str(bundle), "--z",
                                           ",".join(["0"] * runtime.latent_dim), "-k",
                                           str(len(runtime.index)), "--sheet",
                                           str(tmp_path / "sheet.png")])
    assert result.exit_code == 2
    assert result.output.splitlines()[-1].startswith("Error: thumbnails.bin: item ")
    assert result.output.splitlines()[-1].endswith(problem)
    assert not (tmp_path / "sheet.png").exists()
    with pytest.raises(ApiError, match=f"^{re.escape(message)}$") as info:
        KioskApp(runtime).item_image(first)
    assert info.value.status == 500


def test_catalog_text_is_stored_harmless_for_spreadsheets_and_read_back_exactly(shop, tmp_path):
    """Cells a spreadsheet would run (= + - @, tab or CR first) go into items.csv with an
    apostrophe in front, and come back from the runtime as the catalog had them; a carriage
    return inside a field stays one, catalog CSV to bundle to runtime."""
    from vae_edge.runtime.edit import add_items

    csv, original = shop
    bundle = tmp_path / "bundle"
    shutil.copytree(original, bundle)
    photo = str(csv.parent / read_rows(csv)[0]["image"])
    texts = [("=1+1", "=cmd|' /C calc'!A0", "+1", "@SUM(A1)"),
             ("-3", "two\rlines", "-5", "'quoted"),
             ("@x", "\t=tab", "''two", "\r\n=x"),
             ("'y", "plain", "1", "https://shop.example/p")]
    rows = [{"id": item_id, "image": photo, "label": "bag", "name": name, "price": price,
             "url": url} for item_id, name, price, url in texts]
    add_items(bundle, write_csv(tmp_path / "new.csv", rows), log=lambda message: None)

    with open(bundle / "items.csv", encoding="utf-8", newline="") as handle:
        stored = list(csv_module.reader(handle))
    assert len(stored) == 1 + 36 + len(texts)
    assert not [cell for row in stored for cell in row
                if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert stored[-3] == ["'-3", "two\rlines", "'-5", "''quoted"]
    runtime = Runtime.load(bundle)
    assert runtime.manifest["items"]["escape"] == "apostrophe"
    for row, (item_id, name, price, url) in enumerate(texts, start=36):
        assert runtime.index.ids[row] == item_id
        assert runtime.index.item_metadata(row) == {"name": name, "price": price, "url": url}


def test_a_bundle_written_without_the_escape_is_read_verbatim(bundle_copy):
    """items.csv of a format 2 bundle whose manifest does not say "escape": an apostrophe
    in front is the item's own text."""
    from vae_edge.runtime.bundle import write_manifest

    lines = (bundle_copy / "items.csv").read_text().splitlines()
    lines[1:3] = ["'0", "''1"]
    (bundle_copy / "items.csv").write_text("\n".join(lines) + "\n")
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest["items"]["escape"]
    write_manifest(bundle_copy, manifest)
    assert Runtime.load(bundle_copy).index.ids[:3].tolist() == ["'0", "''1", "2"]
