"""The kiosk's connections: uvicorn's h11 protocol with the guards that need its hooks.

uvicorn's public surface (Config, Server, ASGI) has no hook for a deadline on reading a
request, a deadline on the client taking its answer, per-address connection caps, or a stop
that answers every request already received, so `KioskProtocol` extends uvicorn's
`H11Protocol` and `FlowControl`, which are internal. This module is the only one that touches
them; pyproject pins uvicorn to the releases it is tested with (tests/test_server.py,
tests/test_interrupts.py), and a new release is admitted once those pass on it.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import re
import socket
import struct
import termios
from http import HTTPStatus

import h11
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol

from .kiosk_http import MAX_HEAD_BYTES, KioskAsgi
from .kiosk_request import JSON_TYPE

# The write timeout from SIGTERM on: a client that stopped reading cannot hold exit.
SHUTDOWN_WRITE_S = 2.0
# Open connections per client address; more (or more than the server's cap in all) are closed
# as soon as accepted.
MAX_CONNECTIONS_PER_CLIENT = 64
QUOTED_BYTES = re.compile(r": (b['\"]|bytearray\().*$", re.DOTALL)


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
