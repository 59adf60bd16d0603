"""A celery worker rides through its broker, Redis, restarting, and no work is lost."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import requests

from msc3870.conf import DEFAULTS
from msc3870.models import Media, MediaState

from ..helpers import MatrixClient, media_of, wait_until
from .conftest import PrivateRedis, Stack
from .test_faults import set_stuck_sweep_every_second

pytestmark = pytest.mark.services
S = MediaState
SLOW_CHECKS = ",".join([*DEFAULTS["CHECKS"], "tests.services.slow_check.pause"])


def state_of(media: Media) -> str:
    return Media.objects.values_list("state", flat=True).get(pk=media.pk)


def completed_upload(client: MatrixClient, data: bytes) -> Media:
    """PUT to an upload URL and ``/complete``: answered, screening queued."""
    created = client.create()
    assert requests.put(created["upload_url"], data=data).status_code == 200
    answer = client.complete(created["content_uri"])
    assert answer.status_code == 200, answer.text
    return media_of(created["content_uri"])


def completes(media: Media, what: str) -> None:
    wait_until(lambda: state_of(media) == S.COMPLETE, 90, what)


def alive(stack: Stack, worker: subprocess.Popen[bytes]) -> None:
    assert worker.poll() is None, f"the worker exited: {stack.tail('worker', 80)}"
    assert stack.processes["worker"] is worker


def log_size(stack: Stack) -> int:
    return (stack.logs / "worker.log").stat().st_size


def reconnected(stack: Stack, worker: subprocess.Popen[bytes], offset: int) -> None:
    """The worker connected to Redis again (its log past ``offset`` says so), never exiting
    on the way."""

    def back() -> bool:
        alive(stack, worker)
        with open(stack.logs / "worker.log", "rb") as handle:
            handle.seek(offset)
            return b"Connected to " in handle.read()

    wait_until(back, 60, "the worker to reconnect")


def test_worker_survives_redis_restarts_and_no_task_is_lost(
    make_stack: Any, private_redis: PrivateRedis, user_token: tuple[str, str], tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    stack: Stack = make_stack(
        CELERY_BROKER_URL=private_redis.url,
        MSC3870_CHECKS=SLOW_CHECKS,
        MSC3870_COMPLETE_WAIT_SECONDS="1",
        MSC3870_STUCK_AFTER_SECONDS="10",
    )
    stack.start_server()
    # Each screening holds a pool process 3 s; the pool has two, so while one screens
    # the worker is also waiting on Redis for more work, as it is under load.
    worker = stack.start_worker(SLOW_CHECK_DIR=str(markers), SLOW_CHECK_SECONDS="3")
    client = stack.client(user_token[1])
    for restart in range(2):
        running = completed_upload(client, b"screened across restart %d" % restart)
        marker = markers / running.media_id
        wait_until(marker.exists, 60, "screening to start")
        offset = log_size(stack)
        private_redis.restart()
        reconnected(stack, worker, offset)
        completes(running, "the task running across the restart")
        completes(completed_upload(client, b"sent after restart %d" % restart), "a task sent after")
        alive(stack, worker)

    # Sent while Redis is down: answered, and queued again by the stuck sweep once Redis
    # is back.
    created = client.create()
    assert requests.put(created["upload_url"], data=b"sent while down").status_code == 200
    private_redis.stop()
    answer = client.complete(created["content_uri"])
    assert answer.status_code == 200
    assert answer.json() == {"content_uri": created["content_uri"]}
    during = media_of(created["content_uri"])
    assert during.state == S.PROCESSING
    assert "queueing failed" in during.last_error
    offset = log_size(stack)
    private_redis.start()
    reconnected(stack, worker, offset)
    set_stuck_sweep_every_second()
    stack.start_beat()
    completes(during, "the task sent while Redis was down")
    assert client.download(created["content_uri"]).content == b"sent while down"
    alive(stack, worker)
    assert os.path.exists(markers / during.media_id)  # screened by the same worker
