"""The kiosk's HTTP layer as an ASGI app: screen each request, parse its fields, answer it from
one route table with a KioskApp call.

Everything decided from the request line and headers (framing, HTTP version, Host, method,
cross-site origin, route, size) is answered before any body is read, on the event loop. A
request's fields come from its query string (GET) or its JSON body (POST) and are read by one
parser (`Fields`), where z is read and checked once per request, whichever route asks for it.
Routes that decode or search run in a worker thread (kiosk_guards.FairWorkers) when other
requests are in flight.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import unquote

from .kiosk_app import ApiError, KioskApp
from .kiosk_guards import Busy, FairWorkers, HostPolicy
from .kiosk_request import (
    MAX_BODY_BYTES,
    Answer,
    Fields,
    Request,
    error_answer,
    json_answer,
)

MAX_HEAD_BYTES = 32 * 1024  # request line and headers together; the query cap fits inside
# One request, head and body, must arrive within this of its first byte (or of the
# connection opening): a client trickling a byte at a time cannot hold a connection longer.
READ_TIMEOUT_S = 10.0
# An answer the client has not taken within this (it stopped reading) ends its connection:
# the bytes would otherwise sit in the server's memory, and the socket stay open, for ever.
WRITE_TIMEOUT_S = 10.0
WORKER_THREADS = 4  # decode and search release the GIL; more threads than cores buys nothing
# Computing requests run one at a time per client address; beyond this many waiting behind
# the running one, the address gets 429 (a kiosk page has at most 6 requests out at once).
MAX_WAITING_PER_CLIENT = 8
# Open connections in all; more are closed as soon as accepted (server.connection_cap).
MAX_CONNECTIONS = 512
NOTICE_INTERVAL_S = 10.0  # a flood's refusals are logged at most once per this, with a count
RETRY_AFTER_S = 1

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


@dataclass(frozen=True)
class Route:
    """An API route: the fields it takes and its answer from a KioskApp and those fields."""

    answer: Callable[[KioskApp, Fields], Answer]
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    post: bool = False  # also answers POST, its fields a JSON body
    computing: bool = False  # runs a model or the search: a worker thread may answer it


def _nearest_args(app: KioskApp, fields: Fields) -> tuple:
    return (fields.z(app.runtime.latent_dim), fields.integer("k", app.k),
            fields.get("by", "latent"))


ROUTES = {
    "/api/info": Route(lambda app, f: json_answer(app.info())),
    "/api/sample": Route(lambda app, f: json_answer(app.sample(f.integer("seed", None))),
                         optional=("seed",)),
    "/api/decode": Route(lambda app, f: json_answer(app.decode(f.z(app.runtime.latent_dim))),
                         ("z",), post=True, computing=True),
    "/api/decode.png": Route(lambda app, f: Answer(
        200, app.decode_png(f.z(app.runtime.latent_dim)), "image/png"), ("z",), computing=True),
    "/api/nearest": Route(lambda app, f: json_answer(app.nearest(*_nearest_args(app, f))),
                          ("z",), ("k", "by"), post=True, computing=True),
    "/api/ends": Route(lambda app, f: json_answer(app.ends(f.z(app.runtime.latent_dim))),
                       ("z",), post=True, computing=True),
    "/api/view": Route(lambda app, f: json_answer(app.view(*_nearest_args(app, f))),
                       ("z",), ("k", "by"), post=True, computing=True),
}
POST_ROUTES = tuple(path for path, route in ROUTES.items() if route.post)


class KioskAsgi:
    """The HTTP layer as an ASGI app: screen the request, read its body, call KioskApp."""

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
                if self._computing(request.route) and not (
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

    @staticmethod
    def _computing(path: str) -> bool:
        route = ROUTES.get(path)
        if route is not None:
            return route.computing
        match = ITEM_PATH.match(path)
        return bool(match and match.group(2))  # an item's picture may be decoded

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
        path = request.route
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
            path = request.route
            if request.method == "POST":
                return ROUTES[path].answer(self.app, self._checked(Fields.from_body(body), path))
            return self._get(path, request.query)
        except ApiError as exc:
            return error_answer(exc.status, str(exc), close=exc.close)
        except (ValueError, FileNotFoundError) as exc:
            return error_answer(HTTPStatus.BAD_REQUEST, str(exc))
        except Exception:  # a bug: log it here, never show the client a traceback
            traceback.print_exc(file=sys.stderr)
            return error_answer(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error", close=True)

    @staticmethod
    def _checked(fields: Fields, path: str) -> Fields:
        route = ROUTES[path]
        fields.check(route.required, route.optional)
        return fields

    def _get(self, path: str, query: str) -> Answer:
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):])
        if not path.startswith("/api/"):
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such page: {path[:80]}")
        fields = Fields.from_query(query)
        if path in ROUTES:
            return ROUTES[path].answer(self.app, self._checked(fields, path))
        match = ITEM_PATH.match(path)
        if match is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such API route: {path[:80]}")
        fields.check((), ("v",) if match.group(2) else ())  # v: only for caches
        try:
            item_id = unquote(match.group(1), errors="strict")
        except UnicodeDecodeError:
            raise ValueError("item id must be percent-encoded UTF-8") from None
        if not item_id:
            raise ValueError("item id is empty")
        if match.group(2):
            # The bundle cannot change under a running server, so the picture may be cached.
            body, content_type = self.app.item_image(item_id)
            return Answer(200, body, content_type, cache="private, max-age=3600")
        return json_answer(self.app.item(item_id))

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

