"""What fetching other servers' media may cost, and what clients hear of it: the byte
rate per requester, the bound on fetches in flight, and outbound errors that never reach
clients. (Unauthenticated reads never fetch: ``test_remote_media``.)

Other servers are real servers on 127.0.0.1 (the ``remote`` fixture); nothing
here connects anywhere else."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from msc3870.federation import remote_media
from msc3870.models import Media, MediaState, UploadMethod

from .asgi_driver import parked, request, run, until
from .federation_helpers import Remote, multipart_file
from .helpers import (
    V1_DOWNLOAD,
    MatrixClient,
    make_token,
    media_row,
    msc3870_settings,
    png_bytes,
)

pytestmark = pytest.mark.usefixtures("fetching_remote_media")
S = MediaState


def level_of(user_id: str) -> float:
    bucket = remote_media.download_bucket()
    assert bucket is not None
    return bucket.level(remote_media.bucket_key(user_id))


def framed_size(body: bytes, content_type: str) -> int:
    """Bytes the fake server sends for one file (the multipart framing included)."""
    return len(multipart_file(body, content_type)[0])


# --- 1. a byte rate per requester ---------------------------------------------------


@pytest.fixture
def slow_bucket() -> Iterator[None]:
    # Drains a byte a second: what the test fetched stays in the bucket while it runs
    # (less a byte per second it takes, allowed for below).
    with msc3870_settings(
        REMOTE_MEDIA_DOWNLOAD_PER_SECOND=1, REMOTE_MEDIA_DOWNLOAD_BURST_COUNT=10_000
    ):
        yield


def test_fetched_bytes_are_charged_and_a_full_bucket_is_429_before_fetching(
    alice: MatrixClient, bob: MatrixClient, remote: Remote, slow_bucket: None
) -> None:
    for name in ("one", "two", "three"):
        remote.files[name] = (name.encode() * 2000, "application/octet-stream")
    sent = framed_size(b"one" * 2000, "application/octet-stream")

    assert alice.get(V1_DOWNLOAD + f"{remote.name}/one").status_code == 200
    # Under the burst still: the next fetch starts, and fills the bucket past it.
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/two").status_code == 200

    refused = alice.get(V1_DOWNLOAD + f"{remote.name}/three")
    assert refused.status_code == 429
    body = refused.json()
    assert body["errcode"] == "M_LIMIT_EXCEEDED"
    assert body["retry_after_ms"] > 0
    assert int(refused["Retry-After"]) == max(1, -(-body["retry_after_ms"] // 1000))
    # Charged the bytes read, framing included (less what drained meanwhile).
    assert 2 * sent - 60 <= level_of(alice.user_id) <= 2 * sent
    # Refused before any fetch started: no row, no request to the other server.
    assert not Media.objects.filter(server_name=remote.name, media_id="three").exists()
    assert remote.fed_hits() == 2

    # Media already held costs nothing, even with a full bucket.
    level = level_of(alice.user_id)
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/one").status_code == 200
    assert level_of(alice.user_id) <= level
    # Another user has a bucket of their own.
    assert bob.get(V1_DOWNLOAD + f"{remote.name}/three").status_code == 200
    assert remote.fed_hits() == 3


def test_a_failed_fetch_is_charged_what_it_read(
    alice: MatrixClient, remote: Remote, slow_bucket: None
) -> None:
    error = b'{"errcode":"M_NOT_FOUND","error":"' + b"n" * 3000 + b'"}'

    def federation(handler: Any) -> None:
        from .federation_helpers import send

        send(handler, 404, error)

    remote.routes["federation"] = federation
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/missing").status_code == 404
    assert len(error) - 60 <= level_of(alice.user_id) <= len(error)


def test_waiters_on_a_fetch_another_user_started_are_not_charged(
    app: Any, remote: Remote, slow_bucket: None
) -> None:
    image = png_bytes(30, 30)
    remote.files["shared"] = (image, "image/png")
    remote.gate = threading.Event()
    starter = {"Authorization": f"Bearer {make_token('@starter:localhost')}"}
    waiter = {"Authorization": f"Bearer {make_token('@waiter:localhost')}"}

    async def scenario() -> None:
        first = request(app, "GET", V1_DOWNLOAD + f"{remote.name}/shared", headers=starter)
        await until(lambda: remote.fed_hits() == 1, "the fetch")
        second = request(app, "GET", V1_DOWNLOAD + f"{remote.name}/shared", headers=waiter)
        await until(lambda: parked() == 2, "both parked")
        assert remote.gate is not None
        remote.gate.set()
        replies = await asyncio.gather(first.reply(), second.reply())
        assert [r.status for r in replies] == [200, 200]
        # The slot comes back when the fetch's thread is done, which may be just after
        # the waiters were answered (they wake on the row's last change).
        await until(lambda: remote_media._pool.admitted == 0, "the fetch thread's slot back")

    run(scenario)
    assert level_of("@starter:localhost") >= framed_size(image, "image/png") - 60
    assert level_of("@waiter:localhost") == 0


def test_the_rate_is_off_when_per_second_is_none(alice: MatrixClient, remote: Remote) -> None:
    remote.files["a"] = (b"a" * 5000, "text/plain")
    remote.files["b"] = (b"b" * 5000, "text/plain")
    with msc3870_settings(
        REMOTE_MEDIA_DOWNLOAD_PER_SECOND=None, REMOTE_MEDIA_DOWNLOAD_BURST_COUNT=1
    ):
        assert alice.get(V1_DOWNLOAD + f"{remote.name}/a").status_code == 200
        assert alice.get(V1_DOWNLOAD + f"{remote.name}/b").status_code == 200


# --- 2. a bounded number of fetches in flight ----------------------------------------


def in_flight(server_name: str, media_id: str, *, started: Any = None) -> Media:
    """A row as a fetch in flight leaves it (PROCESSING, no bytes yet)."""
    now = timezone.now()
    return Media.objects.create(
        server_name=server_name,
        media_id=media_id,
        user_id="",
        state=S.PROCESSING,
        unused_expires_at=now,
        upload_method=UploadMethod.REMOTE,
        processing_started_at=started or now,
    )


def test_fetches_past_the_bound_are_refused_before_they_start(
    alice: MatrixClient, remote: Remote
) -> None:
    remote.files["held"] = (b"held", "text/plain")
    remote.files["new"] = (b"new", "text/plain")
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/held").status_code == 200
    busy = [in_flight("elsewhere.example", f"busy{i}") for i in range(2)]

    with msc3870_settings(REMOTE_MEDIA_MAX_FETCHES=2):
        refused = alice.get(V1_DOWNLOAD + f"{remote.name}/new")
        assert refused.status_code == 429
        assert refused.json()["errcode"] == "M_LIMIT_EXCEEDED"
        assert refused.json()["retry_after_ms"] == remote_media.FETCHES_BUSY_RETRY_MS
        assert refused["Retry-After"] == "2"
        assert not Media.objects.filter(server_name=remote.name, media_id="new").exists()
        # Held media is served: the count is made only when a fetch would start.
        assert alice.get(V1_DOWNLOAD + f"{remote.name}/held").status_code == 200
        assert remote.fed_hits() == 1

        # A fetch whose process died (abandoned) does not hold a place.
        Media.objects.filter(pk=busy[0].pk).update(
            processing_started_at=timezone.now() - timedelta(hours=1)
        )
        assert alice.get(V1_DOWNLOAD + f"{remote.name}/new").status_code == 200
    assert remote.fed_hits() == 2


def test_fetches_in_flight_are_one_indexed_count(db: None) -> None:
    for i in range(3):
        in_flight("elsewhere.example", f"f{i}")
    with (
        msc3870_settings(REMOTE_MEDIA_MAX_FETCHES=2),
        CaptureQueriesContext(connection) as queries,
    ):
        assert remote_media.fetches_in_flight() == 2  # counted up to the bound
    (query,) = queries.captured_queries
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("EXPLAIN QUERY PLAN " + query["sql"])
            plan = " ".join(str(line) for line in cursor.fetchall())
        assert "msc3870_remote_state_access" in plan


def test_the_in_process_fetch_pool_admits_a_bounded_number(
    alice: MatrixClient, remote: Remote, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = remote_media._FetchPool()
    assert all(pool.reserve() for _ in range(remote_media.FETCH_SLOTS))
    assert not pool.reserve()
    pool.release()
    assert pool.reserve()

    # A process whose slots are all taken answers 429 before inserting a row.
    monkeypatch.setattr(remote_media, "_pool", pool)
    remote.files["x"] = (b"x", "text/plain")
    refused = alice.get(V1_DOWNLOAD + f"{remote.name}/x")
    assert refused.status_code == 429
    assert refused.json()["errcode"] == "M_LIMIT_EXCEEDED"
    assert not Media.objects.filter(server_name=remote.name).exists()
    assert remote.fed_hits() == 0
    pool.release()
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/x").status_code == 200
    assert pool.admitted == remote_media.FETCH_SLOTS - 1  # its slot came back


def test_a_slot_is_given_back_when_another_request_claimed_the_row(
    db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = remote_media._FetchPool()
    monkeypatch.setattr(remote_media, "_pool", pool)
    in_flight("elsewhere.example", "taken")
    # Read as missing, then the insert loses to the row above.
    assert remote_media._claim("elsewhere.example", "taken", "@alice:localhost") is not None
    assert pool.admitted == 0


# --- 3. outbound errors never reach clients ---------------------------------------------


def _assert_tells_nothing(body: bytes, port: int) -> None:
    text = body.decode()
    for secret in ("127.0.0.1", "localhost", str(port), "http", "://", "/_matrix", "Refused"):
        assert secret not in text, (secret, text)
    for words in ("urllib3", "Connection", "Error", "closed", "aborted", "Remote end"):
        assert words not in text, (words, text)


def test_a_server_name_on_a_denied_address_is_not_told_to_clients(
    alice: MatrixClient, remote: Remote
) -> None:
    # "localhost:<port>" resolves to a loopback address: refused by the address guard
    # before a connection is made (the listening socket never sees one).
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        name = f"localhost:{port}"
        with msc3870_settings(FEDERATION_IP_RANGE_ALLOWLIST=[]):
            response = alice.get(V1_DOWNLOAD + f"{name}/x")
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()

    assert response.status_code == 502
    assert response.json() == {"errcode": "M_UNKNOWN", "error": "Could not fetch remote media"}
    _assert_tells_nothing(response.content, port)
    media = media_row(name, "x")
    assert "127.0.0.1" in media.last_error and "may not reach" in media.last_error
    assert media.rejection_reason == "Could not fetch remote media"
    # The answer given from the row afterwards tells no more.
    again = alice.get(V1_DOWNLOAD + f"{name}/x")
    assert again.status_code == 502
    _assert_tells_nothing(again.content, port)


def test_a_server_that_closes_the_connection_is_not_told_to_clients(
    alice: MatrixClient,
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    stop = threading.Event()

    def close_each() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted, _ = listener.accept()
            except TimeoutError:
                continue
            accepted.close()

    thread = threading.Thread(target=close_each, daemon=True)
    thread.start()
    try:
        response = alice.get(V1_DOWNLOAD + f"127.0.0.1:{port}/x")
    finally:
        stop.set()
        thread.join(5)
        listener.close()

    assert response.status_code == 502
    assert response.json() == {"errcode": "M_UNKNOWN", "error": "Could not fetch remote media"}
    _assert_tells_nothing(response.content, port)
    assert str(port) in media_row(f"127.0.0.1:{port}", "x").last_error
