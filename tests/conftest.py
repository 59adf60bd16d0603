from __future__ import annotations

import atexit
import io
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.cache import cache
from django.test import Client
from PIL import Image

from msc3870.models import AccessToken, Media, digest_token

from . import network_guard as _network_guard_module

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


# ------------------------------------------------------------------------------ helpers


def png_bytes(width: int = 8, height: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def _clean_media_and_cache() -> Iterator[None]:
    from msc3870.auth import token_cache

    cache.clear()
    token_cache.clear()
    yield
    media_dir = Path(settings.MEDIA_DIR)
    if media_dir.exists():
        shutil.rmtree(media_dir)


def make_token(user_id: str, **fields: Any) -> str:
    token = "mr_" + secrets.token_urlsafe(16)
    AccessToken.objects.create(user_id=user_id, token_digest=digest_token(token), **fields)
    return token


@dataclass
class MatrixClient:
    """Django's test client speaking as one Matrix user."""

    client: Client
    token: str
    user_id: str

    def _headers(self, headers: dict[str, str] | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **(headers or {})}

    def get(self, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        return self.client.get(path, headers=self._headers(headers), **kwargs)

    def post(
        self,
        path: str,
        data: bytes | str = b"",
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> Any:
        return self.client.generic(
            "POST", path, data, content_type=content_type, headers=self._headers(headers)
        )

    def put(
        self,
        path: str,
        data: bytes = b"",
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
    ) -> Any:
        return self.client.generic(
            "PUT", path, data, content_type=content_type, headers=self._headers(headers)
        )

    def create(self) -> dict[str, Any]:
        response = self.post("/_matrix/media/v1/create")
        assert response.status_code == 200, response.content
        return response.json()


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
    def factory(user_id: str = "@alice:localhost") -> MatrixClient:
        return MatrixClient(Client(), make_token(user_id), user_id)

    return factory


@pytest.fixture
def alice(matrix_client: Callable[[str], MatrixClient]) -> MatrixClient:
    return matrix_client("@alice:localhost")


@pytest.fixture
def bob(matrix_client: Callable[[str], MatrixClient]) -> MatrixClient:
    return matrix_client("@bob:localhost")


def mxc_path(content_uri: str) -> str:
    """``mxc://server/id`` -> ``server/id``."""
    assert content_uri.startswith("mxc://")
    return content_uri[len("mxc://") :]


def media_of(content_uri: str) -> Media:
    server_name, media_id = mxc_path(content_uri).split("/")
    return Media.objects.get(server_name=server_name, media_id=media_id)


def url_path(url: str) -> str:
    """The path and query of an absolute upload URL, for Django's test client."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def files_under(root: Path) -> list[str]:
    if not root.exists():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def msc3870_settings(**overrides: Any) -> Any:
    """``override_settings`` for a few keys of the MSC3870 dict, keeping the others."""
    from django.test import override_settings

    return override_settings(MSC3870={**settings.MSC3870, **overrides})


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
    wakeup._hub = None
