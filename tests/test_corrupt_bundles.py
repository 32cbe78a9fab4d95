"""Bundles that are not what they claim: each corruption is built from the good tiny bundle
and must be refused with a message naming the file and the problem, before onnxruntime
runs (and, for all but the graph-signature checks, before it even loads) any graph.

"resigned" cases play an attacker who edits the files AND rewrites the manifest's sha256
and sizes to match: checksums prove consistency, not trust, so the other checks must hold.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tracemalloc
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime
import pytest
from click.testing import CliRunner
from PIL import Image

from vae_edge.runtime import BundleError, Runtime
from vae_edge.runtime.bundle import bundle_files, graph_sections, write_manifest
from vae_edge.runtime.cli import main as run_main

ALL_FILES = bundle_files(thumbnails=False)


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def edit_manifest(change: Callable[[dict], object]) -> Callable:
    def mutate(bundle: Path, outside: Path):
        manifest = manifest_of(bundle)
        change(manifest)
        (bundle / "manifest.json").write_text(json.dumps(manifest))
    return mutate


def as_format_2(manifest: dict) -> None:
    """Restate a format 3 manifest as format 2, which also states the schema's constants."""
    manifest.update(format_version=2,
                    **graph_sections(manifest["latent_dim"], manifest["image"]["shape"]))
    manifest["image"].update(dtype="float32", range=[0.0, 1.0])
    manifest["index"].update(files={"mu": "index_mu.npy", "log_sigma": "index_log_sigma.npy",
                                    "labels": "index_labels.npy"},
                             dtypes={"mu": "float16", "log_sigma": "float16", "labels": "int32"})
    manifest["items"]["file"] = "items.csv"


def edit_format_2(change: Callable[[dict], object]) -> Callable:
    """The manifest restated as format 2, then changed."""
    return edit_manifest(lambda m: (as_format_2(m), change(m)))


def reshape(manifest: dict, latent_dim: int, image_shape: list) -> None:
    """Claim another latent dim and image shape, consistently across the manifest."""
    manifest.update(latent_dim=latent_dim, **graph_sections(latent_dim, image_shape))
    manifest["image"]["shape"] = image_shape


def resign(bundle: Path) -> None:
    """Rewrite every sha256 and size in the manifest to match the files as they now are."""
    manifest = manifest_of(bundle)
    write_manifest(bundle, manifest)


def resigned(mutate: Callable) -> Callable:
    def wrapped(bundle: Path, outside: Path):
        mutate(bundle, outside)
        resign(bundle)
    return wrapped


def truncate(name: str, keep: float = 0.5) -> Callable:
    def mutate(bundle: Path, outside: Path):
        data = (bundle / name).read_bytes()
        (bundle / name).write_bytes(data[: int(len(data) * keep)])
    return mutate


def flip_bit(name: str) -> Callable:
    def mutate(bundle: Path, outside: Path):
        data = bytearray((bundle / name).read_bytes())
        data[len(data) // 2] ^= 0x10
        (bundle / name).write_bytes(bytes(data))
    return mutate


def replace_file(name: str, content: bytes) -> Callable:
    def mutate(bundle: Path, outside: Path):
        (bundle / name).write_bytes(content)
    return mutate


def save_array(name: str, make: Callable[[np.ndarray], np.ndarray]) -> Callable:
    def mutate(bundle: Path, outside: Path):
        array = np.load(bundle / name, allow_pickle=False)
        np.save(bundle / name, make(array), allow_pickle=False)
    return mutate


def npy_with_header(header: str, payload: bytes) -> bytes:
    """A version 1.0 .npy file with the given header dict text, then payload bytes."""
    text = header + " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode() + payload


def object_npy(bundle: Path, outside: Path):
    """index_labels.npy as an object array whose pickle would create a file if ever loaded."""
    sentinel = outside / "pwned"
    evil = f"cos\nsystem\n(S'touch {sentinel}'\ntR.".encode()
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (5000,), }"
    (bundle / "index_labels.npy").write_bytes(npy_with_header(header, evil))


def raw_pickle(bundle: Path, outside: Path):
    sentinel = outside / "pwned"
    (bundle / "index_labels.npy").write_bytes(f"cos\nsystem\n(S'touch {sentinel}'\ntR.".encode())


def huge_header(bundle: Path, outside: Path):
    """A header and a manifest that agree on 10^12 rows; the file holds 5,000."""
    data = (bundle / "index_labels.npy").read_bytes()
    header = "{'descr': '<i4', 'fortran_order': False, 'shape': (1000000000000,), }"
    (bundle / "index_labels.npy").write_bytes(npy_with_header(header, data[128:]))


def duplicate_key(where: str, line: str) -> Callable:
    """manifest.json with `line` inserted after the first `where`: a key written twice."""
    def mutate(bundle: Path, outside: Path):
        text = (bundle / "manifest.json").read_text()
        (bundle / "manifest.json").write_text(text.replace(where, where + line, 1))
    return mutate


def listed_extra_file(bundle: Path, outside: Path):
    """A 2 GiB (sparse) file the manifest lists beside the bundle's own six."""
    with open(bundle / "extra.bin", "wb") as handle:
        handle.truncate(2 << 30)
    edit_manifest(lambda m: m["files"].update(
        {"extra.bin": {"sha256": "0" * 64, "bytes": 2 << 30}}))(bundle, outside)


def huge_header_length(bundle: Path, outside: Path):
    """index_labels.npy in .npy format 2.0 whose 4-byte header length claims about 4 GiB."""
    data = (bundle / "index_labels.npy").read_bytes()
    (bundle / "index_labels.npy").write_bytes(
        b"\x93NUMPY\x02\x00" + (2**32 - 16).to_bytes(4, "little") + data[10:])


def edit_items(change: Callable) -> Callable:
    """items.csv with its lines (header first) changed."""
    def mutate(bundle: Path, outside: Path):
        lines = (bundle / "items.csv").read_text().splitlines()
        (bundle / "items.csv").write_text("\n".join(change(lines)) + "\n")
    return mutate


def with_thumbnails(change_offsets: Callable) -> Callable:
    """The bundle given 3-byte thumbnails per item, then its offsets changed."""
    def mutate(bundle: Path, outside: Path):
        size = len((bundle / "items.csv").read_text().splitlines()) - 1
        (bundle / "thumbnails.bin").write_bytes(b"abc" * size)
        offsets = np.arange(size + 1, dtype=np.int64) * 3
        np.save(bundle / "thumbnail_offsets.npy", change_offsets(offsets).astype(np.int64))
        edit_manifest(lambda m: (m.update(thumbnails={
            "files": {"images": "thumbnails.bin", "offsets": "thumbnail_offsets.npy"},
            "format": "webp", "size": [8, 8]}), m["files"].update(
                {"thumbnails.bin": {}, "thumbnail_offsets.npy": {}})))(bundle, outside)
    return mutate


def symlink_out(name: str) -> Callable:
    """name becomes a symlink to an identical copy outside the bundle (sha256 still matches)."""
    def mutate(bundle: Path, outside: Path):
        target = outside / name
        target.write_bytes((bundle / name).read_bytes())
        (bundle / name).unlink()
        os.symlink(target, bundle / name)
    return mutate


def swap_graphs(bundle: Path, outside: Path):
    encoder = (bundle / "encoder.onnx").read_bytes()
    (bundle / "encoder.onnx").write_bytes((bundle / "decoder.onnx").read_bytes())
    (bundle / "decoder.onnx").write_bytes(encoder)


def external_data_graph(nested: bool) -> Callable:
    """encoder.onnx replaced by a graph whose weight lives in '../secret.bin' (outside),
    either as an initializer or as a Constant inside an If branch."""
    def mutate(bundle: Path, outside: Path):
        from onnx import TensorProto, helper, numpy_helper

        (outside / "secret.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
        weight = numpy_helper.from_array(np.zeros(4, np.float32), "w")
        weight.ClearField("raw_data")
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
            entry = weight.external_data.add()
            entry.key, entry.value = key, value
        x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 1, 28, 28])
        y = helper.make_tensor_value_info("mu", TensorProto.FLOAT, [4])
        if nested:
            branch = helper.make_graph(
                [helper.make_node("Constant", [], ["w"], value=weight)], "branch", [],
                [helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])])
            cond = numpy_helper.from_array(np.array(True), "cond")
            nodes = [helper.make_node("If", ["cond"], ["mu"], then_branch=branch,
                                      else_branch=branch)]
            graph = helper.make_graph(nodes, "g", [x], [y], [cond])
        else:
            graph = helper.make_graph([helper.make_node("Identity", ["w"], ["mu"])], "g", [x],
                                      [y], [weight])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                  ir_version=8)
        (bundle / "encoder.onnx").write_bytes(model.SerializeToString())
    return mutate


@dataclass
class Case:
    id: str
    mutate: Callable
    message: str  # regular expression, matched from the start of the error message
    error: type = BundleError
    loads_graphs: bool = False  # refused by comparing a loaded (never run) graph's signature


SIZE = r"size is \d+ bytes, manifest says \d+ \(truncated or replaced\)"
SHA = r"sha256 mismatch \(manifest [0-9a-f]{12}\.\.\., file [0-9a-f]{12}\.\.\.\)"
PLAIN = r"manifest.json: file name {} is not a plain name inside the bundle"

CASES = [
    # Damaged in transit: the manifest is intact, the files are not.
    *[Case(f"truncated-{n}", truncate(n), rf"{n}: {SIZE}") for n in ALL_FILES],
    *[Case(f"empty-{n}", replace_file(n, b""), rf"{n}: {SIZE}") for n in ALL_FILES[:3]],
    *[Case(f"bitflip-{n}", flip_bit(n), rf"{n}: {SHA}") for n in ALL_FILES],
    Case("missing-bundle", lambda b, o: shutil.rmtree(b),
         r"bundle directory not found: /.*/bundle$", FileNotFoundError),
    Case("missing-decoder", lambda b, o: (b / "decoder.onnx").unlink(),
         r"bundle .*: file decoder.onnx is missing", FileNotFoundError),
    Case("missing-manifest", lambda b, o: (b / "manifest.json").unlink(),
         r"bundle .*: manifest.json is missing", FileNotFoundError),
    Case("directory-not-file", lambda b, o: ((b / "index_mu.npy").unlink(),
                                             (b / "index_mu.npy").mkdir()),
         "index_mu.npy: is not a regular file"),
    # The manifest itself.
    Case("manifest-not-json", replace_file("manifest.json", b"{not json"),
         r"manifest.json: not valid JSON \(Expecting property name"),
    Case("manifest-binary", replace_file("manifest.json", b"\xff\xfe\x00garbage"),
         r"manifest.json: not valid JSON \('utf-8' codec can't decode"),
    Case("manifest-array", replace_file("manifest.json", b"[1, 2]"),
         "manifest.json: expected a JSON object, got list"),
    Case("manifest-deeply-nested", replace_file("manifest.json", b"[" * 200_000),
         r"manifest.json: not valid JSON \(nested too deeply\)"),
    Case("manifest-huge", replace_file("manifest.json", b" " * (2 << 20)),
         r"manifest.json: 2097152 bytes is too large for a manifest \(at most 1048576\)"),
    *[Case(f"missing-key-{key}", edit_manifest(lambda m, key=key: m.pop(key)),
           f"manifest.json: missing key '{key}'")
      for key in ("format", "format_version", "latent_dim", "image", "files", "index")],
    Case("missing-key-index-size", edit_manifest(lambda m: m["index"].pop("size")),
         "manifest.json index: missing key 'size'"),
    Case("missing-key-label-names", edit_manifest(lambda m: m["index"].pop("label_names")),
         "manifest.json index: missing key 'label_names'"),
    Case("missing-key-image-shape", edit_manifest(lambda m: m["image"].pop("shape")),
         "manifest.json image: missing key 'shape'"),
    Case("missing-key-sha256", edit_manifest(lambda m: m["files"]["encoder.onnx"].pop("sha256")),
         r"manifest.json files\['encoder.onnx'\]: missing key 'sha256'"),
    Case("files-lacks-decoder", edit_manifest(lambda m: m["files"].pop("decoder.onnx")),
         "manifest.json: files has no entry for decoder.onnx"),
    Case("manifest-duplicate-key", duplicate_key("{", '"latent_dim": 9,'),
         "manifest.json: key 'latent_dim' appears twice in one object"),
    Case("manifest-duplicate-nested-key", duplicate_key('"encoder.onnx": {', '"bytes": 1,'),
         "manifest.json: key 'bytes' appears twice in one object"),
    Case("files-lists-extra", listed_extra_file,
         "manifest.json: files lists 'extra.bin', which is not a bundle file "
         r"\(expected exactly encoder.onnx, decoder.onnx, index_mu.npy"),
    Case("latent-dim-as-text", edit_manifest(lambda m: m.update(latent_dim="8")),
         "manifest.json: key 'latent_dim' should be int, got str"),
    Case("version-as-bool", edit_manifest(lambda m: m.update(format_version=True)),
         "manifest.json: key 'format_version' should be int, got bool"),
    *[Case(f"format-version-{v}", edit_manifest(lambda m, v=v: m.update(format_version=v)),
           rf"manifest.json: format_version {v} is not supported \(this runtime reads versions "
           r"2 and 3\)")
      for v in (0, 1, 99)],
    Case("format-name", edit_manifest(lambda m: m.update(format="onnx-zoo")),
         "manifest.json: format is 'onnx-zoo', expected 'vae-edge-bundle'"),
    Case("sha256-not-hex", edit_manifest(lambda m: m["files"]["index_mu.npy"].update(sha256="zz")),
         r"manifest.json files\['index_mu.npy'\]: sha256 must be 64 lowercase hex digits"),
    Case("bytes-negative", edit_manifest(lambda m: m["files"]["index_mu.npy"].update(bytes=-1)),
         r"manifest.json files\['index_mu.npy'\]: bytes must be >= 0, got -1"),
    # Provenance that vae-run info and the kiosk show (the manifest itself is not hashed).
    *[Case(f"parity-{name}", edit_manifest(lambda m, v=value: m.update(parity=v)),
           "manifest.json: parity should be an object with a number max_abs_diff, got "
           + re.escape(shown))
      for name, value, shown in (("text", "x", '"x"'), ("null", None, "null"),
                                 ("list", [1], "[1]"),
                                 ("text-diff", {"max_abs_diff": "0"}, '{"max_abs_diff": "0"}'))],
    Case("parity-nan", edit_manifest(lambda m: m["parity"].update(max_abs_diff=float("nan"))),
         "manifest.json: NaN is not a JSON number"),
    Case("metrics-infinity", edit_manifest(lambda m: m["metrics"].update(test_loss=-float("inf"))),
         "manifest.json: -Infinity is not a JSON number"),
    Case("metrics-text", edit_manifest(lambda m: m["metrics"].update(test_loss="low")),
         r"manifest.json: metrics should be an object of numbers, got \{"),
    Case("metrics-list", edit_manifest(lambda m: m.update(metrics=[1])),
         r"manifest.json: metrics should be an object of numbers, got \[1\]"),
    Case("created-number", edit_manifest(lambda m: m.update(created=2026)),
         "manifest.json: created should be a date text, got int"),
    Case("items-escape-other", edit_manifest(lambda m: m["items"].update(escape="backslash")),
         "manifest.json: items escape must be 'apostrophe' or absent, got \"backslash\""),
    Case("catalog-null", edit_manifest(lambda m: m["index"].update(catalog=None)),
         "manifest.json: index catalog should be a name, got NoneType"),
    # Wrong shapes in the manifest.
    Case("latent-dim-9", edit_manifest(lambda m: reshape(m, 9, [1, 28, 28])),
         r"index_mu.npy: shape is \(5000, 8\), expected \(5000, 9\)"),
    Case("latent-dim-9-alone", edit_format_2(lambda m: m.update(latent_dim=9)),
         r"manifest.json: encoder outputs must be \{'mu': \['batch', 9\], 'log_var': "
         r"\['batch', 9\]\}, got \{'mu': \['batch', 8\], 'log_var': \['batch', 8\]\}"),
    Case("graph-output-renamed",
         edit_format_2(lambda m: m["decoder"].update(outputs={"x": ["batch", 1, 28, 28]})),
         r"manifest.json: decoder outputs must be \{'images': \['batch', 1, 28, 28\]\}, "
         r"got \{'x': \['batch', 1, 28, 28\]\}"),
    Case("image-range-0-255", edit_format_2(lambda m: m["image"].update(range=[0, 255])),
         r"manifest.json: image range must be \[0.0, 1.0\], got \[0, 255\]"),
    Case("index-file-renamed",
         edit_format_2(lambda m: m["index"]["files"].update(mu="other.npy")),
         r"manifest.json: index files must be"),
    Case("latent-dim-0", edit_manifest(lambda m: m.update(latent_dim=0)),
         "manifest.json: latent_dim must be >= 1, got 0"),
    Case("index-size-4999", edit_manifest(lambda m: m["index"].update(size=4999)),
         r"index_mu.npy: shape is \(5000, 8\), expected \(4999, 8\)"),
    Case("index-size-0", edit_manifest(lambda m: m["index"].update(size=0)),
         "manifest.json: index size must be >= 1, got 0"),
    Case("image-shape-2d", edit_manifest(lambda m: m["image"].update(shape=[28, 28])),
         r"manifest.json: image shape must be \[C, H, W\], got \[28, 28\]"),
    Case("image-shape-29", edit_manifest(lambda m: reshape(m, 8, [1, 28, 29])),
         r"encoder.onnx: inputs are \[\('images', \[1, 28, 28\]\)\], expected "
         r"\[\('images', \[1, 28, 29\]\)\]", loads_graphs=True),
    Case("label-names-short", edit_manifest(lambda m: m["index"].update(label_names=["a"])),
         r"index_labels.npy: labels must lie in \[0, 1\), got \[0, 9\]"),
    # File names that escape the bundle.
    *[Case(f"escape-{i}", edit_manifest(lambda m, n=name: m["files"].update(
        {n: {"sha256": "0" * 64, "bytes": 1}})), PLAIN.format(pattern))
      for i, (name, pattern) in enumerate([
          ("../escape", "'../escape'"), ("/etc/passwd", "'/etc/passwd'"), ("..", r"'\.\.'"),
          (".", r"'\.'"), ("sub/file", "'sub/file'"), ("a\\b", r"'a\\\\b'"), ("", "''"),
          ("x\x00y", r"'x\\x00y'"), ("../../../../../../../tmp", "'../../../../../../../tmp'"),
      ])],
    *[Case(f"symlink-{n}", symlink_out(n),
           f"{n}: is a symbolic link; bundle files must be regular files")
      for n in ("encoder.onnx", "index_mu.npy", "manifest.json")],
    # An attacker who also rewrites the manifest's checksums.
    Case("resigned-object-array", resigned(object_npy),
         r"index_labels.npy: holds Python objects \(dtype object\), which only pickle can load; "
         "refused"),
    Case("resigned-raw-pickle", resigned(raw_pickle),
         r"index_labels.npy: not a readable .npy file \(the magic string is not correct"),
    Case("resigned-float64-labels", resigned(save_array("index_labels.npy", lambda a: a * 1.0)),
         "index_labels.npy: dtype is float64, expected int32"),
    Case("resigned-float32-mu", resigned(save_array("index_mu.npy",
                                                    lambda a: a.astype(np.float32))),
         "index_mu.npy: dtype is float32, expected float16"),
    Case("resigned-mu-7-dims", resigned(save_array("index_mu.npy", lambda a: a[:, :7])),
         r"index_mu.npy: shape is \(5000, 7\), expected \(5000, 8\)"),
    Case("resigned-truncated-npy", resigned(truncate("index_log_sigma.npy", 0.9)),
         r"index_log_sigma.npy: file is \d+ bytes, its header promises 80128"),
    Case("resigned-huge-header", resigned(lambda b, o: (
        huge_header(b, o), edit_manifest(lambda m: m["index"].update(size=10**12))(b, o))),
         r"index_mu.npy: shape is \(5000, 8\), expected \(1000000000000, 8\)"),
    Case("resigned-huge-labels-header", resigned(huge_header),
         r"index_labels.npy: shape is \(1000000000000,\), expected \(5000,\)"),
    Case("resigned-npy-header-length-4gib", resigned(huge_header_length),
         "index_labels.npy: .npy header claims 4294967280 bytes, at most 10000 accepted"),
    # items.csv: the table of ids and metadata.
    Case("resigned-items-short", resigned(edit_items(lambda lines: lines[:-1])),
         "items.csv: 4999 items, the index has 5000"),
    Case("resigned-items-header", resigned(edit_items(lambda lines: ["sku"] + lines[1:])),
         r"items.csv: header must be \['id'\], got \['sku'\]"),
    Case("resigned-items-repeated-id", resigned(edit_items(lambda lines: lines[:2] + lines[1:-1])),
         "items.csv: ids must be unique and non-empty"),
    Case("resigned-items-extra-field", resigned(edit_items(
        lambda lines: lines[:3] + [lines[3] + ",x"] + lines[4:])),
         "items.csv: line 4 has 2 fields, expected 1"),
    Case("resigned-items-latin1", resigned(replace_file("items.csv", b"id\n\xe9\n")),
         r"items.csv: not UTF-8 \(invalid continuation byte at byte 3\)"),
    Case("items-columns-without-id", edit_manifest(lambda m: m["items"].update(columns=["sku"])),
         r"manifest.json: items columns must be distinct non-empty names starting with 'id'"),
    Case("thumbnails-missing-key", edit_manifest(lambda m: m.pop("thumbnails")),
         r"manifest.json: missing key 'thumbnails' \(null when there are none\)"),
    Case("thumbnails-listed-without-files", edit_manifest(lambda m: m.update(thumbnails={
        "files": {"images": "thumbnails.bin", "offsets": "thumbnail_offsets.npy"},
        "format": "webp", "size": [96, 96]})),
         "manifest.json: files has no entry for thumbnails.bin"),
    Case("thumbnails-format-png", edit_manifest(lambda m: m.update(thumbnails={
        "files": {"images": "thumbnails.bin", "offsets": "thumbnail_offsets.npy"},
        "format": "png", "size": [96, 96]})),
         "manifest.json: thumbnails must be files"),
    Case("resigned-thumbnail-offsets-past-end", resigned(with_thumbnails(
        lambda offsets: offsets + 1)),
         "thumbnail_offsets.npy: offsets must rise from 0 to the size of thumbnails.bin"),
    Case("resigned-thumbnail-offsets-falling", resigned(with_thumbnails(
        lambda offsets: np.concatenate([[0, 5, 3], offsets[3:]]))),
         "thumbnail_offsets.npy: offsets must rise from 0 to the size of thumbnails.bin"),
    Case("resigned-thumbnail-offsets-short", resigned(with_thumbnails(
        lambda offsets: offsets[:-1])),
         r"thumbnail_offsets.npy: expected int64 \(5001,\), got int64 \(5000,\)"),
    Case("resigned-nan-mu", resigned(save_array("index_mu.npy", lambda a: np.where(
        np.arange(a.size).reshape(a.shape) == 17, np.float16("nan"), a))),
         "index_mu.npy: holds NaN or infinite values"),
    Case("resigned-log-sigma-60000", resigned(save_array("index_log_sigma.npy", lambda a: np.where(
        np.arange(a.size).reshape(a.shape) == 17, np.float16(-60000), a))),
         "index_log_sigma.npy: values must be >= -40, got -60000"),
    Case("resigned-label-11", resigned(save_array("index_labels.npy", lambda a: a + 2)),
         r"index_labels.npy: labels must lie in \[0, 10\), got \[2, 11\]"),
    Case("resigned-truncated-onnx", resigned(truncate("decoder.onnx")),
         r"decoder.onnx: not a valid ONNX model \(truncated message\)"),
    Case("resigned-random-onnx", resigned(replace_file(
        "encoder.onnx", np.random.default_rng(5).bytes(4096))),
         r"encoder.onnx: not a valid ONNX model \("),
    Case("resigned-external-data", resigned(external_data_graph(nested=False)),
         "encoder.onnx: tensor 'w' keeps its data in an external file; bundle graphs must be "
         "self-contained"),
    Case("resigned-external-data-in-subgraph", resigned(external_data_graph(nested=True)),
         "encoder.onnx: tensor 'w' keeps its data in an external file"),
    Case("resigned-swapped-graphs", resigned(swap_graphs),
         r"encoder.onnx: inputs are \[\('z', \[8\]\)\], expected \[\('images', \[1, 28, 28\]\)\]",
         loads_graphs=True),
]


@pytest.fixture
def no_graph_runs(monkeypatch):
    """Fail if any ONNX graph is run; record which graphs onnxruntime was asked to load."""
    loaded = []
    real_session = onnxruntime.InferenceSession

    class Session(real_session):
        def __init__(self, path, *args, **kwargs):
            loaded.append(Path(path).name)
            super().__init__(path, *args, **kwargs)

        def run(self, *args, **kwargs):
            raise AssertionError("an ONNX graph was run while loading a bundle")

    monkeypatch.setattr(onnxruntime, "InferenceSession", Session)
    return loaded


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corrupt_bundle_is_refused(case, bundle_copy, tmp_path, no_graph_runs):
    outside = tmp_path / "outside"
    outside.mkdir()
    case.mutate(bundle_copy, outside)
    verify_options = (True, False) if case.id.startswith("resigned") else (True,)
    for verify in verify_options:
        with warnings.catch_warnings(), pytest.raises(case.error) as info:
            warnings.simplefilter("error")  # refused without a warning printed first
            Runtime.load(bundle_copy, verify=verify)
        message = str(info.value)
        assert info.type is case.error, (type(info.value), message)
        assert re.match(case.message, message), message
        assert "\n" not in message
    if not case.loads_graphs:
        assert no_graph_runs == []  # refused before onnxruntime saw any graph
    assert not (outside / "pwned").exists()  # no pickle ran

    result = CliRunner().invoke(run_main, ["info", "--bundle", str(bundle_copy)])
    assert result.exit_code == 2
    assert result.output == f"Error: {message}\n"


def test_npy_header_length_is_checked_before_reading(bundle_copy, tmp_path):
    resigned(huge_header_length)(bundle_copy, tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match="index_labels.npy: .npy header claims 4294967280"):
            Runtime.load(bundle_copy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # the claimed 4 GiB was never allocated


def test_good_bundle_loads_after_resigning(bundle_copy):
    """The resign helper itself keeps a good bundle good (so refusals above are real)."""
    resign(bundle_copy)
    runtime = Runtime.load(bundle_copy)
    assert len(runtime.index) == 5000


def test_extra_unlisted_files_are_ignored(bundle_copy):
    (bundle_copy / "README.txt").write_text("notes")
    os.symlink("/etc/passwd", bundle_copy / "passwd")
    assert len(Runtime.load(bundle_copy).index) == 5000


# Graphs that load and match the manifest but fail or misbehave when run: each call is
# refused with a BundleError naming the graph, and the CLI prints one line, exit status 2.

def filled(source: str, output: str, tail: list[int], value: float) -> tuple[list, list]:
    """Nodes and initializers making `output` a (batch, *tail) tensor of `value`, batch taken
    from `source` at run time (so onnxruntime cannot fold it while loading)."""
    from onnx import helper, numpy_helper

    nodes = [helper.make_node("Shape", [source], [f"{output}_batch"], end=1),
             helper.make_node("Concat", [f"{output}_batch", f"{output}_tail"],
                              [f"{output}_shape"], axis=0),
             helper.make_node("ConstantOfShape", [f"{output}_shape"], [output],
                              value=numpy_helper.from_array(np.array([value], np.float32)))]
    return nodes, [numpy_helper.from_array(np.array(tail, np.int64), f"{output}_tail")]


def graph_file(name: str, kind: str) -> Callable:
    """name (encoder.onnx or decoder.onnx) replaced by a graph with the bundle's signature
    (latent dim 8) that, when run: 'reshape' applies a Reshape that cannot fit its input,
    'allocate' asks for a 2^50-byte tensor (beyond any address space), 'nan' outputs NaN."""
    def mutate(bundle: Path, outside: Path):
        from onnx import TensorProto, helper, numpy_helper

        def tensor(tensor_name, *dims):
            return helper.make_tensor_value_info(tensor_name, TensorProto.FLOAT, ["b", *dims])

        if name == "decoder.onnx":
            source, inputs, outputs = "z", [tensor("z", 8)], [tensor("images", 1, 28, 28)]
        else:
            source, inputs = "images", [tensor("images", 1, 28, 28)]
            outputs = [tensor("mu", 8), tensor("log_var", 8)]
        nodes, initializers = [], []
        for output in outputs:
            tail = [d.dim_value for d in output.type.tensor_type.shape.dim[1:]]
            if kind == "reshape":
                # 3 x tail values: never the size of the one input item each call passes.
                shape = numpy_helper.from_array(np.array([3, *tail], np.int64),
                                                f"{output.name}_shape")
                more = [helper.make_node("Reshape", [source, shape.name], [output.name])], [shape]
            elif kind == "allocate":
                more = filled(source, output.name, [1, 1 << 24, 1 << 24], 0.0)
            else:
                more = filled(source, output.name, tail, float("nan"))
            nodes += more[0]
            initializers += more[1]
        graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                  ir_version=8)
        (bundle / name).write_bytes(model.SerializeToString())
    return resigned(mutate)


FAILED_RUN = r"{}: onnxruntime failed running the graph \(\[ONNXRuntimeError\] .*{}.*\)$"
RUN_CASES = [
    ("decoder.onnx", "reshape", FAILED_RUN.format("decoder.onnx", "cannot be reshaped")),
    # onnxruntime's words for it: its arena's, or the allocator's when the arena is off
    ("decoder.onnx", "allocate", FAILED_RUN.format("decoder.onnx",
                                                   "(Failed to allocate memory|bad_alloc)")),
    ("decoder.onnx", "nan", "decoder.onnx: output 'images' holds NaN or infinite values$"),
    ("encoder.onnx", "reshape", FAILED_RUN.format("encoder.onnx", "cannot be reshaped")),
    ("encoder.onnx", "nan", "encoder.onnx: output 'mu' holds NaN or infinite values$"),
]


@pytest.mark.parametrize(("name", "kind", "message"), RUN_CASES,
                         ids=[f"{n[:7]}-{k}" for n, k, _ in RUN_CASES])
def test_graph_failing_while_running_is_refused(bundle_copy, tmp_path, name, kind, message):
    graph_file(name, kind)(bundle_copy, tmp_path)
    runtime = Runtime.load(bundle_copy)
    image = np.zeros((28, 28), np.uint8)
    calls = ([lambda: runtime.decode(np.zeros(8))] if name == "decoder.onnx" else
             [lambda: runtime.encode(image), lambda: runtime.nearest_image(image)])
    for call in calls:
        with pytest.raises(BundleError) as info:
            call()
        assert re.match(message, str(info.value)), str(info.value)
        assert "\n" not in str(info.value)

    picture = tmp_path / "photo.png"
    Image.fromarray(image).save(picture)
    command = (["decode", "--z", "0,0,0,0,0,0,0,0", "-o", str(tmp_path / "out.png")]
               if name == "decoder.onnx" else ["encode", str(picture)])
    result = CliRunner().invoke(run_main, [*command, "--bundle", str(bundle_copy)])
    assert result.exit_code == 2
    assert result.output == f"Error: {info.value}\n"


def test_graph_failing_while_running_prints_one_line(bundle_copy, tmp_path):
    """In a real process: onnxruntime's own log line would go to stderr beside the error."""
    graph_file("decoder.onnx", "reshape")(bundle_copy, tmp_path)
    cli = "from vae_edge.runtime.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", cli, "decode", "--bundle", str(bundle_copy),
                             "--z", "0,0,0,0,0,0,0,0", "-o", str(tmp_path / "out.png")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert re.match("Error: " + FAILED_RUN.format("decoder.onnx", "cannot be reshaped"),
                    result.stderr)
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "out.png").exists()
