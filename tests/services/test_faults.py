"""Faults the background side must survive, on real processes and services."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from django.db import connection
from django.utils import timezone
from kombu import Connection

from msc3870 import maintenance, moderation
from msc3870.conf import DEFAULTS
from msc3870.models import Media, MediaState

from ..helpers import EICAR, bucket_keys, media_of, wait_until
from .conftest import ROOT, PrivateRedis, Stack, s3_server
from .helpers import keys_of

pytestmark = pytest.mark.services
S = MediaState
RABBITMQ_URL = os.environ.get("SERVICES_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
SLOW_CHECKS = ",".join([*DEFAULTS["CHECKS"], "tests.services.slow_check.pause"])


def state_of(pk: int) -> str:
    return Media.objects.values_list("state", flat=True).get(pk=pk)


def set_stuck_sweep_every_second() -> None:
    """What an operator does in the admin: run the stuck sweep every second."""
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    from msc3870.schedule import install_default_schedule

    install_default_schedule()
    every, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.filter(task="msc3870.redispatch_stuck").update(interval=every)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_worker_killed_mid_screening(
    broker: str,
    make_stack: Any,
    private_redis: PrivateRedis,
    user_token: tuple[str, str],
    tmp_path: Path,
    s3_client: Any,
) -> None:
    """SIGKILL the worker while it screens: the media still ends up complete, and nothing
    is served before. RabbitMQ redelivers the unacknowledged task to the next worker;
    Redis keeps it until its visibility timeout, so there beat's stuck sweep re-queues it."""
    broker_url = private_redis.url if broker == "redis" else RABBITMQ_URL
    if broker == "rabbitmq":  # tasks left over from an earlier run would be redelivered
        with Connection(broker_url) as conn, contextlib.suppress(conn.channel_errors):
            conn.default_channel.queue_purge("celery")
    markers = tmp_path / "markers"
    markers.mkdir()
    stack: Stack = make_stack(
        CELERY_BROKER_URL=broker_url,
        MSC3870_CHECKS=SLOW_CHECKS,
        MSC3870_COMPLETE_WAIT_SECONDS="1",
        MSC3870_STUCK_AFTER_SECONDS="3",
    )
    stack.start_server()
    stack.start_worker("doomed", SLOW_CHECK_DIR=str(markers), SLOW_CHECK_SECONDS="120")
    _, token = user_token
    created = stack.client(token).create()
    data = os.urandom(2 * 1024 * 1024)
    assert requests.put(created["upload_url"], data=data).status_code == 200
    answer = stack.client(token).complete(created["content_uri"])
    assert answer.status_code == 200  # accepted; the checks are still running
    media = media_of(created["content_uri"])
    wait_until(lambda: (markers / media.media_id).exists(), 60, "screening to start")
    assert (
        stack.client().download(created["content_uri"], "?timeout_ms=0", legacy=True).status_code
        == 504
    )
    stack.kill("doomed")  # SIGKILL, the whole process group
    assert state_of(media.pk) == S.PROCESSING
    stack.start_worker("survivor")
    if broker == "redis":
        set_stuck_sweep_every_second()
        stack.start_beat()
    wait_until(lambda: state_of(media.pk) == S.COMPLETE, 90, "the media to complete")
    got = stack.client().download(created["content_uri"], legacy=True)
    assert got.content == data
    media.refresh_from_db()
    assert media.attempts >= 2
    assert keys_of(s3_client, media) == [media.storage_key]


def test_broker_down_at_complete(
    make_stack: Any, private_redis: PrivateRedis, user_token: tuple[str, str]
) -> None:
    """The client gets a prompt answer; once the broker is back, beat's stuck sweep gets the
    media screened with no operator action."""
    stack: Stack = make_stack(
        CELERY_BROKER_URL=private_redis.url,
        MSC3870_COMPLETE_WAIT_SECONDS="2",
        MSC3870_STUCK_AFTER_SECONDS="2",
    )
    stack.start_server()
    stack.start_worker()
    _, token = user_token
    created = stack.client(token).create()
    assert requests.put(created["upload_url"], data=b"queued later").status_code == 200
    private_redis.stop()
    started = time.monotonic()
    answer = stack.client(token).complete(created["content_uri"])
    elapsed = time.monotonic() - started
    assert answer.status_code == 200
    assert answer.json() == {"content_uri": created["content_uri"]}
    assert elapsed < 15
    media = media_of(created["content_uri"])
    assert media.state == S.PROCESSING
    assert "queueing failed" in media.last_error
    assert (
        stack.client().download(created["content_uri"], "?timeout_ms=0", legacy=True).status_code
        == 504
    )
    private_redis.start()  # same port: the worker reconnects
    set_stuck_sweep_every_second()
    stack.start_beat()
    wait_until(lambda: state_of(media.pk) == S.COMPLETE, 90, "the media to complete")
    assert stack.client().download(created["content_uri"], legacy=True).content == b"queued later"


def test_s3_down_during_screening_is_retried_and_recorded(
    live: Stack, user_token: tuple[str, str], s3_client: Any
) -> None:
    _, token = user_token
    created = live.client(token).create()
    assert requests.put(created["upload_url"], data=b"survives an outage").status_code == 200
    live.stop("worker")
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(live.client(token).complete, created["content_uri"])
        media = media_of(created["content_uri"])
        wait_until(lambda: state_of(media.pk) == S.PROCESSING, 30, "the claim")
        s3_server("stop")
        try:
            live.start_worker()

            def failed_and_recorded() -> bool:
                media.refresh_from_db()
                return media.attempts >= 1 and "storage" in media.last_error.lower()

            wait_until(failed_and_recorded, 90, "a recorded storage failure")
            assert media.state == S.PROCESSING
        finally:
            s3_server("start")
        wait_until(lambda: state_of(media.pk) == S.COMPLETE, 120, "the retry to complete it")
        assert answer.result().status_code == 200
    media.refresh_from_db()
    assert media.last_error == ""
    assert (
        live.client().download(created["content_uri"], legacy=True).content == b"survives an outage"
    )
    assert keys_of(s3_client, media) == [media.storage_key]


def test_s3_down_during_cleanup_never_claims_deleted(
    live: Stack, user_token: tuple[str, str], s3_client: Any
) -> None:
    _, token = user_token
    media = media_of(
        live.client(token).upload_through_url(b"to be purged", content_type="text/plain")
    )
    s3_server("stop")
    try:
        assert moderation.purge(media, by="@mod:localhost")

        def failure_recorded() -> bool:
            media.refresh_from_db()
            return bool(media.last_error)

        wait_until(failure_recorded, 60, "the failed deletion to be recorded")
        assert media.state == S.DELETED
        assert media.objects_deleted_at is None  # the row does not say the object is gone
    finally:
        s3_server("start")
    wait_until(
        lambda: Media.objects.get(pk=media.pk).objects_deleted_at is not None,
        120,
        "the retried deletion",
    )
    assert keys_of(s3_client, media) == []


def race_once(live: Stack, token: str, s3_client: Any) -> str:
    """/complete and the expiry sweep, both at the id's expiry instant."""
    created = live.client(token).create()
    requests.put(created["upload_url"], data=b"racing the clock")
    media = media_of(created["content_uri"])
    instant = timezone.now() + timedelta(milliseconds=400)
    Media.objects.filter(pk=media.pk).update(unused_expires_at=instant)
    barrier = threading.Barrier(2)

    def at_instant() -> None:
        barrier.wait()
        time.sleep(max(0.0, (instant - timezone.now()).total_seconds()))

    def do_complete() -> int:
        at_instant()
        return live.client(token).complete(created["content_uri"]).status_code

    def do_expire() -> int:
        at_instant()
        try:
            return maintenance.expire_pending().moved
        finally:
            connection.close()

    with ThreadPoolExecutor(2) as pool:
        completed = pool.submit(do_complete)
        expired = pool.submit(do_expire)
        status, moved = completed.result(), expired.result()
    final = state_of(media.pk)
    if final == S.COMPLETE:
        assert (status, moved) == (200, 0)
        assert (
            live.client().download(created["content_uri"], legacy=True).content
            == b"racing the clock"
        )
    else:
        assert final == S.EXPIRED
        assert (status, moved) == (404, 1)
        assert keys_of(s3_client, media) == []
    return final


def test_expiry_and_complete_race_at_the_expiry_instant(
    live: Stack, user_token: tuple[str, str], s3_client: Any
) -> None:
    _, token = user_token
    outcomes = [race_once(live, token, s3_client) for _ in range(6)]
    assert set(outcomes) <= {S.COMPLETE, S.EXPIRED}  # exactly one side won each time


def test_two_beat_hosts_run_the_same_cleanup_at_once(live: Stack, s3_client: Any) -> None:
    past = timezone.now() - timedelta(seconds=1)
    rows = [
        Media(
            server_name="localhost",
            media_id=f"twohosts{index:05d}",
            user_id="@sweeper:localhost",
            unused_expires_at=past,
        )
        for index in range(3000)
    ]
    Media.objects.bulk_create(rows, batch_size=1000)
    bucket = os.environ["AWS_STORAGE_BUCKET_NAME"]
    with_objects = Media.objects.filter(media_id__startswith="twohosts")[:100]
    for media in with_objects:
        s3_client.put_object(Bucket=bucket, Key=media.incoming_key, Body=b"abandoned")
    script = (
        "import json; from msc3870 import maintenance; "
        "e = maintenance.expire_pending(batch_size=250); d = maintenance.delete_dead_objects(); "
        "print(json.dumps({'moved': e.moved, 'deleted': e.objects_deleted + d.objects_deleted}))"
    )
    hosts = [
        subprocess.Popen(
            [str(ROOT / ".venv/bin/python"), "manage.py", "shell", "-c", script],
            cwd=ROOT,
            env=live.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    results = []
    for host in hosts:
        out, err = host.communicate(timeout=300)
        assert host.returncode == 0, err.decode()[-2000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    swept = Media.objects.filter(media_id__startswith="twohosts")
    assert swept.count() == 3000  # no lost rows
    assert set(swept.values_list("state", flat=True)) == {S.EXPIRED}
    assert sum(r["moved"] for r in results) == 3000  # each row moved exactly once
    assert sum(r["deleted"] for r in results) == 3000  # and marked cleaned exactly once
    assert not swept.filter(objects_deleted_at__isnull=True).exists()
    assert bucket_keys(s3_client, "incoming/twohosts") == []


def test_clamav_scan_with_a_real_clamd(
    make_stack: Any,
    private_redis: PrivateRedis,
    clamd: str,
    user_token: tuple[str, str],
    s3_client: Any,
) -> None:
    # The uploader hears the scanner's verdict in the /complete answer (it waits for
    # the full-object checks only when the operator asks for it).
    stack: Stack = make_stack(
        CELERY_BROKER_URL=private_redis.url,
        MSC3870_CLAMAV_URL=clamd,
        MSC3870_COMPLETE_WAITS_FOR_CHECKS="1",
    )
    stack.start_server()
    stack.start_worker()
    _, token = user_token
    clean = stack.client(token).create()
    requests.put(clean["upload_url"], data=b"nothing to see here")
    assert stack.client(token).complete(clean["content_uri"]).status_code == 200
    assert media_of(clean["content_uri"]).state == S.COMPLETE
    infected = stack.client(token).create()
    requests.put(infected["upload_url"], data=b"prefix " + EICAR + b" suffix")
    answer = stack.client(token).complete(infected["content_uri"])
    assert answer.status_code == 403
    assert "EICAR-Test-Signature" in answer.json()["error"]
    media = media_of(infected["content_uri"])
    assert media.state == S.REJECTED
    wait_until(lambda: not keys_of(s3_client, media), 30, "the infected bytes to be deleted")
