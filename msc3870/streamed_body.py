"""A request body that a view's thread reads while the event loop is still receiving it.

An upload is stored as it arrives, in one pass (receiving it whole first, then storing it,
would take two, one after the other). The event loop feeds what arrives (``feed``,
``end``, or ``fail`` with the reason the body stopped), the view's thread reads it as a
file (``read(n)`` blocks until ``n`` bytes, the end, or the failure), and the loop stops
receiving while ``BUFFER_BYTES`` wait unread (``wait_for_room``), so that a fast client
and a slow store hold a few MiB, never the upload.

Where the server offers it (the ASGI extension ``RECEIVE_INTO``), a body with a
Content-Length is read by ``DirectBody`` instead: the reader's own buffer is handed to the
loop, which has the server receive the socket's bytes straight into it, with no copy and
no message per chunk.

The reading thread lets go of its database connections once a body has taken longer than
``HOLD_CONNECTIONS_SECONDS`` (``HeldConnections``): a body may take minutes, and as many
arrive at once as ``UPLOAD_BODIES_MAX`` allows per process, far more than a database
accepts connections; a body that arrives sooner keeps them for the writes after it, which
would otherwise begin by connecting again.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from django.db import connections

#: Bytes received and not yet read past which the loop stops receiving (TCP then slows
#: the client down).
BUFFER_BYTES = 4 * 1024 * 1024
#: A reader waiting for more than this is woken once this much has arrived (or the body
#: ended), not for every chunk the loop receives (a quarter of a MiB on loopback): each
#: wake-up is a switch of threads and of the GIL.
WAKE_BYTES = 1024 * 1024
#: The ASGI extension (a key of ``scope["extensions"]``) by which a server offers to receive
#: the rest of a body with a Content-Length straight into the application's buffers. Its
#: value holds the two callables of ``ReceiveInto``: ``{"receive_into": ..., "discard":
#: ...}``. Without it, a body comes in ``receive()`` messages.
RECEIVE_INTO = "msc3870.receive_into"
#: How long a body's reader keeps its thread's idle database connections (``HeldConnections``).
HOLD_CONNECTIONS_SECONDS = 1.0


class ReceiveInto(Protocol):
    """What a server offering ``RECEIVE_INTO`` does, on the event loop."""

    async def receive_into(self, buffer: memoryview, arrived: Callable[[int], None]) -> int:
        """Fill ``buffer`` with the body's next bytes, fewer only at its end (none past
        it), calling ``arrived(n)`` as each ``n`` bytes land; ``OSError`` if the client
        left. Cancelled, it discards the rest of the body."""
        ...

    def discard(self) -> None:
        """The application reads no more of the body: the server takes the rest as it
        comes and drops it (the connection can carry the next request)."""
        ...


class BodyEnded(OSError):
    """The body can no longer be read: the view finished with it (closed), or the loop
    stopped receiving it for a reason that is not a Matrix error (the client left)."""


class StreamedBody:
    def __init__(self, loop: asyncio.AbstractEventLoop, received: list[bytes]) -> None:
        self._loop = loop
        self._chunks: deque[bytes | memoryview] = deque(c for c in received if c)
        self._buffered = sum(len(c) for c in self._chunks)
        self._ended = False
        self._error: BaseException | None = None
        self._closed = False
        self._held = HeldConnections()
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        #: Bytes buffered that wake the reader (``WAKE_BYTES`` at most, below
        #: ``BUFFER_BYTES``: the loop always receives that much before it stops).
        self._wake_at = 1
        #: Set (on the loop) when the reader has made room, or closed the body.
        self._room: asyncio.Event | None = None

    # ------------------------------------------------------------ the event loop's side

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        with self._lock:
            if self._closed:
                return
            self._chunks.append(chunk)
            self._buffered += len(chunk)
            if self._buffered >= self._wake_at:
                self._arrived.notify()

    def end(self) -> None:
        with self._lock:
            self._ended = True
            self._arrived.notify()

    def fail(self, error: BaseException) -> None:
        """The body stops here: the next read (or the one waiting) raises ``error``."""
        with self._lock:
            if self._ended or self._error is not None:
                return
            self._error = error
            self._chunks.clear()
            self._buffered = 0
            self._arrived.notify()

    @property
    def full(self) -> bool:
        return self._buffered >= BUFFER_BYTES and not self._closed

    async def wait_for_room(self) -> None:
        """Until the reader has taken enough that less than ``BUFFER_BYTES`` wait, or has
        closed the body."""
        while True:
            with self._lock:
                if self._buffered < BUFFER_BYTES or self._closed:
                    self._room = None
                    return
                self._room = room = asyncio.Event()
            await room.wait()

    # ------------------------------------------------------------ the reader's side

    def read(self, size: int = -1, /) -> bytes:
        """``size`` bytes, fewer only at the end of the body (a file's read; stores make
        parts of what one read returns); everything left with no size. What has arrived
        is taken as it comes, so that a read larger than the buffer makes room for the
        rest."""
        parts: list[bytes | memoryview] = []
        got = 0
        while size < 0 or got < size:
            taken = self._next(size - got if size >= 0 else None)
            if not taken:
                break
            parts.extend(taken)
            got += sum(len(part) for part in taken)
        if len(parts) == 1:
            return bytes(parts[0])
        return b"".join(parts)

    def readinto(self, buffer: memoryview | bytearray, /) -> int:
        """``read`` into ``buffer``: it is filled, fewer bytes only at the end of the body.
        Each chunk is copied once, into the buffer, where ``read`` joins them into new
        bytes (an 8 MiB part each time, fresh memory)."""
        view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
        filled = 0
        while filled < len(view):
            taken = self._next(len(view) - filled)
            if not taken:
                break
            for part in taken:
                view[filled : filled + len(part)] = part
                filled += len(part)
        return filled

    def _next(self, most: int | None) -> list[bytes | memoryview]:
        """Up to ``most`` bytes (all there are with None) of what has arrived, waiting
        for at least one; none at the end of the body."""
        hold = self._held.check()
        with self._lock:
            self._wake_at = 1 if most is None else max(1, min(most, WAKE_BYTES))
            while self._buffered < self._wake_at and not self._ended:
                if self._error is not None or self._closed:
                    break
                if not self._arrived.wait(hold):
                    hold = self._held.check()
            if self._error is not None:
                raise self._error
            if self._closed:
                raise BodyEnded("The request body was closed")
            if not self._buffered or most == 0:  # the end
                return []
            taken = self._take(self._buffered if most is None else min(most, self._buffered))
            self._make_room()
        return taken

    def _take(self, want: int) -> list[bytes | memoryview]:
        parts: list[bytes | memoryview] = []
        needed = want
        while needed:
            chunk = self._chunks.popleft()
            if len(chunk) > needed:
                view = memoryview(chunk)
                parts.append(view[:needed])
                self._chunks.appendleft(view[needed:])
                needed = 0
            else:
                parts.append(chunk)
                needed -= len(chunk)
        self._buffered -= want
        return parts

    def _make_room(self) -> None:
        room = self._room
        if room is not None and (self._buffered < BUFFER_BYTES or self._closed):
            self._room = None
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(room.set)

    def close(self) -> None:
        """The reader is done with the body: the loop stops receiving it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._chunks.clear()
            self._buffered = 0
            self._make_room()

    @property
    def closed(self) -> bool:
        return self._closed


class DirectBody:
    """A body the server receives straight into the buffer of each ``readinto`` (the
    server's ``RECEIVE_INTO``): the reader hands its buffer to the event loop (``asked``,
    ``wanted``), which has the server fill it and says how much (``filled``). No byte is
    copied on the way, the loop wakes the reader once per buffer, and between two reads
    the server does not receive (TCP holds the client back). What arrived before this
    body was made (``received``) is read first. The loop's side is ``_pump_into`` in
    ``msc3870.asgi``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, received: list[bytes]) -> None:
        self._loop = loop
        self._received: deque[memoryview] = deque(memoryview(c) for c in received if c)
        self._lock = threading.Lock()
        self._answered = threading.Condition(self._lock)
        self._want: memoryview | None = None
        self._got: int | None = None
        self._ended = False
        self._error: BaseException | None = None
        self._closed = False
        self._held = HeldConnections()
        #: Set (on the loop) when the reader waits for its buffer to be filled, or closed.
        self.asked = asyncio.Event()

    # ------------------------------------------------------------ the event loop's side

    def wanted(self) -> memoryview | None:
        """The buffer the reader waits to have filled; None once it closed the body."""
        with self._lock:
            self.asked.clear()
            return None if self._closed else self._want

    def filled(self, count: int) -> None:
        """``count`` bytes of the wanted buffer were received (fewer than it holds: the
        body ended)."""
        with self._lock:
            if self._want is None:
                return
            if count < len(self._want):
                self._ended = True
            self._got = count
            self._answered.notify()

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self._ended or self._error is not None:
                return
            self._error = error
            self._answered.notify()

    # ------------------------------------------------------------ the reader's side

    def read(self, size: int = -1, /) -> bytes:
        """As ``StreamedBody.read``, by way of ``readinto``."""
        if size < 0:
            return b"".join(iter(lambda: self.read(WAKE_BYTES), b""))
        buffer = bytearray(size)
        count = self.readinto(buffer)
        del buffer[count:]
        return bytes(buffer)

    def readinto(self, buffer: memoryview | bytearray, /) -> int:
        """Fill ``buffer``, fewer bytes only at the end of the body."""
        view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
        hold = self._held.check()
        filled = self._take_received(view)
        if filled == len(view):
            return filled
        with self._lock:
            self._raise_if_stopped()
            if self._ended:
                return filled
            self._want, self._got = view[filled:], None
            try:
                self._loop.call_soon_threadsafe(self.asked.set)
            except RuntimeError:  # the loop is closed: nobody will fill it
                self._error = BodyEnded("The request body stopped")
            while self._got is None and self._error is None and not self._closed:
                if not self._answered.wait(hold):
                    hold = self._held.check()
            got, self._want = self._got, None
            if got is None:
                self._raise_if_stopped()
        return filled + (got or 0)

    def _take_received(self, view: memoryview) -> int:
        filled = 0
        received = self._received
        while received and filled < len(view):
            chunk = received.popleft()
            count = min(len(chunk), len(view) - filled)
            view[filled : filled + count] = chunk[:count]
            if count < len(chunk):
                received.appendleft(chunk[count:])
            filled += count
        return filled

    def _raise_if_stopped(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise BodyEnded("The request body was closed")

    def close(self) -> None:
        """The reader is done with the body: the loop stops receiving it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._received.clear()
            self._answered.notify()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self.asked.set)

    @property
    def closed(self) -> bool:
        return self._closed


class HeldConnections:
    """The reading thread's idle database connections, kept from its first read for
    ``HOLD_CONNECTIONS_SECONDS``, then released: at the first read past that time, or
    while the reader waits for bytes (it waits no longer than ``check`` says)."""

    def __init__(self) -> None:
        self._release_at: float | None = None

    def check(self) -> float | None:
        """Release them if it is time; the seconds until it is (None: released)."""
        now = time.monotonic()
        if self._release_at is None:
            self._release_at = now + HOLD_CONNECTIONS_SECONDS
        if self._release_at == math.inf:
            return None
        if now < self._release_at:
            return self._release_at - now
        self._release_at = math.inf
        release_idle_connections()
        return None


class ConnectionKeepers:
    """The upload threads that keep their database connections from one request to the
    next: the first ``most`` to ask. An upload's first write then finds a connection
    open, where connecting costs milliseconds; the other threads, there so that many
    bodies can arrive at once, close theirs after each request."""

    def __init__(self, most: int) -> None:
        self._most = most
        self._threads: set[int] = set()
        self._lock = threading.Lock()

    def keeps(self) -> bool:
        """Whether the calling thread keeps its connections (known by its ident, which
        a thread passes on only when it ends: the executor's threads live as long as it)."""
        thread = threading.get_ident()
        with self._lock:
            if thread not in self._threads and len(self._threads) < self._most:
                self._threads.add(thread)
            return thread in self._threads


def release_idle_connections() -> None:
    """Close this thread's database connections that no transaction holds (the next query
    opens one again)."""
    for connection in connections.all(initialized_only=True):
        if not connection.in_atomic_block:
            connection.close()
