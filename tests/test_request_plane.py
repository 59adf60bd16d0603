"""The request plane (msc3870.asgi, msc3870.wakeup): waits held on the event loop, caps,
bodies refused before they are read, query budgets of the hot path."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from msc3870 import wakeup
from msc3870.asgi import MediaASGIHandler
from msc3870.models import AccessToken, Media, MediaState

from .asgi_driver import Reply, call, created_path, parked, parked_download, request, run, until
from .helpers import MatrixClient, bearer, data_queries, make_token, msc3870_settings, mxc_path

S = MediaState


# ------------------------------------------------------------------ query budgets


def test_create_costs_at_most_2_queries(alice: MatrixClient) -> None:
    """The user's lock (PostgreSQL only) and one INSERT that counts the user's pending ids
    in the same statement."""
    alice.create()  # the token is resolved (and cached) once
    with CaptureQueriesContext(connection) as captured:
        alice.create()
    assert len(data_queries(captured)) <= 2, data_queries(captured)


def test_put_of_a_small_file_with_screening_costs_at_most_3_queries(alice: MatrixClient) -> None:
    alice.create()
    path = mxc_path(alice.create()["content_uri"])
    with CaptureQueriesContext(connection) as captured:
        response = alice.put(f"/_matrix/media/v3/upload/{path}", os.urandom(1024))
    assert response.status_code == 200, response.content
    queries = data_queries(captured)
    # The row read, the dedup look-up, and one UPDATE that records the bytes with the
    # verdict; only that UPDATE writes.
    assert len(queries) <= 3, queries
    assert [q.split()[0] for q in queries if not q.startswith("SELECT")] == ["UPDATE"], queries
    assert Media.objects.get(media_id=path.split("/")[1]).state == S.COMPLETE  # screened


def test_download_of_complete_media_costs_at_most_2_queries(alice: MatrixClient) -> None:
    path = mxc_path(alice.create()["content_uri"])
    alice.put(f"/_matrix/media/v3/upload/{path}", b"some bytes")
    with CaptureQueriesContext(connection) as captured:
        response = alice.get(f"/_matrix/client/v1/media/download/{path}")
        body = b"".join(response.streaming_content)
    assert response.status_code == 200
    assert body == b"some bytes"
    assert len(data_queries(captured)) <= 2, data_queries(captured)


# ------------------------------------------------------------------ token cache


def test_revoked_token_stops_working_once_its_cache_entry_expires(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert alice.get("/_matrix/client/v1/media/config").status_code == 200
    AccessToken.objects.update(revoked=True)
    # Within TOKEN_CACHE_SECONDS the process still trusts what it resolved...
    assert alice.get("/_matrix/client/v1/media/config").status_code == 200
    # ...and not after.
    import msc3870.auth

    later = msc3870.auth.time.monotonic() + 11
    monkeypatch.setattr(msc3870.auth.time, "monotonic", lambda: later)
    response = alice.get("/_matrix/client/v1/media/config")
    assert response.status_code == 401
    assert response.json()["errcode"] == "M_UNKNOWN_TOKEN"


def test_token_cache_can_be_turned_off(alice: MatrixClient) -> None:
    with msc3870_settings(TOKEN_CACHE_SECONDS=0):
        assert alice.get("/_matrix/client/v1/media/config").status_code == 200
        AccessToken.objects.update(revoked=True)
        assert alice.get("/_matrix/client/v1/media/config").status_code == 401


# ------------------------------------------------------------------ the ASGI handler


def test_waiting_downloads_hold_no_thread_and_all_get_the_bytes(
    app: MediaASGIHandler, token: str
) -> None:
    """50 waiters on a handler with 2 threads: other requests still answer, and one
    upload answers every waiter."""

    async def scenario() -> None:
        path = await created_path(app, token)
        url = f"/_matrix/client/v1/media/download/{path}?timeout_ms=30000"
        waiters = [request(app, "GET", url, headers=bearer(token)) for _ in range(50)]
        await until(lambda: parked() == 50, "50 parked waiters")
        versions = await call(app, "GET", "/_matrix/client/versions")
        assert versions.status == 200
        data = os.urandom(4096)
        put = await call(
            app, "PUT", f"/_matrix/media/v3/upload/{path}", body=data, headers=bearer(token)
        )
        assert put.status == 200, put.body
        replies = [await w.reply() for w in waiters]
        assert {r.status for r in replies} == {200}
        assert all(r.body == data for r in replies)
        assert parked() == 0

    run(scenario)


def test_a_change_made_elsewhere_wakes_waiters_through_the_poll(
    app: MediaASGIHandler, token: str
) -> None:
    """A change this process did not make (another process, a worker) and was not told
    of: the batched poll finds it."""

    async def scenario() -> None:
        path = await created_path(app, token)
        waiter = await parked_download(app, path, bearer(token))
        media_id = path.split("/")[1]
        await asyncio.to_thread(
            lambda: Media.objects.filter(media_id=media_id).update(state=S.EXPIRED)
        )
        reply = await waiter.reply()
        assert reply.status == 404
        assert reply.json()["errcode"] == "M_NOT_FOUND"
        assert wakeup.current_hub().polls >= 1  # type: ignore[union-attr]

    run(scenario)


def test_a_lost_notification_is_recovered_by_the_safety_poll(
    app: MediaASGIHandler, token: str
) -> None:
    """With a push source connected, the poll runs at the slow safety interval and still
    finds a change whose notification never came."""

    async def scenario() -> None:
        path = await created_path(app, token)
        waiter = await parked_download(app, path, bearer(token))
        hub = wakeup.current_hub()
        assert hub is not None
        hub.listening = True  # as if LISTEN were connected: only the safety poll runs
        # Lose every notification but the poll's own (on PostgreSQL the real LISTEN would
        # hear the change).
        polling, real_notify, real_poll = [False], hub.notify, hub.poll_once

        async def poll_once() -> None:
            polling[0] = True
            try:
                await real_poll()
            finally:
                polling[0] = False

        def notify(pk: int, state: str) -> None:
            if polling[0]:
                real_notify(pk, state)

        hub.poll_once = poll_once  # type: ignore[method-assign]
        hub.notify = notify  # type: ignore[method-assign]
        polls_before = hub.polls
        media_id = path.split("/")[1]
        await asyncio.to_thread(
            lambda: Media.objects.filter(media_id=media_id).update(state=S.EXPIRED)
        )
        reply = await waiter.reply()
        assert reply.status == 404
        assert hub.polls > polls_before

    with msc3870_settings(WAKEUP_SAFETY_POLL_SECONDS=0.2):
        run(scenario)


def test_waiting_ends_at_the_deadline_with_504(app: MediaASGIHandler, token: str) -> None:
    async def scenario() -> Reply:
        path = await created_path(app, token)
        return await call(
            app,
            "GET",
            f"/_matrix/client/v1/media/download/{path}?timeout_ms=200",
            headers=bearer(token),
        )

    reply = run(scenario)
    assert reply.status == 504
    assert reply.json()["errcode"] == "M_NOT_YET_UPLOADED"
    assert parked() == 0


def test_waiters_past_the_per_media_cap_get_429_at_once(app: MediaASGIHandler, token: str) -> None:
    async def scenario() -> None:
        path = await created_path(app, token)
        url = f"/_matrix/client/v1/media/download/{path}?timeout_ms=30000"
        first = [request(app, "GET", url, headers=bearer(token)) for _ in range(3)]
        await until(lambda: parked() == 3, "3 parked waiters")
        refused = await call(app, "GET", url, headers=bearer(token))
        assert refused.status == 429
        assert refused.json()["errcode"] == "M_LIMIT_EXCEEDED"
        assert refused.json()["retry_after_ms"] > 0
        assert refused.headers["retry-after"] == "1"
        for waiter in first:
            waiter.hang_up.set()
        await until(lambda: parked() == 0, "hung-up waiters released")
        assert app.caps.total == 0 and not app.caps.per_media

    with msc3870_settings(WAIT_MAX_WAITERS_PER_MEDIA=3):
        run(scenario)


def test_unauthenticated_waits_have_their_own_lower_cap(app: MediaASGIHandler, token: str) -> None:
    async def scenario() -> None:
        path = await created_path(app, token)
        legacy = f"/_matrix/media/v3/download/{path}?timeout_ms=30000"
        parked_legacy = [request(app, "GET", legacy) for _ in range(2)]
        await until(lambda: parked() == 2, "2 parked legacy waiters")
        assert (await call(app, "GET", legacy)).status == 429
        # Authenticated clients are not refused because of them.
        authed = request(
            app,
            "GET",
            f"/_matrix/client/v1/media/download/{path}?timeout_ms=30000",
            headers=bearer(token),
        )
        await until(lambda: parked() == 3, "an authenticated waiter parked too")
        for waiter in [*parked_legacy, authed]:
            waiter.hang_up.set()
        await until(lambda: parked() == 0, "all released")

    with msc3870_settings(LEGACY_WAIT_MAX_WAITERS=2):
        run(scenario)


def test_legacy_waits_are_capped_in_time(token: str, app: MediaASGIHandler) -> None:
    async def scenario() -> Reply:
        path = await created_path(app, token)
        return await call(app, "GET", f"/_matrix/media/v3/download/{path}?timeout_ms=60000")

    with msc3870_settings(LEGACY_DOWNLOAD_TIMEOUT_MS_MAX=300):
        reply = run(scenario)
    assert reply.status == 504


def test_complete_waits_on_the_loop_for_screening_done_elsewhere(
    app: MediaASGIHandler, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a broker the checks run in a worker: where /complete waits for their verdict
    (COMPLETE_WAITS_FOR_CHECKS), it parks until they decide."""
    from msc3870 import verdicts

    monkeypatch.setattr(verdicts, "dispatch", lambda media, **options: None)

    async def scenario() -> None:
        created = await call(app, "POST", "/_matrix/media/v1/create", headers=bearer(token))
        upload_url = created.json()["upload_url"]
        path = mxc_path(created.json()["content_uri"])
        put = await call(app, "PUT", upload_url.split("8008", 1)[1], body=b"hello")
        assert put.status == 200, put.body
        completing = request(
            app, "POST", f"/_matrix/media/v1/upload/{path}/complete", headers=bearer(token)
        )
        await until(lambda: parked() == 1, "/complete parked")
        media = await asyncio.to_thread(Media.objects.get, media_id=path.split("/")[1])
        outcome = await asyncio.to_thread(verdicts.screen, media.pk)
        assert outcome == "complete"
        reply = await completing.reply()
        assert reply.status == 200, reply.body
        assert reply.json() == {"content_uri": f"mxc://{path}"}

    with msc3870_settings(COMPLETE_WAITS_FOR_CHECKS=True):
        run(scenario)


def test_middleware_headers_reach_an_answer_given_after_a_wait(
    app: MediaASGIHandler, token: str
) -> None:
    async def scenario() -> Reply:
        path = await created_path(app, token)
        waiter = await parked_download(app, path, bearer(token, Origin="https://app.element.io"))
        await call(app, "PUT", f"/_matrix/media/v3/upload/{path}", body=b"x", headers=bearer(token))
        return await waiter.reply()

    reply = run(scenario)
    assert reply.status == 200
    assert reply.headers["access-control-allow-origin"] == "*"
    assert reply.headers["x-content-type-options"] == "nosniff"


# ------------------------------------------------------------------ bodies and heads


def test_declared_length_over_the_limit_is_refused_before_reading(
    app: MediaASGIHandler, token: str
) -> None:
    async def scenario() -> None:
        path = await created_path(app, token)
        exchange = request(
            app,
            "PUT",
            f"/_matrix/media/v3/upload/{path}",
            chunks=[b"x" * 1024] * 3,
            headers=bearer(token, **{"Content-Length": "2000000"}),
        )
        reply = await exchange.reply()
        assert reply.status == 413
        assert reply.json()["errcode"] == "M_TOO_LARGE"
        assert exchange.body_reads == []  # not a byte read

    with msc3870_settings(MAX_UPLOAD_SIZE=1024 * 1024):
        run(scenario)


def test_a_body_streaming_past_the_limit_is_refused(app: MediaASGIHandler, token: str) -> None:
    async def scenario() -> None:
        path = await created_path(app, token)
        reply = await call(
            app,
            "PUT",
            f"/_matrix/media/v3/upload/{path}",
            chunks=[b"x" * 600] * 4,
            headers=bearer(token),
            content_length=False,
        )
        assert reply.status == 413
        assert reply.json()["errcode"] == "M_TOO_LARGE"
        media = await asyncio.to_thread(Media.objects.get, media_id=path.split("/")[1])
        assert media.state == S.PENDING  # nothing kept: the id may be uploaded to again

    with msc3870_settings(MAX_UPLOAD_SIZE=2000):
        run(scenario)


def test_large_uploads_do_not_hold_up_small_requests(
    app: MediaASGIHandler, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies past the in-memory spool run on their own threads: with every one of them
    busy storing a large upload, a small request is still answered."""
    import threading

    from msc3870.stores.local import LocalMediaStore

    release = threading.Event()
    storing = threading.Semaphore(0)
    write_stream = LocalMediaStore.write_stream

    def slow_write_stream(self: Any, *args: Any, **kwargs: Any) -> Any:
        storing.release()
        release.wait(30)
        return write_stream(self, *args, **kwargs)

    monkeypatch.setattr(LocalMediaStore, "write_stream", slow_write_stream)
    large = os.urandom(1024 * 1024 + 1)

    async def scenario() -> None:
        paths = [await created_path(app, token) for _ in range(app.threads)]
        uploads = [
            request(
                app,
                "PUT",
                f"/_matrix/media/v3/upload/{path}",
                chunks=[large[:65536], large[65536:]],
                headers=bearer(token),
            )
            for path in paths
        ]
        for _ in paths:  # every bulk thread is now busy
            await asyncio.to_thread(storing.acquire, True, 30)
        small = await call(app, "POST", "/_matrix/media/v1/create", headers=bearer(token))
        assert small.status == 200, small.body
        release.set()
        for upload in uploads:
            assert (await upload.reply()).status == 200

    try:
        with msc3870_settings(MAX_UPLOAD_SIZE=4 * 1024 * 1024):
            run(scenario)
    finally:
        release.set()


def test_a_chunked_body_is_uploaded_whole(app: MediaASGIHandler, token: str) -> None:
    async def scenario() -> bytes:
        path = await created_path(app, token)
        put = await call(
            app,
            "PUT",
            f"/_matrix/media/v3/upload/{path}",
            chunks=[b"abc", b"def", b"ghi"],
            headers=bearer(token),
            content_length=False,
        )
        assert put.status == 200, put.body
        got = await call(
            app, "GET", f"/_matrix/client/v1/media/download/{path}", headers=bearer(token)
        )
        assert got.status == 200
        return got.body

    assert run(scenario) == b"abcdefghi"


def test_json_bodies_are_small(app: MediaASGIHandler, token: str) -> None:
    reply = run(
        lambda: call(
            app, "POST", "/_matrix/media/v1/create", body=b" " * 70_000, headers=bearer(token)
        )
    )
    assert reply.status == 413


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/_matrix/client/versions?" + "a" * 9000, {}, 414),
        ("/_matrix/client/versions", {"X-Big": "b" * 40_000}, 431),
    ],
)
def test_overlong_heads_get_matrix_errors(
    app: MediaASGIHandler, path: str, headers: dict[str, str], status: int
) -> None:
    reply = run(lambda: call(app, "GET", path, headers=headers))
    assert reply.status == status
    assert reply.json()["errcode"] == "M_UNKNOWN"


def test_matrix_requests_skip_the_admin_middleware(app: MediaASGIHandler) -> None:
    matrix = run(lambda: call(app, "GET", "/_matrix/client/versions"))
    admin = run(lambda: call(app, "GET", "/admin/login/"))
    assert "x-frame-options" not in matrix.headers  # clickjacking middleware: admin only
    assert admin.headers.get("x-frame-options") == "DENY"
    assert "csrftoken" in admin.headers.get("set-cookie", "")


def test_a_waiter_that_hangs_up_is_released(app: MediaASGIHandler, token: str) -> None:
    async def scenario() -> Reply:
        path = await created_path(app, token)
        exchange = await parked_download(app, path, bearer(token))
        exchange.hang_up.set()
        return await exchange.reply()

    reply = run(scenario)
    assert reply.status == 0  # nothing sent to a client that is gone
    assert parked() == 0
    assert app.caps.total == 0


def test_an_id_expiring_while_waited_on_answers_404_at_its_expiry(
    app: MediaASGIHandler, token: str
) -> None:
    async def scenario() -> Reply:
        path = await created_path(app, token)
        soon = timezone.now() + timezone.timedelta(milliseconds=300)
        await asyncio.to_thread(
            lambda: Media.objects.filter(media_id=path.split("/")[1]).update(unused_expires_at=soon)
        )
        return await call(
            app,
            "GET",
            f"/_matrix/client/v1/media/download/{path}?timeout_ms=30000",
            headers=bearer(token),
        )

    reply = run(scenario)
    assert reply.status == 404


def test_an_answer_after_a_wait_has_its_own_length(app: MediaASGIHandler, token: str) -> None:
    """The placeholder's Content-Length (added by the middleware) must not describe the
    final answer: a 429 past a cap, a 404, the bytes."""

    async def scenario() -> list[Reply]:
        path = await created_path(app, token)
        url = f"/_matrix/client/v1/media/download/{path}?timeout_ms=30000"
        first = request(app, "GET", url, headers=bearer(token))
        await until(lambda: parked() == 1, "a parked waiter")
        refused = await call(app, "GET", url, headers=bearer(token))
        media_id = path.split("/")[1]
        await asyncio.to_thread(
            lambda: Media.objects.filter(media_id=media_id).update(state=S.EXPIRED)
        )
        return [refused, await first.reply()]

    with msc3870_settings(WAIT_MAX_WAITERS_PER_MEDIA=1):
        replies = run(scenario)
    assert [r.status for r in replies] == [429, 404]
    for reply in replies:
        assert int(reply.headers["content-length"]) == len(reply.body)
        assert reply.json()["errcode"]


def test_a_failure_outside_the_view_is_still_a_matrix_error(
    app: MediaASGIHandler, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bytes of a small download are read after the view (on the pool thread, by the
    handler): if that fails, the client gets M_UNKNOWN 500 in JSON, not the server's
    plain-text page."""
    from msc3870.stores.local import LocalMediaStore

    async def scenario() -> Reply:
        path = await created_path(app, token)
        await call(app, "PUT", f"/_matrix/media/v3/upload/{path}", body=b"x", headers=bearer(token))

        def broken(*args: Any, **kwargs: Any) -> Iterator[bytes]:
            raise OSError("disk gone")
            yield b""

        monkeypatch.setattr(LocalMediaStore, "iter_bytes", broken)
        return await call(
            app, "GET", f"/_matrix/client/v1/media/download/{path}", headers=bearer(token)
        )

    reply = run(scenario)
    assert reply.status == 500
    assert reply.json()["errcode"] == "M_UNKNOWN"


def test_one_requester_cannot_take_every_waiting_slot(app: MediaASGIHandler, token: str) -> None:
    other = make_token("@bob:localhost")

    async def scenario() -> None:
        path = await created_path(app, token)
        url = f"/_matrix/client/v1/media/download/{path}?timeout_ms=30000"
        mine = [request(app, "GET", url, headers=bearer(token)) for _ in range(2)]
        await until(lambda: parked() == 2, "2 parked waiters")
        refused = await call(app, "GET", url, headers=bearer(token))
        assert refused.status == 429
        assert refused.json()["errcode"] == "M_LIMIT_EXCEEDED"
        theirs = request(app, "GET", url, headers=bearer(other))
        await until(lambda: parked() == 3, "another user's waiter parked")
        for waiter in [*mine, theirs]:
            waiter.hang_up.set()
        await until(lambda: parked() == 0, "all released")
        assert app.caps.total == 0 and not app.caps.per_requester

    with msc3870_settings(WAIT_MAX_WAITERS_PER_REQUESTER=2):
        run(scenario)


def test_an_upload_resolves_its_route_once(
    app: MediaASGIHandler, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its credential is checked from the route before the body is read; the view is
    found from that same route, not resolved again."""
    from django.urls.resolvers import URLResolver

    async def scenario() -> None:
        path = await created_path(app, token)
        resolved: list[str] = []
        real = URLResolver.resolve

        def counting(self: URLResolver, path_info: str) -> Any:
            resolved.append(path_info)
            return real(self, path_info)

        monkeypatch.setattr(URLResolver, "resolve", counting)
        put = await call(
            app, "PUT", f"/_matrix/media/v3/upload/{path}", body=b"x" * 10, headers=bearer(token)
        )
        monkeypatch.setattr(URLResolver, "resolve", real)
        assert put.status == 200, put.body
        top_level = [p for p in resolved if p.startswith("/_matrix/media/v3/upload/")]
        assert len(top_level) == 1, resolved

    run(scenario)
