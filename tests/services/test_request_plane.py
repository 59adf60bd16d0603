"""The request plane on real processes: downloads waiting on pending media are
parked on each web worker's wake-up hub, and woken by a change made anywhere.

The servers run two uvicorn workers (WEB_CONCURRENCY=2) on PostgreSQL. Which worker
holds which waiting connection is read from the workers' sockets (psutil), so "woken in
the other worker" is checked, not assumed. Every wait has a bound: a waiter that is never
woken fails the test at the client's timeout, well before its own ``timeout_ms``.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any

import pytest
import requests
from django.db import connection

from msc3870.models import MediaState

from ..helpers import bearer, media_of, mxc_path
from .conftest import Stack, make_user_token
from .helpers import CLIENT_TIMEOUT, Answer, Waiters, park, results

pytestmark = pytest.mark.services

WAIT_MS = 60_000
TRIGGER = "msc3870_media_state_notify"


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
    response = stack.client(token).put_upload(content_uri, data)
    assert response.status_code == 200, response.text


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
    two_workers: Stack, make_stack: Any, waiters: Waiters, user_token: tuple[str, str]
) -> None:
    """No broker on this server: the PUT's own worker screens and completes the media.
    Waiters on both of its workers, and on another server, all get the bytes."""
    _, token = user_token
    inline = make_stack(CELERY_BROKER_URL="")  # tasks in-process: the web worker completes
    inline.start_server(workers=2)
    created = inline.client(token).create()
    content_uri = created["content_uri"]
    here = park(waiters, inline, download_url(inline, content_uri), bearer(token), 40)
    there = park(
        waiters,
        two_workers,
        download_url(two_workers, content_uri),
        bearer(token),
        10,
        spread=False,
    )
    data = os.urandom(5000)
    put_through_server(inline, token, content_uri, data)
    assert_all_got(results(here), data)
    assert_all_got(results(there), data)
    assert media_of(content_uri).state == MediaState.COMPLETE


def test_a_completion_by_the_celery_worker_wakes_every_waiter(
    two_workers: Stack, waiters: Waiters, user_token: tuple[str, str]
) -> None:
    """Upload to the URL, then /complete: the celery worker screens and completes; its
    NOTIFY wakes the waiters of both web workers (and /complete's own wait)."""
    _, token = user_token
    created = two_workers.client(token).create()
    content_uri = created["content_uri"]
    data = os.urandom(7000)
    put = two_workers.client(token).put_to_url(created["upload_url"], data)
    assert put.status_code == 200, put.text
    parked = park(waiters, two_workers, download_url(two_workers, content_uri), bearer(token), 40)
    done = two_workers.client(token).complete(content_uri)
    assert done.status_code == 200, done.text
    assert_all_got(results(parked), data)
    assert "msc3870.screen_media" in two_workers.tail("worker", 400)
    assert media_of(content_uri).state == MediaState.COMPLETE


def set_trigger(enabled: bool) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SET lock_timeout = '10s'")
        cursor.execute(
            f"ALTER TABLE msc3870_media {'ENABLE' if enabled else 'DISABLE'} TRIGGER {TRIGGER}"
        )
        cursor.execute("RESET lock_timeout")


def test_a_lost_notification_is_recovered_by_the_safety_poll(
    two_workers: Stack, waiters: Waiters, user_token: tuple[str, str]
) -> None:
    """With the NOTIFY trigger off, the changes made by /complete's worker and by the
    celery worker are never heard by the other web worker: only its safety poll can wake
    its waiters, and it does, long before their 60 s wait ends."""
    _, token = user_token
    created = two_workers.client(token).create()
    content_uri = created["content_uri"]
    data = os.urandom(3000)
    put = two_workers.client(token).put_to_url(created["upload_url"], data)
    assert put.status_code == 200, put.text
    parked = park(waiters, two_workers, download_url(two_workers, content_uri), bearer(token), 30)
    set_trigger(False)
    try:
        done = two_workers.client(token).complete(content_uri)
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
    created = polling.client(token).create()
    content_uri = created["content_uri"]
    parked = park(waiters, polling, download_url(polling, content_uri), bearer(token), 30)
    data = os.urandom(2000)
    put_through_server(polling, token, content_uri, data)
    assert_all_got(results(parked), data)


# ---------------------------------------------------------------------------- load and caps


def test_a_thousand_waiters_do_not_stop_versions(
    two_workers: Stack, waiters: Waiters, user_token: tuple[str, str]
) -> None:
    _, token = user_token
    created = two_workers.client(token).create()
    content_uri = created["content_uri"]
    # A thousand recipients of one upload are many users (one user's waiters are capped).
    url = download_url(two_workers, content_uri)
    recipients = [make_user_token() for _ in range(10)]
    parked = []
    for number, recipient in enumerate(recipients):
        last = number == len(recipients) - 1
        parked += park(waiters, two_workers, url, bearer(recipient), 100, spread=last)
    # While a thousand wait: the rest of the API answers (outcomes, not timings).
    for _ in range(10):
        versions_answers(two_workers)
    config = requests.get(
        f"{two_workers.base_url}/_matrix/client/v1/media/config", headers=bearer(token), timeout=10
    )
    assert config.status_code == 200
    other = two_workers.client(token).create()
    assert other["content_uri"] != content_uri
    assert not any(f.done() for f in parked)
    data = os.urandom(1000)
    put_through_server(two_workers, token, content_uri, data)
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
    a, b, c = (capped.client(token).create()["content_uri"] for _ in range(3))
    headers = bearer(token)
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
            problems.append(f"{cap}: 429 without a Retry-After header")
    assert not problems, problems
    assert [len(futures) for futures in parked.values()] == [3, 2, 1]
    assert not any(f.done() for futures in parked.values() for f in futures)

    data = {uri: os.urandom(500) for uri in (b, a, c)}  # b first: its waits are the shortest
    for uri, payload in data.items():
        put_through_server(capped, token, uri, payload)
    for uri, futures in parked.items():
        assert_all_got(results(futures), data[uri])
