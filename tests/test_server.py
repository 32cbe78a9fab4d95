"""`vae-run serve`: the JSON API over real HTTP on loopback, against the tiny bundle."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vae_edge.runtime.cli import main as run_main
from vae_edge.runtime.images import to_uint8
from vae_edge.runtime.server import MAX_BODY_BYTES, MAX_QUERY_CHARS, KioskApp, make_server

pytestmark = pytest.mark.slow  # needs the tiny trained bundle

D = 8  # the tiny bundle's latent dim
Z = [0.5, -1.2, 0.0, 1.0, 2.0, -2.0, 0.1, 3.0]
Z_TEXT = ",".join(str(v) for v in Z)


@pytest.fixture(scope="module")
def server(runtime):
    srv = make_server(runtime, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def call(server, method, path, body=None, headers=None, connection=None):
    """(status, headers, raw bytes); body: a dict is sent as JSON, bytes as they are."""
    conn = connection or http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    if isinstance(body, dict) or isinstance(body, list):
        body = json.dumps(body).encode()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        if connection is None:
            conn.close()


def call_json(server, method, path, body=None, **kwargs):
    status, headers, raw = call(server, method, path, body, **kwargs)
    assert headers["Content-Type"] == "application/json; charset=utf-8", raw[:200]
    return status, json.loads(raw)


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
                    "far_distance": pytest.approx(info["far_distance"])}
    typical = runtime.roundtrip_distance(runtime.sample_prior(512, seed=0))
    assert info["far_distance"] == float(np.quantile(typical, 0.99))


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
    expected = runtime.nearest(np.array(Z), k=k, by=by or "latent")
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
        assert results[0]["image"] == f"/api/item/{results[0]['id']}.png"


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


def test_item_json_and_picture(server, runtime):
    row = 17
    item_id = int(runtime.index.ids[row])
    status, item = call_json(server, "GET", f"/api/item/{item_id}")
    assert status == 200
    assert item["id"] == item_id and item["row"] == row
    assert item["label"] == runtime.label_names[runtime.index.labels[row]]
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
        ("GET", "/api/sample?seed=x", None, "seed must be an integer, got 'x'"),
        ("GET", "/api/sample?n=3", None, "unknown field(s): n (allowed: seed)"),
        ("GET", "/api/item/abc", None, "item id must be an integer, got 'abc'"),
    ],
)
def test_bad_input_is_a_400_with_a_json_error(server, method, path, body, message):
    status, payload = call_json(server, method, path, body)
    assert (status, payload) == (400, {"error": message})


def test_unknown_item_is_404(server):
    status, payload = call_json(server, "GET", "/api/item/123456789")
    assert (status, payload) == (404, {"error": "no catalog item with id 123456789"})


@pytest.mark.parametrize(
    "method, path, status, message",
    [
        ("GET", "/api/nothing", 404, "no such API route: /api/nothing"),
        ("GET", "/elsewhere", 404, "no such page: /elsewhere"),
        ("GET", "/static/../server.py", 404, "no such file: ../server.py"),
        ("GET", "/static/missing.js", 404, "no such file: missing.js"),
        ("POST", "/api/info", 405, "POST is for /api/decode and /api/nearest, not /api/info"),
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
    # Beyond http.server's own request-line limit the answer is still JSON.
    status, payload = call_json(server, "GET", "/api/decode?z=" + "0" * 70000)
    assert status == 414 and payload == {"error": "Request-URI Too Long"}


def test_post_without_length_is_refused(server):
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(b"POST /api/decode HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = sock.makefile("rb").read()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 411 ") and b"Connection: close" in head
    assert json.loads(body) == {"error": "POST needs a Content-Length header"}


def test_page_and_assets(server):
    status, headers, page = call(server, "GET", "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert b'<script src="/static/app.js"' in page
    for name, content_type in (("app.js", "text/javascript; charset=utf-8"),
                               ("style.css", "text/css; charset=utf-8")):
        status, headers, raw = call(server, "GET", f"/static/{name}")
        assert status == 200 and headers["Content-Type"] == content_type and raw
    # Nothing on the page points off the kiosk's own server.
    for name in ("/", "/static/app.js", "/static/style.css"):
        text = call(server, "GET", name)[2].decode()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
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


def test_a_bug_is_a_500_without_traceback(server, monkeypatch, capsys):
    def broken(z):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(server.app, "decode", broken)
    status, payload = call_json(server, "POST", "/api/decode", {"z": Z})
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


def test_app_rejects_bad_settings(runtime):
    with pytest.raises(ValueError, match=r"^range must be a number in \(0, 100\], got 0$"):
        KioskApp(runtime, z_range=0)
    with pytest.raises(ValueError, match=r"^k must be <= 100, got 101$"):
        KioskApp(runtime, k=101)
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


BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "onnx", "onnxscript", "tqdm"):
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Block())
    from vae_edge.runtime.cli import main
    main()
    """
)


def test_vae_run_serve_without_torch(tiny_bundle, tmp_path):
    """The real command in its own process, torch unimportable; Ctrl+C stops it cleanly."""
    process = subprocess.Popen(
        [sys.executable, "-c", BLOCK_TORCH, "serve", "--bundle", str(tiny_bundle),
         "--port", "0", "--range", "5", "-k", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = process.stdout.readline()
        assert line.startswith("kiosk on http://127.0.0.1:"), process.stderr.read()
        assert "(latent dim 8, 5000 catalog items)" in line
        host, port = line.split("http://")[1].split("/")[0].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/api/info")
        info = json.loads(conn.getresponse().read())
        conn.close()
        assert info["range"] == 5.0 and info["k"] == 3
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "stopped" in err and "Traceback" not in err
