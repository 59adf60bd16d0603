"""On real processes: media a moderator acts on is 404 on every client read path at once
on every web worker, and downloads parked on it in any worker are answered 404.

gunicorn runs two uvicorn workers on PostgreSQL with a celery worker. The moderation
call runs in the test process, as a management command or an admin process would, and
commits there; the workers learn nothing but what they read (each request reads the row)
and what PostgreSQL's NOTIFY tells their parked requests. Which worker answers a request
is read from the workers' sockets (psutil) before the request is sent on its connection,
so "every worker" is checked, not assumed. The federation paths are checked per path in
the unit suite (``tests/test_moderation_everywhere.py``).
"""

from __future__ import annotations

import http.client
from collections.abc import Callable
from datetime import timedelta

import psutil
import pytest
from django.utils import timezone

from msc3870 import moderation
from msc3870.models import Media, ModerationAction

from ..helpers import bearer, media_of, mxc_path, png_bytes, wait_until
from .conftest import Stack
from .helpers import CLIENT_TIMEOUT, Waiters, park, results

pytestmark = pytest.mark.services

A = ModerationAction
MOD = "@mod:localhost"
SIZE = "width=32&height=32"


def read_paths(media: Media) -> dict[str, str]:
    path = mxc_path(media.mxc_uri)
    return {
        "v1 download": f"/_matrix/client/v1/media/download/{path}?timeout_ms=0",
        "legacy download": f"/_matrix/media/v3/download/{path}?timeout_ms=0",
        "v1 thumbnail": f"/_matrix/client/v1/media/thumbnail/{path}?{SIZE}&timeout_ms=0",
        "legacy thumbnail": f"/_matrix/media/v3/thumbnail/{path}?{SIZE}&timeout_ms=0",
    }


class Connections:
    """Keep-alive connections to the server, each asked which worker holds it before a
    request is sent on it (the server may close one after an answer to balance the
    workers; it is then opened again, and asked again)."""

    def __init__(self, stack: Stack, count: int) -> None:
        self.stack = stack
        self.host, port = stack.base_url.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)
        self.connections = [
            http.client.HTTPConnection(self.host, self.port, timeout=CLIENT_TIMEOUT)
            for _ in range(count)
        ]

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.stack.processes["server"].pid).children()

    def holder(self, connection: http.client.HTTPConnection) -> int:
        """The pid of the worker that accepted this connection (opened if closed)."""
        if connection.sock is None:
            connection.connect()
        client_port = connection.sock.getsockname()[1]

        def found() -> int | None:
            for worker in self.workers():
                for conn in worker.net_connections(kind="tcp"):
                    if (
                        conn.laddr
                        and conn.raddr
                        and conn.laddr.port == self.port
                        and conn.raddr.port == client_port
                        and conn.status == psutil.CONN_ESTABLISHED
                    ):
                        return worker.pid
            return None

        return wait_until(found, 10, "a worker to accept the connection")

    def get_all(self, path: str, headers: dict[str, str]) -> list[tuple[int, int, bytes]]:
        """GET ``path`` on every connection: (worker pid, status, body) of each."""
        answers = []
        for connection in self.connections:
            pid = self.holder(connection)
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            answers.append((pid, response.status, response.read()))
            if response.will_close:
                connection.close()
        return answers

    def close(self) -> None:
        for connection in self.connections:
            connection.close()


def spread_connections(stack: Stack, media: Media, headers: dict[str, str]) -> Connections:
    """Connections that have been served by every worker (more are opened, in bounded
    rounds, until they have)."""
    for count in (6, 12, 24):
        connections = Connections(stack, count)
        answers = connections.get_all(read_paths(media)["v1 download"], headers)
        assert {status for _, status, _ in answers} == {200}, answers[:2]
        if {pid for pid, _, _ in answers} == {w.pid for w in connections.workers()}:
            return connections
        connections.close()
    raise AssertionError("connections never reached every worker")


ACTIONS: dict[str, Callable[[Media], object]] = {
    "quarantine": lambda m: moderation.quarantine(m, by=MOD, reason="reported"),
    "reject": lambda m: moderation.reject(m, by=MOD, reason="illegal"),
    "purge": lambda m: moderation.purge(m, by=MOD, reason="spam"),
    "quarantine the uploader": lambda m: moderation.quarantine_user_media(m.user_id, by=MOD),
    "bulk purge": lambda m: moderation.moderate_many([m.pk], A.PURGE, by=MOD),
}


@pytest.mark.parametrize("action", list(ACTIONS))
def test_moderated_media_is_404_on_every_path_in_every_worker_at_once(
    two_workers: Stack, user_token: tuple[str, str], action: str
) -> None:
    _, token = user_token
    media = media_of(two_workers.client(token).uploaded(png_bytes(64, 64), "image/png"))
    headers = bearer(token)
    connections = spread_connections(two_workers, media, headers)
    try:
        for path in read_paths(media).values():  # thumbnails made, every path served
            answers = connections.get_all(path, headers)
            assert {status for _, status, _ in answers} == {200}, (path, answers[:2])

        ACTIONS[action](media)  # committed here, in another process

        workers = {w.pid for w in connections.workers()}
        for name, path in read_paths(media).items():
            answers = connections.get_all(path, headers)
            assert {status for _, status, _ in answers} == {404}, (name, answers[:2])
            assert all(b"M_NOT_FOUND" in body for _, _, body in answers), name
            assert {pid for pid, _, _ in answers} == workers, name
    finally:
        connections.close()


@pytest.mark.parametrize("bulk", [False, True])
def test_downloads_parked_in_every_worker_are_404_when_the_media_is_purged(
    two_workers: Stack, waiters: Waiters, user_token: tuple[str, str], bulk: bool
) -> None:
    _, token = user_token
    content_uri = two_workers.client(token).create()["content_uri"]
    base = two_workers.base_url
    path = mxc_path(content_uri)
    parked = []
    for url, headers in (
        (f"{base}/_matrix/client/v1/media/download/{path}?timeout_ms=60000", bearer(token)),
        (f"{base}/_matrix/client/v1/media/thumbnail/{path}?{SIZE}&timeout_ms=60000", bearer(token)),
        (f"{base}/_matrix/media/v3/download/{path}?timeout_ms=10000", {}),
    ):
        parked += park(waiters, two_workers, url, headers, 4)  # on every worker
    media = media_of(content_uri)
    started = timezone.now()
    if bulk:
        assert moderation.moderate_many([media.pk], A.PURGE, by=MOD).done == 1
    else:
        assert moderation.purge(media, by=MOD, reason="spam")
    answers = results(parked)
    assert {status for status, _, _ in answers} == {404}, [a[:2] for a in answers][:3]
    assert all(b"M_NOT_FOUND" in body for _, body, _ in answers)
    # Woken by the purge (NOTIFY): past their deadline they would have been told to wait
    # (M_NOT_YET_UPLOADED), not 404.
    assert timezone.now() - started < timedelta(seconds=8)
