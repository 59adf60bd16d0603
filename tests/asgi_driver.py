"""Drive an ASGI app in-process, as a server would: one request, its body in chunks, and
the client's hang-up when the test says so."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from msc3870 import wakeup


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
    sent: list[dict[str, Any]] = []
    exchange = Exchange(task=None, hang_up=hang_up)  # type: ignore[arg-type]
    raw_path, _, query = path.partition("?")
    header_list = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if content_length and not any(k == b"content-length" for k, _ in header_list):
        header_list.append((b"content-length", str(sum(map(len, pieces))).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": raw_path,
        "raw_path": raw_path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8008"), *header_list],
        "client": (client, 40000),
        "server": ("127.0.0.1", 8008),
    }

    async def receive() -> dict[str, Any]:
        if pieces:
            chunk = pieces.pop(0)
            exchange.body_reads.append(len(chunk))
            return {"type": "http.request", "body": chunk, "more_body": bool(pieces)}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def run() -> Reply:
        await app(scope, receive, send)
        if not sent:
            return Reply(0, {}, b"")  # nothing sent: the client had gone
        start = sent[0]
        assert start["type"] == "http.response.start"
        assert sent[-1].get("more_body", False) is False, "response never completed"
        return Reply(
            start["status"],
            {k.decode().lower(): v.decode() for k, v in start["headers"]},
            b"".join(m.get("body", b"") for m in sent[1:]),
        )

    exchange.task = asyncio.ensure_future(run())
    return exchange


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
