"""The request plane on real processes (issue 7): downloads waiting on pending media are
parked on each web worker's wake-up hub, and woken by a change made anywhere.

The servers run two uvicorn workers (WEB_CONCURRENCY=2) on PostgreSQL. Which worker
holds which waiting connection is read from the workers' sockets (psutil), so "woken in
the other worker" is checked, not assumed. Every wait has a bound: a waiter that is never
woken fails the test at the client's timeout, well before its own ``timeout_ms``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import psutil
import pytest
import requests
from django.db import connection

from msc3870.models import MediaState

from .conftest import Stack, base_env, make_user_token, wait_until
from .helpers import auth, complete, create, media_of, mxc_path

pytestmark = pytest.mark.services

# The client gives up well before the server's own wait (timeout_ms=60000) ends: a waiter
# answered within this bound was woken, not timed out.
CLIENT_TIMEOUT = 30
WAIT_MS = 60_000
TRIGGER = "msc3870_media_state_notify"


Answer = tuple[int, bytes, dict[str, str]]


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
                # A head without its body (seen: a 429 after a parked request carrying
                # the placeholder's Content-Length). Reported, not raised, so the test
                # says which answer it was.
                body = f"<BUG: body not received: {exc}>".encode()
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


@pytest.fixture
def waiters() -> Iterator[Waiters]:
    running = Waiters()
    yield running
    running.close()


@pytest.fixture(scope="module")
def plane(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """gunicorn with two uvicorn workers on PostgreSQL, and a celery worker (Redis)."""
    tmp = tmp_path_factory.mktemp("plane")
    running = Stack(env=base_env(tmp), logs=tmp)
    try:
        running.start_server(workers=2)
        running.start_worker()
        yield running
    finally:
        running.stop_all()


def results(futures: list[concurrent.futures.Future[Answer]]) -> list[Answer]:
    return [future.result(CLIENT_TIMEOUT + 10) for future in futures]


def download_url(stack: Stack, content_uri: str, *, legacy: bool = False) -> str:
    if legacy:  # unauthenticated; at most LEGACY_DOWNLOAD_TIMEOUT_MS_MAX (10 s)
        return (
            f"{stack.base_url}/_matrix/media/v3/download/{mxc_path(content_uri)}?timeout_ms=10000"
        )
    return (
        f"{stack.base_url}/_matrix/client/v1/media/download/{mxc_path(content_uri)}"
        f"?timeout_ms={WAIT_MS}"
    )


def put_through_server(stack: Stack, token: str, content_uri: str, data: bytes) -> None:
    """MSC2246: the bytes through the media server; answered once the checks decided."""
    response = requests.put(
        f"{stack.base_url}/_matrix/media/v3/upload/{mxc_path(content_uri)}",
        data=data,
        headers={**auth(token), "Content-Type": "application/octet-stream"},
        timeout=60,
    )
    assert response.status_code == 200, response.text


def connections_per_worker(stack: Stack) -> dict[int, int]:
    """Established client connections each web worker holds (pid -> count)."""
    port = int(stack.base_url.rsplit(":", 1)[1])
    master = psutil.Process(stack.processes["server"].pid)
    counts = {}
    for worker in master.children():
        counts[worker.pid] = sum(
            1
            for conn in worker.net_connections(kind="tcp")
            if conn.status == psutil.CONN_ESTABLISHED and conn.laddr and conn.laddr.port == port
        )
    return counts


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
    before = sum(connections_per_worker(stack).values())
    futures = waiters.get(url, headers, count)
    for _ in range(10):
        expected = before + len(futures)
        wait_until(
            lambda expected=expected: sum(connections_per_worker(stack).values()) >= expected,
            20,
            f"the server to accept {len(futures)} more waiting requests",
        )
        if not spread or min(connections_per_worker(stack).values()) > 0:
            break
        futures += waiters.get(url, headers, 20)
    else:
        raise AssertionError(f"waiters never reached every worker: {connections_per_worker(stack)}")
    done = [f for f in futures if f.done()]
    assert not done, f"waiters answered before any upload: {[f.result()[:2] for f in done]}"
    return futures


def assert_all_got(answers: list[Answer], data: bytes) -> None:
    statuses = sorted({status for status, _, _ in answers})
    assert statuses == [200], (statuses, [a[1][:200] for a in answers if a[0] != 200][:3])
    assert all(body == data for _, body, _ in answers)


def versions_answers(stack: Stack) -> None:
    response = requests.get(f"{stack.base_url}/_matrix/client/versions", timeout=10)
    assert response.status_code == 200
    assert "versions" in response.json()


# ---------------------------------------------------------------------------- wake-ups


def test_a_completion_in_one_worker_wakes_waiters_in_the_other_and_in_other_servers(
    plane: Stack, make_stack: Any, waiters: Waiters, user_token: tuple[str, str]
) -> None:
    """No broker on this server: the PUT's own worker screens and completes the media.
    Waiters on both of its workers, and on another server, all get the bytes."""
    _, token = user_token
    inline = make_stack(CELERY_BROKER_URL="")  # tasks in-process: the web worker completes
    inline.start_server(workers=2)
    created = create(inline, token)
    content_uri = created["content_uri"]
    here = park(waiters, inline, download_url(inline, content_uri), auth(token), 40)
    there = park(waiters, plane, download_url(plane, content_uri), auth(token), 10, spread=False)
    data = os.urandom(5000)
    put_through_server(inline, token, content_uri, data)
    assert_all_got(results(here), data)
    assert_all_got(results(there), data)
    assert media_of(content_uri).state == MediaState.COMPLETE


def test_a_completion_by_the_celery_worker_wakes_every_waiter(
    plane: Stack, waiters: Waiters, user_token: tuple[str, str]
) -> None:
    """Upload to the URL, then /complete: the celery worker screens and completes; its
    NOTIFY wakes the waiters of both web workers (and /complete's own wait)."""
    _, token = user_token
    created = create(plane, token)
    content_uri = created["content_uri"]
    data = os.urandom(7000)
    put = requests.put(
        created["upload_url"],
        data=data,
        headers={"Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert put.status_code == 200, put.text
    parked = park(waiters, plane, download_url(plane, content_uri), auth(token), 40)
    done = complete(plane, token, content_uri)
    assert done.status_code == 200, done.text
    assert_all_got(results(parked), data)
    assert "msc3870.screen_media" in plane.tail("worker", 400)
    assert media_of(content_uri).state == MediaState.COMPLETE


def set_trigger(enabled: bool) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SET lock_timeout = '10s'")
        cursor.execute(
            f"ALTER TABLE msc3870_media {'ENABLE' if enabled else 'DISABLE'} TRIGGER {TRIGGER}"
        )
        cursor.execute("RESET lock_timeout")


def test_a_lost_notification_is_recovered_by_the_safety_poll(
    plane: Stack, waiters: Waiters, user_token: tuple[str, str]
) -> None:
    """With the NOTIFY trigger off, the changes made by /complete's worker and by the
    celery worker are never heard by the other web worker: only its safety poll can wake
    its waiters, and it does, long before their 60 s wait ends."""
    _, token = user_token
    created = create(plane, token)
    content_uri = created["content_uri"]
    data = os.urandom(3000)
    put = requests.put(
        created["upload_url"],
        data=data,
        headers={"Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert put.status_code == 200, put.text
    parked = park(waiters, plane, download_url(plane, content_uri), auth(token), 30)
    set_trigger(False)
    try:
        done = complete(plane, token, content_uri)
        assert done.status_code == 200, done.text
        assert_all_got(results(parked), data)
    finally:
        set_trigger(True)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tgenabled FROM pg_trigger WHERE tgname = %s AND NOT tgisinternal", [TRIGGER]
        )
        assert cursor.fetchone() == ("O",)  # enabled again for the tests that follow


def test_waiters_are_woken_by_polling_without_listen(
    make_stack: Any, waiters: Waiters, user_token: tuple[str, str]
) -> None:
    """MSC3870_WAKEUP_LISTEN=0: no LISTEN at all, the batched poll alone wakes them."""
    _, token = user_token
    polling = make_stack(CELERY_BROKER_URL="", MSC3870_WAKEUP_LISTEN="0")
    polling.start_server(workers=2)
    created = create(polling, token)
    content_uri = created["content_uri"]
    parked = park(waiters, polling, download_url(polling, content_uri), auth(token), 30)
    data = os.urandom(2000)
    put_through_server(polling, token, content_uri, data)
    assert_all_got(results(parked), data)


# ---------------------------------------------------------------------------- load and caps


def test_a_thousand_waiters_do_not_stop_versions(
    plane: Stack, waiters: Waiters, user_token: tuple[str, str]
) -> None:
    _, token = user_token
    created = create(plane, token)
    content_uri = created["content_uri"]
    # A thousand recipients of one upload are many users (one user's waiters are capped).
    url = download_url(plane, content_uri)
    recipients = [make_user_token() for _ in range(10)]
    parked = []
    for number, recipient in enumerate(recipients):
        last = number == len(recipients) - 1
        parked += park(waiters, plane, url, auth(recipient), 100, spread=last)
    # While a thousand wait: the rest of the API answers (outcomes, not timings).
    for _ in range(10):
        versions_answers(plane)
    config = requests.get(
        f"{plane.base_url}/_matrix/client/v1/media/config", headers=auth(token), timeout=10
    )
    assert config.status_code == 200
    other = create(plane, token)
    assert other["content_uri"] != content_uri
    assert not any(f.done() for f in parked)
    data = os.urandom(1000)
    put_through_server(plane, token, content_uri, data)
    assert_all_got(results(parked), data)


def past_the_cap(
    waiters: Waiters, url: str, headers: dict[str, str], admitted: int
) -> tuple[Answer, list[concurrent.futures.Future[Answer]]]:
    """``admitted + 1`` requests at once, of which the server may admit ``admitted``:
    the refusal (whichever request it falls on; the server admits them in the order its
    threads finish, not the order sent) and the futures still waiting. A refusal comes
    only once the cap is full, so the others are then admitted, not in flight."""
    futures = waiters.get(url, headers, admitted + 1)
    done, waiting = concurrent.futures.wait(
        futures, CLIENT_TIMEOUT + 10, return_when=concurrent.futures.FIRST_COMPLETED
    )
    assert done, f"none of {len(futures)} requests was refused"
    assert len(done) == 1, [f.result()[:2] for f in done]
    return done.pop().result(), [f for f in futures if f in waiting]


def test_caps_answer_at_once(
    make_stack: Any, waiters: Waiters, user_token: tuple[str, str]
) -> None:
    """One worker with small caps: 3 waiters per media, 2 unauthenticated, 6 in all. Past
    each cap the answer is an immediate 429 with retry_after_ms and Retry-After, naming
    the cap, while the admitted waiters keep waiting; then they all get their bytes."""
    _, token = user_token
    capped = make_stack(
        CELERY_BROKER_URL="",
        MSC3870_WAIT_MAX_WAITERS="6",
        MSC3870_WAIT_MAX_WAITERS_PER_MEDIA="3",
        MSC3870_LEGACY_WAIT_MAX_WAITERS="2",
    )
    capped.start_server(workers=1)
    a, b, c = (create(capped, token)["content_uri"] for _ in range(3))
    headers = auth(token)
    refusals: dict[str, Answer] = {}
    parked: dict[str, list[concurrent.futures.Future[Answer]]] = {}
    # a: 3 admitted, the 4th refused per media (3 wait in all).
    refusals["Too many requests wait for this media"], parked[a] = past_the_cap(
        waiters, download_url(capped, a), headers, 3
    )
    # b: 2 unauthenticated admitted, the 3rd refused (5 wait in all).
    refusals["Too many unauthenticated requests are waiting"], parked[b] = past_the_cap(
        waiters, download_url(capped, b, legacy=True), {}, 2
    )
    # c: 1 admitted (6 in all), the next refused by the total.
    refusals["Too many requests are waiting"], parked[c] = past_the_cap(
        waiters, download_url(capped, c), headers, 1
    )

    problems = []
    for cap, (status, body, answer_headers) in refusals.items():
        if status != 429 or b"M_LIMIT_EXCEEDED" not in body or b"retry_after_ms" not in body:
            problems.append(f"{cap}: {status} {body[:200]!r}")
        elif cap.encode() not in body:
            problems.append(f"{cap}: refused by another cap: {body[:200]!r}")
        elif "Retry-After" not in answer_headers:
            problems.append(f"BUG {cap}: 429 without a Retry-After header")
    assert not problems, problems
    assert [len(futures) for futures in parked.values()] == [3, 2, 1]
    assert not any(f.done() for futures in parked.values() for f in futures)

    data = {uri: os.urandom(500) for uri in (b, a, c)}  # b first: its waits are the shortest
    for uri, payload in data.items():
        put_through_server(capped, token, uri, payload)
    for uri, futures in parked.items():
        assert_all_got(results(futures), data[uri])
