"""`vae-run serve`: a small JSON API and a touch-friendly kiosk page over one shared Runtime.

HTTP is uvicorn with h11 (both pure Python): h11 parses each request strictly, and uvicorn's
asyncio loop holds every connection without a thread, so slow or stalled clients cost a socket,
not a worker. `KioskProtocol` adds what neither has: one deadline for reading each request,
head and body together, one for the client to take its answer, caps on connections per client
address and in all, a stop that answers every request already received, and JSON bodies for
the requests h11 refuses. `KioskAsgi` screens each request (framing, size, Host, cross-site
origin) before reading its body, then runs the `KioskApp` call in a small thread pool shared
fairly between client addresses (`FairWorkers`). docs/kiosk.md documents the API, the trust
model and the choice.

Routes (all answers are JSON except the page, its assets and the pictures):

    GET  /                         the kiosk page (runtime/static/index.html)
    GET  /static/<file>            its script and style sheet
    GET  /api/info                 latent dim, label names, catalog size, slider range, k,
                                   idle reset, attract, the opening z, words for each slider's ends
    GET  /api/sample[?seed=N]      z drawn from the prior N(0, I)
    GET  /api/decode?z=...         {"z", "image": PNG data URL}; POST the same as {"z": [...]}
    GET  /api/decode.png?z=...     the decoded garment as a PNG
    GET  /api/nearest?z=...&k=N&by=latent|decoded
                                   the k catalog items most like the garment z, best first
                                   (Runtime.nearest, by="latent" unless given), with z's
                                   distance from the catalog; POST: {"z": [...], "k": N, "by": ...}
    GET  /api/ends?z=...           what each slider does: the garment with that slider at each end
                                   of its range, the others at z; POST the same as {"z": [...]}
    GET  /api/item/<id>            one catalog item: label, metadata, mu, log_sigma (the id
                                   percent-encoded: item ids are a shop's SKUs, any text)
    GET  /api/item/<id>/image      its picture: the catalog photo's thumbnail (WebP) where the
                                   bundle has thumbnails, else the decoder's view of mu (PNG)

Errors are {"error": "..."} with a 4xx status; an unexpected failure is a 500 whose body says
only "internal error" (the traceback goes to the server's stderr, never to the client).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import ctypes
import fcntl
import functools
import hashlib
import ipaddress
import json
import re
import resource
import signal
import socket
import struct
import sys
import termios
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import h11
import numpy as np
import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol

from .bundle import BundleError
from .core import MATCH_MODES, Runtime, check_k, check_latent, parse_z
from .images import png_bytes

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_RANGE = 3.0
MAX_RANGE = 100.0
DEFAULT_K = 6
DEFAULT_IDLE_RESET_S = 90  # a shopper who walks away leaves the next one a fresh page
MAX_IDLE_RESET_S = 24 * 3600
MAX_ATTRACT_S = 3600
MAX_K = 100  # a results list longer than this is a scraper, not a kiosk
FAR_SAMPLES = 256  # p99 3.82 on the shipped model, as from 512 (4,096: 3.90); start-up stays short
FAR_QUANTILE = 0.99
# 512 latent values of up to ~25 JSON characters each fit comfortably under both caps.
MAX_BODY_BYTES = 64 * 1024
MAX_QUERY_CHARS = 16 * 1024
MAX_HEAD_BYTES = 32 * 1024  # request line and headers together; the query cap fits inside
# One request, head and body, must arrive within this of its first byte (or of the
# connection opening): a client trickling a byte at a time cannot hold a connection longer.
READ_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 15  # a kept-alive connection with no request in progress closes after this
# An answer the client has not taken within this (it stopped reading) ends its connection:
# the bytes would otherwise sit in the server's memory, and the socket stay open, for ever.
WRITE_TIMEOUT_S = 10.0
SHUTDOWN_WRITE_S = 2.0  # the same, from SIGTERM on: a client that stopped reading cannot hold exit
WORKER_THREADS = 4  # decode and search release the GIL; more threads than cores buys nothing
# Computing requests run one at a time per client address; beyond this many waiting behind
# the running one, the address gets 429 (a kiosk page has at most 6 requests out at once).
MAX_WAITING_PER_CLIENT = 8
SHUTDOWN_GRACE_S = 30  # a safety net only: every wait above has its own shorter deadline
BACKLOG = 128
# Open connections, per client address and in all; more are closed as soon as accepted. The
# total stays below the open-file limit (systemd's default is 1,024) with room for the backlog
# asyncio accepts in one go and the files the process holds anyway, so accept() never fails.
MAX_CONNECTIONS = 512
MAX_CONNECTIONS_PER_CLIENT = 64
RESERVED_FILES = 64
NOTICE_INTERVAL_S = 10.0  # a flood's refusals are logged at most once per this, with a count
ITEM_IMAGE_CACHE = 4096

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".webmanifest": "application/manifest+json",
}
STATIC_NAME = re.compile(r"^[A-Za-z0-9_-]+\.[a-z]+$")
# The page may only talk to its own server: a kiosk is often offline, and nothing external
# should ever load into it.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
ITEM_PATH = re.compile(r"^/api/item/([^/]*)(/image)?$")
INTEGER = re.compile(r"^[+-]?[0-9]{1,19}$")
HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
POST_ROUTES = ("/api/decode", "/api/nearest", "/api/ends")
# Routes that run a model or the search: a worker thread answers them. The rest (the page,
# info, samples, item JSON, errors) take microseconds and are answered on the event loop,
# so they never queue behind a decode.
COMPUTING_ROUTE = re.compile(r"^/api/(decode|decode\.png|nearest|ends|item/[^/]*/image)$")
RETRY_AFTER_S = 1
JSON_TYPE = "application/json; charset=utf-8"
QUOTED_BYTES = re.compile(r": (b['\"]|bytearray\().*$", re.DOTALL)


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


def json_int(value, name: str) -> int:
    """An integer from a JSON body: a JSON number, never a string of digits."""
    if isinstance(value, str):
        raise ValueError(f"{name} must be an integer, got a string")
    return parse_int(value, name)


def check_seconds(value, name: str, maximum: float, zero_means: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        0 <= value <= maximum
    ):
        raise ValueError(f"{name} must be a number of seconds in [0, {maximum}] "
                         f"(0: {zero_means}), got {value!r}")
    return float(value)


def check_server_k(k) -> int:
    k = check_k(k)
    if k > MAX_K:
        raise ValueError(f"k must be <= {MAX_K}, got {k}")
    return k


def _json_kind(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false",
             type(None): "null", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def png_data_url(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


class KioskApp:
    """The API over one Runtime, independent of HTTP: each method takes parsed values.

    Every method only reads the Runtime and this object's immutable tables, so one
    KioskApp serves all of the server's threads (the item picture cache is lru_cache,
    which is thread-safe).
    """

    def __init__(self, runtime: Runtime, *, z_range: float = DEFAULT_RANGE, k: int = DEFAULT_K,
                 idle_reset: float = DEFAULT_IDLE_RESET_S, attract: float = 0):
        if isinstance(z_range, bool) or not isinstance(z_range, (int, float)) or not (
            0 < z_range <= MAX_RANGE
        ):
            raise ValueError(f"range must be a number in (0, {MAX_RANGE:g}], got {z_range!r}")
        self.runtime = runtime
        self.z_range = float(z_range)
        self.k = check_server_k(k)
        self.idle_reset = check_seconds(idle_reset, "idle reset", MAX_IDLE_RESET_S, "never")
        self.attract = check_seconds(attract, "attract", MAX_ATTRACT_S, "off")
        # The page opens on a real garment, the catalog's first item, not on z = 0 (which
        # decodes to a blur of every class).
        self.opening_z = runtime.index.mu[0].astype(np.float64).tolist()
        self.slider_ends = slider_ends(runtime)
        # A garment is "far from the catalog" when its round-trip distance exceeds what 99%
        # of typical garments (z ~ N(0, I), a fixed sample) show: docs/matching.md.
        typical = runtime.roundtrip_distance(runtime.sample_prior(FAR_SAMPLES, seed=0))
        self.far_distance = float(np.quantile(typical, FAR_QUANTILE))
        # The rows in id order, for a binary search over the bundle's own id strings (a dict,
        # or the ids sorted, would hold a second copy of every id for an idle kiosk).
        self._id_rows = np.argsort(runtime.index.ids, kind="stable").astype(np.int32)
        self.item_png = functools.lru_cache(maxsize=ITEM_IMAGE_CACHE)(self._item_png)
        # Part of every picture's URL: a browser may keep a picture for an hour, and an item
        # removed and added again with a new photo (vae-run remove, add, a restart) keeps its id.
        files = runtime.manifest["files"]
        self.image_version = hashlib.sha256("".join(
            f"{name}\0{files[name]['sha256']}\n" for name in sorted(files)).encode()
        ).hexdigest()[:16]

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
            "metadata_columns": list(rt.index.columns),
            "thumbnails": rt.index.thumbnail_offsets is not None,
            "idle_reset": self.idle_reset,
            "attract": self.attract,
            "opening_z": self.opening_z,
            "slider_ends": self.slider_ends,
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

    def ends(self, z: np.ndarray) -> dict:
        """For each slider, the garment with that slider at -range and at +range, the other
        values kept from z: one decode of 2d rows, so a page can show what every slider does."""
        d = self.runtime.latent_dim
        grid = np.repeat(z[None, :], 2 * d, axis=0)
        dims = np.arange(d)
        grid[2 * dims, dims] = -self.z_range
        grid[2 * dims + 1, dims] = self.z_range
        urls = [png_data_url(image) for image in self.runtime.decode(grid)]
        return {"z": z.tolist(), "range": self.z_range,
                "ends": [urls[2 * i:2 * i + 2] for i in range(d)]}

    def nearest(self, z: np.ndarray, k: int, by: str = "latent") -> dict:
        matches = self.runtime.nearest(z, k=check_server_k(k), by=by, with_distance=True)
        names = self.runtime.label_names
        results = [
            {"rank": rank, "id": str(item_id), "row": int(row), "label": names[label],
             "label_id": int(label), "log_likelihood": float(score),
             "probability": float(probability), "metadata": metadata,
             "image": item_image_url(item_id, self.image_version)}
            for rank, (row, item_id, label, score, probability, metadata) in enumerate(
                zip(matches.rows, matches.ids, matches.labels, matches.log_likelihoods,
                    matches.probabilities, matches.metadata),
                start=1)
        ]
        distance = float(matches.distances)
        return {"z": z.tolist(), "by": by, "k": len(results), "distance": distance,
                "far": distance > self.far_distance, "results": results}

    def row_of(self, item_id: str) -> int:
        ids = self.runtime.index.ids
        position = bisect.bisect_left(self._id_rows, item_id, key=lambda row: ids[row])
        if position < len(self._id_rows) and ids[self._id_rows[position]] == item_id:
            return int(self._id_rows[position])
        raise ApiError(HTTPStatus.NOT_FOUND, f"no catalog item with id {item_id[:80]!r}")

    def item(self, item_id: str) -> dict:
        row = self.row_of(item_id)
        index = self.runtime.index
        label = int(index.labels[row])
        return {"id": item_id, "row": row, "label": self.runtime.label_names[label],
                "label_id": label, "metadata": index.item_metadata(row),
                "mu": index.mu[row].astype(np.float64).tolist(),
                "log_sigma": index.log_sigma[row].astype(np.float64).tolist(),
                "image": item_image_url(item_id, self.image_version)}

    def item_image(self, item_id: str) -> tuple[bytes, str]:
        """The item's picture and its content type: the catalog photo's thumbnail, or where
        the bundle has none, the decoder's view of mu."""
        row = self.row_of(item_id)
        try:
            photo = self.runtime.thumbnail(row)
        except BundleError as exc:  # the bundle's fault, not the request's
            raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc)) from None
        if photo is not None:
            return photo, "image/webp"
        return self.item_png(row), "image/png"

    def _item_png(self, row: int) -> bytes:
        return png_bytes(self.runtime.decode(self.runtime.index.mu[row].astype(np.float64)))


def item_image_url(item_id: str, version: str) -> str:
    """The item's picture: `v` names the bundle's contents, so a cached picture of an
    earlier bundle is never shown for an item of this one."""
    return f"/api/item/{quote(str(item_id), safe='')}/image?v={version}"


def slider_ends(runtime: Runtime) -> list[list[str]]:
    """For each latent dim, the catalog classes whose items lie lowest and highest along it on
    average: words for the two ends of a slider ("Sandal" to "Coat"). A catalog with one
    class or none names no ends ("")."""
    index = runtime.index
    names = runtime.label_names
    present = np.unique(index.labels)
    if len(present) < 2:
        return [["", ""] for _ in range(runtime.latent_dim)]
    means = np.stack([index.mu[index.labels == label].mean(axis=0, dtype=np.float64)
                      for label in present])
    low, high = present[means.argmin(axis=0)], present[means.argmax(axis=0)]
    return [[names[a], names[b]] for a, b in zip(low, high)]


@dataclass(frozen=True)
class Answer:
    """One HTTP response, before it is written."""

    status: int
    body: bytes
    content_type: str = JSON_TYPE
    cache: str = "no-store"
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False  # end the connection after this answer


def json_answer(payload: dict, status: int = 200, *, close: bool = False) -> Answer:
    return Answer(status, json.dumps(payload, separators=(",", ":")).encode("utf-8"), close=close)


def error_answer(status: int, message: str, *, close: bool = False) -> Answer:
    return json_answer({"error": message}, status, close=close)


@dataclass(frozen=True)
class Request:
    """What the router needs of one request; path and query are the raw, undecoded target."""

    method: str
    path: str
    query: str
    http_version: str
    headers: dict[str, str]  # lower-case names; a repeated name keeps its first value
    repeated: frozenset[str]  # names given more than once
    client: str
    # The request line and headers as h11 parsed them (less the blanks it strips). h11 bounds
    # only a head still arriving; one that comes whole in a single read is checked with this.
    head_bytes: int = 0

    @classmethod
    def from_scope(cls, scope: dict) -> Request:
        headers, repeated = {}, set()
        head_bytes = (len(scope["method"]) + len(scope["raw_path"]) + len(scope["query_string"])
                      + len(" ? HTTP/1.1\r\n\r\n")
                      + sum(len(name) + len(value) + 4 for name, value in scope["headers"]))
        for name, value in scope["headers"]:
            key = name.decode("latin-1")
            if key in headers:
                repeated.add(key)
            else:
                headers[key] = value.decode("latin-1")
        client = scope.get("client")
        return cls(method=scope["method"], path=scope["raw_path"].decode("ascii", "replace"),
                   query=scope["query_string"].decode("ascii", "replace"),
                   http_version=scope["http_version"], headers=headers,
                   repeated=frozenset(repeated), client=client[0] if client else "-",
                   head_bytes=head_bytes)

    @property
    def line(self) -> str:
        target = self.path + (f"?{self.query}" if self.query else "")
        return f"{self.method} {target[:200]} HTTP/{self.http_version}"


class HostPolicy:
    """Which Host header values this server answers: the defence against DNS rebinding.

    A page on another site that rebinds its own name to this machine's address still sends
    its own name as Host, so only names the server knows are its own are accepted: the
    address it listens on, `localhost` when that is a loopback or wildcard address, any IP
    address when it listens on all of them (an address cannot be rebound), and the names the
    operator lists. The port is not compared: a rebinding page is refused by its name.
    """

    def __init__(self, listen_host: str, bound_ip: str, allowed: Iterable[str] = ()):
        names = {listen_host.lower().strip("[]"), bound_ip.lower()}
        wildcard = ipaddress.ip_address(bound_ip).is_unspecified
        if wildcard or ipaddress.ip_address(bound_ip).is_loopback:
            names.add("localhost")
        for name in allowed:
            names.add(check_host_name(name))
        self.names = frozenset(names)
        self.any_address = wildcard

    def allows(self, host_header: str) -> bool:
        name = host_header.strip().lower()
        if name.startswith("["):
            name = name[1:].partition("]")[0]
        elif name.count(":") == 1:
            name = name.partition(":")[0]
        if name in self.names:
            return True
        if self.any_address:
            try:
                ipaddress.ip_address(name)
            except ValueError:
                return False
            return True
        return False


def check_host_name(name: str) -> str:
    """A name for --allow-host: a DNS name or an IP address, without port or wildcard."""
    if not isinstance(name, str):
        raise ValueError(f"allowed host must be a string, got {type(name).__name__}")
    text = name.strip().lower()
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    if not HOST_NAME.match(text) or ".." in text:
        raise ValueError(f"allowed host must be a host name or IP address without port, "
                         f"got {name[:80]!r}")
    return text


class Busy(Exception):
    """A client address already has as many computing requests waiting as it may."""


class FairWorkers:
    """Worker threads for the computing routes, shared fairly between client addresses.

    Each address has one request computing at a time, the rest wait in its own queue (at most
    `waiting` of them); a free thread goes to the next address in turn. So an address that
    floods the decode routes holds one thread, and another address's request starts at once
    (or, with every thread busy, after one request per address ahead of it).
    Event loop only, apart from the work itself.
    """

    def __init__(self, threads: int, waiting: int):
        self.threads = threads
        self.waiting = waiting
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kiosk")
        self.queues: dict[str, deque] = {}  # address -> (future, call) waiting
        self.turns: deque[str] = deque()  # addresses with work waiting and none computing
        self.computing: set[str] = set()

    @property
    def idle(self) -> bool:
        return not self.computing

    async def run(self, client: str, call):
        """call() in a worker thread, in the client's turn; Busy when its queue is full."""
        queue = self.queues.setdefault(client, deque())
        if len(queue) >= self.waiting:
            raise Busy
        future = asyncio.get_running_loop().create_future()
        queue.append((future, call))
        if client not in self.computing and len(queue) == 1:
            self.turns.append(client)
        self._start()
        return await future

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        while len(self.computing) < self.threads and self.turns:
            client = self.turns.popleft()
            queue = self.queues[client]
            future, call = queue.popleft()
            if not queue:
                del self.queues[client]
            if future.cancelled():  # its connection went away while it waited
                if queue:
                    self.turns.append(client)
                continue
            self.computing.add(client)
            job = loop.run_in_executor(self.executor, call)
            job.add_done_callback(functools.partial(self._finished, client, future))

    def _finished(self, client: str, future: asyncio.Future, job: asyncio.Future) -> None:
        self.computing.discard(client)
        if client in self.queues:
            self.turns.append(client)
        if not future.done():
            if job.exception() is not None:
                future.set_exception(job.exception())
            else:
                future.set_result(job.result())
        self._start()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)


class KioskAsgi:
    """The HTTP layer as an ASGI app: screen the request, read its body, call KioskApp.

    Everything decided from the request line and headers (framing, HTTP version, Host,
    method, cross-site origin, route, size) is answered before any body is read, on the
    event loop; KioskApp calls that decode or search run in a worker thread.
    """

    def __init__(self, app: KioskApp, hosts: HostPolicy, *, read_timeout: float,
                 write_timeout: float = WRITE_TIMEOUT_S, log_requests: bool = False,
                 workers: int = WORKER_THREADS, max_connections: int = MAX_CONNECTIONS):
        self.app = app
        self.hosts = hosts
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.log_requests = log_requests
        self.static = load_static()
        self.workers = FairWorkers(workers, MAX_WAITING_PER_CLIENT)
        # Every request the server has parsed and not yet answered, begun or not: uvicorn's set
        # of request tasks (KioskServer shares it). Requests pipelined on several connections
        # all start in one turn of the loop, so counting begun ones would find each alone.
        self.tasks: set = set()
        # Event loop only: open connections per client address, and whether
        # the server is stopping.
        self.max_connections = max_connections
        self.connections: dict[str, int] = {}
        self.stopping = False
        self._notices: dict[str, tuple[float, int]] = {}  # kind -> (last logged, not logged)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return  # lifespan is off and websockets are not served
        request = Request.from_scope(scope)
        try:
            answer = self.screen(request)
            if answer is None:
                body = b""
                if request.method == "POST":
                    body = await self._read_body(receive)
                    if body is None:
                        return  # the client left mid-body: nobody to answer
                # A request alone in the server is answered on the event loop: handing it to
                # a thread and back costs more than many of the answers. When others are in
                # flight, decode and search go to the workers, fairly between clients.
                if COMPUTING_ROUTE.match(urlsplit(request.path).path) and not (
                    len(self.tasks) == 1 and self.workers.idle
                ):
                    answer = await self._compute(request, body)
                else:
                    answer = self.route(request, body)
        except Exception:  # a bug in screening: log it, never show the client a traceback
            traceback.print_exc(file=sys.stderr)
            answer = error_answer(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error", close=True)
        if answer.status == HTTPStatus.TOO_MANY_REQUESTS:  # a flood: a line now and then
            self.notice(request.client, "busy", f'"{request.line}" 429')
        elif self.log_requests or answer.status >= 400:  # failures are always worth a line
            self.log(request.client, f'"{request.line}" {answer.status}')
        await send({"type": "http.response.start", "status": answer.status,
                    "headers": self._headers(answer)})
        await send({"type": "http.response.body", "body": answer.body})

    async def _compute(self, request: Request, body: bytes) -> Answer:
        try:
            return await self.workers.run(request.client,
                                          functools.partial(self.route, request, body))
        except Busy:
            return Answer(HTTPStatus.TOO_MANY_REQUESTS, json.dumps(
                {"error": f"too many requests from {request.client} at once: at most "
                          f"{MAX_WAITING_PER_CLIENT} may wait behind the one computing"}
            ).encode("utf-8"), headers=(("retry-after", str(RETRY_AFTER_S)),))

    @staticmethod
    def _headers(answer: Answer) -> list[tuple[bytes, bytes]]:
        headers = [("content-type", answer.content_type),
                   ("content-length", str(len(answer.body))),
                   ("cache-control", answer.cache),
                   ("x-content-type-options", "nosniff"), *answer.headers]
        if answer.close:
            headers.append(("connection", "close"))
        return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]

    @staticmethod
    async def _read_body(receive) -> bytes | None:
        # h11 has already checked Content-Length, and screen() its size.
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def log(client: str, text: str) -> None:
        print(f"{client} {text}", file=sys.stderr, flush=True)

    def notice(self, client: str, kind: str, text: str) -> None:
        """Log a refusal a flood repeats: at most one line of each kind per NOTICE_INTERVAL_S,
        saying how many went unlogged since the last."""
        now = time.monotonic()
        last, unlogged = self._notices.get(kind, (-NOTICE_INTERVAL_S, 0))
        if now - last < NOTICE_INTERVAL_S:
            self._notices[kind] = (last, unlogged + 1)
            return
        self._notices[kind] = (now, 0)
        self.log(client, text + (f" (and {unlogged} more like it not logged)" if unlogged else ""))

    # -- before the body ---------------------------------------------------------------------
    def screen(self, request: Request) -> Answer | None:
        """A refusal decided from the request line and headers, or None to go on.

        Every refusal closes the connection: any body the client sent is never read, so the
        connection could not be trusted to start a new request where this one ends.
        """
        headers = request.headers
        if request.head_bytes > MAX_HEAD_BYTES:
            return error_answer(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request line and "
                                f"headers exceed {MAX_HEAD_BYTES} bytes", close=True)
        if "content-length" in headers and "transfer-encoding" in headers:
            return error_answer(HTTPStatus.BAD_REQUEST, "both Content-Length and "
                                "Transfer-Encoding given: the body's length is ambiguous",
                                close=True)
        if request.http_version not in ("1.0", "1.1"):
            return error_answer(HTTPStatus.BAD_REQUEST, f"HTTP/{request.http_version} is "
                                "not supported: send HTTP/1.1", close=True)
        for name in ("origin", "sec-fetch-site"):  # h11 refuses a repeated Host itself
            if name in request.repeated:
                return error_answer(HTTPStatus.BAD_REQUEST,
                                    f"header given more than once: {name}", close=True)
        host = headers.get("host")
        if host is None:
            return error_answer(HTTPStatus.BAD_REQUEST, "a Host header is required",
                                close=True)
        if not self.hosts.allows(host):
            return error_answer(HTTPStatus.FORBIDDEN, f"this kiosk does not serve host "
                                f"{host[:80]!r} (the operator can add names with --allow-host)",
                                close=True)
        if request.method not in ("GET", "HEAD", "POST"):
            return error_answer(HTTPStatus.NOT_IMPLEMENTED,
                                f"Unsupported method ({request.method[:20]!r})", close=True)
        if request.method == "GET" or request.method == "HEAD":
            return None
        refusal = self.cross_site(headers, host)
        if refusal:
            return error_answer(HTTPStatus.FORBIDDEN, refusal, close=True)
        path = urlsplit(request.path).path
        if path not in POST_ROUTES:
            known = path == "/" or path.startswith(("/static/", "/api/"))
            return error_answer(HTTPStatus.METHOD_NOT_ALLOWED if known else HTTPStatus.NOT_FOUND,
                                f"POST is for {', '.join(POST_ROUTES)}, not {path[:80]}",
                                close=True)
        if "transfer-encoding" in headers:
            return error_answer(HTTPStatus.LENGTH_REQUIRED,
                                "chunked bodies are not accepted: send Content-Length",
                                close=True)
        if "content-length" not in headers:
            return error_answer(HTTPStatus.LENGTH_REQUIRED, "POST needs a Content-Length header",
                                close=True)
        length = int(headers["content-length"])  # h11 accepts only plain decimal digits
        if length > MAX_BODY_BYTES:
            return error_answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body is {length} "
                                f"bytes, at most {MAX_BODY_BYTES} allowed", close=True)
        return None

    @staticmethod
    def cross_site(headers: dict[str, str], host: str) -> str | None:
        """Why a state-changing request is refused as cross-site, or None.

        Browsers send Origin (and Sec-Fetch-Site) with every POST, so a page on another site
        is refused whatever it posts; clients that are not browsers send neither and are
        answered, since they could send any headers they liked anyway.
        """
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return f"cross-site request refused (Sec-Fetch-Site: {site[:40]})"
        origin = headers.get("origin")
        if origin is not None and origin.lower() != f"http://{host.lower()}":
            return f"cross-site request refused (Origin: {origin[:80]})"
        return None

    # -- after the body (in a worker thread where it computes) -------------------------------
    def route(self, request: Request, body: bytes) -> Answer:
        try:
            path = urlsplit(request.path).path
            if request.method == "POST":
                return self._post(path, body)
            return self._get(path, request.query)
        except ApiError as exc:
            return error_answer(exc.status, str(exc), close=exc.close)
        except (ValueError, FileNotFoundError) as exc:
            return error_answer(HTTPStatus.BAD_REQUEST, str(exc))
        except Exception:  # a bug: log it here, never show the client a traceback
            traceback.print_exc(file=sys.stderr)
            return error_answer(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error", close=True)

    @staticmethod
    def _query(query: str) -> dict[str, str]:
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

    @staticmethod
    def _json_body(raw: bytes) -> dict:
        # The body is read as JSON whatever Content-Type says: `curl -d` sends a form type,
        # and cross-site posts are refused by origin before the body is read.
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

    def _get(self, path: str, query_string: str) -> Answer:
        app = self.app
        d = app.runtime.latent_dim
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):])
        if not path.startswith("/api/"):
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such page: {path[:80]}")
        query = self._query(query_string)
        if path == "/api/info":
            self._fields(query, (), ())
            return json_answer(app.info())
        if path == "/api/sample":
            self._fields(query, (), ("seed",))
            seed = parse_int(query["seed"], "seed") if "seed" in query else None
            return json_answer(app.sample(seed))
        if path == "/api/decode":
            self._fields(query, ("z",), ())
            return json_answer(app.decode(parse_z(query["z"], d)))
        if path == "/api/decode.png":
            self._fields(query, ("z",), ())
            return Answer(200, app.decode_png(parse_z(query["z"], d)), "image/png")
        if path == "/api/ends":
            self._fields(query, ("z",), ())
            return json_answer(app.ends(parse_z(query["z"], d)))
        if path == "/api/nearest":
            self._fields(query, ("z",), ("k", "by"))
            k = parse_int(query["k"], "k") if "k" in query else app.k
            return json_answer(app.nearest(parse_z(query["z"], d), k,
                                           query.get("by", "latent")))
        match = ITEM_PATH.match(path)
        if match:
            self._fields(query, (), ("v",) if match.group(2) else ())  # v: only for caches
            try:
                item_id = unquote(match.group(1), errors="strict")
            except UnicodeDecodeError:
                raise ValueError("item id must be percent-encoded UTF-8") from None
            if not item_id:
                raise ValueError("item id is empty")
            if match.group(2):
                # The bundle cannot change under a running server, so the picture may be cached.
                body, content_type = app.item_image(item_id)
                return Answer(200, body, content_type, cache="private, max-age=3600")
            return json_answer(app.item(item_id))
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such API route: {path[:80]}")

    def _post(self, path: str, raw: bytes) -> Answer:
        app = self.app
        d = app.runtime.latent_dim
        body = self._json_body(raw)
        if path == "/api/decode":
            self._fields(body, ("z",), ())
            return json_answer(app.decode(latent_from_json(body["z"], d)))
        if path == "/api/ends":
            self._fields(body, ("z",), ())
            return json_answer(app.ends(latent_from_json(body["z"], d)))
        self._fields(body, ("z",), ("k", "by"))
        k = json_int(body["k"], "k") if "k" in body else app.k
        return json_answer(app.nearest(latent_from_json(body["z"], d), k,
                                       body.get("by", "latent")))

    def _static(self, name: str) -> Answer:
        page = self.static.get(name)
        if page is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such file: {name[:80]}")
        body, content_type = page
        headers = (("content-security-policy", PAGE_POLICY),) if name.endswith(".html") else ()
        return Answer(200, body, content_type, cache="no-cache", headers=headers)


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


class _KioskConnection(h11.Connection):
    """h11's connection, keeping the error it raised for the peer's bytes (for the answer),
    and handing out an answer's head together with its body.

    uvicorn writes the head and the body as they come from h11: two sends, two packets and
    two wake-ups of the client for every answer. Held back until the body, the head goes out
    in the same send (an empty write is nothing to asyncio).
    """

    refusal: h11.RemoteProtocolError | None = None
    _head = b""

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refusal = exc
            raise

    def send(self, event):
        data = super().send(event)
        if type(event) is h11.Response:
            self._head, data = data, b""
        elif self._head and data is not None:
            data, self._head = self._head + data, b""
        return data


class _KioskFlow(FlowControl):
    """uvicorn's flow control, with reading also paused while the client has not taken what
    was written to it: pipelined requests from a client that does not read are neither parsed
    nor answered into the server's memory. uvicorn pauses and resumes reading for its own
    reasons (a body being read, a pipelined request waiting); reading resumes when neither
    holds it."""

    def __init__(self, transport):
        super().__init__(transport)
        self.reading_wanted = True

    def pause_reading(self) -> None:
        self.reading_wanted = False
        super().pause_reading()

    def resume_reading(self) -> None:
        self.reading_wanted = True
        if not self.write_paused:
            super().resume_reading()

    def pause_writing(self) -> None:
        super().pause_writing()
        FlowControl.pause_reading(self)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.reading_wanted:
            FlowControl.resume_reading(self)


class KioskProtocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines on reading and writing, caps on connections, a
    stop that loses no request, and JSON refusals.

    uvicorn's own keep-alive timer starts only after an answer and restarts with every byte,
    so by itself a client that trickles a header byte at a time holds its connection for ever.
    Here a request's head and body must arrive within the read timeout of its first byte (of
    the connection opening, for the first request); a request already begun then gets a 408.
    Written bytes the client has not taken within the write timeout end the connection.
    """

    counted = False  # whether this connection is in the kiosk's count (it was not refused)

    def __init__(self, config, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        self.kiosk: KioskAsgi = config.app
        self.conn = _KioskConnection(h11.SERVER, config.h11_max_incomplete_event_size)
        self.read_deadline: asyncio.TimerHandle | None = None
        self.write_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport):
        super().connection_made(transport)
        self.flow = _KioskFlow(transport)
        # Every byte the kernel has not taken counts as waiting: pause_writing() comes with
        # the first one, resume_writing() once all are gone, and the write deadline runs between.
        transport.set_write_buffer_limits(high=0)
        kiosk, client = self.kiosk, self.client[0] if self.client else "-"
        here = kiosk.connections.get(client, 0)
        if here >= MAX_CONNECTIONS_PER_CLIENT or len(self.connections) > kiosk.max_connections:
            kiosk.notice(client, "connections", f"connection refused: {here} open from this "
                         f"address (at most {MAX_CONNECTIONS_PER_CLIENT}), "
                         f"{len(self.connections) - 1} in all (at most {kiosk.max_connections})")
            transport.abort()
            return
        kiosk.connections[client] = here + 1
        self.counted = True
        # With Nagle on, a write made while earlier bytes are unacknowledged (the tail of a
        # large answer, a pipelined answer) waits ~40 ms for the client's delayed ACK.
        # (asyncio sets this itself only for sockets made with proto=IPPROTO_TCP.)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._start_read_clock()
        if kiosk.stopping:  # accepted just before the listening socket closed
            self.shutdown()

    def data_received(self, data: bytes) -> None:
        if self.read_deadline is None and self.conn.their_state is h11.IDLE:
            self._start_read_clock()  # the first bytes of a request on a kept-alive connection
        super().data_received(data)
        self._stop_read_clock_once_received()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined request that arrived while this one was answered starts its clock now.
        state = self.conn.their_state
        if state is h11.SEND_BODY or (state is h11.IDLE and self.conn.trailing_data[0]):
            self._start_read_clock()
        if self.kiosk.stopping:
            self._close_if_done()

    def connection_lost(self, exc):
        self._stop_read_clock()
        if self.write_deadline is not None:
            self.write_deadline.cancel()
            self.write_deadline = None
        if self.counted:
            self.counted = False
            client = self.client[0] if self.client else "-"
            left = self.kiosk.connections.pop(client) - 1
            if left:
                self.kiosk.connections[client] = left
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The server is stopping: answer every request already received, then close.

        uvicorn closes an idle connection at once, and a busy one after its answer; either
        way the requests the client had already sent (pipelined, or in the socket unread)
        would be lost, and closing a socket with unread bytes resets it, which can destroy
        the answer just written. Here the connection closes only once nothing waits.
        """
        if self.transport.is_closing():
            return
        if self.write_deadline is not None:
            self._arm_write_deadline(SHUTDOWN_WRITE_S)
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self.transport.is_closing() or (self.cycle and not self.cycle.response_complete):
            return
        if self.conn.trailing_data[0] or self._bytes_waiting():
            return  # a request already sent: it is read and answered, then this comes again
        super().shutdown()

    def _bytes_waiting(self) -> bool:
        sock = self.transport.get_extra_info("socket")
        try:
            return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD,
                                                  b"\0\0\0\0"))[0] > 0
        except OSError:
            return False

    def pause_writing(self) -> None:
        super().pause_writing()
        self._arm_write_deadline(SHUTDOWN_WRITE_S if self.kiosk.stopping
                                 else self.kiosk.write_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.write_deadline is not None:
            self.write_deadline.cancel()
            self.write_deadline = None

    def _arm_write_deadline(self, seconds: float) -> None:
        when = self.loop.time() + seconds
        if self.write_deadline is not None:
            if self.write_deadline.when() <= when:
                return
            self.write_deadline.cancel()
        self.write_deadline = self.loop.call_at(when, self._write_timed_out, seconds)

    def _write_timed_out(self, seconds: float) -> None:
        self.write_deadline = None
        client = self.client[0] if self.client else "-"
        self.kiosk.notice(client, "write", f"connection closed: the client did not take its "
                          f"answer within {seconds:g} s")
        self.transport.abort()  # close() would wait for the bytes to go

    def _start_read_clock(self) -> None:
        if self.read_deadline is None and not self.transport.is_closing():
            self.read_deadline = self.loop.call_later(self.kiosk.read_timeout, self._read_timed_out)

    def _stop_read_clock(self) -> None:
        if self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None

    def _stop_read_clock_once_received(self) -> None:
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._stop_read_clock()

    def _read_timed_out(self) -> None:
        self.read_deadline = None
        if self.transport.is_closing():
            return
        begun = self.conn.their_state is h11.SEND_BODY or bool(self.conn.trailing_data[0])
        if begun:  # a connection that never sent a byte is closed without a word
            self._refuse(HTTPStatus.REQUEST_TIMEOUT, f"request not received within "
                         f"{self.kiosk.read_timeout:g} s")
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request (malformed line or header, bad or conflicting length)."""
        refusal = self.conn.refusal
        status = refusal.error_status_hint if refusal is not None else 400
        if status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE:
            message = f"request line and headers exceed {MAX_HEAD_BYTES} bytes"
        else:  # h11's reason, without the bytes it quotes
            message = "malformed request: " + QUOTED_BYTES.sub("", str(refusal or msg))
        self._refuse(status, message)
        self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        # Written directly, not through h11: the request may not even have a parsed head,
        # and the connection closes right after.
        body = json.dumps({"error": message}).encode("utf-8")
        phrase = HTTPStatus(status).phrase
        self.transport.write(
            f"HTTP/1.1 {status} {phrase}\r\ncontent-type: {JSON_TYPE}\r\n"
            f"content-length: {len(body)}\r\ncache-control: no-store\r\n"
            f"x-content-type-options: nosniff\r\nconnection: close\r\n\r\n".encode("latin-1")
            + body)
        client = self.client[0] if self.client else "-"
        self.kiosk.log(client, f"{status} {message}")


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling the connections it is stopping (KioskProtocol.shutdown)."""

    async def shutdown(self, sockets=None):
        self.config.app.stopping = True
        await super().shutdown(sockets)


class KioskServer:
    """A bound kiosk server: serve_forever() (any thread) or run() (the main thread, signals)."""

    def __init__(self, sock: socket.socket, asgi: KioskAsgi):
        self.socket = sock
        self.asgi = asgi
        self.app = asgi.app
        self.server_address = sock.getsockname()
        self._uvicorn = _Uvicorn(uvicorn.Config(
            asgi, http=KioskProtocol, loop="asyncio", ws="none", lifespan="off",
            interface="asgi3", log_config=None, access_log=False, proxy_headers=False,
            server_header=False, timeout_keep_alive=IDLE_TIMEOUT_S,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
            h11_max_incomplete_event_size=MAX_HEAD_BYTES, backlog=BACKLOG))
        asgi.tasks = self._uvicorn.server_state.tasks
        self._serving = threading.Event()
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def serve_forever(self) -> None:
        """Serve until shutdown() (or, in the main thread, SIGINT/SIGTERM); once per server."""
        self._serving.set()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serving, let requests in flight finish, and wait for serve_forever to return."""
        self._uvicorn.should_exit = True
        if self._serving.is_set():
            self._stopped.wait()

    def server_close(self) -> None:
        self.socket.close()
        self.asgi.workers.shutdown()

    def run(self, log=print) -> None:
        """Serve until Ctrl+C or SIGTERM, finish the requests in flight, close the socket.

        Call from the main thread. While serving, uvicorn handles both signals; once it has
        stopped it raises the signal again, which lands on the handler installed here instead
        of ending the process, so the caller returns normally.
        """
        caught = []

        def stop(signum, frame):
            caught.append(signum)
            self._uvicorn.should_exit = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.serve_forever()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.server_close()
        log(f"stopped ({signal.Signals(caught[0]).name})" if caught else "stopped")


def make_server(runtime: Runtime, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                z_range: float = DEFAULT_RANGE, k: int = DEFAULT_K,
                idle_reset: float = DEFAULT_IDLE_RESET_S, attract: float = 0,
                log_requests: bool = False, allow_hosts: Iterable[str] = (),
                read_timeout: float = READ_TIMEOUT_S,
                write_timeout: float = WRITE_TIMEOUT_S) -> KioskServer:
    """A bound, not yet serving, kiosk server; port 0 picks a free port (see .url).

    allow_hosts: names besides the listening address that clients may send as Host (the
    names a reverse proxy or the local network uses for this machine).
    idle_reset: seconds without input after which the page goes back to its opening state
    (0: never); attract: once reset, the page shows another catalog item every this many
    seconds until someone touches it (0: it stays on the opening garment).
    read_timeout: seconds within which each request must arrive; write_timeout: seconds within
    which a client must take an answer (one that stops reading is disconnected).
    Raises ValueError for a bad range, k, idle reset, attract, host name or timeout, for an
    open-file limit too low to serve, and for an address that cannot be bound.
    """
    app = KioskApp(runtime, z_range=z_range, k=k, idle_reset=idle_reset, attract=attract)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in [0, 65535], got {port!r}")
    for name, value in (("read timeout", read_timeout), ("write timeout", write_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 < value <= 3600
        ):
            raise ValueError(f"{name} must be a number of seconds in (0, 3600], got {value!r}")
    max_connections = connection_cap()
    if isinstance(allow_hosts, str):
        allow_hosts = (allow_hosts,)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        hosts = HostPolicy(host, sock.getsockname()[0], allow_hosts)
        asgi = KioskAsgi(app, hosts, read_timeout=float(read_timeout),
                         write_timeout=float(write_timeout), log_requests=log_requests,
                         max_connections=max_connections)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise ValueError(f"cannot listen on {host}:{port}: {reason}") from None
    except BaseException:
        sock.close()
        raise
    return KioskServer(sock, asgi)


def connection_cap() -> int:
    """How many connections the server keeps open: MAX_CONNECTIONS, or fewer where the
    process's open-file limit would not hold them with the backlog and its own files."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = MAX_CONNECTIONS if soft == resource.RLIM_INFINITY else soft - BACKLOG - RESERVED_FILES
    if room < MAX_CONNECTIONS_PER_CLIENT:
        raise ValueError(f"the open-file limit ({soft}) leaves room for {max(room, 0)} "
                         f"connections, at least {MAX_CONNECTIONS_PER_CLIENT} needed: raise it "
                         f"(ulimit -n, or LimitNOFILE= in a systemd unit)")
    return min(MAX_CONNECTIONS, room)


def return_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc only; elsewhere nothing).

    Loading a bundle (hashing, checking the graphs, the far sample) leaves freed memory that
    glibc keeps for later allocations: an idle kiosk would hold it for good. `vae-run serve`
    calls this once it is ready; it changes no setting, only what the process holds.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
