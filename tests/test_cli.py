import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vae_edge.export.cli import main as export_main
from vae_edge.runtime.cli import SHEET_MAX_ITEMS
from vae_edge.runtime.cli import main as run_main
from vae_edge.runtime.images import save_png
from vae_edge.training.cli import main as train_main

Z8 = "0.5,-1.2,0,1,2,-2,0.1,3"


def run(*args):
    return CliRunner().invoke(run_main, [str(a) for a in args])


def test_info(tiny_bundle):
    result = run("info", "--bundle", tiny_bundle, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["latent_dim"] == 8 and info["catalog_size"] == 5000
    assert "Ankle boot" in info["label_names"]


def test_nearest_table_and_json(tiny_bundle, runtime):
    result = run("nearest", "--bundle", tiny_bundle, "--z", Z8, "-k", 3)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].startswith("ranked by latent; distance from the catalog |z - mu(decode(z))| = ")
    assert lines[2].split() == ["rank", "id", "label", "log", "q(z|x)", "p(x|z)"]
    assert len(lines) == 6
    result = run("nearest", "--bundle", tiny_bundle, "--z", Z8, "-k", 3, "--json")
    payload = json.loads(result.output)
    expected = runtime.nearest(np.array([float(v) for v in Z8.split(",")]), k=3)
    assert [r["id"] for r in payload["results"]] == expected.ids.tolist()
    assert [r["log_likelihood"] for r in payload["results"]] == expected.log_likelihoods.tolist()
    assert {"id", "label", "log_likelihood"} <= set(payload["results"][0])


def test_nearest_label_and_image(tiny_bundle, runtime, tmp_path):
    result = run("nearest", "--bundle", tiny_bundle, "--z", Z8, "-k", 4, "--label", "Sneaker",
                 "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    expected = runtime.nearest(np.array([float(v) for v in Z8.split(",")]), k=4, label=7)
    assert [r["id"] for r in payload["results"]] == expected.ids.tolist()
    assert {r["label"] for r in payload["results"]} == {"Sneaker"}
    for r, p in zip(payload["results"], expected.probabilities):
        assert set(r) >= {"id", "label", "log_likelihood", "probability"}
        assert r["probability"] == pytest.approx(p, rel=1e-12)

    photo = tmp_path / "photo.png"
    save_png(photo, runtime.decode(np.zeros(runtime.latent_dim)))
    result = run("nearest", "--bundle", tiny_bundle, "--image", photo, "-k", 3, "--json",
                 "--sheet", tmp_path / "sheet.png")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output.splitlines()[0])
    expected = runtime.nearest_image(np.asarray(Image.open(photo)), k=3)
    assert payload["image"] == str(photo)
    assert [r["id"] for r in payload["results"]] == expected.ids.tolist()
    assert (tmp_path / "sheet.png").is_file()

    table = run("nearest", "--bundle", tiny_bundle, "--image", photo, "--label", "bag")
    assert table.exit_code == 0, table.output
    assert "image = " in table.output and "Bag" in table.output


def test_random_is_reproducible(tiny_bundle):
    a = run("nearest", "--bundle", tiny_bundle, "--random", "--seed", 4, "--json")
    b = run("nearest", "--bundle", tiny_bundle, "--random", "--seed", 4, "--json")
    assert a.exit_code == 0 and a.output == b.output


def test_decode_encode_round_trip(tiny_bundle, runtime, tmp_path):
    out = tmp_path / "out.png"
    result = run("decode", "--bundle", tiny_bundle, "--z", Z8, "-o", out)
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.size == (28, 28) and image.mode == "L"
    result = run("encode", "--bundle", tiny_bundle, out, "--json")
    assert result.exit_code == 0, result.output
    encoded = json.loads(result.output)
    pixels = np.asarray(Image.open(out))
    np.testing.assert_allclose(encoded["mu"], runtime.encode(pixels)[0], atol=1e-6)


def test_sheet(tiny_bundle, tmp_path):
    sheet = tmp_path / "sheet.png"
    result = run("nearest", "--bundle", tiny_bundle, "--z", Z8, "-k", 4, "--sheet", sheet)
    assert result.exit_code == 0, result.output
    with Image.open(sheet) as image:
        assert image.size[0] > 5 * 28 * 4  # query + 4 items, scaled up
        four_items = image.size[0]
    result = run("nearest", "--bundle", tiny_bundle, "--z", Z8, "-k", 5000, "--sheet", sheet)
    assert result.exit_code == 0, result.output
    cell = (four_items - 8) // 5  # the sheet is 8 px of margin plus one cell per picture
    with Image.open(sheet) as image:  # the query and at most SHEET_MAX_ITEMS items, whatever k
        assert image.size[0] == 8 + cell * (1 + SHEET_MAX_ITEMS)


def test_help_explains():
    for main, words in ((run_main, "log q(z|x)"), (train_main, "beta * KL"),
                        (export_main, "float16 index")):
        result = CliRunner().invoke(main, ["--help"])
        assert result.exit_code == 0 and words in result.output
