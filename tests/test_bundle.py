"""Bundle: read (formats 2 and 3), write (format 3, atomic, read back before it is swapped in),
and the edits extended and without."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from vae_edge.runtime import BundleError, Runtime
from vae_edge.runtime.bundle import Bundle, default_bundle_path

FORMAT_2_ONLY = ("encoder", "decoder")


def same_index(a, b) -> None:
    for name in ("mu", "log_sigma", "labels", "ids"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.label_names == b.label_names and a.columns == b.columns
    for x, y in zip(a.metadata, b.metadata, strict=True):
        np.testing.assert_array_equal(x, y)


def test_the_shipped_format_2_bundle_reads_and_writes_back_as_format_3(tmp_path):
    shipped = Bundle.read(default_bundle_path())
    assert shipped.manifest["format_version"] == 2
    assert len(shipped.index) == 60_000
    shipped.write(tmp_path / "b")
    again = Bundle.read(tmp_path / "b")
    manifest = again.manifest
    assert manifest["format_version"] == 3
    assert not set(FORMAT_2_ONLY) & set(manifest)
    assert set(manifest["image"]) == {"shape", "layout"}
    assert set(manifest["index"]) == {"catalog", "size", "label_names"}
    assert "file" not in manifest["items"] and manifest["items"]["escape"] == "apostrophe"
    assert again.graphs == shipped.graphs
    same_index(again.index, shipped.index)
    assert {k: v for k, v in manifest.items() if k != "files"} == {
        k: v for k, v in Bundle.read(tmp_path / "b", verify=False).manifest.items()
        if k != "files"}
    # The provenance is carried over as it was.
    for key in ("created", "parity", "metrics", "model_config", "dataset"):
        assert manifest[key] == shipped.manifest[key]


def test_a_format_3_bundle_round_trips(tiny_bundle, tmp_path):
    tiny = Bundle.read(tiny_bundle)
    assert tiny.manifest["format_version"] == 3
    tiny.write(tmp_path / "b")
    again = Bundle.read(tmp_path / "b")
    assert again.manifest == tiny.manifest
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(
        p.name for p in tiny_bundle.iterdir())
    for path in tiny_bundle.iterdir():
        assert (tmp_path / "b" / path.name).read_bytes() == path.read_bytes(), path.name
    assert Runtime.load(tmp_path / "b").describe()["format_version"] == 3


def test_without_then_extended_gives_the_same_catalog(tiny_bundle, tmp_path):
    tiny = Bundle.read(tiny_bundle)
    last = tiny.index.take(range(4990, 5000))
    smaller = tiny.without(last.ids.tolist())
    assert len(smaller.index) == 4990 and "edited" in smaller.manifest
    smaller.write(tmp_path / "b")
    back = Bundle.read(tmp_path / "b").extended(last)
    same_index(back.index, tiny.index)
    assert len(Bundle.read(tiny_bundle).index) == 5000  # the bundle read is left as it was


def test_extended_appends_new_label_names_and_fills_missing_columns(tiny_bundle):
    tiny = Bundle.read(tiny_bundle)
    item = tiny.index.take([0])
    new = type(item)(mu=item.mu, log_sigma=item.log_sigma, labels=np.zeros(1, np.int32),
                     label_names=("Zebra",), ids=np.array(["new"], object))
    grown = tiny.extended(new).index
    assert grown.label_names == (*tiny.index.label_names, "Zebra")
    assert grown.labels[-1] == len(tiny.index.label_names)
    with pytest.raises(ValueError, match=r"^id\(s\) already in the index: 0$"):
        tiny.extended(item)


@pytest.mark.parametrize("ids, message", [
    (["no-such", "7"], r"^{root}: no item with id 'no-such'$"),
    ([str(i) for i in range(5000)], r"^{root}: removing every item would leave an empty catalog$"),
    ([], "^no ids given: expected one or more item ids to remove$"),
])
def test_without_refuses_what_it_cannot_do(tiny_bundle, ids, message):
    with pytest.raises(ValueError, match=message.format(root=tiny_bundle)):
        Bundle.read(tiny_bundle).without(ids)


def test_write_reads_the_bundle_back_before_it_replaces_anything(bundle_copy):
    """A bundle that would not read back (a label id past its label names) is refused with
    the reader's error, and the bundle at the path is left as it was."""
    before = {p.name: p.read_bytes() for p in bundle_copy.iterdir()}
    tiny = Bundle.read(bundle_copy)
    index = tiny.index.take(range(len(tiny.index)))
    broken = dataclasses.replace(index, labels=index.labels + 1)
    with pytest.raises(BundleError, match=r"^index_labels.npy: labels must lie in \[0, 10\)"):
        Bundle(tiny.manifest, broken, tiny.graphs, tiny.root).write(bundle_copy)
    assert {p.name: p.read_bytes() for p in bundle_copy.iterdir()} == before
    assert sorted(p.name for p in bundle_copy.parent.iterdir()) == ["bundle"]


def test_a_format_2_manifest_states_its_constants(bundle_copy):
    """Format 2's manifest lists file names, dtypes and graph signatures; the reader holds
    it to them (tests/test_corrupt_bundles.py), and a faithful one loads."""
    from tests.test_corrupt_bundles import as_format_2, resign

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    as_format_2(manifest)
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    resign(bundle_copy)
    assert Runtime.load(bundle_copy).describe()["format_version"] == 2
