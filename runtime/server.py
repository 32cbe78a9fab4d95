"""`vae-run serve`: a small JSON API and a touch-friendly kiosk page over one shared Runtime.

Standard library only (http.server.ThreadingHTTPServer): the runtime has to install light on a
Raspberry Pi, and a kiosk serves one screen on loopback, so a framework would add dependencies
without adding anything the kiosk needs. docs/kiosk.md documents the API and the choice.

Routes (all answers are JSON except the page, its assets and the *.png routes):

    GET  /                         the kiosk page (runtime/static/index.html)
    GET  /static/<file>            its script and style sheet
    GET  /api/info                 latent dim, label names, catalog size, slider range, k
    GET  /api/sample[?seed=N]      z drawn from the prior N(0, I)
    GET  /api/decode?z=...         {"z", "image": PNG data URL}; POST the same as {"z": [...]}
    GET  /api/decode.png?z=...     the decoded garment as a PNG
    GET  /api/nearest?z=...&k=N&by=latent|decoded
                                   the k catalog items most like the garment z, best first
                                   (Runtime.nearest, by="latent" unless given), with z's
                                   distance from the catalog; POST: {"z": [...], "k": N, "by": ...}
    GET  /api/item/<id>            one catalog item: label, mu, log_sigma
    GET  /api/item/<id>.png        its picture: the decoder's reconstruction of mu

Errors are {"error": "..."} with a 4xx status; an unexpected failure is a 500 whose body says
only "internal error" (the traceback goes to the server's stderr, never to the client).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import re
import socket
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from .core import MATCH_MODES, Runtime, check_k, check_latent, parse_z
from .images import to_uint8

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_RANGE = 3.0
MAX_RANGE = 100.0
DEFAULT_K = 6
MAX_K = 100  # a results list longer than this is a scraper, not a kiosk
FAR_SAMPLES = 512
FAR_QUANTILE = 0.99
# 512 latent values of up to ~25 JSON characters each fit comfortably under both caps.
MAX_BODY_BYTES = 64 * 1024
MAX_QUERY_CHARS = 16 * 1024
MAX_CONNECTIONS = 32
IDLE_TIMEOUT_S = 15.0
ITEM_IMAGE_CACHE = 4096

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
STATIC_NAME = re.compile(r"^[A-Za-z0-9_-]+\.[a-z]+$")
# The page may only talk to its own server: a kiosk is often offline, and nothing external
# should ever load into it.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
ITEM_PATH = re.compile(r"^/api/item/([^/]*?)(\.png)?$")
INTEGER = re.compile(r"^[+-]?[0-9]{1,18}$")


class ApiError(Exception):
    """An HTTP error other than 400 (not found, wrong method, too large)."""

    def __init__(self, status: HTTPStatus, message: str, close: bool = False):
        super().__init__(message)
        self.status = status
        self.close = close


def latent_from_json(value, latent_dim: int) -> np.ndarray:
    """z from a JSON body: a list of latent_dim numbers, or a string parse_z accepts."""
    if isinstance(value, str):
        return parse_z(value, latent_dim)
    if not isinstance(value, list):
        raise ValueError(
            f"z must be a list of {latent_dim} numbers or a string like '0.5,-1.2,...', "
            f"got {_json_kind(value)}"
        )
    for position, item in enumerate(value, start=1):
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ValueError(f"z value {position} is not a number: got {_json_kind(item)}")
    try:
        array = np.array([float(item) for item in value], dtype=np.float64)
    except OverflowError:
        raise ValueError("z holds a number too large for a float") from None
    if array.shape != (latent_dim,):
        raise ValueError(f"z has {array.shape[0]} values, expected {latent_dim} "
                         f"(the latent dimension)")
    return check_latent(array, latent_dim)


def parse_int(text, name: str) -> int:
    """An integer from a query string or JSON body (JSON floats such as 5.0 are refused)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if isinstance(text, str) and INTEGER.match(text.strip()):
        return int(text)
    shown = repr(text[:40]) if isinstance(text, str) else _json_kind(text)
    raise ValueError(f"{name} must be an integer, got {shown}")


def check_server_k(k) -> int:
    k = check_k(k)
    if k > MAX_K:
        raise ValueError(f"k must be <= {MAX_K}, got {k}")
    return k


def _json_kind(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false",
             type(None): "null", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def png_data_url(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


class KioskApp:
    """The API over one Runtime, independent of HTTP: each method takes parsed values.

    Every method only reads the Runtime and this object's immutable tables, so one
    KioskApp serves all of the server's threads (the item picture cache is lru_cache,
    which is thread-safe).
    """

    def __init__(self, runtime: Runtime, *, z_range: float = DEFAULT_RANGE, k: int = DEFAULT_K):
        if isinstance(z_range, bool) or not isinstance(z_range, (int, float)) or not (
            0 < z_range <= MAX_RANGE
        ):
            raise ValueError(f"range must be a number in (0, {MAX_RANGE:g}], got {z_range!r}")
        self.runtime = runtime
        self.z_range = float(z_range)
        self.k = check_server_k(k)
        # A garment is "far from the catalog" when its round-trip distance exceeds what 99%
        # of typical garments (z ~ N(0, I), a fixed sample) show: docs/matching.md.
        typical = runtime.roundtrip_distance(runtime.sample_prior(FAR_SAMPLES, seed=0))
        self.far_distance = float(np.quantile(typical, FAR_QUANTILE))
        ids = runtime.index.ids
        # First row wins should an id repeat; ids are dataset rows, so they do not.
        self._rows = {}
        for row, item_id in enumerate(ids.tolist()):
            self._rows.setdefault(item_id, row)
        self.item_png = functools.lru_cache(maxsize=ITEM_IMAGE_CACHE)(self._item_png)

    def info(self) -> dict:
        rt = self.runtime
        return {
            "latent_dim": rt.latent_dim,
            "image_shape": list(rt.image_shape),
            "label_names": list(rt.label_names),
            "catalog": rt.manifest["index"].get("catalog", "unknown"),
            "catalog_size": len(rt.index),
            "range": self.z_range,
            "k": self.k,
            "max_k": MAX_K,
            "match_modes": list(MATCH_MODES),
            "far_distance": self.far_distance,
        }

    def sample(self, seed: int | None) -> dict:
        if seed is not None and not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        z = self.runtime.sample_prior(seed=seed)
        return {"z": z.tolist(), "seed": seed}

    def decode_png(self, z: np.ndarray) -> bytes:
        return png_bytes(self.runtime.decode(z))

    def decode(self, z: np.ndarray) -> dict:
        return {"z": z.tolist(), "image": png_data_url(self.runtime.decode(z))}

    def nearest(self, z: np.ndarray, k: int, by: str = "latent") -> dict:
        matches = self.runtime.nearest(z, k=check_server_k(k), by=by)
        names = self.runtime.label_names
        results = [
            {"rank": rank, "id": int(item_id), "row": int(row), "label": names[label],
             "label_id": int(label), "log_likelihood": float(score),
             "probability": float(probability), "image": f"/api/item/{int(item_id)}.png"}
            for rank, (row, item_id, label, score, probability) in enumerate(
                zip(matches.rows, matches.ids, matches.labels, matches.log_likelihoods,
                    matches.probabilities),
                start=1)
        ]
        distance = float(matches.distances)
        return {"z": z.tolist(), "by": by, "k": len(results), "distance": distance,
                "far": distance > self.far_distance, "results": results}

    def row_of(self, item_id: int) -> int:
        try:
            return self._rows[item_id]
        except KeyError:
            raise ApiError(HTTPStatus.NOT_FOUND,
                           f"no catalog item with id {item_id}") from None

    def item(self, item_id: int) -> dict:
        row = self.row_of(item_id)
        index = self.runtime.index
        label = int(index.labels[row])
        return {"id": item_id, "row": row, "label": self.runtime.label_names[label],
                "label_id": label, "mu": index.mu[row].astype(np.float64).tolist(),
                "log_sigma": index.log_sigma[row].astype(np.float64).tolist(),
                "image": f"/api/item/{item_id}.png"}

    def _item_png(self, row: int) -> bytes:
        # No thumbnails are stored in the bundle: the picture is the decoder's view of mu.
        return png_bytes(self.runtime.decode(self.runtime.index.mu[row].astype(np.float64)))


class KioskHandler(BaseHTTPRequestHandler):
    """One request; routing and validation, then one KioskApp call."""

    protocol_version = "HTTP/1.1"  # keep-alive: a slider sends many small requests
    server_version = "vae-edge-kiosk"
    timeout = IDLE_TIMEOUT_S  # an idle or stalled client frees its thread after this
    # Headers and body go out in two writes; with Nagle on, the client's delayed ACK would
    # hold the body back ~40 ms on every keep-alive request.
    disable_nagle_algorithm = True

    # -- responses -----------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str, *, cache: str = "no-store",
              headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload: dict, status: int = 200):
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8")

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, URI too long, 501) as JSON too."""
        self.close_connection = True
        try:
            status = HTTPStatus(code)
            text = message or status.phrase
        except ValueError:
            text = message or "error"
        if not getattr(self, "command", None):
            self.command = "GET"  # unparsed request line: still send the JSON body
        self._json({"error": text}, status=code)

    # -- request parsing -------------------------------------------------------------------
    def _query(self) -> dict[str, str]:
        query = urlsplit(self.path).query
        if len(query) > MAX_QUERY_CHARS:
            raise ApiError(HTTPStatus.REQUEST_URI_TOO_LONG,
                           f"query string is {len(query)} characters, at most "
                           f"{MAX_QUERY_CHARS} allowed")
        try:
            params = parse_qs(query, keep_blank_values=True, strict_parsing=False,
                              max_num_fields=16)
        except ValueError:
            raise ValueError("too many query parameters (at most 16)") from None
        repeated = sorted(name for name, values in params.items() if len(values) > 1)
        if repeated:
            raise ValueError(f"query parameter given more than once: {', '.join(repeated)}")
        return {name: values[0] for name, values in params.items()}

    def _body(self) -> dict:
        length_text = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(HTTPStatus.LENGTH_REQUIRED,
                           "chunked bodies are not accepted: send Content-Length", close=True)
        if length_text is None:
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "POST needs a Content-Length header",
                           close=True)
        if not length_text.strip().isdigit():
            raise ApiError(HTTPStatus.BAD_REQUEST,
                           f"Content-Length is not a number: {length_text[:40]!r}", close=True)
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"request body is {length} bytes, at most {MAX_BODY_BYTES} allowed",
                           close=True)
        raw = self.rfile.read(length)
        if len(raw) != length:
            raise ApiError(HTTPStatus.BAD_REQUEST, "request body ended early", close=True)
        # The body is read as JSON whatever Content-Type says: `curl -d` sends a form type,
        # and the API changes nothing on the server, so there is nothing to guard by type.
        try:
            payload = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError("request body is not UTF-8 text") from None
        except RecursionError:
            raise ValueError("request body is nested too deeply") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"request body is not valid JSON: {exc.msg} at "
                             f"line {exc.lineno} column {exc.colno}") from None
        if not isinstance(payload, dict):
            raise ValueError(f"request body must be a JSON object, got {_json_kind(payload)}")
        return payload

    @staticmethod
    def _fields(params: dict, required: tuple[str, ...], optional: tuple[str, ...]) -> dict:
        unknown = sorted(set(params) - set(required) - set(optional))
        if unknown:
            allowed = ", ".join(required + optional) or "none"
            raise ValueError(f"unknown field(s): {', '.join(unknown)} (allowed: {allowed})")
        missing = [name for name in required if name not in params]
        if missing:
            raise ValueError(f"missing field: {missing[0]}")
        return params

    # -- routing ---------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str):
        app: KioskApp = self.server.app
        try:
            path = urlsplit(self.path).path
            if method == "POST":
                self._post(app, path)
            else:
                self._get(app, path)
        except ApiError as exc:
            if exc.close:
                self.close_connection = True
            self._json({"error": str(exc)}, status=exc.status)
        except (ValueError, FileNotFoundError) as exc:
            self._json({"error": str(exc)}, status=HTTPStatus.BAD_REQUEST)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # a bug: log it here, never show the client a traceback
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            self._json({"error": "internal error"}, status=HTTPStatus.INTERNAL_SERVER_ERROR)

    def _get(self, app: KioskApp, path: str):
        d = app.runtime.latent_dim
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):])
        if not path.startswith("/api/"):
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such page: {path[:80]}")
        query = self._query()
        if path == "/api/info":
            self._fields(query, (), ())
            return self._json(app.info())
        if path == "/api/sample":
            self._fields(query, (), ("seed",))
            seed = parse_int(query["seed"], "seed") if "seed" in query else None
            return self._json(app.sample(seed))
        if path == "/api/decode":
            self._fields(query, ("z",), ())
            return self._json(app.decode(parse_z(query["z"], d)))
        if path == "/api/decode.png":
            self._fields(query, ("z",), ())
            return self._send(200, app.decode_png(parse_z(query["z"], d)), "image/png")
        if path == "/api/nearest":
            self._fields(query, ("z",), ("k", "by"))
            k = parse_int(query["k"], "k") if "k" in query else app.k
            return self._json(app.nearest(parse_z(query["z"], d), k,
                                          query.get("by", "latent")))
        match = ITEM_PATH.match(path)
        if match:
            self._fields(query, (), ())
            item_id = parse_int(match.group(1), "item id")
            if match.group(2):
                # The bundle cannot change under a running server, so the picture may be cached.
                return self._send(200, app.item_png(app.row_of(item_id)), "image/png",
                                  cache="private, max-age=3600")
            return self._json(app.item(item_id))
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such API route: {path[:80]}")

    def _post(self, app: KioskApp, path: str):
        d = app.runtime.latent_dim
        if path not in ("/api/decode", "/api/nearest"):
            known = path == "/" or path.startswith(("/static/", "/api/"))
            # Read nothing of a body we will not use: the connection is closed instead.
            raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED if known else HTTPStatus.NOT_FOUND,
                           f"POST is for /api/decode and /api/nearest, not {path[:80]}",
                           close=True)
        body = self._body()
        if path == "/api/decode":
            self._fields(body, ("z",), ())
            return self._json(app.decode(latent_from_json(body["z"], d)))
        self._fields(body, ("z",), ("k", "by"))
        k = parse_int(body["k"], "k") if "k" in body else app.k
        return self._json(app.nearest(latent_from_json(body["z"], d), k,
                                      body.get("by", "latent")))

    def _static(self, name: str):
        page = self.server.static.get(name)
        if page is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such file: {name[:80]}")
        body, content_type = page
        headers = {"Content-Security-Policy": PAGE_POLICY} if name.endswith(".html") else {}
        self._send(200, body, content_type, cache="no-cache", headers=headers)

    # -- logging ---------------------------------------------------------------------------
    def log_message(self, format, *args):
        if self.server.log_requests:
            super().log_message(format, *args)

    def log_request(self, code="-", size="-"):
        # Failures are always worth a line; successes only when asked for.
        failed = isinstance(code, int) and code >= 400
        if self.server.log_requests or failed:
            super().log_message('"%s" %s %s', self.requestline, str(code), str(size))

    def log_error(self, format, *args):
        # An idle keep-alive connection timing out is routine, not an error.
        if self.server.log_requests or not format.startswith("Request timed out"):
            super().log_message(format, *args)


def load_static(directory: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """The page's files, read once: name -> (bytes, content type). Only plain names are served."""
    files = {}
    if not directory.is_dir():
        raise FileNotFoundError(f"kiosk page files not found: {directory}")
    for path in sorted(directory.iterdir()):
        content_type = STATIC_TYPES.get(path.suffix)
        if path.is_file() and content_type and STATIC_NAME.match(path.name):
            files[path.name] = (path.read_bytes(), content_type)
    if "index.html" not in files:
        raise FileNotFoundError(f"kiosk page not found: {directory / 'index.html'}")
    return files


class KioskServer(ThreadingHTTPServer):
    """A thread per connection, at most max_connections at once (the rest wait to be accepted)."""

    daemon_threads = True

    def __init__(self, address, app: KioskApp, *, log_requests: bool = False,
                 max_connections: int = MAX_CONNECTIONS):
        self.app = app
        self.static = load_static()
        self.log_requests = log_requests
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, KioskHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def process_request(self, request, client_address):
        self._slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def run(self, log=print) -> None:
        """Serve until Ctrl+C (or shutdown() from another thread), then close the socket."""
        try:
            self.serve_forever()
        except KeyboardInterrupt:
            log("stopped")
        finally:
            self.server_close()


class _KioskServer6(KioskServer):
    address_family = socket.AF_INET6


def make_server(runtime: Runtime, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                z_range: float = DEFAULT_RANGE, k: int = DEFAULT_K,
                log_requests: bool = False) -> KioskServer:
    """A bound, not yet serving, kiosk server; port 0 picks a free port (see .url).

    Raises ValueError for a bad range or k and for an address that cannot be bound.
    """
    app = KioskApp(runtime, z_range=z_range, k=k)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in [0, 65535], got {port!r}")
    cls = _KioskServer6 if ":" in host else KioskServer
    try:
        return cls((host, port), app, log_requests=log_requests)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ValueError(f"cannot listen on {host}:{port}: {reason}") from None


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
