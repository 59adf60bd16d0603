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
  buffer and copied out of it (``ReceivedChunks``).
"""

from __future__ import annotations

import asyncio
import gc
import json
import resource
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker

from msc3870.admission import BodyPace
from msc3870.errors import HeadersTooLarge, InvalidHttpRequest, MatrixError, URITooLong

from . import balance, redaction

# Above the application's own limits (msc3870.asgi), which answer first where they can.
MAX_URL_BYTES = 16 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 200

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


class MatrixHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with bounded request heads, JSON refusals, and the
    head and body of a small answer sent together (``CoalescingTransport``)."""

    _head_bytes = 0
    _head_error: MatrixError | None = None
    _drain: BodyPace | None = None
    _drain_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport))  # type: ignore[arg-type]
        if balance.table is not None:
            balance.table.opened()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_drain()
        super().connection_lost(exc)
        if balance.table is not None:
            balance.table.closed()

    def on_headers_complete(self) -> None:
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not previous and balance.table is not None and balance.table.over_share():
            # This answer is the connection's last: its client reconnects, to a less
            # busy worker as a rule.
            self.cycle.keep_alive = False  # type: ignore[union-attr]

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not self.transport.is_closing():
            # Answered before its body ended: uvicorn reads the rest and discards it.
            self._drain = BodyPace(self.loop.time())
            self._arm_drain()

    def on_body(self, body: bytes) -> None:
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
