"""What the services tests do beside ``MatrixClient`` (``Stack.client``): look at the
bucket, and hold many waiting downloads on a loop of their own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

import aiohttp

from msc3870.models import Media

from ..helpers import bucket_keys, connections_per_worker, wait_until
from .conftest import Stack

# The client gives up well before the server's own wait (timeout_ms=60000) ends: a waiter
# answered within this bound was woken, not timed out.
CLIENT_TIMEOUT = 30

Answer = tuple[int, bytes, dict[str, str]]


def keys_of(s3_client: Any, media: Media) -> list[str]:
    """The media's objects: its incoming and served keys, and the keys of its upload
    requests (``Media.upload_key``: the served key, a dot and a suffix)."""
    return [
        k for k in bucket_keys(s3_client) if k.rsplit("/", 1)[-1].split(".", 1)[0] == media.media_id
    ]


class Waiters:
    """Concurrent HTTP requests on an event loop of their own (a thread), so that the
    test can do blocking things (HTTP, SQL) while they wait."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.session: aiohttp.ClientSession = self._call(self._make_session())

    async def _make_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT),
        )

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    async def _get(self, url: str, headers: dict[str, str]) -> Answer:
        async with self.session.get(url, headers=headers) as response:
            try:
                body = await response.read()
            except aiohttp.ClientPayloadError as exc:
                # A head without its body (a refusal sent with the Content-Length of a
                # parked request's placeholder): reported, not raised, so that the test
                # says which answer it was.
                body = f"<body not received: {exc}>".encode()
            return response.status, body, dict(response.headers)

    def get(
        self, url: str, headers: dict[str, str] | None = None, count: int = 1
    ) -> list[concurrent.futures.Future[Answer]]:
        return [
            asyncio.run_coroutine_threadsafe(self._get(url, headers or {}), self.loop)
            for _ in range(count)
        ]

    def close(self) -> None:
        self._call(self.session.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def results(futures: list[concurrent.futures.Future[Answer]]) -> list[Answer]:
    return [future.result(CLIENT_TIMEOUT + 10) for future in futures]


def _connections(stack: Stack) -> dict[int, int]:
    """Established client connections each web worker of ``stack`` holds (pid -> count)."""
    port = int(stack.base_url.rsplit(":", 1)[1])
    return connections_per_worker(stack.processes["server"].pid, port)


def park(
    waiters: Waiters,
    stack: Stack,
    url: str,
    headers: dict[str, str],
    count: int,
    *,
    spread: bool = True,
) -> list[concurrent.futures.Future[Answer]]:
    """``count`` waiting requests, all accepted by the server (and, with ``spread``, some
    on every worker: more are added, in bounded rounds, until each worker holds one)."""
    before = sum(_connections(stack).values())
    futures = waiters.get(url, headers, count)
    for _ in range(10):
        expected = before + len(futures)
        wait_until(
            lambda expected=expected: sum(_connections(stack).values()) >= expected,
            20,
            f"the server to accept {len(futures)} more waiting requests",
        )
        if not spread or min(_connections(stack).values()) > 0:
            break
        futures += waiters.get(url, headers, 20)
    else:
        raise AssertionError(f"waiters never reached every worker: {_connections(stack)}")
    done = [f for f in futures if f.done()]
    assert not done, f"waiters answered before any upload: {[f.result()[:2] for f in done]}"
    return futures
