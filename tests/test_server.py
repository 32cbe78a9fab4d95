"""`vae-run serve`: the JSON API over real HTTP on loopback, against the tiny bundle."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import os
import resource
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tests.conftest import serving
from vae_edge.runtime import Runtime
from vae_edge.runtime.cli import main as run_main
from vae_edge.runtime.images import to_uint8
from vae_edge.runtime.server import (
    MAX_BODY_BYTES,
    MAX_CONNECTIONS_PER_CLIENT,
    MAX_HEAD_BYTES,
    MAX_QUERY_CHARS,
    HostPolicy,
    KioskApp,
    make_server,
)

D = 8  # the tiny bundle's latent dim
Z = [0.5, -1.2, 0.0, 1.0, 2.0, -2.0, 0.1, 3.0]
Z_TEXT = ",".join(str(v) for v in Z)


@pytest.fixture(scope="module")
def server(runtime):
    with serving(make_server(runtime, "127.0.0.1", 0)) as srv:
        yield srv


SHORT_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def guarded(runtime):
    """A server with a short read timeout and one extra host name the operator allowed."""
    with serving(make_server(runtime, "127.0.0.1", 0, read_timeout=SHORT_TIMEOUT,
                             allow_hosts=["Kiosk.Local"])) as srv:
        yield srv


def call(server, method, path, body=None, headers=None, connection=None):
    """(status, headers (case-insensitive), raw bytes); body: a dict is sent as JSON, bytes as
    they are."""
    conn = connection or http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    if isinstance(body, dict) or isinstance(body, list):
        body = json.dumps(body).encode()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        if connection is None:
            conn.close()


def call_json(server, method, path, body=None, **kwargs):
    status, headers, raw = call(server, method, path, body, **kwargs)
    assert headers["Content-Type"] == "application/json; charset=utf-8", raw[:200]
    return status, json.loads(raw)


def exchange(server, data: bytes, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Raw bytes in, everything the server sends back: (reply, whether the server closed)."""
    chunks = []
    with socket.create_connection(server.server_address[:2], timeout=timeout) as sock:
        sock.sendall(data)
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return b"".join(chunks), True
                chunks.append(chunk)
        except socket.timeout:
            return b"".join(chunks), False


def answers(reply: bytes) -> list[tuple[int, dict]]:
    """Each (status, JSON body) in a raw reply, in order; every one must be a whole answer."""
    found = []
    while reply:
        head, separator, rest = reply.partition(b"\r\n\r\n")
        assert separator, f"incomplete answer: {reply[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        fields = dict(line.lower().split(": ", 1) for line in lines[1:])
        assert fields["content-type"] == "application/json; charset=utf-8", head
        length = int(fields["content-length"])
        found.append((int(status), json.loads(rest[:length])))
        reply = rest[length:]
    return found


def pixels_of_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "L" and image.size == (28, 28)
        return np.asarray(image)


def pixels_of_data_url(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return pixels_of_png(base64.b64decode(url[len(prefix):]))


def test_info(server, runtime):
    status, info = call_json(server, "GET", "/api/info")
    assert status == 200
    assert info == {"latent_dim": D, "image_shape": [1, 28, 28],
                    "label_names": list(runtime.label_names), "catalog": "fashion-mnist/train",
                    "catalog_size": 5000, "range": 3.0, "k": 6, "max_k": 100,
                    "match_modes": ["latent", "decoded"],
                    "far_distance": pytest.approx(info["far_distance"]),
                    "metadata_columns": [], "thumbnails": False, "idle_reset": 90.0,
                    "attract": 0.0,
                    "opening_z": runtime.index.mu[0].astype(np.float64).tolist(),
                    "slider_ends": info["slider_ends"]}
    typical = runtime.roundtrip_distance(runtime.sample_prior(256, seed=0))
    assert info["far_distance"] == float(np.quantile(typical, 0.99))
    # Each slider's ends are named by the classes lying lowest and highest along it on average.
    mu, labels = runtime.index.mu.astype(np.float64), runtime.index.labels
    for dim, (low, high) in enumerate(info["slider_ends"]):
        means = {name: mu[labels == label, dim].mean()
                 for label, name in enumerate(runtime.label_names) if (labels == label).any()}
        assert low == min(means, key=means.get) and high == max(means, key=means.get)


def test_ends_show_each_slider_at_both_ends_of_its_range(server, runtime):
    for status, answer in (call_json(server, "POST", "/api/ends", {"z": Z}),
                           call_json(server, "GET", f"/api/ends?z={Z_TEXT}")):
        assert status == 200 and answer["z"] == Z and answer["range"] == 3.0
        assert len(answer["ends"]) == D
        for dim, pair in enumerate(answer["ends"]):
            for value, url in zip((-3.0, 3.0), pair):
                z = np.array(Z)
                z[dim] = value
                np.testing.assert_array_equal(pixels_of_data_url(url),
                                              to_uint8(runtime.decode(z)))


def test_decode_post_get_and_png_match_the_runtime(server, runtime):
    expected = to_uint8(runtime.decode(np.array(Z)))
    status, decoded = call_json(server, "POST", "/api/decode", {"z": Z})
    assert status == 200 and decoded["z"] == Z
    np.testing.assert_array_equal(pixels_of_data_url(decoded["image"]), expected)
    status, decoded = call_json(server, "GET", f"/api/decode?z={Z_TEXT}")
    assert status == 200 and decoded["z"] == Z
    np.testing.assert_array_equal(pixels_of_data_url(decoded["image"]), expected)
    status, headers, raw = call(server, "GET", f"/api/decode.png?z={Z_TEXT}")
    assert status == 200 and headers["Content-Type"] == "image/png"
    np.testing.assert_array_equal(pixels_of_png(raw), expected)
    # The CLI's text form of z (a string) is accepted in a JSON body too.
    status, decoded = call_json(server, "POST", "/api/decode", {"z": Z_TEXT})
    assert status == 200 and decoded["z"] == Z


@pytest.mark.parametrize(("k", "by"), [(1, None), (7, "latent"), (64, "decoded")])
def test_nearest_matches_the_runtime(server, runtime, k, by):
    expected = runtime.nearest(np.array(Z), k=k, by=by or "latent", with_distance=True)
    mode = {} if by is None else {"by": by}
    for status, payload in (
        call_json(server, "POST", "/api/nearest", {"z": Z, "k": k, **mode}),
        call_json(server, "GET", f"/api/nearest?z={Z_TEXT}&k={k}" + (f"&by={by}" if by else "")),
    ):
        assert status == 200 and payload["k"] == k and payload["z"] == Z
        assert payload["by"] == (by or "latent")
        assert payload["distance"] == float(expected.distances)
        results = payload["results"]
        assert [r["rank"] for r in results] == list(range(1, k + 1))
        assert [r["id"] for r in results] == expected.ids.tolist()
        assert [r["row"] for r in results] == expected.rows.tolist()
        assert [r["label_id"] for r in results] == expected.labels.tolist()
        assert [r["label"] for r in results] == [runtime.label_names[i] for i in expected.labels]
        assert [r["log_likelihood"] for r in results] == expected.log_likelihoods.tolist()
        assert [r["probability"] for r in results] == expected.probabilities.tolist()
        assert results[0]["image"] == \
            f"/api/item/{results[0]['id']}/image?v={KioskApp(runtime).image_version}"
        assert [r["metadata"] for r in results] == [{}] * k  # Fashion-MNIST has no metadata


@pytest.mark.parametrize("by", ["latent", "decoded"])
def test_view_is_decode_and_nearest_in_one_answer(server, by):
    """One page update, one request: /api/view answers exactly what /api/decode and
    /api/nearest answer for the same z, by POST and by GET."""
    decoded = call_json(server, "POST", "/api/decode", {"z": Z})[1]
    nearest = call_json(server, "POST", "/api/nearest", {"z": Z, "k": 5, "by": by})[1]
    for status, payload in (
        call_json(server, "POST", "/api/view", {"z": Z, "k": 5, "by": by}),
        call_json(server, "GET", f"/api/view?z={Z_TEXT}&k=5&by={by}"),
    ):
        assert (status, payload) == (200, {"decoded": decoded, "nearest": nearest})
    default_k = call_json(server, "POST", "/api/view", {"z": Z})[1]["nearest"]
    assert (default_k["k"], default_k["by"]) == (6, "latent")
    assert call_json(server, "POST", "/api/view", {"z": Z[:2]}) == (
        400, {"error": "z has 2 values, expected 8 (the latent dimension)"})


def test_nearest_default_k_is_the_servers(server, runtime):
    status, payload = call_json(server, "POST", "/api/nearest", {"z": Z})
    assert status == 200 and payload["k"] == 6


def test_sample_is_the_prior_and_reproducible(server, runtime):
    status, first = call_json(server, "GET", "/api/sample?seed=4")
    assert status == 200 and first["seed"] == 4
    assert first["z"] == runtime.sample_prior(seed=4).tolist()
    assert call_json(server, "GET", "/api/sample?seed=4")[1] == first
    status, unseeded = call_json(server, "GET", "/api/sample")
    assert status == 200 and len(unseeded["z"]) == D and unseeded["seed"] is None
    largest = 2**63 - 1
    status, last = call_json(server, "GET", f"/api/sample?seed={largest}")
    assert status == 200 and last["z"] == runtime.sample_prior(seed=largest).tolist()


def within_graph_tolerance(value):
    """A JSON value whose numbers compare equal within 1e-4 relative: the answer comes through
    the graphs, whose float32 output differs across CPUs in the last bits (README, CPUs)."""
    if isinstance(value, dict):
        return {key: within_graph_tolerance(item) for key, item in value.items()}
    if isinstance(value, list):
        return [within_graph_tolerance(item) for item in value]
    if isinstance(value, float):
        return pytest.approx(value, rel=1e-4)
    return value


def test_the_api_example_in_the_docs_is_the_shipped_models_answer():
    docs = Path(__file__).resolve().parents[1] / "docs"
    command, answer = runpy.run_path(str(docs / "kiosk_api_example.py"))["example"]().split("\n", 1)
    text = (docs / "kiosk.md").read_text()
    assert command in text
    documented = text.split(command + "\n", 1)[1].split("\n```", 1)[0]
    # the block is the answer wrapped at spaces (textwrap.fill): a space joins it again
    assert json.loads(documented.replace("\n", " ")) == within_graph_tolerance(
        json.loads(answer.replace("\n", " ")))


def test_item_json_and_picture(server, runtime):
    row = 17
    item_id = runtime.index.ids[row]
    status, item = call_json(server, "GET", f"/api/item/{item_id}")
    assert status == 200
    assert item["id"] == item_id and item["row"] == row
    assert item["label"] == runtime.label_names[runtime.index.labels[row]]
    assert item["metadata"] == {}
    assert item["mu"] == runtime.index.mu[row].astype(np.float64).tolist()
    assert item["log_sigma"] == runtime.index.log_sigma[row].astype(np.float64).tolist()
    status, headers, raw = call(server, "GET", item["image"])
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert "max-age" in headers["Cache-Control"]
    expected = to_uint8(runtime.decode(runtime.index.mu[row].astype(np.float64)))
    np.testing.assert_array_equal(pixels_of_png(raw), expected)


NESTED = b"[" * 60000


@pytest.mark.parametrize(
    "method, path, body, message",
    [
        ("POST", "/api/decode", {"z": [0, 0]}, "z has 2 values, expected 8 (the latent dimension)"),
        ("POST", "/api/decode", {"z": "1,2,x,4,5,6,7,8"}, "z value 3 is not a number: 'x'"),
        ("POST", "/api/decode", {"z": [True] * D}, "z value 1 is not a number: got true/false"),
        ("POST", "/api/decode", {"z": [0] * 7 + [None]}, "z value 8 is not a number: got null"),
        ("POST", "/api/decode", {"z": 5},
         "z must be a list of 8 numbers or a string like '0.5,-1.2,...', got a number"),
        ("POST", "/api/decode", b'{"z": [NaN, 0, 0, 0, 0, 0, 0, 0]}',
         "z holds NaN or infinite values"),
        ("POST", "/api/decode", b'{"z": [1e400, 0, 0, 0, 0, 0, 0, 0]}',
         "z holds NaN or infinite values"),
        ("POST", "/api/decode", b'{"z": [1' + b"0" * 400 + b', 0, 0, 0, 0, 0, 0, 0]}',
         "z holds a number too large for a float"),
        ("POST", "/api/decode", {"z": [2e6] + [0] * 7},
         "z values must lie in [-1e+06, 1e+06], got |z| up to 2e+06"),
        ("POST", "/api/decode", {}, "missing field: z"),
        ("POST", "/api/decode", {"z": Z, "k": 3}, "unknown field(s): k (allowed: z)"),
        ("POST", "/api/nearest", {"z": Z, "k": 0}, "k must be >= 1, got 0"),
        ("POST", "/api/nearest", {"z": Z, "k": 101}, "k must be <= 100, got 101"),
        ("POST", "/api/nearest", {"z": Z, "k": 2.5}, "k must be an integer, got a number"),
        ("POST", "/api/nearest", {"z": Z, "k": "3"}, "k must be an integer, got a string"),
        ("POST", "/api/ends", {"z": [0]}, "z has 1 values, expected 8 (the latent dimension)"),
        ("POST", "/api/ends", {"z": Z, "k": 3}, "unknown field(s): k (allowed: z)"),
        ("POST", "/api/nearest", {"z": Z, "kk": 2}, "unknown field(s): kk (allowed: z, k, by)"),
        ("POST", "/api/nearest", {"z": Z, "by": "pixels"},
         "by must be one of latent, decoded, got 'pixels'"),
        ("GET", f"/api/nearest?z={Z_TEXT}&by=", None, "by must be one of latent, decoded, got ''"),
        ("POST", "/api/nearest", b"{", "request body is not valid JSON: Expecting property name "
         "enclosed in double quotes at line 1 column 2"),
        ("POST", "/api/nearest", [1, 2], "request body must be a JSON object, got a list"),
        ("POST", "/api/nearest", b"\xff\xfe", "request body is not UTF-8 text"),
        ("POST", "/api/nearest", NESTED, "request body is nested too deeply"),
        ("GET", "/api/nearest?z=1,2", None, "z has 2 values, expected 8 (the latent dimension)"),
        ("GET", "/api/nearest", None, "missing field: z"),
        ("GET", f"/api/nearest?z={Z_TEXT}&k=abc", None, "k must be an integer, got 'abc'"),
        ("GET", f"/api/nearest?z={Z_TEXT}&z={Z_TEXT}", None,
         "query parameter given more than once: z"),
        ("GET", "/api/decode?z=", None, "z is empty: expected 8 comma-separated numbers"),
        ("GET", "/api/sample?seed=-1", None, "seed must be in [0, 2**63), got -1"),
        ("GET", f"/api/sample?seed={2**63}", None, f"seed must be in [0, 2**63), got {2**63}"),
        ("GET", f"/api/sample?seed={10**19}", None, f"seed must be an integer, got '{10**19}'"),
        ("GET", "/api/sample?seed=x", None, "seed must be an integer, got 'x'"),
        ("GET", "/api/sample?n=3", None, "unknown field(s): n (allowed: seed)"),
        ("GET", "/api/item/%ff", None, "item id must be percent-encoded UTF-8"),
    ],
)
def test_bad_input_is_a_400_with_a_json_error(server, method, path, body, message):
    status, payload = call_json(server, method, path, body)
    assert (status, payload) == (400, {"error": message})


def test_an_item_picture_url_changes_with_the_bundle(server, runtime, bundle_copy, tmp_path):
    """Pictures may be cached for an hour: an item removed and added again with another photo
    (then the kiosk restarted) gets another URL, so a browser never shows the old photo."""
    from vae_edge.runtime.edit import add_items, remove_items

    url = call_json(server, "GET", "/api/item/3")[1]["image"]
    status, headers, body = call(server, "GET", url)
    assert (status, headers["Content-Type"]) == (200, "image/png")
    assert headers["Cache-Control"] == "private, max-age=3600"
    assert call_json(server, "GET", "/api/item/3?v=1")[1] == {
        "error": "unknown field(s): v (allowed: none)"}
    before = KioskApp(Runtime.load(bundle_copy)).item("3")["image"]
    assert before == url
    remove_items(bundle_copy, ["3"], log=lambda message: None)
    Image.new("L", (28, 28), 200).save(tmp_path / "new.png")
    (tmp_path / "new.csv").write_text("id,image,label\n3,new.png,Bag\n", encoding="utf-8")
    add_items(bundle_copy, tmp_path / "new.csv", log=lambda message: None)
    after = KioskApp(Runtime.load(bundle_copy)).item("3")["image"]
    assert after != before and after.startswith("/api/item/3/image?v=")


def test_unknown_item_is_404(server):
    status, payload = call_json(server, "GET", "/api/item/123456789")
    assert (status, payload) == (404, {"error": "no catalog item with id '123456789'"})
    status, payload = call_json(server, "GET", "/api/item/SKU%2F1%20a/image")
    assert (status, payload) == (404, {"error": "no catalog item with id 'SKU/1 a'"})


@pytest.mark.parametrize(
    "method, path, status, message",
    [
        ("GET", "/api/nothing", 404, "no such API route: /api/nothing"),
        ("GET", "/elsewhere", 404, "no such page: /elsewhere"),
        ("GET", "/static/../server.py", 404, "no such file: ../server.py"),
        ("GET", "/static/missing.js", 404, "no such file: missing.js"),
        ("POST", "/api/info", 405,
         "POST is for /api/decode, /api/nearest, /api/ends, /api/view, not /api/info"),
        ("PUT", "/api/decode", 501, "Unsupported method ('PUT')"),
    ],
)
def test_routes_that_do_not_exist(server, method, path, status, message):
    got_status, payload = call_json(server, method, path, b"{}" if method != "GET" else None)
    assert (got_status, payload) == (status, {"error": message})


def test_body_and_query_are_capped(server):
    status, payload = call_json(server, "POST", "/api/decode", b" " * (MAX_BODY_BYTES + 1))
    assert status == 413
    assert payload == {"error": f"request body is {MAX_BODY_BYTES + 1} bytes, "
                                f"at most {MAX_BODY_BYTES} allowed"}
    long_query = "z=" + "0" * MAX_QUERY_CHARS
    status, payload = call_json(server, "GET", f"/api/decode?{long_query}")
    assert status == 414
    assert payload == {"error": f"query string is {len(long_query)} characters, "
                                f"at most {MAX_QUERY_CHARS} allowed"}
    # A request line and headers past h11's buffer limit: still a JSON answer, and the end.
    reply, closed = exchange(server, b"GET /api/decode?z=" + b"0" * (MAX_HEAD_BYTES + 1000))
    assert closed and answers(reply) == [
        (431, {"error": f"request line and headers exceed {MAX_HEAD_BYTES} bytes"})]


def test_post_without_length_is_refused(server):
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(b"POST /api/decode HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = sock.makefile("rb").read()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 411 ") and b"connection: close" in head
    assert json.loads(body) == {"error": "POST needs a Content-Length header"}


def test_page_and_assets(server):
    status, headers, page = call(server, "GET", "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert b'<script src="static/app.js"' in page  # relative: exported sites reuse the page
    for name, content_type in (("app.js", "text/javascript; charset=utf-8"),
                               ("style.css", "text/css; charset=utf-8"),
                               ("qrcode.js", "text/javascript; charset=utf-8"),
                               ("icon.svg", "image/svg+xml"),
                               ("manifest.webmanifest", "application/manifest+json")):
        status, headers, raw = call(server, "GET", f"/static/{name}")
        assert status == 200 and headers["Content-Type"] == content_type and raw
    # Nothing on the page points off the kiosk's own server.
    for name in ("/", "/static/app.js", "/static/style.css"):
        # The SVG namespace names a vocabulary; it is never fetched.
        text = call(server, "GET", name)[2].decode().replace("http://www.w3.org/2000/svg", "")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    assert b'<link rel="manifest" href="static/manifest.webmanifest">' in page
    manifest_url = "/static/manifest.webmanifest"
    manifest = json.loads(call(server, "GET", manifest_url)[2])
    assert manifest["display"] == "fullscreen"
    assert urljoin(manifest_url, manifest["start_url"]) == "/"  # relative to the manifest
    for icon in manifest["icons"]:
        assert call(server, "GET", urljoin(manifest_url, icon["src"]))[0] == 200
    status, headers, raw = call(server, "HEAD", "/")
    assert status == 200 and raw == b"" and int(headers["Content-Length"]) == len(page)


def test_keep_alive_survives_a_bad_request(server, runtime):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    try:
        assert call(server, "POST", "/api/decode", {"z": [1]}, connection=conn)[0] == 400
        status, _, raw = call(server, "POST", "/api/nearest", {"z": Z, "k": 2}, connection=conn)
        assert status == 200
        assert [r["id"] for r in json.loads(raw)["results"]] == \
            runtime.nearest(np.array(Z), k=2).ids.tolist()
    finally:
        conn.close()


class FailingRuntime(Runtime):
    """A runtime whose decode, once failing is set, raises an error that is not the caller's
    fault (the kiosk decodes at start-up, so the bug shows only afterwards)."""

    failing = False

    def decode(self, z):
        if self.failing:
            raise RuntimeError("secret detail")
        return super().decode(z)


def test_a_bug_is_a_500_without_traceback(tiny_bundle, capsys):
    runtime = FailingRuntime.load(tiny_bundle)
    with serving(make_server(runtime, "127.0.0.1", 0)) as failing:
        runtime.failing = True
        status, payload = call_json(failing, "POST", "/api/decode", {"z": Z})
        assert (status, payload) == (500, {"error": "internal error"})
    assert "secret detail" in capsys.readouterr().err  # logged for the operator only


def test_concurrent_requests_get_their_own_answers(server, runtime):
    """8 clients at once, each with its own z: every answer must be for the z it sent."""
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(8, 12, D)).round(3)
    failures = []

    def client(qs):
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
        try:
            for j, z in enumerate(qs):
                path, body = (("/api/nearest", {"z": z.tolist(), "k": 5}) if j % 2 == 0
                              else ("/api/decode", {"z": z.tolist()}))
                status, _, raw = call(server, "POST", path, body, connection=conn)
                payload = json.loads(raw)
                if status != 200:
                    failures.append((status, payload))
                elif path == "/api/nearest":
                    expected = runtime.nearest(z, k=5).ids.tolist()
                    if [r["id"] for r in payload["results"]] != expected:
                        failures.append(("wrong nearest", z))
                elif not np.array_equal(pixels_of_data_url(payload["image"]),
                                        to_uint8(runtime.decode(z))):
                    failures.append(("wrong image", z))
        except Exception as exc:  # surfaced through failures, not lost in the thread
            failures.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(qs,)) for qs in queries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert failures == []


HOST = b"Host: 127.0.0.1\r\n"
NEXT = b"GET /api/info HTTP/1.1\r\n" + HOST + b"\r\n"  # what a smuggled request would be


@pytest.mark.parametrize(
    "framing, message",
    [
        (b"Content-Length: \xb2\r\n", "malformed request: bad Content-Length"),
        (b"Content-Length: " + b"1" * 5002 + b"\r\n", "malformed request: bad Content-Length"),
        (b"Content-Length: 2\r\nContent-Length: 40\r\n",
         "malformed request: conflicting Content-Length headers"),
        (b"Content-Length: 40\r\nTransfer-Encoding: chunked\r\n",
         "both Content-Length and Transfer-Encoding given: the body's length is ambiguous"),
    ],
)
def test_ambiguous_framing_is_refused_and_the_connection_closed(server, framing, message):
    """The request after the refused one is never answered: nothing can be smuggled."""
    body = b"2\r\n{}\r\n0\r\n\r\n"
    reply, closed = exchange(server, b"POST /api/decode HTTP/1.1\r\n" + HOST + framing +
                             b"\r\n" + body + NEXT)
    assert closed and answers(reply) == [(400, {"error": message})]


@pytest.mark.parametrize(
    "request_line, message",
    [
        (b"GARBAGE", "malformed request: illegal request line"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello on the HTTP port
         "malformed request: illegal request line"),
        (b"GET / HTTP/2.0", "HTTP/2.0 is not supported: send HTTP/1.1"),
        (b"GET /", "malformed request: illegal request line"),
        (b"GET / HTTP/1.1 extra", "malformed request: illegal request line"),
        (b"GET / HTTP/1.1\r\nno colon here", "malformed request: illegal header line"),
        (b"GET / HTTP/1.1\r\n" + HOST[:-2], "malformed request: Found multiple Host: headers"),
        (b"POST /api/nearest HTTP/1.1\r\nOrigin: http://a\r\nOrigin: http://a",
         "header given more than once: origin"),
    ],
)
def test_malformed_request_lines_get_a_400_status_line(server, request_line, message):
    reply, closed = exchange(server, request_line + b"\r\n" + HOST + b"\r\n" + NEXT)
    assert closed and answers(reply) == [(400, {"error": message})]


def test_the_same_content_length_twice_counts_once(server):
    body = json.dumps({"z": Z, "k": 1}).encode()
    length = b"Content-Length: %d\r\n" % len(body)
    reply, _ = exchange(server, b"POST /api/nearest HTTP/1.1\r\n" + HOST + length + length +
                        b"Connection: close\r\n\r\n" + body)
    [(status, payload)] = answers(reply)
    assert status == 200 and payload["k"] == 1


@pytest.mark.parametrize(
    "head, status",
    [
        (b"POST /api/nearest HTTP/1.1\r\n" + HOST + b"Origin: https://evil.example\r\n", 403),
        (b"POST /api/info HTTP/1.1\r\n" + HOST, 405),
        (b"POST /api/nearest HTTP/1.1\r\n" + HOST.replace(b"127.0.0.1", b"evil.example"), 403),
        (b"PUT /api/nearest HTTP/1.1\r\n" + HOST, 501),
    ],
)
def test_a_refusal_before_the_body_closes_the_connection(server, head, status):
    """The unread body is never taken for the next request."""
    body = b"x" * 20
    reply, closed = exchange(server, head + b"Content-Length: %d\r\n\r\n" % (len(body) +
                                                                           len(NEXT)) + body + NEXT)
    assert closed and [answer[0] for answer in answers(reply)] == [status]


def test_a_body_over_the_cap_is_refused_before_it_is_read(server):
    reply, closed = exchange(server, b"POST /api/nearest HTTP/1.1\r\n" + HOST +
                             b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1) + NEXT)
    assert closed and answers(reply) == [
        (413, {"error": f"request body is {MAX_BODY_BYTES + 1} bytes, "
                        f"at most {MAX_BODY_BYTES} allowed"})]


def test_slow_clients_leave_the_server_answering(server):
    """45 clients each sending a header byte every 2 s; others are answered within 1 s."""
    head = b"GET /api/info HTTP/1.1\r\n" + HOST + b"X-Slow: "
    slow = [socket.create_connection(server.server_address[:2], timeout=5) for _ in range(45)]
    try:
        delays = []
        for step in range(3):
            for sock in slow:
                sock.sendall(head[step:step + 1])
            started = time.monotonic()
            status, _, _ = call(server, "GET", "/api/info")
            delays.append(time.monotonic() - started)
            assert status == 200
            time.sleep(2.0)
        assert max(delays) < 1.0, delays
    finally:
        for sock in slow:
            sock.close()


def test_a_trickled_request_is_cut_off_at_the_read_timeout(guarded):
    """The timeout bounds the whole request, not each read: a byte every 0.25 s still ends."""
    head = b"GET /api/info HTTP/1.1\r\n" + HOST + b"X-Slow: " + b"a" * 200
    with socket.create_connection(guarded.server_address[:2], timeout=5) as sock:
        started = time.monotonic()
        for byte in head[:int(SHORT_TIMEOUT / 0.25) - 1]:  # stop sending before the deadline
            sock.sendall(bytes([byte]))
            time.sleep(0.25)
        reply = sock.recv(65536)
        elapsed = time.monotonic() - started
        assert sock.recv(1) == b""  # and the connection is closed
    assert answers(reply) == [(408, {"error": f"request not received within {SHORT_TIMEOUT:g} s"})]
    assert SHORT_TIMEOUT - 0.1 < elapsed < SHORT_TIMEOUT + 1.5, elapsed


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(guarded):
    with socket.create_connection(guarded.server_address[:2], timeout=5) as sock:
        started = time.monotonic()
        assert sock.recv(65536) == b""
        assert time.monotonic() - started < SHORT_TIMEOUT + 1.5


def test_a_stalled_body_is_a_408_without_traceback(guarded, capsys, caplog):
    started = time.monotonic()
    reply, closed = exchange(guarded, b"POST /api/decode HTTP/1.1\r\n" + HOST +
                             b"Content-Length: 100\r\n\r\n" + b"0123456789")
    assert closed and answers(reply) == [
        (408, {"error": f"request not received within {SHORT_TIMEOUT:g} s"})]
    assert time.monotonic() - started < SHORT_TIMEOUT + 1.5
    assert "Traceback" not in capsys.readouterr().err
    assert not [record for record in caplog.records if record.exc_info]


def test_a_client_gone_mid_body_logs_no_traceback(server, runtime, capsys, caplog):
    with socket.create_connection(server.server_address[:2], timeout=5) as sock:
        sock.sendall(b"POST /api/nearest HTTP/1.1\r\n" + HOST +
                     b"Content-Length: 100\r\n\r\n" + b'{"z": [0, ')
        time.sleep(0.2)
    time.sleep(0.3)
    status, payload = call_json(server, "POST", "/api/nearest", {"z": Z, "k": 1})
    assert status == 200 and payload["results"][0]["id"] == runtime.nearest(np.array(Z), k=1).ids[0]
    assert "Traceback" not in capsys.readouterr().err
    assert not [record for record in caplog.records if record.exc_info]


@pytest.mark.parametrize(
    "host, allowed",
    [
        ("127.0.0.1:{port}", True),
        ("localhost:{port}", True),
        ("kiosk.local", True),  # listed by the operator (allow_hosts), in any case, any port
        ("KIOSK.LOCAL:8080", True),
        ("rebind.attacker.example", False),
        ("rebind.attacker.example:{port}", False),
        ("kiosk.local.attacker.example", False),
        ("127.0.0.2:{port}", False),  # an address, but not the one it listens on
    ],
)
def test_host_must_be_a_name_the_server_answers_to(guarded, host, allowed):
    host = host.format(port=guarded.server_address[1])
    reply, closed = exchange(guarded, f"GET /api/info HTTP/1.1\r\nHost: {host}\r\n"
                                      "Connection: close\r\n\r\n".encode())
    [(status, payload)] = answers(reply)
    if allowed:
        assert status == 200 and payload["latent_dim"] == D
    else:
        assert (status, payload) == (403, {"error": f"this kiosk does not serve host {host!r} "
                                                    "(the operator can add names with "
                                                    "--allow-host)"})


def test_listening_on_every_address_answers_any_address_but_no_other_name():
    everywhere = HostPolicy("0.0.0.0", "0.0.0.0", ["kiosk.local"])
    assert everywhere.allows("192.168.1.20:8000") and everywhere.allows("[fe80::1]:8000")
    assert everywhere.allows("localhost") and everywhere.allows("kiosk.local:8000")
    assert not everywhere.allows("rebind.attacker.example")
    assert not everywhere.allows("192.168.1.20.attacker.example")


def test_a_request_without_host_is_refused(server):
    reply, closed = exchange(server, b"GET /api/info HTTP/1.0\r\n\r\n")
    assert closed and answers(reply) == [(400, {"error": "a Host header is required"})]


@pytest.mark.parametrize(
    "headers, refusal",
    [
        ({"Origin": "https://evil.example"}, "Origin: https://evil.example"),
        ({"Origin": "null"}, "Origin: null"),
        ({"Origin": "http://localhost:{port}"}, "Origin: http://localhost:{port}"),
        ({"Sec-Fetch-Site": "cross-site"}, "Sec-Fetch-Site: cross-site"),
        ({"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:{port}"},
         "Sec-Fetch-Site: same-site"),
        ({"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}, None),
        ({}, None),  # not a browser: nothing to tell, and nothing a browser page could forge
    ],
)
def test_cross_site_posts_are_refused(server, headers, refusal):
    port = server.server_address[1]
    headers = {name: value.format(port=port) for name, value in headers.items()}
    status, payload = call_json(server, "POST", "/api/nearest", {"z": Z, "k": 1},
                                headers=headers)
    if refusal is None:
        assert status == 200 and payload["k"] == 1
    else:
        refusal = refusal.format(port=port)
        assert (status, payload) == (403, {"error": f"cross-site request refused ({refusal})"})


def test_cross_site_reads_are_answered(server):
    """A GET changes nothing; the browser keeps its answer from the other site (no CORS)."""
    status, headers, _ = call(server, "GET", "/api/info",
                              headers={"Origin": "https://evil.example"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


def test_app_rejects_bad_settings(runtime):
    with pytest.raises(ValueError, match=r"^range must be a number in \(0, 100\], got 0$"):
        KioskApp(runtime, z_range=0)
    with pytest.raises(ValueError, match=r"^k must be <= 100, got 101$"):
        KioskApp(runtime, k=101)
    with pytest.raises(ValueError, match=r"^idle reset must be a number of seconds in "
                                         r"\[0, 86400\] \(0: never\), got -1$"):
        KioskApp(runtime, idle_reset=-1)
    with pytest.raises(ValueError, match=r"^attract must be a number of seconds in "
                                         r"\[0, 3600\] \(0: off\), got 'x'$"):
        KioskApp(runtime, attract="x")
    with pytest.raises(ValueError, match=r"^port must be an integer in \[0, 65535\], got 70000$"):
        make_server(runtime, "127.0.0.1", 70000)


def test_serve_cli_errors(tiny_bundle):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(run_main, ["serve", "--bundle", str(tiny_bundle),
                                               "--port", str(port)])
    assert result.exit_code == 2
    assert f"Error: cannot listen on 127.0.0.1:{port}: Address already in use" in result.output
    result = CliRunner().invoke(run_main, ["serve", "--bundle", str(tiny_bundle), "--range", "0"])
    assert result.exit_code == 2 and "Invalid value for '--range'" in result.output
    result = CliRunner().invoke(run_main, ["serve", "--bundle", str(tiny_bundle), "-k", "0"])
    assert result.exit_code == 2 and "Invalid value for '-k'" in result.output
    result = CliRunner().invoke(run_main, ["serve", "--bundle", str(tiny_bundle),
                                           "--idle-reset", "-5"])
    assert result.exit_code == 2 and "Invalid value for '--idle-reset'" in result.output
    result = CliRunner().invoke(run_main, ["serve", "--bundle", str(tiny_bundle),
                                           "--allow-host", "kiosk.local:80"])
    assert result.exit_code == 2
    assert ("Error: allowed host must be a host name or IP address without port, "
            "got 'kiosk.local:80'") in result.output


SERVE = "from vae_edge.runtime.cli import main; main()"
def start_serve(args, cwd, code=SERVE):
    """`vae-run serve` in its own session: signals reach it only from the test, and how the
    shell started pytest (a background job ignores SIGINT) does not matter."""
    process = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--port", "0", *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=cwd, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = process.stdout.readline()
    if not line.startswith("kiosk on http://127.0.0.1:"):
        process.kill()
        pytest.fail(f"vae-run serve did not start: {line}{process.communicate(timeout=30)[1]}")
    return process, line, int(line.split("http://127.0.0.1:")[1].split("/")[0])


def test_vae_run_serve_without_torch(tiny_bundle, tmp_path, without_torch):
    """The real command in its own process, torch unimportable; Ctrl+C stops it cleanly."""
    process, line, port = start_serve(["--bundle", str(tiny_bundle), "--range", "5", "-k", "3",
                                       "--idle-reset", "0", "--attract", "5"], tmp_path,
                                      code=without_torch(SERVE))
    try:
        assert "(latent dim 8, 5000 catalog items)" in line
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/info")
        info = json.loads(conn.getresponse().read())
        conn.close()
        assert info["range"] == 5.0 and info["k"] == 3 and info["idle_reset"] == 0
        assert info["attract"] == 5
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert err == "stopped (SIGINT)\n"


def test_sigterm_finishes_the_request_in_flight(tiny_bundle, tmp_path):
    """SIGTERM while a request's body is half sent: it is answered, then the server exits 0."""
    process, _, port = start_serve(["--bundle", str(tiny_bundle), "--allow-host", "kiosk.local"],
                                   tmp_path)
    try:
        body = json.dumps({"z": Z, "k": 2}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /api/nearest HTTP/1.1\r\nHost: kiosk.local\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            assert process.poll() is None  # still waiting for the rest of the body
            with pytest.raises(ConnectionRefusedError):  # but no longer accepting connections
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            sock.sendall(body[10:])
            reply = b""
            while chunk := sock.recv(65536):  # until the server closes the connection
                reply += chunk
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    [(status, payload)] = answers(reply)
    assert status == 200 and [r["rank"] for r in payload["results"]] == [1, 2]
    assert process.returncode == 0, err
    assert err == "stopped (SIGTERM)\n"


# -- hostile clients ------------------------------------------------------------------------


def test_a_head_over_the_cap_in_one_write_is_a_431(server):
    """h11 bounds a head still arriving; one that comes whole is measured by the server."""
    head = b"GET /api/info HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n"
    reply, closed = exchange(server, head)
    assert closed and answers(reply) == [
        (431, {"error": f"request line and headers exceed {MAX_HEAD_BYTES} bytes"})]
    status, _, _ = call(server, "GET", "/api/info", headers={"X-Big": "a" * 30000})
    assert status == 200  # a large head under the cap is still answered


def from_address(server, source: str, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(server.server_address[:2], timeout=timeout,
                                    source_address=(source, 0))


def test_connections_per_client_address_are_capped(server, capsys):
    """Past MAX_CONNECTIONS_PER_CLIENT, an address's connections are closed unanswered at once,
    and logged in one line; other addresses, and the address once it closes some, are served."""
    held = [from_address(server, "127.0.0.2") for _ in range(MAX_CONNECTIONS_PER_CLIENT)]
    try:
        for sock in held[-3:]:  # the last ones are open and answered
            sock.sendall(b"GET /api/sample HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        for _ in range(3):
            with from_address(server, "127.0.0.2") as extra:
                try:
                    extra.sendall(b"GET /api/sample HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    assert extra.recv(65536) == b""
                except ConnectionResetError:
                    pass
        with from_address(server, "127.0.0.3") as other:
            other.sendall(b"GET /api/sample HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert other.recv(65536).startswith(b"HTTP/1.1 200 OK")
        held.pop().close()
        for _ in range(50):  # until the server has seen the close
            with from_address(server, "127.0.0.2") as again:
                try:
                    again.sendall(b"GET /api/sample HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    if again.recv(65536).startswith(b"HTTP/1.1 200 OK"):
                        break
                except ConnectionResetError:
                    pass
            time.sleep(0.1)
        else:
            pytest.fail("a connection from 127.0.0.2 was still refused after one closed")
    finally:
        for sock in held:
            sock.close()
    refusals = [line for line in capsys.readouterr().err.splitlines() if "refused" in line]
    assert len(refusals) == 1 and refusals[0].startswith(
        f"127.0.0.2 connection refused: {MAX_CONNECTIONS_PER_CLIENT} open from this address "
        f"(at most {MAX_CONNECTIONS_PER_CLIENT}), "), refusals


def test_connections_in_all_stay_below_the_open_file_limit(runtime):
    """Under an open-file limit of 300 the server keeps 300 - 128 (backlog) - 64 (its own
    files) = 108 connections open, from any addresses; one more is closed at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))
    try:
        srv = make_server(runtime, "127.0.0.1", 0)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    request = b"GET /api/sample HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    held = []
    with serving(srv):
        try:
            for source, count in (("127.0.0.2", MAX_CONNECTIONS_PER_CLIENT), ("127.0.0.3", 44)):
                held += [from_address(srv, source) for _ in range(count)]
            held[-1].sendall(request)  # the 108th is served
            assert held[-1].recv(65536).startswith(b"HTTP/1.1 200 OK")
            with from_address(srv, "127.0.0.4") as extra:
                try:
                    extra.sendall(request)
                    assert extra.recv(65536) == b""
                except ConnectionResetError:
                    pass
        finally:
            for sock in held:
                sock.close()


WRITE_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def impatient(runtime):
    """A server that disconnects a client that does not take its answer within 1 s."""
    with serving(make_server(runtime, "127.0.0.1", 0, write_timeout=WRITE_TIMEOUT)) as srv:
        yield srv


def test_a_client_that_never_reads_is_disconnected(impatient, capsys):
    """100 pipelined requests for the largest static file, none of the answers read: the
    server stops at what the socket holds, closes the connection at the write timeout, and
    answers others meanwhile."""
    request = b"GET /static/qrcode.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    size = len((Path(__file__).parent.parent / "runtime/static/qrcode.js").read_bytes())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window
    sock.settimeout(10)
    try:
        sock.connect(impatient.server_address[:2])
        sock.sendall(request * 100)
        status, _, _ = call(impatient, "GET", "/api/info")
        assert status == 200
        time.sleep(WRITE_TIMEOUT + 1.0)
        received = 0
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
    finally:
        sock.close()
    assert received < 100 * size  # it was cut off, not answered in full once read
    assert (f"127.0.0.1 connection closed: the client did not take its answer within "
            f"{WRITE_TIMEOUT:g} s") in capsys.readouterr().err


class GatedRuntime(Runtime):
    """A runtime whose decode of a z starting with GATED waits until its gate opens (at most
    `patience` seconds, then fails)."""

    patience = 60.0

    def decode(self, z):
        if np.asarray(z).reshape(-1)[0] == GATED:
            assert self.gate.wait(timeout=self.patience)
        return super().decode(z)

    @classmethod
    def load(cls, *args, **kwargs):
        runtime = super().load(*args, **kwargs)
        runtime.gate = threading.Event()
        return runtime


GATED = 1.5


def test_computing_routes_are_fair_between_client_addresses(tiny_bundle, capsys):
    """One address floods decode: it computes one request at a time, may have 8 more waiting and
    gets 429 beyond; another address's decode is answered while the flood's are all stuck."""
    runtime = GatedRuntime.load(tiny_bundle)
    gated = ",".join(str(v) for v in [GATED, *Z[1:]])
    flood_request = (f"GET /api/decode.png?z={gated} HTTP/1.1\r\n"
                     f"Host: 127.0.0.1\r\n\r\n").encode()
    replies = []
    with serving(make_server(runtime, "127.0.0.1", 0)) as srv:
        # A request in flight (its body pending), so that none of the flood is answered on the
        # event loop as a request alone would be.
        pending = from_address(srv, "127.0.0.3")
        pending.sendall(b"POST /api/decode HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Content-Length: 100\r\n\r\n")
        time.sleep(0.2)
        flood = [from_address(srv, "127.0.0.2", timeout=30) for _ in range(12)]

        def read(sock):
            replies.append(sock.recv(65536))

        readers = [threading.Thread(target=read, args=(sock,)) for sock in flood]
        try:
            for sock, reader in zip(flood, readers):
                sock.sendall(flood_request)
                reader.start()
            deadline = time.monotonic() + 20
            while len(replies) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            busy = list(replies)
            status, _, body = call(srv, "GET", f"/api/decode.png?z={Z_TEXT}")
            assert status == 200 and body.startswith(b"\x89PNG")
        finally:
            runtime.gate.set()
            for reader in readers:
                reader.join(timeout=30)
            for sock in [pending, *flood]:
                sock.close()
    assert len(busy) == 3 and all(reply.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
                                  for reply in busy), busy
    assert all(b"\r\nretry-after: 1\r\n" in reply for reply in busy)
    assert answers(busy[0]) == [
        (429, {"error": "too many requests from 127.0.0.2 at once: at most 8 may wait behind "
                        "the one computing"})]
    assert sorted(reply.split(b" ", 2)[1] for reply in replies) == [b"200"] * 9 + [b"429"] * 3
    logged = [line for line in capsys.readouterr().err.splitlines() if " 429" in line]
    assert len(logged) == 1  # a flood is logged now and then, not line by line


def stop_with_sigterm(process) -> tuple[str, str]:
    """SIGTERM, then the process's output; it must exit 0 within 20 s (its bounds are 10 s)."""
    process.send_signal(signal.SIGTERM)
    try:
        out, err = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"vae-run serve still running 20 s after SIGTERM: {err[-2000:]}")
    assert process.returncode == 0, err
    return out, err


def test_serve_refuses_an_open_file_limit_too_low_to_serve(tiny_bundle, tmp_path):
    """The connection caps must fit under the open-file limit, or accept() would fail."""
    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))

    result = subprocess.run([sys.executable, "-c", SERVE, "serve", "--port", "0", "--bundle",
                             str(tiny_bundle)], capture_output=True, text=True, cwd=tmp_path,
                            preexec_fn=low_limit, timeout=120)
    assert result.returncode == 2
    assert result.stderr == ("Error: the open-file limit (200) leaves room for 8 connections, at "
                             "least 64 needed: raise it (ulimit -n, or LimitNOFILE= in a systemd "
                             "unit)\n")


def test_sigterm_answers_a_request_pipelined_behind_the_one_in_flight(tiny_bundle, tmp_path):
    """Both requests were received before the connection was done with: each gets its answer,
    then the server closes the connection cleanly (no reset) and exits."""
    process, _, port = start_serve(["--bundle", str(tiny_bundle)], tmp_path)
    try:
        body = json.dumps({"z": Z, "k": 2}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /api/nearest HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            sock.sendall(body[10:] + NEXT)
            reply = b""
            while chunk := sock.recv(65536):  # a reset raises here
                reply += chunk
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    (status, payload), (next_status, info) = answers(reply)
    assert status == 200 and [r["rank"] for r in payload["results"]] == [1, 2]
    assert next_status == 200 and info["latent_dim"] == D
    assert process.returncode == 0 and err == "stopped (SIGTERM)\n", err


def test_sigterm_with_a_client_that_stopped_reading(tiny_bundle, tmp_path):
    """A client with answers it never reads cannot hold the exit: the server closes it 2 s after
    SIGTERM, logs one line for it, no traceback, and exits 0; a kept-alive idle connection is
    closed cleanly."""
    process, _, port = start_serve(["--bundle", str(tiny_bundle)], tmp_path)
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        stalled.connect(("127.0.0.1", port))
        stalled.sendall(b"GET /static/qrcode.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 100)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as idle:
            idle.sendall(NEXT)
            assert answers(idle.recv(65536))[0][0] == 200
            time.sleep(0.5)
            _, err = stop_with_sigterm(process)
            assert idle.recv(1) == b""
    finally:
        stalled.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert err == ("127.0.0.1 connection closed: the client did not take its answer within "
                   "2 s\nstopped (SIGTERM)\n"), err


def test_requests_that_start_together_compute_in_the_workers(tiny_bundle):
    """Requests pipelined on several connections all start in one turn of the event loop; each
    must go to the workers rather than find itself alone and compute on the loop, where one
    after the other they would hold every client (here: the gated ones for ever)."""
    runtime = GatedRuntime.load(tiny_bundle)
    runtime.patience = 5.0
    srv = make_server(runtime, "127.0.0.1", 0)
    gated = ",".join(str(v) for v in [GATED, *Z[1:]])

    async def call(z: str, client: str) -> int:
        scope = {"type": "http", "method": "GET", "raw_path": b"/api/decode.png",
                 "query_string": f"z={z}".encode(), "http_version": "1.1",
                 "headers": [(b"host", b"127.0.0.1")], "client": (client, 40000)}
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await srv.asgi(scope, receive, send)
        return sent[0]["status"]

    async def main():
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(call(gated, "127.0.0.2")) for _ in range(2)]
        tasks.append(loop.create_task(call(Z_TEXT, "127.0.0.1")))
        for task in tasks:  # as uvicorn registers every request's task
            srv.asgi.tasks.add(task)
            task.add_done_callback(srv.asgi.tasks.discard)
        done, _ = await asyncio.wait([tasks[-1]], timeout=10)
        answered_first = tasks[-1] in done and not runtime.gate.is_set()
        runtime.gate.set()
        return answered_first, await asyncio.gather(*tasks)

    try:
        answered_first, statuses = asyncio.run(main())
    finally:
        srv.server_close()
    assert answered_first and statuses == [200, 200, 200]
