"""`vae-run serve`: the kiosk page and its JSON API over one shared Runtime, in three parts.

runtime/kiosk_app.py is what each route answers (`KioskApp`, no HTTP); runtime/kiosk_http.py is
the HTTP layer (`KioskAsgi`: request screening, one route table, one parser of a request's
fields); this module serves it with uvicorn's Config and Server. h11 parses each request
strictly, and uvicorn's asyncio loop holds every connection without a thread, so slow or
stalled clients cost a socket, not a worker. runtime/kiosk_protocol.py adds what neither has:
one deadline for reading each request, head and body together, one for the client to take its
answer, caps on connections per client address and in all, a stop that answers every request
already received, and JSON bodies for the requests h11 refuses. docs/kiosk.md documents the
API, the trust model and the choice.

The routes are kiosk_http.ROUTES (and the page, its files and the item routes), listed with
their answers in docs/kiosk.md. Errors are {"error": "..."} with a 4xx status; an
unexpected failure is a 500 whose body says only "internal error" (the traceback goes to the
server's stderr, never to the client).
"""

from __future__ import annotations

import ctypes
import resource
import signal
import socket
import threading
from collections.abc import Iterable

import uvicorn

from .checks import is_integer, is_number
from .core import Runtime
from .kiosk_app import (
    DEFAULT_HOST,
    DEFAULT_IDLE_RESET_S,
    DEFAULT_K,
    DEFAULT_PORT,
    DEFAULT_RANGE,
    MAX_ATTRACT_S,
    MAX_IDLE_RESET_S,
    MAX_K,
    MAX_RANGE,
    ApiError,
    KioskApp,
)
from .kiosk_guards import HostPolicy
from .kiosk_http import (
    MAX_CONNECTIONS,
    MAX_HEAD_BYTES,
    READ_TIMEOUT_S,
    STATIC_DIR,
    WRITE_TIMEOUT_S,
    KioskAsgi,
)
from .kiosk_protocol import MAX_CONNECTIONS_PER_CLIENT, KioskProtocol
from .kiosk_request import MAX_BODY_BYTES, MAX_QUERY_CHARS

# The names a caller of the kiosk server uses, wherever they are defined.
__all__ = [
    "DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_RANGE", "MAX_RANGE", "DEFAULT_K", "MAX_K",
    "DEFAULT_IDLE_RESET_S", "MAX_IDLE_RESET_S", "MAX_ATTRACT_S", "MAX_BODY_BYTES",
    "MAX_QUERY_CHARS", "MAX_HEAD_BYTES", "MAX_CONNECTIONS", "MAX_CONNECTIONS_PER_CLIENT",
    "READ_TIMEOUT_S", "WRITE_TIMEOUT_S", "MAX_TIMEOUT_S", "STATIC_DIR", "ApiError", "HostPolicy",
    "KioskApp", "KioskAsgi", "KioskServer", "make_server", "connection_cap",
    "return_free_memory", "is_loopback",
]

MAX_TIMEOUT_S = 3600  # the read and write timeouts' upper bound
IDLE_TIMEOUT_S = 15  # a kept-alive connection with no request in progress closes after this
SHUTDOWN_GRACE_S = 30  # a safety net only: every wait above has its own shorter deadline
BACKLOG = 128
# The connection cap (kiosk_http.MAX_CONNECTIONS) stays below the open-file limit (systemd's
# default is 1,024) with room for the backlog asyncio accepts in one go and the files the
# process holds anyway, so accept() never fails.
RESERVED_FILES = 64


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
    if not is_integer(port) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in [0, 65535], got {port!r}")
    for name, value in (("read timeout", read_timeout), ("write timeout", write_timeout)):
        if not is_number(value) or not 0 < value <= MAX_TIMEOUT_S:
            raise ValueError(f"{name} must be a number of seconds in (0, {MAX_TIMEOUT_S}], "
                             f"got {value!r}")
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
