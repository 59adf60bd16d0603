"""Fixtures of every test (``tests/README.md`` says where tests of what live).

- the network guard: a test that reached for another machine fails (``network_guard.py``);
- each test starts with an empty cache and media directory, and ``on_commit`` runs at once;
- Matrix users: ``alice``, ``bob``, ``matrix_client("@carol:localhost")`` (``MatrixClient``
  in process), ``token`` (a committed token, for the ASGI handler and live servers);
- how work runs: ``puts_claim_first``, ``broker_sends``, ``app`` (the ASGI handler);
- local stand-ins for other services: ``s3`` (moto), ``clamd`` (a fake clamd; the services
  suite overrides it with a real one), ``key_servers`` and ``peer`` (another homeserver
  that signs its requests to us), ``remote`` (another homeserver whose media we fetch,
  with ``fetching_remote_media``), ``live_url`` (this server in a live server thread).

Plain helpers are in ``helpers.py`` (and ``federation_helpers.py``, ``server_helpers.py``,
``asgi_driver.py``): test modules import them from there, never from each other.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.cache import cache

from . import network_guard as _network_guard_module
from .federation_helpers import FakeRemote, KeyServers, Remote, remote_media_server, undelegated
from .helpers import (  # noqa: F401  (importable from here too)
    FakeClamd,
    MatrixClient,
    files_under,
    make_token,
    media_of,
    msc3870_settings,
    mxc_path,
    png_bytes,
    url_path,
)

# ---------------------------------------------------------------- tests never leave the machine

#: The guard (tests/network_guard.py): the copy ``sitecustomize`` installed when this
#: session was itself started by a test, else this package's.
network_guard: Any = sys.modules.get("_msc3870_network_guard", _network_guard_module)


def _guard_log() -> Path:
    """Where guarded processes started by this session record findings: the parent
    session's file when there is one."""
    inherited = os.environ.get(network_guard.LOG_ENV)
    if inherited:
        return Path(inherited)
    directory = tempfile.mkdtemp(prefix="network-guard-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return Path(directory) / "findings.log"


GUARD_FINDINGS = network_guard.Findings(_guard_log())
network_guard.install(GUARD_FINDINGS.record)
# Every process the tests start (gunicorn, celery, manage.py, python -c) inherits it.
os.environ.update(network_guard.subprocess_environment(GUARD_FINDINGS.log_path))


def _guard_report(findings: list[str]) -> str:
    return "A test reached for another machine (refused):\n\n" + "\n".join(findings)


@pytest.fixture(autouse=True)
def _tests_never_leave_the_machine() -> Iterator[None]:
    """Fails the test if the guard refused anything meanwhile, even an error the code
    under test swallowed. Set up first, torn down last: the other fixtures' teardown
    counts too."""
    yield
    findings = GUARD_FINDINGS.new()
    if findings:
        pytest.fail(_guard_report(findings), pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """What was refused after the last test's teardown (module and session fixtures)."""
    findings = GUARD_FINDINGS.new()
    if findings:
        print("\n" + _guard_report(findings), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _clean_media_and_cache() -> Iterator[None]:
    from msc3870.auth import token_cache

    cache.clear()
    token_cache.clear()
    yield
    media_dir = Path(settings.MEDIA_DIR)
    if media_dir.exists():
        shutil.rmtree(media_dir)


@pytest.fixture
def puts_claim_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PUT as it runs with a broker: the id is claimed (PROCESSING) before the body is
    read, and the bytes are recorded before the checks are queued. (Without one, the
    default here, a PUT is decided in one write: ``uploads._upload_decided_in_one_write``.)"""
    from msc3870 import verdicts

    monkeypatch.setattr(verdicts, "screens_in_request", lambda: False)


@pytest.fixture
def broker_sends(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[Any, ...], Any]]:
    """As with a broker: tasks sent by name (``msc3870.queue``) are recorded here, as
    (name, args, kwargs), and not run."""
    from celery import current_app

    from msc3870 import queue

    sent: list[tuple[str, tuple[Any, ...], Any]] = []
    monkeypatch.setattr(queue, "has_broker", lambda: True)
    monkeypatch.setattr(
        current_app,
        "send_task",
        lambda name, args=(), kwargs=None, **_options: sent.append((name, tuple(args), kwargs)),
    )
    return sent


@pytest.fixture
def matrix_client(db: None) -> Callable[[str], MatrixClient]:
    """Makes a user with a token of its own, and its client (in process)."""

    def factory(user_id: str = "@alice:localhost") -> MatrixClient:
        return MatrixClient.in_process(make_token(user_id), user_id)

    return factory


@pytest.fixture
def alice(matrix_client: Callable[[str], MatrixClient]) -> MatrixClient:
    return matrix_client("@alice:localhost")


@pytest.fixture
def bob(matrix_client: Callable[[str], MatrixClient]) -> MatrixClient:
    return matrix_client("@bob:localhost")


@pytest.fixture
def token(transactional_db: None) -> str:
    """A token of ``@alice:localhost``, committed: for requests served by other threads
    (the ASGI handler's pool, a live server)."""
    from msc3870.auth import token_cache

    token_cache.clear()
    return make_token("@alice:localhost")


@pytest.fixture
def live_url(live_server: Any) -> Iterator[str]:
    """This server in a thread of its own (pytest-django's ``live_server``), its public
    URL set to match."""
    with msc3870_settings(PUBLIC_BASEURL=live_server.url):
        yield live_server.url


@pytest.fixture(autouse=True)
def _on_commit_runs_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests run inside a transaction that never commits; requests in production do
    not (each statement commits). Run on_commit callbacks at once, as production does."""
    from django.db import transaction

    def run_now(func: Callable[[], Any], using: str | None = None, robust: bool = False) -> None:
        func()

    monkeypatch.setattr(transaction, "on_commit", run_now)


@pytest.fixture
def app(transactional_db: None) -> Iterator[Any]:
    """The ASGI application (msc3870.asgi.MediaASGIHandler) with 2 threads, driven in
    process by tests/asgi_driver.py; its pool threads need committed data, hence
    transactional_db."""
    from msc3870 import wakeup
    from msc3870.asgi import MediaASGIHandler

    handler = MediaASGIHandler(threads=2)
    yield handler
    handler.executor.shutdown(wait=True)
    handler.bulk_executor.shutdown(wait=True)
    handler.upload_executor.shutdown(wait=True)
    wakeup._hub = None


# -------------------------------------------------------------------- other services


@pytest.fixture
def s3() -> Iterator[Any]:
    """The media storage on S3, moto's in-process mock of it, with the bucket made; the
    boto3 client to look at it."""
    import boto3
    from django.test import override_settings
    from moto import mock_aws

    from .helpers import BUCKET, s3_storages

    with mock_aws(), override_settings(STORAGES=s3_storages()):
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


@pytest.fixture
def clamd() -> Iterator[FakeClamd]:
    server = FakeClamd()
    yield server
    server.close()


@pytest.fixture
def key_servers(monkeypatch: pytest.MonkeyPatch) -> KeyServers:
    """Other servers' key servers, answered without a network (none publishes until the
    test says so); made-up server names resolve without DNS to port 8448."""
    from msc3870.federation import discovery, keyring

    fake = KeyServers()
    monkeypatch.setattr(keyring, "_get_json", fake)
    # These made-up names publish no delegation: port 8448, without asking DNS.
    monkeypatch.setattr(discovery, "resolve", undelegated)
    return fake


@pytest.fixture
def peer(key_servers: KeyServers) -> FakeRemote:
    """Another homeserver, ``remote.example.com``, with its key published: it signs its
    requests to us (``federation_helpers.fed_get``)."""
    return key_servers.publish(FakeRemote("remote.example.com"))


@pytest.fixture
def fetching_remote_media() -> Iterator[None]:
    """Other servers' media fetched when asked for, from servers on 127.0.0.1 only (the
    outbound allowlist opened to it), their self-signed certificates accepted."""
    with msc3870_settings(
        FETCH_REMOTE_MEDIA=True,
        FEDERATION_IP_RANGE_ALLOWLIST=["127.0.0.1/32"],
        FEDERATION_VERIFY_TLS=False,
    ):
        yield


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[Remote]:
    """Another homeserver serving its media over HTTPS on 127.0.0.1
    (``federation_helpers.Remote``); fetching from it needs ``fetching_remote_media``."""
    with remote_media_server(tmp_path) as server:
        yield server
