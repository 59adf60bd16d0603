"""Drive an ASGI app in-process, as a server would: one request, its body in chunks
(``request``) or piece by piece as the test sends it (``feed``), and the client's hang-up
when the test says so."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from msc3870 import wakeup
from msc3870.streamed_body import RECEIVE_INTO

from .helpers import bearer, mxc_path


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Exchange:
    """One request in flight; ``reply`` resolves when the response is complete."""

    task: asyncio.Task[Reply]
    hang_up: asyncio.Event
    body_reads: list[int] = field(default_factory=list)

    async def reply(self, timeout: float = 30) -> Reply:
        return await asyncio.wait_for(self.task, timeout)


def request(
    app: Any,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    chunks: list[bytes] | None = None,
    content_length: bool = True,
    client: str = "127.0.0.1",
) -> Exchange:
    """Start a request on the running loop. ``chunks`` sends the body in pieces;
    ``client`` is the address it comes from."""
    hang_up = asyncio.Event()
    pieces = list(chunks) if chunks is not None else [body]
    exchange = Exchange(task=None, hang_up=hang_up)  # type: ignore[arg-type]
    header_list = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if content_length and not any(k == b"content-length" for k, _ in header_list):
        header_list.append((b"content-length", str(sum(map(len, pieces))).encode()))
    scope = http_scope(method, path, header_list, (client, 40000))

    async def receive() -> dict[str, Any]:
        if pieces:
            chunk = pieces.pop(0)
            exchange.body_reads.append(len(chunk))
            return {"type": "http.request", "body": chunk, "more_body": bool(pieces)}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    exchange.task = asyncio.ensure_future(_reply(app, scope, receive, whole=True))
    return exchange


HANG_UP = object()


@dataclass
class Feed:
    """A request whose body the test sends piece by piece, or stops sending."""

    task: asyncio.Task[Reply]
    queue: asyncio.Queue[Any]
    #: Sizes of the body pieces the application pulled from ``receive`` (or were
    #: received into its buffers).
    pulled: list[int] = field(default_factory=list)
    #: With ``into``: whether the application discarded the rest of the body.
    discarded: bool = False

    def send(self, data: bytes, *, more: bool = True) -> None:
        self.queue.put_nowait((data, more))

    def hang_up(self) -> None:
        self.queue.put_nowait(HANG_UP)

    async def reply(self, timeout: float = 20) -> Reply:
        return await asyncio.wait_for(asyncio.shield(self.task), timeout)


def feed(
    app: Any,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    length: int | None = None,
    client: tuple[str, int] | None = ("127.0.0.1", 40000),
    into: bool = False,
) -> Feed:
    """Start a request whose body comes only from ``Feed.send``; ``length`` is its
    Content-Length (None: chunked). ``into``: the server offers msc3870's
    ``RECEIVE_INTO``, and fills the application's buffers with what is sent."""
    header_list = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if length is not None:
        header_list.append((b"content-length", str(length).encode()))
    else:
        header_list.append((b"transfer-encoding", b"chunked"))
    scope = http_scope(method, path, header_list, client)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    exchange = Feed(task=None, queue=queue)  # type: ignore[arg-type]

    async def receive() -> dict[str, Any]:
        item = await queue.get()
        if item is HANG_UP:
            return {"type": "http.disconnect"}
        data, more = item
        exchange.pulled.append(len(data))
        return {"type": "http.request", "body": data, "more_body": more}

    if into:
        scope["extensions"] = {RECEIVE_INTO: _receive_into(exchange, queue)}
    exchange.task = asyncio.ensure_future(_reply(app, scope, receive, whole=False))
    return exchange


def _receive_into(exchange: Feed, queue: asyncio.Queue[Any]) -> dict[str, Any]:
    """``RECEIVE_INTO`` over what the test sends: each buffer filled from the pieces
    sent (a piece may span buffers), fewer bytes only at the end of the body."""
    left = memoryview(b"")
    ended = False

    async def receive_into(buffer: memoryview, arrived: Callable[[int], None]) -> int:
        nonlocal left, ended
        filled = 0
        while filled < len(buffer):
            if not left:
                if ended:
                    break
                item = await queue.get()
                if item is HANG_UP:
                    raise ConnectionResetError("The client went away")
                data, more = item
                left, ended = memoryview(data), not more
                continue
            count = min(len(left), len(buffer) - filled)
            buffer[filled : filled + count] = left[:count]
            left, filled = left[count:], filled + count
            exchange.pulled.append(count)
            arrived(count)
        return filled

    def discard() -> None:
        exchange.discarded = True

    return {"receive_into": receive_into, "discard": discard}


def http_scope(
    method: str, path: str, headers: list[tuple[bytes, bytes]], client: tuple[str, int] | None
) -> dict[str, Any]:
    """The ASGI scope of one HTTP/1.1 request to 127.0.0.1:8008 (``path`` with its query)."""
    raw_path, _, query = path.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": raw_path,
        "raw_path": raw_path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8008"), *headers],
        "client": client,
        "server": ("127.0.0.1", 8008),
    }


async def _reply(app: Any, scope: dict[str, Any], receive: Any, *, whole: bool) -> Reply:
    """Run ``app`` on one request: what it answered (status 0: nothing, the client had
    gone). ``whole``: the answer must have been completed."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    if not sent:
        return Reply(0, {}, b"")
    start = sent[0]
    if whole:
        assert start["type"] == "http.response.start"
        assert sent[-1].get("more_body", False) is False, "response never completed"
    return Reply(
        start["status"],
        {k.decode().lower(): v.decode() for k, v in start["headers"]},
        b"".join(m.get("body", b"") for m in sent[1:]),
    )


async def call(app: Any, method: str, path: str, **kwargs: Any) -> Reply:
    return await request(app, method, path, **kwargs).reply()


def run(scenario: Callable[[], Any]) -> Any:
    """Run an async scenario on a new loop, bounded (a hang fails, never hangs)."""
    return asyncio.run(asyncio.wait_for(scenario(), 60))


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def parked() -> int:
    """Requests parked on this process's wake-up hub."""
    hub = wakeup.current_hub()
    return hub.waiting if hub is not None else 0


async def create(app: Any, token: str) -> dict[str, Any]:
    """A new media id of ``token``'s user: ``/create``'s answer (asserted 200)."""
    reply = await call(app, "POST", "/_matrix/media/v1/create", headers=bearer(token))
    assert reply.status == 200, reply.body
    return reply.json()


async def created_path(app: Any, token: str) -> str:
    """A new media id as ``server/id``."""
    return mxc_path((await create(app, token))["content_uri"])


async def parked_download(app: Any, path: str, headers: dict[str, str]) -> Exchange:
    """A client v1 download of ``path`` (``server/id``, up to 30 s), once it is parked on
    the wake-up hub."""
    before = parked()
    exchange = request(
        app, "GET", f"/_matrix/client/v1/media/download/{path}?timeout_ms=30000", headers=headers
    )
    await until(lambda: parked() == before + 1, "a parked waiter")
    return exchange
