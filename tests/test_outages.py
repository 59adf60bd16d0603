"""A service this server depends on fails under a request (the database restarts, the
cache or broker goes away, the storage stops mid-read, the spool directory cannot be
written): the client hears a Matrix 503 it may retry, never a 500, and the failure of
one answer is not the failure of the others answered with it (bench/soak.py found each)."""

from __future__ import annotations

import asyncio
import tempfile
from typing import Any

import kombu.exceptions
import pytest
import redis.exceptions
from django.db import InterfaceError, OperationalError

from msc3870 import admission, uploads
from msc3870.asgi import SMALL_STREAM_BYTES, MediaASGIHandler
from msc3870.auth import token_cache
from msc3870.errors import StorageUnavailable, outage
from msc3870.models import Media, MediaState
from msc3870.stores import get_store

from .asgi_driver import call, created_path, parked_download, request, run
from .helpers import CREATE, MatrixClient, bearer, mxc_path

UNAVAILABLE = {"errcode": "M_UNKNOWN", "error": "Service temporarily unavailable"}
STORAGE_UNAVAILABLE = {"errcode": "M_UNKNOWN", "error": "Media storage is unavailable"}


@pytest.mark.parametrize(
    "failure",
    [
        OperationalError("connection to server at 127.0.0.1 failed: Connection refused"),
        InterfaceError("connection already closed"),
        redis.exceptions.ConnectionError("Connection closed by server."),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
        kombu.exceptions.OperationalError("Error 111 connecting to 127.0.0.1:6379."),
    ],
    ids=type,
)
def test_a_service_outage_under_a_view_is_a_503_that_names_nothing(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    def down(*args: Any, **kwargs: Any) -> Any:
        raise failure

    monkeypatch.setattr(uploads, "create_media", down)
    response = alice.post(CREATE)
    assert response.status_code == 503
    assert response.json() == UNAVAILABLE
    assert "127.0.0.1" not in response.content.decode()


def test_a_database_outage_checking_an_uploads_token_is_a_503(
    app: MediaASGIHandler, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload's access token is resolved before its body is read, outside the views."""

    def down(*args: Any) -> Any:
        raise OperationalError("the database system is shutting down")

    async def scenario() -> None:
        path = await created_path(app, token)
        token_cache.clear()  # resolved on a thread, where the database is asked
        monkeypatch.setattr(admission, "resolved_verdict", down)
        reply = await call(
            app, "PUT", f"/_matrix/media/v3/upload/{path}", body=b"hi", headers=bearer(token)
        )
        assert reply.status == 503
        assert reply.json() == UNAVAILABLE

    run(scenario)


def test_a_bug_is_still_a_500() -> None:
    assert outage(ValueError("not a service")) is None
    assert outage(ConnectionError("a socket of our own")) is None


def failing_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every read of the store fails as the S3 store's does when the storage is gone."""

    def gone(*args: Any, **kwargs: Any) -> Any:
        raise StorageUnavailable()
        yield b""  # a generator, as the real one: it fails on its first chunk

    monkeypatch.setattr(type(get_store()), "iter_bytes", gone)


def test_a_storage_failure_reading_a_small_download_is_a_503(
    app: MediaASGIHandler, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        uploaded = await call(
            app, "POST", "/_matrix/media/v3/upload", body=b"hi", headers=bearer(token)
        )
        assert uploaded.status == 200, uploaded.body
        path = mxc_path(uploaded.json()["content_uri"])
        failing_reads(monkeypatch)
        reply = await call(
            app, "GET", f"/_matrix/client/v1/media/download/{path}", headers=bearer(token)
        )
        assert reply.status == 503
        assert reply.json() == STORAGE_UNAVAILABLE

    run(scenario)


def test_a_storage_failure_at_the_start_of_a_large_download_is_a_503(
    app: MediaASGIHandler, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the size read whole before answering, the body is streamed: its first read is
    still made before the status line, so a storage that is down is a 503, not a 200
    whose body never comes."""

    async def scenario() -> None:
        body = b"x" * (SMALL_STREAM_BYTES + 1)
        uploaded = await call(
            app, "POST", "/_matrix/media/v3/upload", body=body, headers=bearer(token)
        )
        assert uploaded.status == 200, uploaded.body
        path = mxc_path(uploaded.json()["content_uri"])
        whole = await call(
            app, "GET", f"/_matrix/client/v1/media/download/{path}", headers=bearer(token)
        )
        assert (whole.status, whole.body) == (200, body)
        failing_reads(monkeypatch)
        reply = await call(
            app, "GET", f"/_matrix/client/v1/media/download/{path}", headers=bearer(token)
        )
        assert reply.status == 503
        assert reply.json() == STORAGE_UNAVAILABLE

    run(scenario)


def test_a_storage_failure_answering_parked_downloads_is_a_503_for_each(
    app: MediaASGIHandler, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiters woken together are answered in one batch: one failed read answers each of
    them 503, and leaves no exception behind on the loop."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        unretrieved: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
        path = await created_path(app, token)
        waiters = [await parked_download(app, path, bearer(token)) for _ in range(2)]
        failing_reads(monkeypatch)
        put = await call(
            app, "PUT", f"/_matrix/media/v3/upload/{path}", body=b"hi", headers=bearer(token)
        )
        assert put.status == 200, put.body
        replies = [await waiter.reply() for waiter in waiters]
        assert [(r.status, r.json()) for r in replies] == [(503, STORAGE_UNAVAILABLE)] * 2
        await asyncio.sleep(0.1)
        assert unretrieved == []

    run(scenario)


def test_an_unwritable_spool_refuses_a_spooled_body_with_a_503_and_uploads_stream_on(
    app: MediaASGIHandler, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large body that is not an upload (here a POST to the PUT route, answered by its
    view after the body) goes to a temporary file: when none can be made (the disk is full
    or read-only), it is refused with a 503, the rest unread. An upload streams to the
    store and needs no temporary file: it goes on."""

    class Unwritable(tempfile.SpooledTemporaryFile):  # type: ignore[type-arg]
        def rollover(self) -> None:
            raise PermissionError(1, "Operation not permitted")

    async def scenario() -> None:
        path = await created_path(app, token)
        monkeypatch.setattr(tempfile, "SpooledTemporaryFile", Unwritable)
        chunks = [b"x" * 512 * 1024] * 4
        reply = await request(
            app, "POST", f"/_matrix/media/v3/upload/{path}", chunks=chunks, headers=bearer(token)
        ).reply()
        assert reply.status == 503
        assert reply.json() == UNAVAILABLE
        assert reply.headers.get("connection") == "close"
        media_id = path.split("/")[1]
        state = await asyncio.to_thread(lambda: Media.objects.get(media_id=media_id).state)
        assert state == MediaState.PENDING

        put = await request(
            app, "PUT", f"/_matrix/media/v3/upload/{path}", chunks=chunks, headers=bearer(token)
        ).reply()
        assert put.status == 200, put.body
        media = await asyncio.to_thread(lambda: Media.objects.get(media_id=media_id))
        assert (media.state, media.size) == (MediaState.COMPLETE, 2 * 1024 * 1024)

    run(scenario)
