"""Who the kiosk answers and how much of it each client gets: the Host names it serves (the
defence against DNS rebinding) and worker threads shared fairly between client addresses."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


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
