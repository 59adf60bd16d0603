"""The whole MSC3870 flow over real HTTP: a real client against a live server thread."""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests

from msc3870.models import MediaState

from .helpers import bearer, media_files, media_of, msc3870_settings, mxc_path


def test_create_put_to_url_complete_download(live_url: str, token: str) -> None:
    http = requests.Session()
    created = http.post(f"{live_url}/_matrix/media/v1/create", headers=bearer(token)).json()
    assert created["upload_url"].startswith(live_url)
    # A fixed start: random bytes beginning with "{" sniff as JSON (1 run in 256 served
    # application/json, as the type policy says).
    data = b"mediarepo test bytes\n" + os.urandom(3 * 1024 * 1024 + 17)
    # The upload URL needs no Matrix token: the URL is the credential.
    put = http.put(
        created["com.beeper.msc3870.upload_url"],
        data=data,
        headers={"Content-Type": "application/x-test"},
    )
    assert put.status_code == 200
    done = http.post(
        f"{live_url}/_matrix/media/v1/upload/{mxc_path(created['content_uri'])}/complete"
        "?filename=blob.bin",
        json={},
        headers=bearer(token),
    )
    assert done.status_code == 200
    assert done.json() == {"content_uri": created["content_uri"]}
    got = http.get(
        f"{live_url}/_matrix/client/v1/media/download/{mxc_path(created['content_uri'])}",
        headers=bearer(token),
    )
    assert got.status_code == 200
    assert got.content == data
    assert got.headers["Content-Type"] == "application/x-test"
    assert got.headers["Content-Disposition"] == "attachment; filename=blob.bin"
    ranged = http.get(
        f"{live_url}/_matrix/media/v3/download/{mxc_path(created['content_uri'])}",
        headers={"Range": "bytes=1000-1999"},
    )
    assert ranged.status_code == 206
    assert ranged.content == data[1000:2000]


def test_download_waits_for_an_upload_in_progress(live_url: str, token: str) -> None:
    http = requests.Session()
    created = http.post(f"{live_url}/_matrix/media/v1/create", headers=bearer(token)).json()
    path = mxc_path(created["content_uri"])
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            requests.get,
            f"{live_url}/_matrix/media/v3/download/{path}?timeout_ms=15000",
            timeout=30,
        )
        threading.Event().wait(0.5)
        assert not waiting.done()
        http.put(created["upload_url"], data=b"worth the wait")
        http.post(
            f"{live_url}/_matrix/media/v1/upload/{path}/complete", json={}, headers=bearer(token)
        )
        response = waiting.result()
    assert response.status_code == 200
    assert response.content == b"worth the wait"


@pytest.mark.parametrize("waits", [True, False], ids=["waits-for-verdict", "answers-early"])
def test_racing_completes_screen_once_and_agree(live_url: str, token: str, waits: bool) -> None:
    """Six racing /complete calls all answer 200 with the same id and the checks run once.
    By default /complete answers before the full-object checks finish, so the row may still
    be processing when the answers arrive: the test then waits (bounded) for the verdict."""
    with msc3870_settings(COMPLETE_WAITS_FOR_CHECKS=waits):
        _race_completes(live_url, token, settle=not waits)


def _race_completes(live_url: str, token: str, settle: bool) -> None:
    http = requests.Session()
    created = http.post(f"{live_url}/_matrix/media/v1/create", headers=bearer(token)).json()
    path = mxc_path(created["content_uri"])
    assert http.put(created["upload_url"], data=b"raced").status_code == 200
    barrier = threading.Barrier(6)

    def complete(_: int) -> requests.Response:
        barrier.wait()
        return requests.post(
            f"{live_url}/_matrix/media/v1/upload/{path}/complete", json={}, headers=bearer(token)
        )

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(complete, range(6)))
    assert [r.status_code for r in responses] == [200] * 6
    assert {r.json()["content_uri"] for r in responses} == {created["content_uri"]}
    media = media_of(created["content_uri"])
    deadline = time.monotonic() + 30
    while settle and media.state == MediaState.PROCESSING and time.monotonic() < deadline:
        time.sleep(0.02)
        media = media_of(created["content_uri"])
    assert media.state == MediaState.COMPLETE
    assert media.attempts == 1


def test_racing_puts_fill_the_id_once(live_url: str, token: str) -> None:
    created = requests.post(f"{live_url}/_matrix/media/v1/create", headers=bearer(token)).json()
    path = mxc_path(created["content_uri"])
    barrier = threading.Barrier(4)

    def put(index: int) -> requests.Response:
        barrier.wait()
        return requests.put(
            f"{live_url}/_matrix/media/v3/upload/{path}",
            data=f"writer {index}".encode() * 1000,
            headers=bearer(token),
        )

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(put, range(4)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 409, 409, 409]
    winner = next(i for i, r in enumerate(responses) if r.status_code == 200)
    got = requests.get(f"{live_url}/_matrix/media/v3/download/{path}")
    assert got.content == f"writer {winner}".encode() * 1000


def test_client_that_hangs_up_mid_body_leaves_nothing(live_url: str, token: str) -> None:
    created = requests.post(f"{live_url}/_matrix/media/v1/create", headers=bearer(token)).json()
    path = mxc_path(created["content_uri"])
    host = urlsplit(live_url)
    with socket.create_connection((host.hostname, host.port)) as raw:
        raw.sendall(
            (
                f"PUT /_matrix/media/v3/upload/{path} HTTP/1.1\r\nHost: {host.netloc}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: text/plain\r\n"
                "Content-Length: 100000\r\n\r\n"
            ).encode()
            + b"only part of it"
        )
        raw.shutdown(socket.SHUT_WR)
        raw.settimeout(10)
        reply = raw.recv(4096)
    assert b" 400 " in reply.split(b"\r\n", 1)[0]
    assert media_of(created["content_uri"]).state == MediaState.PENDING
    assert media_files() == []
    # The id is still usable.
    ok = requests.put(
        f"{live_url}/_matrix/media/v3/upload/{path}", data=b"all of it", headers=bearer(token)
    )
    assert ok.status_code == 200
