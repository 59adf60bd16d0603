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
