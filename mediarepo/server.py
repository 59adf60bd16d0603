"""The HTTP server of the deployable project: gunicorn managing uvicorn workers.

gunicorn forks one worker per core and restarts any that dies; each worker is uvicorn
(httptools parser, uvloop) running ``mediarepo.asgi``. Six adjustments:
- the worker raises its open-files limit to the hard limit: thousands of parked
  downloads are thousands of sockets;
- once the application is loaded, the worker tunes the garbage collector so that full
  collections stay out of the way of thousands of parked requests
  (``tune_garbage_collector``);
- the HTTP protocol answers requests it cannot parse or that pass its size limits in
  Matrix JSON (414 for an overlong request line, 431 for overlong headers, 400 for the
  rest), where uvicorn would answer in plain text; and it bounds what it buffers;
- a worker holding more than its share of the keep-alive connections closes one after
  its next answer, so that they spread over the workers (mediarepo/balance.py);
- the rest of a body answered before it was read (a refused upload, drained so that the
  connection is kept) must arrive at the pace the application asks of bodies
  (``msc3870.admission.BodyPace``), or the connection is closed: uvicorn would hold it as
  long as a byte trickles in now and then;
- a request body's chunks reach the application as they arrived, not appended to a
  buffer and copied out of it (``ReceivedChunks``);
- a connection reads into a large buffer (``Reception``), and the rest of a body with a
  Content-Length is received straight into the application's own buffers where it asks
  for that (``ReceiveInto``, msc3870's ``RECEIVE_INTO``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import resource
import threading
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn_worker import UvicornWorker

from msc3870.admission import BodyPace
from msc3870.errors import HeadersTooLarge, InvalidHttpRequest, MatrixError, URITooLong
from msc3870.streamed_body import RECEIVE_INTO

from . import balance, redaction

# Above the application's own limits (msc3870.asgi), which answer first where they can.
MAX_URL_BYTES = 16 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 200

#: What one read from a connection takes at most: a streamed body arrives in a few large
#: chunks, each parsed, handed on and waited for once (uvloop's own reads take 256 KB).
READ_BUFFER_BYTES = 4 * 1024 * 1024

_STATUS_TEXT = {400: b"Bad Request", 414: b"URI Too Long", 431: b"Request Header Fields Too Large"}


def matrix_error_bytes(error: MatrixError) -> bytes:
    """A whole answer, written before any application sees the request: the error's body
    and headers as the application's own errors have them, then the connection closes."""
    body = json.dumps(error.as_dict()).encode()
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (error.status, _STATUS_TEXT[error.status]),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            *(b"%s: %s\r\n" % (k.lower().encode(), v.encode()) for k, v in error.headers().items()),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class CoalescingTransport:
    """A transport that sends a small write together with the one after it.

    uvicorn writes a response's head and its body separately: two system calls, two TCP
    segments and two wake-ups of the client for every small answer. Sending holds the
    GIL, and those calls were a tenth of a busy worker's GIL time (py-spy --gil, 16
    clients). So a write of up to ``MAX_PENDING`` bytes is held until the next write,
    which takes it along at once, or until the end of the event loop's turn. Nothing is
    held longer, nor more than that: a streamed download keeps uvicorn's flow control
    (which watches the real transport's buffer). Everything else is the wrapped
    transport's.
    """

    MAX_PENDING = 16 * 1024  # a head, a JSON body: not the 64 KiB chunks of a download

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: bytes | None = None

    def write(self, data: bytes) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            if len(data) <= self.MAX_PENDING:
                self._transport.write(pending + data)
                return
            self._transport.write(pending)
        if len(data) > self.MAX_PENDING:
            self._transport.write(data)
            return
        self._pending = bytes(data)
        asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not self._transport.is_closing():
            self._transport.write(pending)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class ReceivedChunks:
    """What uvicorn buffers of a request body between two ``receive()`` calls, as the
    chunks that arrived rather than a ``bytearray``.

    uvicorn appends each chunk to a ``bytearray`` (``body += chunk``) and copies it out
    again for the message (``bytes(body)``): two copies of every byte of an upload, about
    a twentieth of a worker's CPU while it streams one to S3 (perf). Here the chunk is
    kept as it is, and the message is that same chunk when one arrived in between (the
    rule while a body streams), or the chunks joined (one copy). uvicorn uses the buffer
    through ``+=``, ``len()`` and ``bytes()`` only, and makes a new ``bytearray`` after
    each message, which ``MatrixHttpToolsProtocol.on_body`` replaces again.
    """

    __slots__ = ("_chunks", "_size")

    def __init__(self, already: bytes | bytearray = b"") -> None:
        self._chunks: list[bytes] = [bytes(already)] if already else []
        self._size = len(already)

    def __iadd__(self, chunk: bytes) -> ReceivedChunks:
        if chunk:
            self._chunks.append(chunk)
            self._size += len(chunk)
        return self

    def __len__(self) -> int:
        return self._size

    def __bytes__(self) -> bytes:
        chunks = self._chunks
        if len(chunks) == 1 and type(chunks[0]) is bytes:
            return chunks[0]
        return b"".join(chunks)


_read_buffers = threading.local()


def read_buffer() -> memoryview:
    """The read buffer of this thread's event loop, shared by its connections: each read
    is parsed before the next one is made, and the parser copies out what it keeps."""
    buffer: memoryview | None = getattr(_read_buffers, "buffer", None)
    if buffer is None:
        buffer = _read_buffers.buffer = memoryview(bytearray(READ_BUFFER_BYTES))
    return buffer


class Reception(asyncio.BufferedProtocol):
    """What a connection receives, read into a buffer (asyncio's ``BufferedProtocol``):
    the loop thread's ``read_buffer``, then parsed by the HTTP protocol; or, while a body
    is received straight into the application's buffer (``ReceiveInto``), that buffer,
    unparsed. Everything else is the HTTP protocol's."""

    def __init__(self, http: MatrixHttpToolsProtocol) -> None:
        self.http = http
        self.buffer = read_buffer()

    def get_buffer(self, sizehint: int) -> memoryview:
        into = self.http.receiving_into
        return into.space(self.buffer) if into is not None else self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        into = self.http.receiving_into
        if into is not None:
            into.received(nbytes, self.buffer)
        else:
            self.http.data_received(self.buffer[:nbytes])  # type: ignore[arg-type]

    def eof_received(self) -> bool | None:
        return self.http.eof_received()  # type: ignore[func-returns-value]

    def connection_lost(self, exc: Exception | None) -> None:
        self.http.connection_lost(exc)

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()


class ReceiveInto:
    """msc3870's ``RECEIVE_INTO`` for one request whose body has a Content-Length: the
    rest of the body, past what the parser has seen, received into the application's
    buffers (``receive_into``) or dropped (``discard``).

    Once the first buffer is asked for, this owns the connection's reads until the last
    byte of the body (``engaged``), and reads no byte past it: the parser, which never
    sees those bytes, is then replaced by a new one for the next request, and the message
    completes as the parser would have completed it. Between two buffers the connection
    does not read."""

    def __init__(self, http: MatrixHttpToolsProtocol, cycle: RequestResponseCycle, left: int):
        self.http, self.cycle = http, cycle
        #: Bytes of the body neither parsed nor received yet.
        self.left = left
        self.engaged = False
        self.discarding = False
        self._target: memoryview | None = None
        self._filled = 0
        self._arrived: Callable[[int], None] | None = None
        self._waiter: asyncio.Future[int] | None = None

    def extension(self) -> dict[str, Any]:
        return {"receive_into": self.receive_into, "discard": self.discard}

    async def receive_into(self, buffer: memoryview, arrived: Callable[[int], None]) -> int:
        if self._waiter is not None or self.discarding:
            raise RuntimeError("receive_into while a body is being received or discarded")
        if self.cycle.disconnected:
            raise ConnectionResetError("The client went away")
        if self.cycle.waiting_for_100_continue and not self.cycle.transport.is_closing():
            # As uvicorn's receive() would: the client sends no byte of its body before it.
            self.cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.cycle.waiting_for_100_continue = False
        count = self._take_parsed(buffer)
        if count:
            arrived(count)
        if count == len(buffer) or not self.left:
            return count
        self.engaged = True
        self.http.receiving_into = self
        self._target = buffer[count : count + min(len(buffer) - count, self.left)]
        self._filled, self._arrived = 0, arrived
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        self.http.flow.resume_reading()
        try:
            return count + await waiter
        except asyncio.CancelledError:
            self.discard()
            raise
        finally:
            self._waiter = self._target = self._arrived = None

    def discard(self) -> None:
        if not self.engaged or not self.left or self.discarding:
            return  # not engaged: the parser still has the body, and uvicorn drains it
        self.discarding = True
        self._target = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()
        self.http.flow.resume_reading()

    def _take_parsed(self, buffer: memoryview) -> int:
        """What the parser had received of the body and the application had not."""
        parsed = self.cycle.body
        if not len(parsed):
            return 0
        data = memoryview(bytes(parsed))
        count = min(len(data), len(buffer))
        buffer[:count] = data[:count]
        self.cycle.body = ReceivedChunks(data[count:]) if count < len(data) else bytearray()  # type: ignore[assignment]
        return count

    # -- the reads, from Reception

    def space(self, scratch: memoryview) -> memoryview:
        if self._target is not None:
            return self._target[self._filled :]
        return scratch[: self.left]  # discarded, or kept for the next buffer

    def received(self, count: int, scratch: memoryview) -> None:
        self.left -= count
        if self._target is not None:
            self._filled += count
            assert self._arrived is not None and self._waiter is not None
            self._arrived(count)
            if self._filled == len(self._target):
                self._target = None
                self._waiter.set_result(self._filled)
                if self.left:
                    self.http.flow.pause_reading()
        elif self.discarding:
            self.http.body_discarded(count)
        else:  # read while no buffer was asked for: kept for the next one
            self.cycle.body += bytes(scratch[:count])  # type: ignore[operator]
            self.http.flow.pause_reading()
        if not self.left:
            self.http.body_received_directly()

    def lost(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionResetError("The client went away"))


class MatrixHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with bounded request heads, JSON refusals, and the
    head and body of a small answer sent together (``CoalescingTransport``)."""

    _head_bytes = 0
    _head_error: MatrixError | None = None
    _drain: BodyPace | None = None
    _drain_timer: asyncio.TimerHandle | None = None
    #: The ``ReceiveInto`` of the body being parsed, if it has a Content-Length.
    _into: ReceiveInto | None = None
    #: The ``ReceiveInto`` that has the connection's reads.
    receiving_into: ReceiveInto | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport))  # type: ignore[arg-type]
        transport.set_protocol(Reception(self))
        if balance.table is not None:
            balance.table.opened()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_drain()
        if self.receiving_into is not None:
            self.receiving_into.lost()
        super().connection_lost(exc)
        if balance.table is not None:
            balance.table.closed()

    def on_headers_complete(self) -> None:
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is previous:
            return  # an upgrade
        if balance.table is not None and balance.table.over_share():
            # This answer is the connection's last: its client reconnects, to a less
            # busy worker as a rule.
            self.cycle.keep_alive = False
        length = _content_length(self.headers)
        self._into = None
        if length:
            self._into = ReceiveInto(self, self.cycle, length)
            self.scope.setdefault("extensions", {})[RECEIVE_INTO] = self._into.extension()  # type: ignore[typeddict-unknown-key]

    def body_received_directly(self) -> None:
        """A ``ReceiveInto`` took the body's last byte: a new parser for the next request,
        and the message complete, as the parser would have said."""
        self.receiving_into = self._into = None
        self.parser = httptools.HttpRequestParser(self)
        with contextlib.suppress(AttributeError):  # as uvicorn: httptools < 0.6.3
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.on_message_complete()
        self.flow.resume_reading()

    def body_discarded(self, count: int) -> None:
        """``count`` bytes of a body a ``ReceiveInto`` discards arrived: as the drained
        bytes of ``on_body``, they keep the connection (and the drain's pace)."""
        self._unset_keepalive_if_required()
        if self._drain is not None:
            self._drain.arrived(count, self.loop.time())
            self._arm_drain()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not self.transport.is_closing():
            # Answered before its body ended: uvicorn reads the rest and discards it.
            self._drain = BodyPace(self.loop.time())
            self._arm_drain()

    def on_body(self, body: bytes) -> None:
        if self._into is not None:
            self._into.left -= len(body)
        if self._drain is not None:
            self._drain.arrived(len(body), self.loop.time())
            self._arm_drain()
        cycle = self.cycle
        if cycle is not None and isinstance(cycle.body, bytearray):
            cycle.body = ReceivedChunks(cycle.body)  # type: ignore[assignment]
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._drain is not None:
            self._stop_drain()
            # uvicorn armed the keep-alive timeout with the answer, and the body's bytes
            # cancelled it: arm it again, or the idle connection stays open for good.
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def _arm_drain(self) -> None:
        assert self._drain is not None
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self._drain_timer = self.loop.call_at(self._drain.deadline(), self._drain_too_slow)

    def _stop_drain(self) -> None:
        self._drain = None
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    def _drain_too_slow(self) -> None:
        self._drain_timer = None
        if self._drain is not None and not self.transport.is_closing():
            self._drain = None
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._head_error = None

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_URL_BYTES:
            self._head_error = URITooLong()
            raise self._head_error

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEADER_BYTES or len(self.headers) >= MAX_HEADERS:
            self._head_error = HeadersTooLarge()
            raise self._head_error
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        self.transport.write(matrix_error_bytes(self._head_error or InvalidHttpRequest()))
        self.transport.close()


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body's length, if one Content-Length says it and it is not chunked."""
    lengths = [value for name, value in headers if name == b"content-length"]
    if len(lengths) != 1 or any(name == b"transfer-encoding" for name, _ in headers):
        return None
    return int(lengths[0]) if lengths[0].isdigit() else None


def raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class MediaUvicornWorker(UvicornWorker):
    CONFIG_KWARGS: dict[str, Any] = {
        "loop": "auto",
        "http": "mediarepo.server:MatrixHttpToolsProtocol",
        # Parked downloads answer from the loop; nothing in uvicorn should cap them
        # below the application's own waiting caps.
        "limit_concurrency": None,
        # The application writes each request's line itself, with its route, user, media
        # and duration (msc3870.logs): uvicorn's would say the same again.
        "access_log": False,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # UvicornWorker has just wired uvicorn's loggers to gunicorn's access and error
        # logs: request lines carry access tokens and upload URLs (mediarepo/redaction.py).
        redaction.install()

    def init_process(self) -> None:
        raise_open_files_limit()
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        tune_garbage_collector()


#: Allocations between two young collections (CPython's default: 700).
GC_YOUNG_THRESHOLD = 20_000


def tune_garbage_collector() -> None:
    """Keep full collections out of the way of thousands of parked requests.

    CPython's full collection scans every tracked object, and a worker holding thousands of
    parked downloads has hundreds of thousands: a full collection in the middle of
    answering them would stall them all. So, once the application is loaded:
    - ``gc.freeze()``: what start-up made (Django, the URLconf and views, about 100,000
      objects) lives as long as the process and is never scanned again;
    - young collections every ``GC_YOUNG_THRESHOLD`` allocations rather than 700: the
      objects of one request die by reference counting before a collection sees them,
      so few are promoted, and full collections (run when the promoted objects reach a
      quarter of the old ones) come rarely. Cyclic garbage waits at most that many
      allocations longer.
    """
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 (imports every view now, to freeze them)
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
