"""Uploads through this server are stored while they arrive (msc3870.streamed_body, the
body path of msc3870.asgi): one pass, memory bounded by a buffer, every way a body can end
still answered as before. Driven in process; tests/services/test_s3_streamed_uploads.py
writes to SeaweedFS."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import threading
import time
from typing import Any

import pytest

from msc3870 import streamed_body
from msc3870.admission import BodyPace
from msc3870.asgi import SPOOL_MEMORY_BYTES, MediaASGIHandler
from msc3870.errors import TooLarge
from msc3870.models import Media, MediaState
from msc3870.stores import get_store
from msc3870.stores.local import LocalMediaStore
from msc3870.streamed_body import BodyEnded, DirectBody, StreamedBody

from .asgi_driver import call, created_path, feed, run, until
from .helpers import bearer, msc3870_settings

MiB = 1024 * 1024
#: A body with a Content-Length comes in receive() messages, or into the application's
#: buffers where the server offers RECEIVE_INTO (mediarepo's does).
BODY_PATHS = pytest.mark.parametrize("into", [False, True], ids=["messages", "into"])


@pytest.fixture(autouse=True)
def _large_uploads_allowed() -> Any:
    with msc3870_settings(MAX_UPLOAD_SIZE=64 * MiB, UPLOAD_MIN_BYTES_PER_SECOND=0):
        yield


class Writes:
    """Watches the local store's ``write_stream``: when it starts, and whether it may
    read (``gate``, set by default)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        real = LocalMediaStore.write_stream
        watcher = self

        def write_stream(store: Any, *args: Any, **kwargs: Any) -> Any:
            watcher.started.set()
            watcher.gate.wait(30)
            return real(store, *args, **kwargs)

        monkeypatch.setattr(LocalMediaStore, "write_stream", write_stream)


def media_row(path: str) -> Media:
    return Media.objects.get(media_id=path.split("/")[1])


def stored_keys() -> list[str]:
    return list(get_store().list_keys("media/"))


@BODY_PATHS
def test_an_upload_is_stored_while_it_arrives(
    into: bool, app: MediaASGIHandler, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store is writing before the last byte has arrived: the body is not received
    whole first (a second pass, as long as the first)."""
    writes = Writes(monkeypatch)
    data = os.urandom(3 * MiB + 123)
    first = SPOOL_MEMORY_BYTES + 1

    async def scenario() -> tuple[int, bytes]:
        path = await created_path(app, token)
        exchange = feed(
            app,
            "PUT",
            f"/_matrix/media/v3/upload/{path}",
            headers=bearer(token),
            length=len(data),
            into=into,
        )
        exchange.send(data[:first])
        await until(writes.started.is_set, "the store to start writing")
        exchange.send(data[first:], more=False)
        reply = await exchange.reply()
        assert reply.status == 200, reply.body
        download = await call(
            app, "GET", f"/_matrix/client/v1/media/download/{path}", headers=bearer(token)
        )
        return download.status, download.body

    status, body = run(scenario)
    assert status == 200
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()


def test_a_chunked_upload_streams_and_records_its_length(app: MediaASGIHandler, token: str) -> None:
    data = os.urandom(2 * MiB + 7)

    async def scenario() -> str:
        exchange = feed(app, "POST", "/_matrix/media/v3/upload", headers=bearer(token), length=None)
        for start in range(0, len(data), 300_000):
            exchange.send(data[start : start + 300_000])
        exchange.send(b"", more=False)
        reply = await exchange.reply()
        assert reply.status == 200, reply.body
        return str(reply.json()["content_uri"])

    uri = run(scenario)
    media = Media.objects.get(media_id=uri.rsplit("/", 1)[1])
    assert media.state == MediaState.COMPLETE
    assert media.size == len(data)
    assert media.sha256 == hashlib.sha256(data).hexdigest()


def test_a_chunked_upload_over_the_limit_is_413_and_keeps_nothing(
    app: MediaASGIHandler, token: str
) -> None:
    async def scenario() -> Any:
        path = await created_path(app, token)
        exchange = feed(
            app, "PUT", f"/_matrix/media/v3/upload/{path}", headers=bearer(token), length=None
        )
        for _ in range(5):
            exchange.send(os.urandom(MiB))
        return path, await exchange.reply()

    with msc3870_settings(MAX_UPLOAD_SIZE=3 * MiB):
        path, reply = run(scenario)
    assert reply.status == 413
    assert reply.json()["errcode"] == "M_TOO_LARGE"
    assert media_row(path).state == MediaState.PENDING  # the id may be uploaded to again
    assert stored_keys() == []
    assert app.bodies.total == 0


@BODY_PATHS
def test_a_streamed_body_that_stalls_is_408_and_keeps_nothing(
    into: bool, app: MediaASGIHandler, token: str
) -> None:
    async def scenario() -> Any:
        path = await created_path(app, token)
        exchange = feed(
            app,
            "PUT",
            f"/_matrix/media/v3/upload/{path}",
            headers=bearer(token),
            length=4 * MiB,
            into=into,
        )
        exchange.send(os.urandom(2 * MiB))
        return path, await exchange.reply(timeout=15), exchange.discarded

    with msc3870_settings(UPLOAD_IDLE_TIMEOUT_SECONDS=0.5):
        path, reply, discarded = run(scenario)
    assert discarded is into  # received into the buffers: the server drops the rest
    assert reply.status == 408
    assert "No bytes of the request body arrived" in reply.json()["error"]
    assert reply.headers["connection"] == "close"
    assert media_row(path).state == MediaState.PENDING
    assert stored_keys() == []
    assert app.bodies.total == 0


@BODY_PATHS
def test_a_client_that_leaves_mid_stream_gets_no_answer_and_leaves_nothing(
    into: bool, app: MediaASGIHandler, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = Writes(monkeypatch)

    async def scenario() -> Any:
        exchange = feed(
            app,
            "POST",
            "/_matrix/media/v3/upload",
            headers=bearer(token),
            length=4 * MiB,
            into=into,
        )
        exchange.send(os.urandom(2 * MiB))
        await until(writes.started.is_set, "the store to start writing")
        exchange.hang_up()
        return await exchange.reply()

    assert run(scenario).status == 0  # nobody to answer
    assert stored_keys() == []
    assert Media.objects.get().state == MediaState.REJECTED  # a POST's id is never served
    assert app.bodies.total == 0


@BODY_PATHS
def test_a_slow_store_holds_the_body_back_without_cutting_the_client(
    into: bool, app: MediaASGIHandler, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the store does not read, the handler stops receiving once the buffer is
    full (memory stays bounded), and that pause is not counted against the client's pace:
    a store slower than the idle timeout does not make it a 408."""
    writes = Writes(monkeypatch)
    writes.gate.clear()
    data = os.urandom(12 * MiB)

    async def scenario() -> tuple[int, int, int]:
        path = await created_path(app, token)
        exchange = feed(
            app,
            "PUT",
            f"/_matrix/media/v3/upload/{path}",
            headers=bearer(token),
            length=len(data),
            into=into,
        )
        for start in range(0, len(data), MiB):
            exchange.send(data[start : start + MiB], more=start + MiB < len(data))
        await until(writes.started.is_set, "the store to start writing")
        await asyncio.sleep(1.5)  # three idle timeouts with the store not reading
        held_back = sum(exchange.pulled)
        writes.gate.set()
        reply = await exchange.reply()
        assert reply.status == 200, reply.body
        row = await asyncio.to_thread(media_row, path)
        return held_back, sum(exchange.pulled), row.size or 0

    with msc3870_settings(UPLOAD_IDLE_TIMEOUT_SECONDS=0.5):
        held_back, pulled, size = run(scenario)
    assert held_back <= SPOOL_MEMORY_BYTES + streamed_body.BUFFER_BYTES + 2 * MiB, held_back
    assert pulled == size == len(data)


# ------------------------------------------------------------------ the parts


def test_streamed_body_reads_whole_sizes_across_chunks() -> None:
    async def scenario() -> None:
        body = StreamedBody(asyncio.get_running_loop(), [b"ab", b"cde"])
        body.feed(b"fgh")
        assert await asyncio.to_thread(body.read, 4) == b"abcd"
        reading = asyncio.ensure_future(asyncio.to_thread(body.read, 6))
        await asyncio.sleep(0.05)
        assert not reading.done()  # 4 of 6 bytes are there: it waits for the rest
        body.feed(b"ijkl")
        assert await reading == b"efghij"
        body.end()
        assert await asyncio.to_thread(body.read, 10) == b"kl"  # short only at the end
        assert await asyncio.to_thread(body.read, 10) == b""

    run(scenario)


def test_streamed_body_reads_into_a_buffer_across_chunks() -> None:
    """``readinto`` fills the buffer from the chunks as they arrive (a store's part
    buffer), short only at the end, as ``read`` does."""

    async def scenario() -> None:
        body = StreamedBody(asyncio.get_running_loop(), [b"ab", b"cde"])
        buffer = bytearray(6)
        reading = asyncio.ensure_future(asyncio.to_thread(body.readinto, memoryview(buffer)))
        await asyncio.sleep(0.05)
        assert not reading.done()  # 5 of 6 bytes are there: it waits for the rest
        body.feed(b"fgh")
        assert await reading == 6
        assert buffer == b"abcdef"
        body.end()
        assert await asyncio.to_thread(body.readinto, memoryview(buffer)) == 2
        assert buffer[:2] == b"gh"
        assert await asyncio.to_thread(body.readinto, memoryview(buffer)) == 0

    run(scenario)


def test_a_reader_waiting_for_a_part_is_woken_per_mib_not_per_chunk() -> None:
    """Each wake-up of the reading thread is a switch of threads (and of the GIL): a
    reader filling a part buffer is woken once a MiB has arrived, not for each chunk."""

    async def scenario() -> tuple[int, int]:
        body = StreamedBody(asyncio.get_running_loop(), [])
        wakes = 0
        wait = body._arrived.wait

        def counted(timeout: float | None = None) -> bool:
            nonlocal wakes
            wakes += 1
            return wait(timeout)

        body._arrived.wait = counted  # type: ignore[method-assign]
        buffer = bytearray(3 * MiB)
        reading = asyncio.ensure_future(asyncio.to_thread(body.readinto, memoryview(buffer)))
        await asyncio.sleep(0.05)
        for _ in range(3 * 16):
            body.feed(b"c" * (64 * 1024))
            await asyncio.sleep(0.002)  # time for a woken reader to take it
        return await asyncio.wait_for(reading, 5), wakes

    count, wakes = run(scenario)
    assert count == 3 * MiB
    assert wakes <= 3  # 48 chunks of 64 KiB


def test_a_request_body_is_read_into_a_buffer_as_django_reads_it() -> None:
    """The store reads an upload's request with ``readinto`` (straight into its buffers):
    the request's body counts as read, and a body that stops is Django's
    ``UnreadablePostError``."""
    from django.core.handlers.asgi import ASGIRequest
    from django.http import UnreadablePostError
    from django.http.request import RawPostDataException

    from msc3870.asgi import MediaASGIRequest

    scope = {"type": "http", "method": "PUT", "path": "/", "headers": [], "query_string": b""}
    request = MediaASGIRequest(scope, io.BytesIO(b"0123456789"))
    buffer = bytearray(4)
    assert request.readinto(memoryview(buffer)) == 4 and buffer == b"0123"
    with pytest.raises(RawPostDataException):
        request.body  # noqa: B018 (read as a stream: no body to give whole)
    loop = asyncio.new_event_loop()
    try:
        cut = StreamedBody(loop, [b"ab"])
        cut.fail(BodyEnded("The client went away"))
        with pytest.raises(UnreadablePostError):
            MediaASGIRequest(scope, cut).readinto(memoryview(buffer))
    finally:
        loop.close()
    assert isinstance(request, ASGIRequest)


def test_streamed_body_raises_why_it_stopped() -> None:
    async def scenario() -> None:
        body = StreamedBody(asyncio.get_running_loop(), [b"x" * 10])
        reading = asyncio.ensure_future(asyncio.to_thread(body.read, 100))
        await asyncio.sleep(0.05)
        body.fail(TooLarge("over"))
        with pytest.raises(TooLarge):
            await reading
        closed = StreamedBody(asyncio.get_running_loop(), [])
        closed.close()
        with pytest.raises(BodyEnded):
            closed.read(1)
        closed.feed(b"late")  # ignored: nobody reads it
        assert not closed.full

    run(scenario)


def test_streamed_body_makes_room_for_the_loop() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        body = StreamedBody(loop, [b"x" * streamed_body.BUFFER_BYTES])
        assert body.full
        waiting = asyncio.ensure_future(body.wait_for_room())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await asyncio.to_thread(body.read, MiB)
        await asyncio.wait_for(waiting, 5)
        assert not body.full

    run(scenario)


def test_a_pause_of_the_server_moves_the_body_deadlines_on() -> None:
    with msc3870_settings(
        UPLOAD_MIN_BYTES_PER_SECOND=1000,
        UPLOAD_RATE_GRACE_SECONDS=10,
        UPLOAD_IDLE_TIMEOUT_SECONDS=5,
    ):
        pace = BodyPace(0.0)
        pace.arrived(1000, 1.0)
        assert pace.deadline() == 6.0
        pace.paused(30.0)
        assert pace.deadline() == 36.0
        assert time.monotonic() > 0  # (clock-free: the loop's times are passed in)


def test_a_read_larger_than_the_buffer_completes() -> None:
    """A store reads a part at a time (8 MiB), more than the loop buffers: what arrived is
    taken as it comes, making room for the rest (else each waits for the other)."""

    async def scenario() -> int:
        body = StreamedBody(asyncio.get_running_loop(), [])
        want = 3 * streamed_body.BUFFER_BYTES + 5
        reading = asyncio.ensure_future(asyncio.to_thread(body.read, want))
        sent = 0
        while sent < want + MiB:
            if body.full:
                await asyncio.wait_for(body.wait_for_room(), 5)
            body.feed(b"p" * MiB)
            sent += MiB
            await asyncio.sleep(0)
        body.end()
        return len(await asyncio.wait_for(reading, 5))

    assert run(scenario) == 3 * streamed_body.BUFFER_BYTES + 5


class _Connection:
    def __init__(self, in_atomic_block: bool) -> None:
        self.in_atomic_block = in_atomic_block
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def thread_connections(monkeypatch: pytest.MonkeyPatch) -> tuple[_Connection, _Connection]:
    """The reading thread's database connections: one idle, one in a transaction."""
    idle, in_transaction = _Connection(False), _Connection(True)

    def all_connections(initialized_only: bool = False) -> list[_Connection]:
        assert initialized_only
        return [idle, in_transaction]

    monkeypatch.setattr(streamed_body.connections, "all", all_connections)
    return idle, in_transaction


def test_a_body_that_arrives_within_the_hold_keeps_the_thread_s_connections(
    thread_connections: tuple[_Connection, _Connection],
) -> None:
    """Its writes after the body use them, without connecting again."""
    idle, in_transaction = thread_connections

    async def scenario() -> None:
        body = StreamedBody(asyncio.get_running_loop(), [b"abc"])
        body.end()
        assert await asyncio.to_thread(body.read, 2) == b"ab"
        assert await asyncio.to_thread(body.read, 2) == b"c"

    run(scenario)
    assert not idle.closed and not in_transaction.closed


@pytest.mark.parametrize("direct", [False, True], ids=["messages", "receive_into"])
def test_a_reader_waiting_past_the_hold_lets_go_of_its_idle_connections(
    thread_connections: tuple[_Connection, _Connection],
    monkeypatch: pytest.MonkeyPatch,
    direct: bool,
) -> None:
    """A body may take minutes and 64 may arrive at once per process: a reader waiting
    for bytes closes its thread's idle connections (not one a transaction holds) once the
    body has taken longer than the hold, while it still waits."""
    idle, in_transaction = thread_connections
    monkeypatch.setattr(streamed_body, "HOLD_CONNECTIONS_SECONDS", 0.05)

    async def scenario() -> bytes:
        loop = asyncio.get_running_loop()
        body = DirectBody(loop, [b"ab"]) if direct else StreamedBody(loop, [b"ab"])
        reading = asyncio.ensure_future(asyncio.to_thread(body.read, 3))
        await until(lambda: idle.closed, "the idle connection closed")
        assert not reading.done()
        if isinstance(body, DirectBody):
            await until(lambda: body.wanted() is not None, "the reader to want the rest")
            wanted = body.wanted()
            assert wanted is not None
            wanted[:1] = b"c"
            body.filled(1)
        else:
            body.feed(b"c")
        return await asyncio.wait_for(reading, 5)

    assert run(scenario) == b"abc"
    assert idle.closed and not in_transaction.closed


def test_a_body_read_past_the_hold_lets_go_at_the_next_read(
    thread_connections: tuple[_Connection, _Connection],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without waiting: a body that keeps arriving faster than it is read."""
    idle, _ = thread_connections
    monkeypatch.setattr(streamed_body, "HOLD_CONNECTIONS_SECONDS", 0)

    async def scenario() -> None:
        body = StreamedBody(asyncio.get_running_loop(), [b"abc"])
        assert await asyncio.to_thread(body.read, 1) == b"a"

    run(scenario)
    assert idle.closed


def test_only_the_first_few_upload_threads_keep_their_connections() -> None:
    """As many upload threads as the web threads keep their connections between requests
    (an upload's first write then needs no new one); the others close theirs."""
    keepers = streamed_body.ConnectionKeepers(2)
    answers: dict[str, list[bool]] = {}
    done = threading.Event()  # the threads live on, as the executor's do

    def ask(name: str, asked: threading.Event) -> None:
        answers[name] = [keepers.keeps(), keepers.keeps()]
        asked.set()
        done.wait(5)

    threads = []
    for name in ("first", "second", "third"):
        asked = threading.Event()
        threads.append(threading.Thread(target=ask, args=(name, asked)))
        threads[-1].start()
        assert asked.wait(5)
    done.set()
    for thread in threads:
        thread.join()
    assert answers["first"] == answers["second"] == [True, True]
    assert answers["third"] == [False, False]
