"""A shop's catalog CSV read and checked, and items added to and removed from a bundle."""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tests.test_bad_input import bomb_png
from tests.test_interrupts import ENV, bundle_bytes, console, kill_once_it_writes
from vae_edge.runtime import Runtime
from vae_edge.runtime.catalog import fit_catalog, read_catalog
from vae_edge.runtime.cli import main as run_main
from vae_edge.runtime.edit import add_items, remove_items
from vae_edge.training.data import CLASS_NAMES, load_split


def write_csv(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_rows_are_named_by_csv_line(tmp_path):
    Image.new("RGB", (30, 20)).save(tmp_path / "a.png")
    csv = write_csv(tmp_path / "shop.csv", (
        "id,image,label,name\n"
        "A1,a.png,shirt,\"Blue, long\nsleeved\"\n"  # a quoted field over two lines
        "A2,a.png,shirt\n"                            # line 4: a field short
        "A1,a.png,dress,x\n"                          # line 5: A1 again
        ",a.png,dress,x\n"                            # line 6: no id
        "A3,,dress,x\n"                               # line 7: no image
        "\n"
        " A4,a.png,dress,x\n"                         # line 9: spaces around the id
        "A5,a.png,dress,x\n"))
    with pytest.raises(ValueError) as info:
        read_catalog(csv)
    assert str(info.value) == (
        f"{csv}: 5 bad rows: line 4: 3 fields, expected 4; line 5: id 'A1' repeated; "
        "line 6: empty id; line 7: empty image path; line 9: id ' A4' has surrounding spaces or "
        "control characters; fix them or pass --skip-bad to leave them out")
    catalog = read_catalog(csv, skip_bad=True)
    assert catalog.ids == ("A1", "A5") and catalog.lines == (2, 10)
    assert catalog.labels == ("shirt", "dress") and catalog.columns == ("name",)
    assert catalog.metadata == (("Blue, long\nsleeved",), ("x",))
    assert catalog.images == ((tmp_path / "a.png").absolute(),) * 2
    assert len(catalog.skipped) == 5


@pytest.mark.parametrize("content, message", [
    (b"", "empty file; expected a header row with id and image"),
    (b"sku,image\nA,a.png\n", "header has no id column; expected columns id, image"),
    (b"id,image,name,name\nA,a.png,x,y\n", "header has repeated column names: name"),
    (b"id,image,label,,\nA,a.png,x,,\n", "header has an empty column name (column 4, 5); "
                                          "name the column or delete it"),
    (b"id,image\n", "no items; expected at least one row after the header"),
    (b"id,image\nA,\"a.png\n", "malformed CSV at line 2: unexpected end of data"),
    (b"id,image\n\xe9,a.png\n", r"not UTF-8 text (byte 9: invalid continuation byte)"),
])
def test_malformed_csv_is_refused_even_with_skip_bad(tmp_path, content, message):
    csv = tmp_path / "shop.csv"
    csv.write_bytes(content)
    for skip_bad in (False, True):
        with pytest.raises(ValueError) as info:
            read_catalog(csv, skip_bad=skip_bad)
        assert str(info.value).startswith(f"{csv}: {message}"), str(info.value)
    with pytest.raises(FileNotFoundError, match="catalog CSV not found: "):
        read_catalog(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="is a directory; expected a catalog CSV file"):
        read_catalog(tmp_path)


def test_unicode_line_separators_inside_a_field_are_text(tmp_path):
    """CSV rows end at \\n, \\r or \\r\\n: a name with U+2028, NEL or a form feed (pasted
    from a web page or a word processor) is one field, quoted or not."""
    csv = tmp_path / "shop.csv"
    csv.write_text("id,image,name\r\n"
                   "A,a.png,Red\u2028shirt\r\n"
                   "B,a.png,\"Green\u2029shirt\"\r\n"
                   "C,a.png,Blue\x85shirt\r\n"
                   "D,a.png,Black\x0cshirt\x0b\x1c\x1d\x1e\r\n", encoding="utf-8")
    catalog = read_catalog(csv)
    assert catalog.ids == ("A", "B", "C", "D") and catalog.lines == (2, 3, 4, 5)
    assert catalog.metadata == (("Red\u2028shirt",), ("Green\u2029shirt",), ("Blue\x85shirt",),
                                ("Black\x0cshirt\x0b\x1c\x1d\x1e",))


def test_an_unclosed_quote_is_named_by_the_line_it_opens(tmp_path):
    csv = tmp_path / "shop.csv"
    csv.write_text("id,image,name\nA,a.png,\"oops\n" + "".join(
        f"B{i},a.png,ok\n" for i in range(50)), encoding="utf-8")
    with pytest.raises(ValueError, match="malformed CSV at line 2: unexpected end of data"):
        read_catalog(csv)


def test_ids_a_web_address_cannot_hold_are_bad_rows(tmp_path):
    csv = write_csv(tmp_path / "shop.csv", "id,image\n.,a.png\n..,a.png\n...,a.png\n")
    with pytest.raises(ValueError, match=r"line 2: id '\.' cannot be used in a web address; "
                                         r"line 3: id '\.\.' cannot be used in a web address;"):
        read_catalog(csv)
    assert read_catalog(csv, skip_bad=True).ids == ("...",)


def test_a_spreadsheet_bom_and_absolute_paths_are_accepted(tmp_path):
    Image.new("L", (8, 8), 7).save(tmp_path / "a.webp", lossless=True)
    csv = tmp_path / "shop.csv"
    csv.write_bytes(f"\ufeffid,image\nA,{tmp_path / 'a.webp'}\n".encode())
    catalog, pixels, thumbnails = fit_catalog(read_catalog(csv), 16, 3, thumbnail_size=32)
    assert catalog.ids == ("A",) and pixels.shape == (1, 3, 16, 16) and (pixels == 7).all()
    with Image.open(io.BytesIO(thumbnails[0])) as thumbnail:
        assert thumbnail.format == "WEBP" and thumbnail.size == (32, 32)


def test_unreadable_photos_are_bad_rows(tmp_path):
    Image.new("RGB", (10, 10)).save(tmp_path / "good.jpg")
    (tmp_path / "text.png").write_text("not a picture")
    csv = write_csv(tmp_path / "shop.csv",
                    "id,image\nA,good.jpg\nB,missing.png\nC,text.png\nD,good.jpg\n")
    catalog = read_catalog(csv)
    decoded = []
    with pytest.raises(ValueError) as info:
        fit_catalog(catalog, 16, 3, progress=decoded.append)
    assert decoded == []  # refused from the photos' headers, before any was decoded
    assert str(info.value) == (
        f"{csv}: 2 bad photos: line 3: image not found: {tmp_path / 'missing.png'}; line 4: "
        "text.png: not a PNG, JPEG, WebP, BMP, GIF or PPM image; fix them or pass --skip-bad to "
        "leave them out")
    kept, pixels, _ = fit_catalog(catalog, 16, 3, skip_bad=True)
    assert kept.ids == ("A", "D") and pixels.shape == (2, 3, 16, 16)
    assert [s.split(":")[0] for s in kept.skipped] == ["line 3", "line 4"]


def test_items_added_on_the_device_are_their_own_best_match(bundle_copy, tmp_path, data_dir):
    test = load_split("test", data_dir)
    old = Runtime.load(bundle_copy)
    z = old.sample_prior(seed=3)
    answer_before = old.nearest(z, k=3)
    lines = ["id,image,label"]
    for i in range(6):
        # Photos as a shop might have them: JPEG, scaled up, grayscale or RGB.
        photo = Image.fromarray(test.images[i]).resize((56 + 8 * i, 56 + 8 * i))
        photo = photo.convert("RGB") if i % 2 else photo
        photo.save(tmp_path / f"new{i}.jpg", quality=95)
        lines.append(f"NEW-{i},new{i}.jpg,{CLASS_NAMES[test.labels[i]]}")
    lines.append("NEW-9,new0.jpg,Hat")  # a label the bundle does not have yet
    csv = write_csv(tmp_path / "new.csv", "\n".join(lines) + "\n")

    result = CliRunner().invoke(run_main, ["add", "--bundle", str(bundle_copy), str(csv)])
    assert result.exit_code == 0, result.output
    assert result.output.endswith(f"added 7 items; {bundle_copy} holds 5007\n")
    new = Runtime.load(bundle_copy)
    assert len(new.index) == 5007
    assert new.index.ids[-7:].tolist() == [f"NEW-{i}" for i in range(6)] + ["NEW-9"]
    assert new.label_names == (*old.label_names, "Hat")
    np.testing.assert_array_equal(new.index.mu[:5000], old.index.mu)
    for i in range(6):
        found = CliRunner().invoke(run_main, ["nearest", "--bundle", str(bundle_copy),
                                              "--image", str(tmp_path / f"new{i}.jpg"),
                                              "-k", "3", "--json"])
        assert found.exit_code == 0, found.output
        assert json.loads(found.output)["results"][0]["id"] == f"NEW-{i}"
    # A runtime loaded before (a running kiosk) keeps answering from the bundle it loaded.
    answer_after = old.nearest(z, k=3)
    assert len(old.index) == 5000 and answer_after.ids.tolist() == answer_before.ids.tolist()
    np.testing.assert_array_equal(answer_after.probabilities, answer_before.probabilities)

    # Adding the same ids again: bad rows, named by line, and nothing written.
    before = bundle_bytes(bundle_copy)
    again = CliRunner().invoke(run_main, ["add", "--bundle", str(bundle_copy), str(csv)])
    assert again.exit_code == 2
    assert again.output.startswith(
        f"Error: {csv}: 7 bad rows: line 2: id 'NEW-0' is already in the bundle;")
    assert bundle_bytes(bundle_copy) == before

    removed = CliRunner().invoke(run_main, ["remove", "--bundle", str(bundle_copy),
                                            "NEW-0", "NEW-9", "17"])
    assert removed.exit_code == 0, removed.output
    assert removed.output.endswith(f"removed 3 items; {bundle_copy} holds 5004\n")
    after = Runtime.load(bundle_copy)
    assert {"NEW-0", "NEW-9", "17"}.isdisjoint(after.index.ids.tolist())
    assert after.index.ids[-5:].tolist() == [f"NEW-{i}" for i in range(1, 6)]


def test_remove_refuses_unknown_ids_and_an_empty_catalog(bundle_copy):
    before = bundle_bytes(bundle_copy)
    result = CliRunner().invoke(run_main, ["remove", "--bundle", str(bundle_copy), "3",
                                           "no-such", "nor-this"])
    assert result.exit_code == 2
    assert result.output == f"Error: {bundle_copy}: no item with id 'no-such', 'nor-this'\n"
    with pytest.raises(ValueError, match="removing every item would leave an empty catalog"):
        remove_items(bundle_copy, [str(i) for i in range(5000)], log=lambda m: None)
    assert bundle_bytes(bundle_copy) == before


def test_edits_through_a_symbolic_link_or_dot_change_the_bundle_itself(bundle_copy, tmp_path,
                                                                      monkeypatch):
    """bundles/current -> v1 stays a link to the edited bundle; `--bundle .` works."""
    link = tmp_path / "current"
    link.symlink_to(bundle_copy.name)
    result = CliRunner().invoke(run_main, ["remove", "--bundle", str(link), "3"])
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and len(Runtime.load(bundle_copy).index) == 4999
    monkeypatch.chdir(bundle_copy)
    result = CliRunner().invoke(run_main, ["remove", "--bundle", ".", "4"])
    assert result.exit_code == 0, result.output
    assert len(Runtime.load(bundle_copy).index) == 4998
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.lock", "bundle", "current"]
    assert not [p.name for p in bundle_copy.iterdir() if p.name.startswith(".")]


def test_a_symbolic_link_loop_as_the_bundle_is_a_one_line_error(tmp_path, tiny_run):
    from vae_edge.export.cli import main as export_main

    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    Image.new("L", (28, 28)).save(tmp_path / "a.png")
    write_csv(tmp_path / "new.csv", "id,image,label\nA,a.png,Bag\n")
    expected = f"Error: {loop}: symbolic link loop; expected a directory or a link to one\n"
    for cli, args in ((run_main, ["add", "--bundle", str(loop), str(tmp_path / "new.csv")]),
                      (run_main, ["remove", "--bundle", str(loop), "3"]),
                      (export_main, [str(tiny_run[0] / "checkpoint.pt"), "-o", str(loop),
                                     "--force"])):
        result = CliRunner().invoke(cli, args)
        assert (result.exit_code, result.output) == (2, expected), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "loop", "new.csv"]


def test_add_says_how_many_it_left_out_and_which_labels_it_needs(bundle_copy, tmp_path):
    Image.new("L", (28, 28)).save(tmp_path / "a.png")
    rows = "".join(f"MISSING-{i},missing{i}.png,Bag\n" for i in range(7))
    csv = write_csv(tmp_path / "new.csv", f"id,image,label\n{rows}OK,a.png,Bag\n")
    result = CliRunner().invoke(run_main, ["add", "--bundle", str(bundle_copy), "--skip-bad",
                                           str(csv)])
    assert result.exit_code == 0, result.output
    assert "skipped 7 bad rows: line 2: " in result.output
    assert "line 6: " in result.output and "line 7: " not in result.output
    assert "(and 2 more)\n" in result.output
    assert result.output.endswith(f"added 1 item; {bundle_copy} holds 5001\n")
    unlabelled = write_csv(tmp_path / "plain.csv", "id,image\nP,a.png\n")
    with pytest.raises(ValueError) as info:
        add_items(bundle_copy, unlabelled, log=lambda m: None)
    assert str(info.value) == (f"{unlabelled}: has no label column; the bundle's items have "
                               "labels (T-shirt/top, Trouser, Pullover, Dress, Coat (and 5 more))")


def test_add_refuses_columns_the_bundle_does_not_have(bundle_copy, tmp_path):
    Image.new("L", (28, 28)).save(tmp_path / "a.png")
    csv = write_csv(tmp_path / "new.csv", "id,image,label,price\nX,a.png,Bag,3\n")
    with pytest.raises(ValueError, match=r"column\(s\) price are not in the bundle's metadata "
                                         r"columns \(none\)"):
        add_items(bundle_copy, csv, log=lambda m: None)


@pytest.mark.slow  # starts vae-run twice
def test_add_killed_mid_write_keeps_the_previous_bundle(tmp_path, bundle_copy, data_dir):
    previous = bundle_bytes(bundle_copy)
    test = load_split("test", data_dir)
    lines = ["id,image,label"]
    for i in range(200):
        Image.fromarray(test.images[i]).save(tmp_path / f"p{i}.png")
        lines.append(f"P{i},p{i}.png,{CLASS_NAMES[test.labels[i]]}")
    csv = write_csv(tmp_path / "new.csv", "\n".join(lines) + "\n")
    command = [*console("vae-run", "run"), "add", "--bundle", str(bundle_copy), str(csv)]
    partial = kill_once_it_writes(command, bundle_copy)
    assert bundle_bytes(bundle_copy) == previous
    assert len(Runtime.load(bundle_copy).index) == 5000

    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"removed {partial[0].name}, left behind by an interrupted run" in result.stderr
    assert len(Runtime.load(bundle_copy).index) == 5200


def test_two_edits_at_once_both_land(bundle_copy, tmp_path, data_dir):
    import threading

    test = load_split("test", data_dir)
    csvs = []
    for batch in range(2):
        lines = ["id,image,label"]
        for i in range(3):
            Image.fromarray(test.images[batch * 3 + i]).save(tmp_path / f"b{batch}-{i}.png")
            lines.append(f"B{batch}-{i},b{batch}-{i}.png,{CLASS_NAMES[test.labels[batch * 3 + i]]}")
        csvs.append(write_csv(tmp_path / f"batch{batch}.csv", "\n".join(lines) + "\n"))
    errors = []

    def add(csv):
        try:
            add_items(bundle_copy, csv, log=lambda m: None)
        except Exception as exc:  # reported below, with the other thread's outcome
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(csv,)) for csv in csvs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    ids = Runtime.load(bundle_copy).index.ids.tolist()
    assert len(ids) == 5006 and {f"B{b}-{i}" for b in range(2) for i in range(3)} <= set(ids)


def photo_csv(tmp_path, data_dir, count: int = 3):
    test = load_split("test", data_dir)
    lines = ["id,image,label"]
    for i in range(count):
        Image.fromarray(test.images[i]).save(tmp_path / f"n{i}.png")
        lines.append(f"N{i},n{i}.png,{CLASS_NAMES[test.labels[i]]}")
    return write_csv(tmp_path / "new.csv", "\n".join(lines) + "\n")


@pytest.mark.slow  # exports a bundle
def test_an_export_over_a_bundle_waits_for_an_edit_in_progress(bundle_copy, tmp_path,
                                                                tiny_run, data_dir):
    """vae-export -o B --force while vae-run add --bundle B runs: the export starts while
    add holds the bundle (here, between add's first and second photo), says it waits, and
    writes its own complete bundle once add is done; nothing mixes the two."""
    command = [*console("vae-export", "export"), str(tiny_run[0] / "checkpoint.pt"), "-o",
               str(bundle_copy), "--force", "--limit", "10", "--data-dir", str(data_dir)]
    exports = []

    def start_export_once(_):
        if exports:
            return
        exports.append(subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True))
        waiting = f"waiting for another run that changes {bundle_copy} to finish\n"
        for line in exports[0].stdout:  # until it waits, or (failing) to its end
            if line == waiting:
                break
        assert line == waiting, "the export did not wait for the edit"

    try:
        report = add_items(bundle_copy, photo_csv(tmp_path, data_dir), progress=start_export_once,
                           log=lambda m: None)
        assert report.size == 5003
        output = exports[0].stdout.read()
        assert exports[0].wait(timeout=600) == 0, output
    finally:
        for process in exports:
            process.kill()
            process.stdout.close()
    assert output.endswith(f"wrote {bundle_copy}\n")
    after = Runtime.load(bundle_copy)
    assert after.index.ids.tolist() == [str(i) for i in range(10)]
    assert "edited" not in after.manifest
    result = CliRunner().invoke(run_main, ["info", "--bundle", str(bundle_copy)])
    assert result.exit_code == 0, result.output


def replace_manifest(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["created"] = "2030-01-01T00:00:00+00:00"
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def replace_encoder(bundle):
    (bundle / "encoder.onnx").write_bytes((bundle / "decoder.onnx").read_bytes())


@pytest.mark.parametrize("replace", [replace_manifest, replace_encoder])
def test_add_refuses_a_bundle_replaced_under_it(bundle_copy, tmp_path, data_dir, replace):
    """A bundle changed while add encodes, by a run that takes no lock (a copy over it):
    add writes only the graphs and manifest it loaded, so here it refuses and writes
    nothing."""
    replaced = []

    def replace_once(_):
        if not replaced:
            replace(bundle_copy)
            replaced.append(bundle_bytes(bundle_copy))

    with pytest.raises(ValueError, match=f"^{bundle_copy} changed while it was being edited; "
                                         "nothing written: run the edit again$"):
        add_items(bundle_copy, photo_csv(tmp_path, data_dir), progress=replace_once,
                  log=lambda m: None)
    assert bundle_bytes(bundle_copy) == replaced[0]


def test_labels_that_differ_in_case_only_are_told_apart(bundle_copy, tmp_path):
    Image.new("L", (28, 28)).save(tmp_path / "a.png")
    add_items(bundle_copy, write_csv(tmp_path / "new.csv", "id,image,label\nX,a.png,bag\n"),
              log=lambda m: None)
    runtime = Runtime.load(bundle_copy)
    assert runtime.label_names[-2:] == ("Ankle boot", "bag")
    assert runtime.label_id("bag") == 10 and runtime.label_id("Bag") == 8
    assert runtime.label_id("Sneaker") == runtime.label_id("sneaker ") == 7  # one name: any case
    with pytest.raises(ValueError, match="unknown label 'BAG'"):
        runtime.label_id("BAG")  # two names match but for case: neither is guessed
    assert runtime.nearest(runtime.sample_prior(seed=0), k=3, label="bag").ids.tolist() == ["X"]


def test_add_reads_a_shop_photo_above_a_strangers_bound_and_refuses_a_thin_one(bundle_copy,
                                                                              tmp_path):
    """A catalog photo is the shop's own: 53 megapixels is added, where a query photo of the
    same size is refused. A line of 1 x 200,000 pixels is refused before it is decoded."""
    Image.new("L", (7600, 7000), 90).save(tmp_path / "camera.jpg", quality=90)
    csv = write_csv(tmp_path / "big.csv", "id,image,label\nBIG,camera.jpg,Bag\n")
    result = CliRunner().invoke(run_main, ["add", "--bundle", str(bundle_copy), str(csv)])
    assert result.exit_code == 0, result.output
    assert result.output.endswith(f"added 1 item; {bundle_copy} holds 5001\n")
    query = CliRunner().invoke(run_main, ["encode", "--bundle", str(bundle_copy),
                                          str(tmp_path / "camera.jpg")])
    assert query.exit_code == 2
    assert query.output == ("Error: camera.jpg: image is 7600x7000 pixels, too large to decode "
                            "safely (at most 50,000,000 pixels)\n")
    (tmp_path / "thin.png").write_bytes(bomb_png(1, 200_000))
    thin = write_csv(tmp_path / "thin.csv", "id,image,label\nTHIN,thin.png,Bag\n")
    result = CliRunner().invoke(run_main, ["add", "--bundle", str(bundle_copy), str(thin)])
    assert result.exit_code == 2
    assert result.output == (
        f"Error: {thin}: 1 bad photo: line 2: thin.png: image is 1x200000 pixels, too long and "
        "thin to fit (at most 50 times longer one way than the other); fix it or pass "
        "--skip-bad to leave it out\n")
