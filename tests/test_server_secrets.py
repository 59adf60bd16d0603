"""The deployed server (gunicorn + uvicorn workers, as `make run` starts it) keeps its
secrets: access tokens and upload URLs never written whole to its logs, and a data
directory only it can read.

The server is started from a shell-like umask (022) and a data directory left 0755, so
that the modes checked are the ones mediarepo sets itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import requests

from mediarepo.redaction import REDACTED, RedactSecrets, redact

from .helpers import file_mode, wait_until
from .server_helpers import PERIODIC_LINE, Server, start_server

QUERY_SECRET = "SECRETquery0123456789"
PATH_SECRET = "SECRETpath0123456789"


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("hardened")
    data_dir.chmod(0o755)
    old = os.umask(0o022)  # the server and its manage.py commands inherit it
    try:
        running = start_server(data_dir, "hardened", migrate=True, WEB_CONCURRENCY="1")
    finally:
        os.umask(old)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def exchanged(hardened: Server) -> dict[str, str]:
    """Requests whose lines carry secrets, and an upload that writes media files."""
    server = hardened
    refused = requests.get(
        f"{server.base_url}/_matrix/client/v1/media/config",
        params={"access_token": QUERY_SECRET},
        timeout=10,
    )
    assert refused.status_code == 401
    created = server.client.create()
    upload_token = created["upload_url"].rsplit("/", 1)[1]
    put = server.client.put_to_url(created["upload_url"], b"private bytes", "text/plain")
    assert put.status_code == 200, put.text
    done = server.client.complete(created["content_uri"])
    assert done.status_code == 200, done.text
    # A forged upload URL: refused, and Django logs a warning with its path.
    forged = requests.put(
        f"{server.base_url}/_matrix/media/unstable/com.beeper.msc3870/upload_url/{PATH_SECRET}",
        data=b"x",
        timeout=10,
    )
    assert 400 <= forged.status_code < 500
    one_shot = server.client.upload(b"more private bytes", "text/plain")
    assert one_shot.status_code == 200, one_shot.text
    return {"upload_token": upload_token}


# ---------------------------------------------------------------------------- 8.6 logs


def test_access_log_redacts_tokens_and_upload_urls(
    hardened: Server, exchanged: dict[str, str]
) -> None:
    # The access line of the last request is written after its answer: wait for it.
    wait_until(lambda: "/_matrix/media/v3/upload" in hardened.log_text(), 10, "access lines")
    log = hardened.log_text()
    for secret in (QUERY_SECRET, PATH_SECRET, exchanged["upload_token"]):
        assert secret not in log, [line for line in log.splitlines() if secret in line]
    assert f"access_token={REDACTED}" in log, log[-3000:]
    lines = log.splitlines()
    # uvicorn's access lines of the real upload URL's PUT and of the forged one.
    assert any(
        f'"PUT /_matrix/media/unstable/com.beeper.msc3870/upload_url/{REDACTED} HTTP/1.1" 200'
        in line
        for line in lines
    ), log[-3000:]
    assert any(f'/upload_url/{REDACTED} HTTP/1.1" 403' in line for line in lines), log[-3000:]
    # Django's warning about the forged one.
    assert f"Forbidden: /_matrix/media/unstable/com.beeper.msc3870/upload_url/{REDACTED}" in log


def test_redact_rewrites_every_place_a_secret_can_be() -> None:
    assert redact("/a?access_token=abc&x=1") == f"/a?access_token={REDACTED}&x=1"
    assert redact("/a?x=1&ACCESS_TOKEN=abc") == f"/a?x=1&ACCESS_TOKEN={REDACTED}"
    assert redact("/u/upload_url/tok.en-x?y=1") == f"/u/upload_url/{REDACTED}?y=1"
    assert (
        redact("/_matrix/client/versions?user_id=@a:b") == "/_matrix/client/versions?user_id=@a:b"
    )
    record = logging.LogRecord(
        "django.request",
        logging.WARNING,
        __file__,
        1,
        "%s: %s",
        ("Forbidden", "/upload_url/s3cr3t"),
        None,
    )
    assert RedactSecrets().filter(record)
    assert "s3cr3t" not in record.getMessage()


def test_django_request_warnings_are_redacted(
    client: object, db: None, caplog: pytest.LogCaptureFixture
) -> None:
    """In-process too: the filter is on django.request through mediarepo's LOGGING."""
    from django.test import Client

    with caplog.at_level(logging.WARNING, logger="django.request"):
        Client().put("/_matrix/media/unstable/com.beeper.msc3870/upload_url/s3cr3t", b"x")
    assert caplog.records
    assert "s3cr3t" not in caplog.text
    assert f"/upload_url/{REDACTED}" in caplog.text


# ---------------------------------------------------------------------------- 8.10 modes


def test_data_directory_is_private(hardened: Server, exchanged: dict[str, str]) -> None:
    wait_until(lambda: PERIODIC_LINE in hardened.log_text(), 20, "the sweeps' lock")
    data_dir = hardened.data_dir
    assert file_mode(data_dir) == 0o700
    made = [
        path
        for path in data_dir.rglob("*")
        # The logs are the test's own files, not the server's.
        if not path.name.endswith(".log")
    ]
    names = {path.relative_to(data_dir).as_posix() for path in made}
    assert {"mediarepo.sqlite3", "secret_key", "media", "periodic.lock"} <= names, names
    media_files = [p for p in (data_dir / "media").rglob("*") if p.is_file()]
    assert len(media_files) >= 2, names
    wrong = {
        path.relative_to(data_dir).as_posix(): oct(file_mode(path))
        for path in made
        if file_mode(path) != (0o700 if path.is_dir() else 0o600)
    }
    assert not wrong, wrong
