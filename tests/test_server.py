"""The deployable server as it runs: gunicorn with the uvicorn workers of
``mediarepo.server`` serving ``mediarepo.asgi``, spawned as ``make run`` spawns it, on
SQLite in a throw-away data directory. No external service.

One server (two workers, uploads capped at 1 MiB) serves most tests; a second one (one
worker, at most 5 waiters per media) serves the cap test. Every wait is bounded: a hang
fails, it does not hang the suite.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests

from .helpers import assert_matrix_error, connections_per_worker, mxc_path, wait_until
from .server_helpers import MAX_UPLOAD, PERIODIC_LINE, Server, raw_exchange, start_server

OVER_LIMIT_BODY = MAX_UPLOAD + 4096


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server")


@pytest.fixture(scope="module")
def server(data_dir: Path) -> Iterator[Server]:
    """Two workers, as on a two-core host; uploads capped at 1 MiB."""
    running = start_server(data_dir, "main", migrate=True, WEB_CONCURRENCY="2")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def capped_server(server: Server) -> Iterator[Server]:
    """One worker (so that every waiter meets the same cap), 5 waiters per media. Same
    data directory and database as ``server``."""
    running = start_server(
        server.data_dir,
        "capped",
        migrate=False,
        WEB_CONCURRENCY="1",
        MSC3870_WAIT_MAX_WAITERS_PER_MEDIA="5",
    )
    yield running
    running.stop()


# ---------------------------------------------------------------------------- raw HTTP


# ---------------------------------------------------------------------------- request heads


@pytest.mark.parametrize("size", [10 * 1024, 20 * 1024])
def test_overlong_uri_is_414_json(server: Server, size: int) -> None:
    # 10 KiB: past the application's own limit; 20 KiB: past the protocol's.
    response = requests.get(
        f"{server.base_url}/_matrix/client/versions", params={"q": "a" * size}, timeout=10
    )
    assert response.headers["Content-Type"].startswith("application/json")
    assert_matrix_error(response.status_code, response.content, 414)


@pytest.mark.parametrize("size", [40 * 1024, 70 * 1024])
def test_overlong_headers_are_431_json(server: Server, size: int) -> None:
    response = requests.get(
        f"{server.base_url}/_matrix/client/versions", headers={"X-Big": "a" * size}, timeout=10
    )
    assert response.headers["Content-Type"].startswith("application/json")
    assert_matrix_error(response.status_code, response.content, 431)
    many = {f"X-Header-{i}": "b" * 1000 for i in range(size // 1000)}
    response = requests.get(f"{server.base_url}/_matrix/client/versions", headers=many, timeout=10)
    assert_matrix_error(response.status_code, response.content, 431)


def test_garbage_request_line_is_400_json(server: Server) -> None:
    status, headers, body = raw_exchange(server.port, b"GARBAGE\x01 nonsense\r\n\r\n")
    assert headers["content-type"].startswith("application/json")
    assert_matrix_error(status, body, 400)


# ---------------------------------------------------------------------------- bodies


def test_over_limit_upload_gets_413_with_requests(server: Server) -> None:
    """The client sends all of its 1 MiB + 4 KiB: it must read the 413, never a reset."""
    body = os.urandom(OVER_LIMIT_BODY)
    http = requests.Session()
    for _ in range(20):
        response = http.post(
            f"{server.base_url}/_matrix/media/v3/upload",
            data=body,
            headers={**server.auth(), "Content-Type": "application/octet-stream"},
            timeout=15,
        )
        assert_matrix_error(response.status_code, response.content, 413, "M_TOO_LARGE")


def test_over_limit_upload_gets_413_on_a_raw_socket(server: Server) -> None:
    """Headers and the whole body in one go, then read: the 413 arrives every time."""
    body = os.urandom(OVER_LIMIT_BODY)
    head = (
        "POST /_matrix/media/v3/upload HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\n"
        f"Authorization: Bearer {server.token}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    for _ in range(20):
        status, headers, answer = raw_exchange(server.port, head + body)
        assert headers["content-type"].startswith("application/json")
        assert_matrix_error(status, answer, 413, "M_TOO_LARGE")


@pytest.mark.parametrize("target", ["upload_url", "msc2246_put", "create_json"])
def test_every_body_limit_answers_413(server: Server, target: str) -> None:
    """The upload URL and the MSC2246 PUT (media limit), and a JSON endpoint (64 KiB)."""
    created = server.client.create()
    if target == "upload_url":
        url, headers = created["upload_url"], {}
        body = os.urandom(OVER_LIMIT_BODY)
    elif target == "msc2246_put":
        url = f"{server.base_url}/_matrix/media/v3/upload/{mxc_path(created['content_uri'])}"
        headers, body = server.auth(), os.urandom(OVER_LIMIT_BODY)
    else:
        url = f"{server.base_url}/_matrix/media/v1/create"
        headers, body = server.auth(), b"{" + b" " * 100_000 + b"}"
    response = requests.request(
        "POST" if target == "create_json" else "PUT",
        url,
        data=body,
        headers={**headers, "Content-Type": "application/octet-stream"},
        timeout=15,
    )
    assert_matrix_error(response.status_code, response.content, 413, "M_TOO_LARGE")


def test_a_declared_length_far_over_the_limit_is_refused_unread(server: Server) -> None:
    head = (
        "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {server.token}\r\nContent-Length: 99999999999\r\n\r\n"
    ).encode()
    status, headers, body = raw_exchange(server.port, head)  # no body sent: none is awaited
    assert_matrix_error(status, body, 413, "M_TOO_LARGE")
    assert headers.get("connection") == "close"


def chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_chunked_upload_is_stored_byte_identical(server: Server) -> None:
    data = os.urandom(300 * 1024 + 7)
    # A generator body: requests sends it chunked, with no Content-Length.
    response = requests.post(
        f"{server.base_url}/_matrix/media/v3/upload",
        data=chunks(data),
        headers={**server.auth(), "Content-Type": "application/octet-stream"},
        timeout=15,
    )
    assert response.status_code == 200, response.text
    assert "Content-Length" not in response.request.headers
    got = requests.get(
        f"{server.base_url}/_matrix/client/v1/media/download/"
        f"{mxc_path(response.json()['content_uri'])}",
        headers=server.auth(),
        timeout=15,
    )
    assert got.status_code == 200
    assert got.content == data


def test_chunked_upload_to_the_upload_url(server: Server) -> None:
    created = server.client.create()
    data = os.urandom(200 * 1024 + 3)
    put = requests.put(
        created["upload_url"],
        data=chunks(data),
        headers={"Content-Type": "application/octet-stream"},
        timeout=15,
    )
    assert put.status_code == 200, put.text
    path = mxc_path(created["content_uri"])
    done = requests.post(
        f"{server.base_url}/_matrix/media/v1/upload/{path}/complete",
        json={},
        headers=server.auth(),
        timeout=15,
    )
    assert done.status_code == 200, done.text
    # /complete may answer before the full-object checks end (downloads wait meanwhile).
    got = requests.get(
        f"{server.base_url}/_matrix/client/v1/media/download/{path}?timeout_ms=20000",
        headers=server.auth(),
        timeout=30,
    )
    assert got.status_code == 200
    assert got.content == data


def test_chunked_upload_over_the_limit_gets_413(server: Server) -> None:
    response = requests.post(
        f"{server.base_url}/_matrix/media/v3/upload",
        data=chunks(os.urandom(OVER_LIMIT_BODY)),
        headers={**server.auth(), "Content-Type": "application/octet-stream"},
        timeout=15,
    )
    assert_matrix_error(response.status_code, response.content, 413, "M_TOO_LARGE")


# ---------------------------------------------------------------------------- waiting


async def _wait_downloads(
    url: str, headers: dict[str, str], count: int
) -> tuple[list[asyncio.Task[tuple[int, bytes, dict[str, str]]]], aiohttp.ClientSession]:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        timeout=aiohttp.ClientTimeout(total=60),
    )

    async def one() -> tuple[int, bytes, dict[str, str]]:
        async with session.get(url, headers=headers) as response:
            return response.status, await response.read(), dict(response.headers)

    return [asyncio.ensure_future(one()) for _ in range(count)], session


def test_200_waiters_on_two_workers_all_get_the_bytes(server: Server) -> None:
    created = server.client.create()
    path = mxc_path(created["content_uri"])
    data = os.urandom(4096)
    url = f"{server.base_url}/_matrix/client/v1/media/download/{path}?timeout_ms=50000"

    async def scenario() -> tuple[list[tuple[int, bytes, dict[str, str]]], list[int]]:
        tasks, session = await _wait_downloads(url, server.auth(), 200)
        try:
            # Give the requests time to reach the server and park (not an assertion on
            # time: a request arriving late would find the media complete, and the
            # check below that none is answered yet would still hold).
            await asyncio.sleep(1.5)
            assert not any(task.done() for task in tasks), [
                t.result()[0] for t in tasks if t.done() and not t.exception()
            ]
            # The rest of the server keeps answering while they wait.
            loop = asyncio.get_running_loop()
            versions = []
            for _ in range(5):
                answer = await loop.run_in_executor(
                    None,
                    lambda: requests.get(f"{server.base_url}/_matrix/client/versions", timeout=10),
                )
                versions.append(answer.status_code)
            put = await loop.run_in_executor(
                None,
                lambda: server.client.put_upload(created["content_uri"], data),
            )
            assert put.status_code == 200, put.text
            done = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        finally:
            for task in tasks:
                task.cancel()
            await session.close()
        return done, versions

    answers, versions = asyncio.run(scenario())
    assert versions == [200] * 5
    statuses = [status for status, _, _ in answers]
    assert statuses == [200] * 200, sorted(set(statuses))
    assert all(body == data for _, body, _ in answers)


def test_racing_puts_on_two_workers_one_wins_and_its_bytes_are_served(server: Server) -> None:
    """Twelve PUTs of different bytes to one id at once, spread over both workers: each
    stores its bytes unclaimed and one write decides, so exactly one is
    answered 200 and the others 409 M_CANNOT_OVERWRITE_MEDIA; the winner's bytes are
    served, and only its object is left on disk."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    created = server.client.create()
    path = mxc_path(created["content_uri"])
    media_id = path.split("/")[1]
    bodies = [os.urandom(64 * 1024) for _ in range(12)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(
            pool.map(lambda body: server.client.put_upload(created["content_uri"], body), bodies)
        )
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [200] + [409] * 11, [answer.text for answer in answers]
    assert all(
        answer.json()["errcode"] == "M_CANNOT_OVERWRITE_MEDIA"
        for answer in answers
        if answer.status_code == 409
    )
    winner = bodies[[answer.status_code for answer in answers].index(200)]
    served = requests.get(
        f"{server.base_url}/_matrix/client/v1/media/download/{path}",
        headers=server.auth(),
        timeout=30,
    )
    assert served.status_code == 200
    assert hashlib.sha256(served.content).digest() == hashlib.sha256(winner).digest()
    left = [p.name for p in (server.data_dir / "media").rglob(f"{media_id}*") if p.is_file()]
    assert len(left) == 1, left


def test_the_waiter_past_the_per_media_cap_is_refused_at_once(capped_server: Server) -> None:
    server = capped_server
    created = server.client.create()
    path = mxc_path(created["content_uri"])
    url = f"{server.base_url}/_matrix/client/v1/media/download/{path}?timeout_ms=50000"
    data = os.urandom(1000)

    async def scenario() -> tuple[tuple[int, bytes, dict[str, str]], list[Any]]:
        tasks, session = await _wait_downloads(url, server.auth(), 5)
        try:
            await asyncio.sleep(1.0)
            assert not any(task.done() for task in tasks)
            # The sixth: answered while the five still wait (bounded, so a queued sixth
            # fails here instead of hanging until the upload).
            async with session.get(url, headers=server.auth()) as response:
                try:
                    sixth = (response.status, await response.read(), dict(response.headers))
                except aiohttp.ClientPayloadError as exc:
                    # The refusal must not carry the Content-Length that CommonMiddleware
                    # put on the DeferredResponse placeholder: its own body is longer, and
                    # uvicorn would send a head and no body ("Response content longer
                    # than Content-Length").
                    raise AssertionError(
                        f"the 429 past the per-media cap arrived without its body "
                        f"(status {response.status}, headers {dict(response.headers)}): {exc}"
                    ) from exc
            still_waiting = not any(task.done() for task in tasks)
            loop = asyncio.get_running_loop()
            put = await loop.run_in_executor(
                None,
                lambda: server.client.put_upload(created["content_uri"], data),
            )
            assert put.status_code == 200, put.text
            five = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        finally:
            for task in tasks:
                task.cancel()
            await session.close()
        assert still_waiting
        return sixth, list(five)

    (status, body, headers), five = asyncio.run(scenario())
    assert_matrix_error(status, body, 429, "M_LIMIT_EXCEEDED")
    assert json.loads(body)["retry_after_ms"] > 0
    # RFC 9110: the 429 says when to retry in HTTP's own words too.
    assert "Retry-After" in headers, f"429 without a Retry-After header: {headers}"
    assert int(headers["Retry-After"]) >= 1
    assert [(s, b) for s, b, _ in five] == [(200, data)] * 5


def test_waiters_that_hang_up_free_their_places(capped_server: Server) -> None:
    """Five waiters fill the per-media cap, then hang up: five others are admitted (not
    refused with 429), and get the bytes."""
    server = capped_server
    created = server.client.create()
    path = mxc_path(created["content_uri"])
    url = f"{server.base_url}/_matrix/client/v1/media/download/{path}?timeout_ms=50000"
    data = os.urandom(700)

    async def scenario() -> list[tuple[int, bytes, dict[str, str]]]:
        first, first_session = await _wait_downloads(url, server.auth(), 5)
        await asyncio.sleep(1.0)
        assert not any(task.done() for task in first)
        for task in first:
            task.cancel()
        await first_session.close()  # the five connections close
        await asyncio.sleep(1.0)
        second, session = await _wait_downloads(url, server.auth(), 5)
        try:
            await asyncio.sleep(1.0)
            refused = [t.result()[:2] for t in second if t.done() and not t.exception()]
            assert not refused, f"places of waiters that hung up were not freed: {refused}"
            loop = asyncio.get_running_loop()
            put = await loop.run_in_executor(
                None, lambda: server.client.put_upload(created["content_uri"], data)
            )
            assert put.status_code == 200, put.text
            return list(await asyncio.wait_for(asyncio.gather(*second), 60))
        finally:
            for task in second:
                task.cancel()
            await session.close()

    answers = asyncio.run(scenario())
    assert [(s, b) for s, b, _ in answers] == [(200, data)] * 5


def test_a_wait_that_times_out_is_a_whole_504(server: Server) -> None:
    created = server.client.create()
    path = mxc_path(created["content_uri"])
    response = requests.get(
        f"{server.base_url}/_matrix/client/v1/media/download/{path}?timeout_ms=300",
        headers=server.auth(),
        timeout=15,
    )
    assert response.headers["Content-Type"].startswith("application/json")
    assert_matrix_error(response.status_code, response.content, 504, "M_NOT_YET_UPLOADED")


# ---------------------------------------------------------------------------- workers


# ---------------------------------------------------------------------------- every core


def test_keep_alive_connections_crowded_on_one_worker_spread_over_both(server: Server) -> None:
    """Twelve keep-alive connections all accepted by one worker (the other is stopped
    while they connect): the crowded worker closes connections after answers
    (``Connection: close``) until each worker holds at most the mean + 1."""
    import http.client

    import psutil

    workers = psutil.Process(server.process.pid).children()
    assert len(workers) == 2
    stopped = workers[0]
    stopped.suspend()
    try:
        clients = [
            http.client.HTTPConnection("127.0.0.1", server.port, timeout=10) for _ in range(12)
        ]
        for client in clients:
            client.connect()
        wait_until(
            lambda: (
                sorted(connections_per_worker(server.process.pid, server.port).values()) == [0, 12]
            ),
            10,
            "one worker",
        )
    finally:
        stopped.resume()
    closes = 0
    try:
        for _ in range(100):
            closed = 0
            for client in clients:
                client.request("GET", "/_matrix/client/versions")
                response = client.getresponse()
                response.read()
                assert response.status == 200
                if (response.getheader("connection") or "").lower() == "close":
                    client.close()
                    client.connect()
                    closed += 1
            closes += closed
            if closes and not closed:
                break
        held = list(connections_per_worker(server.process.pid, server.port).values())
        assert sum(held) == 12 and max(held) <= 7, (held, closes)
        assert closes >= 5, closes
    finally:
        for client in clients:
            client.close()


def test_exactly_one_worker_runs_the_periodic_sweeps(server: Server) -> None:
    wait_until(lambda: PERIODIC_LINE in server.log_text(), 20, "a worker to take the lock")
    log = server.log_text()
    assert log.count("Booting worker with pid") == 2
    assert log.count(PERIODIC_LINE) == 1, [
        line for line in log.splitlines() if PERIODIC_LINE in line
    ]
    # And the lock is really held by the server (this process cannot take it).
    with open(server.data_dir / "periodic.lock", "a") as handle, pytest.raises(BlockingIOError):
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_the_server_logged_no_traceback(server: Server) -> None:
    """Last: nothing above made a worker log an unhandled error."""
    log = server.log_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:4000]
    assert not re.search(r"Worker \(pid:\d+\) was sent", log), log[-3000:]
