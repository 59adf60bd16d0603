"""mediarepo.server.CoalescingTransport: a small write leaves with the next one, at once, or
at the end of the event loop's turn; nothing is held that flow control or a close should
see. (tests/test_server.py runs it for real, behind gunicorn: every answer goes through
it.)"""

from __future__ import annotations

import asyncio
from typing import Any

from mediarepo.server import CoalescingTransport


class RecordingTransport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1234)}.get(name, default)


def run(scenario: Any) -> Any:
    return asyncio.run(scenario())


def test_head_and_body_leave_in_one_send_as_soon_as_the_body_is_written() -> None:
    async def scenario() -> list[bytes]:
        raw = RecordingTransport()
        transport = CoalescingTransport(raw)  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        assert raw.sent == []  # the head waits for its body
        transport.write(b"{}")
        # Sent with the body, not at the end of the turn: thousands of answers in one
        # turn (parked downloads woken together) would otherwise each wait for all.
        assert raw.sent == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
        await asyncio.sleep(0)
        return raw.sent

    assert run(scenario) == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]


def test_a_lone_head_leaves_at_the_end_of_the_turn() -> None:
    """A streamed answer's head, whose body comes from a thread later, is not held."""

    async def scenario() -> list[bytes]:
        raw = RecordingTransport()
        transport = CoalescingTransport(raw)  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await asyncio.sleep(0)
        return raw.sent

    assert run(scenario) == [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"]


def test_a_large_write_goes_at_once_after_what_was_pending() -> None:
    """A streamed download's chunks reach the real transport as they are written, so
    that its buffer (which uvicorn's flow control watches) sees them."""

    async def scenario() -> list[bytes]:
        raw = RecordingTransport()
        transport = CoalescingTransport(raw)  # type: ignore[arg-type]
        transport.write(b"head")
        chunk = b"x" * (CoalescingTransport.MAX_PENDING + 1)
        transport.write(chunk)
        assert raw.sent == [b"head", chunk]
        await asyncio.sleep(0)
        return raw.sent

    assert run(scenario) == [b"head", b"x" * (CoalescingTransport.MAX_PENDING + 1)]


def test_close_sends_what_is_pending_first() -> None:
    async def scenario() -> RecordingTransport:
        raw = RecordingTransport()
        transport = CoalescingTransport(raw)  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        transport.close()
        await asyncio.sleep(0)  # the scheduled flush finds nothing left and no open socket
        return raw

    raw = run(scenario)
    assert raw.sent == [b"HTTP/1.1 400 Bad Request\r\n\r\n"]
    assert raw.closed


def test_what_is_pending_when_the_peer_is_gone_is_dropped() -> None:
    async def scenario() -> RecordingTransport:
        raw = RecordingTransport()
        transport = CoalescingTransport(raw)  # type: ignore[arg-type]
        transport.write(b"late answer")
        raw.closed = True  # the connection was lost in the meantime
        await asyncio.sleep(0)
        return raw

    assert run(scenario).sent == []


def test_abort_drops_what_is_pending() -> None:
    async def scenario() -> RecordingTransport:
        raw = RecordingTransport()
        transport = CoalescingTransport(raw)  # type: ignore[arg-type]
        transport.write(b"never sent")
        transport.abort()
        await asyncio.sleep(0)
        return raw

    raw = run(scenario)
    assert raw.sent == [] and raw.aborted


def test_everything_else_is_the_wrapped_transports() -> None:
    raw = RecordingTransport()
    transport = CoalescingTransport(raw)  # type: ignore[arg-type]
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1234)
    assert transport.is_closing() is False


class ReadableTransport(RecordingTransport):
    protocol: Any = None

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, *args: Any, **kwargs: Any) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def test_a_body_reaches_the_application_in_the_chunks_that_arrived() -> None:
    """uvicorn would append every chunk to a buffer and copy it out again: the body's
    messages are the chunks as they arrived (joined when several came between two
    receives), every byte in order."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from mediarepo.server import MatrixHttpToolsProtocol, ReceivedChunks

    body = bytes(range(256)) * 1024
    received: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        more = True
        while more:
            message = await receive()
            received.append(message["body"])
            more = message["more_body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def scenario() -> None:
        config = Config(app=app, lifespan="off", log_config=None)
        protocol = MatrixHttpToolsProtocol(config, ServerState(), {})
        protocol.connection_made(ReadableTransport())  # type: ignore[arg-type]
        head = b"PUT /x HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % len(body)
        protocol.data_received(head + body[:1000])
        await asyncio.sleep(0.01)
        protocol.data_received(body[1000:50_000])
        protocol.data_received(body[50_000:120_000])  # two chunks before a receive
        assert isinstance(protocol.cycle.body, ReceivedChunks)  # type: ignore[union-attr]
        await asyncio.sleep(0.01)
        protocol.data_received(body[120_000:])
        await asyncio.sleep(0.01)

    run(scenario)
    assert b"".join(received) == body
    assert all(type(chunk) is bytes for chunk in received)
    assert [len(chunk) for chunk in received] == [1000, 119_000, len(body) - 120_000]


def test_received_chunks_are_what_uvicorn_asks_of_its_buffer() -> None:
    from mediarepo.server import ReceivedChunks

    chunks = ReceivedChunks(bytearray(b"ab"))
    chunks += b"cd"
    chunks += b""
    assert len(chunks) == 4 and bytes(chunks) == b"abcd"
    one = b"x" * 100
    alone = ReceivedChunks()
    alone += one
    assert bytes(alone) is one  # not copied
    assert bytes(ReceivedChunks()) == b""
