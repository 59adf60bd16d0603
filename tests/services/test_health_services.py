"""``GET /health`` of the deployed server with each real component stopped and started
again: PostgreSQL (a cluster of the test's own, never the shared one), SeaweedFS (this
run's S3 server, also frozen with SIGSTOP: a store that hangs), Redis as the broker (a
redis-server of the test's own), and celery beat. Every answer comes within the health
timeout, and the media API keeps answering meanwhile."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from glob import glob
from pathlib import Path
from typing import Any

import pytest
import requests

from ..helpers import free_port, wait_until
from ..process_stack import BIN
from .conftest import ROOT, PrivateRedis, Stack, s3_server

pytestmark = pytest.mark.services

FAST = {"MSC3870_HEALTH_CACHE_SECONDS": "0.5", "MSC3870_HEALTH_TIMEOUT_SECONDS": "2"}
# One answer: the timeout, and the time to make and send it.
ANSWER_WITHIN = 3.5


def check(stack: Stack) -> tuple[int, dict[str, Any]]:
    started = time.monotonic()
    answer = requests.get(f"{stack.base_url}/health", timeout=10)
    took = time.monotonic() - started
    assert took < ANSWER_WITHIN, f"/health took {took:.1f}s"
    return answer.status_code, answer.json()


def down_is(stack: Stack, components: list[str]) -> bool:
    status, body = check(stack)
    if components:
        return status == 503 and body["down"] == components
    return status == 200


def api_answers(stack: Stack) -> None:
    assert requests.get(f"{stack.base_url}/_matrix/client/versions", timeout=5).ok


# ------------------------------------------------------------------------- PostgreSQL


class PrivateCluster:
    """A PostgreSQL cluster of the test's own (initdb as the postgres user), on a free
    port: stopping it disturbs no other test."""

    def __init__(self) -> None:
        binaries = sorted(glob("/usr/lib/postgresql/*/bin/initdb"))
        if not binaries:
            pytest.fail("PostgreSQL's binaries are not installed (scripts/ensure-services)")
        self.bin = Path(binaries[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="mr-health-pg-"))
        self.root.chmod(0o755)
        shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.port = free_port()
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust")

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/mediarepo"

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv],
            check=True,
            capture_output=True,
            timeout=120,
            cwd="/",
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
            "-l", str(self.root / "log"), "-w", "start",
        )  # fmt: skip

    def stop(self) -> None:
        pg_ctl = str(self.bin / "pg_ctl")
        self._as_postgres(pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[PrivateCluster]:
    made = PrivateCluster()
    try:
        made.start()
        made._as_postgres(
            str(made.bin / "createdb"), "-h", "127.0.0.1", "-p", str(made.port), "mediarepo"
        )
        yield made
    finally:
        made.remove()


def test_postgresql_stopped_and_started(make_stack: Any, cluster: PrivateCluster) -> None:
    env = {
        **FAST,
        "DATABASE_URL": cluster.url,
        "MSC3870_HEALTH_COMPONENTS": "database,storage",
    }
    stack: Stack = make_stack(**env)
    migrated = subprocess.run(
        [str(BIN / "python"), "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert migrated.returncode == 0, migrated.stderr[-2000:]
    stack.start_server(workers=1)
    wait_until(lambda: down_is(stack, []), 30, "healthy")
    cluster.stop()
    wait_until(lambda: down_is(stack, ["database"]), 30, "the database reported down")

    def refused() -> bool:
        return check(stack)[1]["components"]["database"] == {"ok": False, "error": "unreachable"}

    wait_until(refused, 10, "probes refused by the stopped server")
    assert check(stack)[1]["components"]["storage"]["ok"] is True
    api_answers(stack)
    cluster.start()
    wait_until(lambda: down_is(stack, []), 30, "the database back")


# -------------------------------------------------------------------------- SeaweedFS


def weed_pid() -> int:
    directory = Path(os.environ.get("S3_SERVER_DIR") or ROOT / "var" / "s3-test")
    return int((directory / "weed.pid").read_text())


def test_seaweedfs_stopped_started_and_hanging(make_stack: Any) -> None:
    stack: Stack = make_stack(**FAST, MSC3870_HEALTH_COMPONENTS="database,storage")
    stack.start_server(workers=1)
    wait_until(lambda: down_is(stack, []), 30, "healthy")
    s3_server("stop")
    try:
        wait_until(lambda: down_is(stack, ["storage"]), 30, "the store reported down")
        assert check(stack)[1]["components"]["storage"]["error"] in ("unreachable", "error")
        api_answers(stack)
    finally:
        s3_server("start")
    wait_until(lambda: down_is(stack, []), 60, "the store back")
    # Frozen: it accepts connections and never answers. Each answer still comes within
    # the timeout ("timed out"), from the last result or at once while the probe hangs.
    pid = weed_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: down_is(stack, ["storage"]), 30, "the frozen store reported down")
        for _ in range(5):
            status, body = check(stack)
            assert status == 503
            assert body["components"]["storage"]["error"] == "timed out"
        api_answers(stack)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: down_is(stack, []), 60, "the store answering again")


# ---------------------------------------------------------------------- Redis, beat


def test_redis_broker_stopped_and_started(make_stack: Any, private_redis: PrivateRedis) -> None:
    stack: Stack = make_stack(
        **FAST,
        CELERY_BROKER_URL=private_redis.url,
        MSC3870_HEALTH_COMPONENTS="database,storage,broker",
    )
    stack.start_server(workers=1)
    wait_until(lambda: down_is(stack, []), 30, "healthy")
    assert check(stack)[1]["components"]["broker"]["queue_depth"] >= 0
    private_redis.stop()
    wait_until(lambda: down_is(stack, ["broker"]), 30, "the broker reported down")
    api_answers(stack)
    private_redis.start()  # the same port
    wait_until(lambda: down_is(stack, []), 60, "the broker back")


def test_celery_beat_ticks_and_stops(make_stack: Any, private_redis: PrivateRedis) -> None:
    stack: Stack = make_stack(
        **FAST,
        CELERY_BROKER_URL=private_redis.url,
        MSC3870_HEALTH_BEAT_MAX_AGE_SECONDS="3",
    )
    stack.start_server(workers=1)
    stack.start_beat()
    wait_until(lambda: down_is(stack, []), 30, "healthy, beat ticking")
    stack.stop("beat")
    wait_until(lambda: down_is(stack, ["beat"]), 30, "beat reported down")
    assert check(stack)[1]["components"]["beat"]["error"] == "no recent tick"
    stack.start_beat()
    wait_until(lambda: down_is(stack, []), 30, "beat back")


# ------------------------------------------------------------------ a worker's metrics


def test_a_celery_worker_serves_its_pool_metrics(
    make_stack: Any, private_redis: PrivateRedis, user_token: tuple[str, str]
) -> None:
    """Screening runs in the worker's pool processes: their values add up on the worker's
    own listener, whose directory the worker empties when it starts."""

    stack: Stack = make_stack(CELERY_BROKER_URL=private_redis.url)
    stack.start_server(workers=1)
    port = free_port()
    directory = Path(stack.env["MEDIAREPO_DATA_DIR"]) / "metrics" / f"celery-{port}"
    directory.mkdir(parents=True)
    (directory / "counter_4242.db").write_bytes(b"an earlier run's values")
    stack.start_worker(METRICS_PORT=str(port))
    assert not (directory / "counter_4242.db").exists()
    _, token = user_token
    for index in range(3):
        stack.client(token).upload_through_url(
            b"screened by the pool %d" % index, content_type="text/plain"
        )

    def screened() -> bool:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        return 'msc3870_screening_duration_seconds_count{verdict="complete"} 3.0' in text

    wait_until(screened, 30, "three screenings counted by the worker")
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'msc3870_media_transitions_total{state="complete"} 3.0' in text
    other = requests.get(f"http://127.0.0.1:{port}/_matrix/client/versions", timeout=5)
    assert other.status_code == 404
