"""The rest of a body received straight into the application's buffers (msc3870's
``RECEIVE_INTO``, offered by ``mediarepo.server.ReceiveInto``): every byte in order, none
read past the body (the next request on the connection is parsed as before), the rest
discarded when the application stops, a client that leaves is an ``OSError``.

Driven through the real protocol, on a transport that reads as a socket does (into the
protocol's buffer, a read at a time, never while reading is paused); tests/test_server.py
and tests/test_upload_admission_server.py run it behind gunicorn."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import pytest

from msc3870.streamed_body import RECEIVE_INTO

BODY = bytes(range(256)) * 4096  # 1 MiB
NEXT = b"GET /next HTTP/1.1\r\nhost: t\r\n\r\n"


class SocketTransport:
    """What a client sent (``incoming``), read into the protocol's buffers at most
    ``chunk`` bytes a read, while reading is not paused."""

    def __init__(self, chunk: int = 100_000) -> None:
        self.loop = asyncio.get_running_loop()
        self.incoming = bytearray()
        self.chunk = chunk
        self.paused = False
        self.protocol: Any = None
        self.sent = bytearray()
        self.closed = False
        self.reads = 0
        self._scheduled = False

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def send(self, data: bytes) -> None:
        self.incoming += data
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._read)

    def _read(self) -> None:
        self._scheduled = False
        if self.paused or self.closed or not self.incoming:
            return
        buffer = self.protocol.get_buffer(-1)
        count = min(len(buffer), len(self.incoming), self.chunk)
        buffer[:count] = self.incoming[:count]
        del self.incoming[:count]
        self.reads += 1
        self.protocol.buffer_updated(count)
        self._schedule()

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        self._schedule()

    def lose(self) -> None:
        self.closed = True
        self.protocol.connection_lost(ConnectionResetError())

    def write(self, data: bytes) -> None:
        self.sent += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1234), "sockname": ("127.0.0.1", 80)}.get(name, default)

    def set_write_buffer_limits(self, *args: Any, **kwargs: Any) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


Reader = Callable[[dict[str, Any], Any], Any]


def serve(
    read_body: Reader, requests: bytes, chunk: int = 100_000
) -> tuple[SocketTransport, dict[str, Any]]:
    """Run the protocol on ``requests`` (sent at once): ``/up`` is answered after
    ``read_body(scope, receive)``, whose result is kept; any other path with its name."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from mediarepo.server import MatrixHttpToolsProtocol

    seen: dict[str, Any] = {"paths": []}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["paths"].append(scope["path"])
        answer = scope["path"].encode()
        if scope["path"] == "/up":
            try:
                seen["result"] = await read_body(scope, receive)
            except Exception as exc:
                seen["error"] = exc
                return
            answer = b"done"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": answer})

    async def scenario() -> SocketTransport:
        config = Config(app=app, lifespan="off", log_config=None)
        protocol = MatrixHttpToolsProtocol(config, ServerState(), {})
        transport = SocketTransport(chunk)
        protocol.connection_made(transport)  # type: ignore[arg-type]
        transport.send(requests)
        for _ in range(100):
            await asyncio.sleep(0.001)
        return transport

    return asyncio.run(scenario()), seen


def upload(body: bytes = BODY) -> bytes:
    return b"PUT /up HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % len(body) + body


async def read_into(
    scope: dict[str, Any], receive: Any, buffer_size: int = 64 * 1024, most: int | None = None
) -> bytes:
    """The first message by ``receive()``, the rest by ``receive_into`` (at most ``most``
    bytes of it, then ``discard``)."""
    into = scope["extensions"][RECEIVE_INTO]
    message = await receive()
    got = bytearray(message["body"])
    arrived: list[int] = []
    while most is None or len(got) < most:
        buffer = memoryview(bytearray(buffer_size))
        count = await into["receive_into"](buffer, arrived.append)
        got += buffer[:count]
        if count < buffer_size:
            break
    if most is not None:
        into["discard"]()
    return bytes(got)


def test_a_body_is_received_into_the_buffers_then_the_next_request_is_parsed() -> None:
    transport, seen = serve(read_into, upload() + NEXT)
    assert seen["result"] == BODY
    assert seen["paths"] == ["/up", "/next"]
    assert transport.sent.count(b"HTTP/1.1 200") == 2
    assert transport.sent.endswith(b"/next\r\n0\r\n\r\n")


def test_reads_stop_between_buffers_and_never_pass_the_body() -> None:
    """Buffers larger than a read, and the next request sent with the body: the reads go
    into the buffer (no copy through the parser), and stop at the body's last byte."""
    lengths: list[int] = []
    first: list[int] = []

    async def big_buffers(scope: dict[str, Any], receive: Any) -> bytes:
        into = scope["extensions"][RECEIVE_INTO]
        message = await receive()
        got = bytearray(message["body"])
        first.append(len(got))
        while True:
            buffer = memoryview(bytearray(300_000))
            count = await into["receive_into"](buffer, lengths.append)
            got += buffer[:count]
            if count < len(buffer):
                return bytes(got)

    _, seen = serve(big_buffers, upload() + NEXT, chunk=70_000)
    assert seen["result"] == BODY
    assert first[0] + sum(lengths) == len(BODY)  # the rest, every byte, went by receive_into
    assert max(lengths) <= 70_000
    assert seen["paths"] == ["/up", "/next"]


def test_what_the_parser_had_is_read_first() -> None:
    """Bytes parsed after the first message and before the first buffer come first."""

    async def late(scope: dict[str, Any], receive: Any) -> bytes:
        into = scope["extensions"][RECEIVE_INTO]
        first = (await receive())["body"]
        await asyncio.sleep(0.02)  # the parser takes more meanwhile
        buffer = memoryview(bytearray(len(BODY)))
        count = await into["receive_into"](buffer, lambda n: None)
        rest = memoryview(bytearray(10))
        assert await into["receive_into"](rest, lambda n: None) == 0  # past the end
        return first + bytes(buffer[:count])

    _, seen = serve(late, upload() + NEXT)
    assert seen["result"] == BODY
    assert seen["paths"] == ["/up", "/next"]


def test_the_rest_is_discarded_when_the_application_stops() -> None:
    transport, seen = serve(lambda s, r: read_into(s, r, most=400_000), upload() + NEXT)
    assert seen["result"] == BODY[: len(seen["result"])]
    assert 400_000 <= len(seen["result"]) < len(BODY)
    assert seen["paths"] == ["/up", "/next"]  # the rest was not parsed as a request
    assert transport.sent.count(b"HTTP/1.1 200") == 2


def test_a_cancelled_receive_discards_the_rest() -> None:
    async def cancelled(scope: dict[str, Any], receive: Any) -> bytes:
        into = scope["extensions"][RECEIVE_INTO]
        first = (await receive())["body"]
        buffer = memoryview(bytearray(len(BODY)))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0):
                await into["receive_into"](buffer, lambda n: None)
        return first

    transport, seen = serve(cancelled, upload() + NEXT, chunk=10_000)
    assert seen["paths"] == ["/up", "/next"]
    assert transport.sent.count(b"HTTP/1.1 200") == 2


def test_a_client_gone_during_a_receive_is_an_os_error() -> None:
    outcome: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await read_into(scope, receive, buffer_size=len(BODY))
        except OSError as exc:
            outcome["error"] = exc

    async def scenario() -> None:
        from uvicorn.config import Config
        from uvicorn.server import ServerState

        from mediarepo.server import MatrixHttpToolsProtocol

        config = Config(app=app, lifespan="off", log_config=None)
        protocol = MatrixHttpToolsProtocol(config, ServerState(), {})
        transport = SocketTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        transport.send(upload()[: len(BODY) // 2])
        await asyncio.sleep(0.05)
        assert not outcome  # the body has not ended: the reader waits
        transport.lose()
        await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert isinstance(outcome["error"], ConnectionResetError)


def test_only_a_body_with_one_content_length_is_offered() -> None:
    from mediarepo.server import _content_length

    assert _content_length([(b"content-length", b"12")]) == 12
    assert _content_length([(b"content-length", b"12"), (b"content-length", b"12")]) is None
    assert _content_length([(b"content-length", b"12"), (b"transfer-encoding", b"x")]) is None
    assert _content_length([(b"content-length", b"-1")]) is None
    assert _content_length([]) is None


def test_a_body_read_by_messages_is_unchanged() -> None:
    """An application that never asks keeps uvicorn's messages (and the drain)."""

    async def by_messages(scope: dict[str, Any], receive: Any) -> bytes:
        got = bytearray()
        while True:
            message = await receive()
            got += message["body"]
            if not message["more_body"]:
                return hashlib.sha256(got).digest()

    _, seen = serve(by_messages, upload() + NEXT)
    assert seen["result"] == hashlib.sha256(BODY).digest()
    assert seen["paths"] == ["/up", "/next"]
