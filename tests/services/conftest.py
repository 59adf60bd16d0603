"""The services suite: the deployable project as separate processes on real services.

A gunicorn process serves ``mediarepo`` and one or more ``celery worker`` processes run
its tasks, against PostgreSQL (pytest-django's test database), a real broker (Redis or
RabbitMQ) and the SeaweedFS S3 server that ``scripts/s3-server`` starts. The test process
uses the same database and bucket to look at what the processes did.

``.ci/run`` sets the environment (see ``SERVICES_ENV`` there); run alone with
``scripts/services-test``.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from django.conf import settings
from django.db import connection

from ..helpers import EICAR, MatrixClient, free_port, make_token, wait_until
from ..process_stack import ROOT, Processes, beat_args, worker_args
from ..redis_server import RedisServer

REQUIRED_ENV = ("DATABASE_URL", "CELERY_BROKER_URL", "AWS_STORAGE_BUCKET_NAME")


def database_url_of_test_db() -> str:
    """DATABASE_URL of the test database pytest-django made (for the other processes)."""
    db = connection.settings_dict
    credentials = db["USER"] or "postgres"
    if db.get("PASSWORD"):
        credentials += f":{db['PASSWORD']}"
    return f"postgres://{credentials}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@dataclass
class Stack(Processes):
    """gunicorn + celery workers sharing one environment (``process_stack.Processes``: the
    soak's stack is one too)."""

    base_url: str = ""

    def client(self, token: str = "") -> MatrixClient:
        """A client of this stack's server with ``token`` (none: anonymous)."""
        return MatrixClient.over_http(self.base_url, token)

    def start_server(
        self, workers: int | None = None, *, public_baseurl: str = "", **extra_env: str
    ) -> None:
        """gunicorn serving the ASGI app, with ``workers`` uvicorn workers (WEB_CONCURRENCY;
        default: the environment's, else one per core) and ``extra_env`` on top of the
        stack's; waits until every worker has started and the server answers.
        ``public_baseurl``: where clients reach it (a balancer in front), default its own
        address."""
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        env = {
            **self.env,
            **extra_env,
            "PORT": str(port),
            "PUBLIC_BASEURL": public_baseurl or self.base_url,
        }
        if workers is not None:
            env["WEB_CONCURRENCY"] = str(workers)
        self.start_gunicorn("server", env, self.base_url)

    def start_worker(self, name: str = "worker", **extra_env: str) -> subprocess.Popen[bytes]:
        args = worker_args(f"{name}-{secrets.token_hex(3)}@%h")
        return self.start_celery(name, args, {**self.env, **extra_env}, b" ready.", 60)

    def start_beat(self) -> subprocess.Popen[bytes]:
        """``celery beat`` with the database scheduler (the schedule an operator edits)."""
        return self.start_celery(
            "beat", beat_args(self.logs / "beat-schedule"), self.env, b"beat: Starting", 60
        )


def base_env(tmp: Path, **overrides: str) -> dict[str, str]:
    missing = [name for name in REQUIRED_ENV if not os.environ.get(name)]
    if missing:
        pytest.fail(f"the services suite needs {', '.join(missing)}; run it through .ci/run")
    return {
        **os.environ,
        "DATABASE_URL": database_url_of_test_db(),
        "DJANGO_SETTINGS_MODULE": "mediarepo.settings",
        "DJANGO_SECRET_KEY": settings.SECRET_KEY,
        "MEDIAREPO_DATA_DIR": str(tmp),
        "MSC3870_COMPLETE_WAIT_SECONDS": "10",
        "MSC3870_CREATE_RATE": "1000/min",
        "PYTHONUNBUFFERED": "1",
        **overrides,
    }


@contextmanager
def running_stack(tmp: Path, workers: int | None = None) -> Iterator[Stack]:
    """gunicorn (``workers`` web workers) and a celery worker, stopped on the way out."""
    running = Stack(env=base_env(tmp), logs=tmp)
    try:
        running.start_server(workers)
        running.start_worker()
        yield running
    finally:
        running.stop_all()


@dataclass
class TwoNodes:
    """Two web nodes behind HAProxy (``docker/haproxy.cfg``), as ``docker/compose.yaml``
    deploys them: each its own gunicorn with its own data directory and port, sharing
    PostgreSQL, the broker, Redis, S3, one celery worker, the Django secret key and the
    federation signing key (a file outside both data directories). ``a`` also runs the
    worker (and the balancer process)."""

    a: Stack
    b: Stack
    balancer_url: str

    @property
    def nodes(self) -> tuple[Stack, Stack]:
        return self.a, self.b

    def client(self, token: str = "") -> MatrixClient:
        """A client of the balancer."""
        return MatrixClient.over_http(self.balancer_url, token)

    def stop_all(self) -> None:
        for node in self.nodes:
            node.stop_all()


def start_balancer(stack: Stack, port: int, backends: list[str]) -> None:
    """HAProxy with the deployment's own configuration, on 127.0.0.1:``port`` in front of
    ``backends`` (base URLs), run by ``stack`` as its process ``balancer``; waits until
    it forwards to them."""
    haproxy = "/usr/sbin/haproxy"
    if not Path(haproxy).exists():
        pytest.fail("haproxy is not installed: scripts/ensure-services installs it")
    env = {
        **os.environ,
        "MEDIAREPO_BALANCER_BIND": f"127.0.0.1:{port}",
        **{
            f"MEDIAREPO_WEB{n}": url.removeprefix("http://")
            for n, url in enumerate(backends, start=1)
        },
    }
    process = stack.spawn("balancer", [haproxy, "-db", "-f", "docker/haproxy.cfg"], env)

    def forwards() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"haproxy exited: {stack.tail('balancer')}")
        try:
            return requests.get(f"http://127.0.0.1:{port}/_matrix/client/versions", timeout=1).ok
        except requests.RequestException:
            return False

    wait_until(forwards, 30, "haproxy to forward")


@contextmanager
def running_two_nodes(tmp: Path, *, worker: bool = True, **env: str) -> Iterator[TwoNodes]:
    """Two nodes of one uvicorn worker each behind the balancer, and (``worker``) a celery
    worker; ``env`` on top of every process's environment."""
    balancer_port = free_port()
    balancer_url = f"http://127.0.0.1:{balancer_port}"
    shared = tmp / "shared"
    shared.mkdir(mode=0o700)
    common = {"MSC3870_SIGNING_KEY_PATH": str(shared / "signing.key"), **env}
    nodes = []
    for name in ("a", "b"):
        data_dir = tmp / name
        data_dir.mkdir(mode=0o700)
        # Metrics on a listener of each node's own (tests read its waiters and requests).
        metrics = {"METRICS_PORT": str(free_port())}
        nodes.append(Stack(env=base_env(data_dir, **common, **metrics), logs=data_dir))
    cluster = TwoNodes(nodes[0], nodes[1], balancer_url)
    try:
        for node in cluster.nodes:
            node.start_server(1, public_baseurl=balancer_url)
        start_balancer(cluster.a, balancer_port, [node.base_url for node in cluster.nodes])
        if worker:
            cluster.a.start_worker()
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture(scope="session")
def stack(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture(scope="module")
def two_workers(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A stack of the module's own whose server has two uvicorn workers (as on a two-core
    host), on PostgreSQL, with a celery worker (Redis)."""
    with running_stack(tmp_path_factory.mktemp("two-workers"), workers=2) as running:
        yield running


@pytest.fixture
def live(stack: Stack, transactional_db: None) -> Iterator[Stack]:
    """The running stack, with a worker, for one test (which may kill and restart it)."""
    if "worker" not in stack.processes:
        stack.start_worker()
    yield stack
    for name in [n for n in stack.processes if n not in ("server", "worker")]:
        stack.stop(name)
    if "worker" not in stack.processes:
        stack.start_worker()


@pytest.fixture
def make_stack(django_db_setup: None, transactional_db: None, tmp_path: Path) -> Iterator[Any]:
    """Build an extra stack (its own server and workers) with other settings, e.g. another
    broker; stopped at the end of the test."""
    made: list[Stack] = []

    def build(**env: str) -> Stack:
        extra = Stack(env=base_env(tmp_path, **env), logs=tmp_path)
        made.append(extra)
        return extra

    yield build
    for extra in made:
        extra.stop_all()


class PrivateRedis(RedisServer):
    """A redis-server of the test's own, to be stopped and started as a broker outage."""

    @property  # type: ignore[override]
    def url(self) -> str:
        return super().url()

    def stop(self, *, kill: bool = True) -> None:
        super().stop(kill=kill)

    def restart(self, down_seconds: float = 1.0) -> None:
        """As an operator restarts it: SIGTERM (it closes its clients' connections and
        exits), ``down_seconds`` with nothing listening, then started again on the same
        port, empty (no persistence)."""
        super().stop(kill=False)
        time.sleep(down_seconds)
        self.start()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    redis = PrivateRedis(tmp_path)
    redis.start()
    yield redis
    redis.stop()


@pytest.fixture
def clamd(tmp_path: Path) -> Iterator[str]:
    """A real clamd (Debian's clamav-daemon). With no network for freshclam, its signature
    database is one signature of our own: the EICAR test string."""
    binary = "/usr/sbin/clamd"
    if not Path(binary).exists():
        pytest.fail("clamd is not installed: scripts/ensure-services installs clamav-daemon")
    database = tmp_path / "clamav-db"
    database.mkdir()
    (database / "eicar.ndb").write_text(f"EICAR-Test-Signature:0:*:{EICAR.hex()}\n")
    port = free_port()
    config = tmp_path / "clamd.conf"
    config.write_text(
        f"DatabaseDirectory {database}\nTCPSocket {port}\nTCPAddr 127.0.0.1\n"
        f"Foreground yes\nLogFile {tmp_path / 'clamd.log'}\nStreamMaxLength 100M\n"
    )
    process = subprocess.Popen(
        [binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError("clamd exited: " + (tmp_path / "clamd.log").read_text())
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"zPING\0")
                return sock.recv(16).startswith(b"PONG")
        except OSError:
            return False

    wait_until(answers, 60, "clamd")
    yield f"tcp://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def user_token(transactional_db: None) -> tuple[str, str]:
    """A fresh user (limits are per user) and its token, committed for the other processes."""
    user_id = f"@u{secrets.token_hex(4)}:localhost"
    return user_id, make_user_token(user_id)


def make_user_token(user_id: str | None = None) -> str:
    """A token of ``user_id`` (default: a new user), committed (call it from a test with a
    transactional database)."""
    return make_token(user_id or f"@u{secrets.token_hex(4)}:localhost")


@pytest.fixture
def s3_client() -> Any:
    from msc3870.stores import get_store

    return get_store().client  # type: ignore[attr-defined]


def s3_server(action: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "s3-server"), action], check=True, cwd=ROOT)


# --- a federating Synapse ------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A test CA (``trustme``) and one certificate for 127.0.0.1 that it issued."""
    from .synapse_helpers import issue_certificates

    return issue_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def synapse_peer(tmp_path_factory: pytest.TempPathFactory, certificates: Any) -> Iterator[Any]:
    """A Synapse with federation on, over TLS, under the name ``127.0.0.1:<port>``
    (``services.synapse_helpers.Peer``); stopped at the end of the module."""
    from .synapse_helpers import Peer, synapse_script

    directory = tmp_path_factory.mktemp("synapse-federating")
    port = free_port()
    server_name = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "SYNAPSE_DIR": str(directory),
        "SYNAPSE_PORT": str(port),
        "SYNAPSE_SERVER_NAME": server_name,
        "SYNAPSE_TLS_CERT": str(certificates.cert),
        "SYNAPSE_TLS_KEY": str(certificates.key),
        "SYNAPSE_FEDERATION": "1",
    }
    synapse_script("install", env, timeout=900)
    synapse_script("start --fresh", env, timeout=120)
    try:
        yield Peer(f"https://{server_name}", server_name, directory, certificates.ca)
    finally:
        synapse_script("stop", env, timeout=60)


@pytest.fixture
def waiters() -> Iterator[Any]:
    """Many concurrent downloads on an event loop of their own (``helpers.Waiters``)."""
    from .helpers import Waiters

    running = Waiters()
    yield running
    running.close()
