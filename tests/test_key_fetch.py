"""Fetching other servers' keys never holds the request plane.

A request signed by a server whose keys are not known yet makes this server fetch them.
Against a key server that never answers, that fetch runs until its deadline: it must run
once per origin, off the request threads, with the requests that need it parked on the
event loop (or refused when the fetch pool is full), and failing X-Matrix attempts are
limited per client address. Every peer here is a socket on 127.0.0.1 that accepts and
never speaks (plain TCP: a TLS client waits for the server's hello forever).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.test import Client

from msc3870.api.federation.authentication import OriginThrottle, ServerOrigin
from msc3870.federation import keyring
from msc3870.federation.xmatrix import sign_request

from .asgi_driver import call, request, run, until
from .federation_helpers import FakeRemote
from .helpers import msc3870_settings

DOWNLOAD = "/_matrix/federation/v1/media/download/someid"
FAST_FAILING = {
    "FEDERATION_IP_RANGE_ALLOWLIST": ["127.0.0.1/32"],
    "FEDERATION_VERIFY_TLS": False,
    "FEDERATION_KEY_FETCH_TIMEOUT_SECONDS": 3,
}


@dataclass
class SilentPeer:
    """A TCP listener on 127.0.0.1 that accepts connections and never sends a byte."""

    sock: socket.socket
    accepted: list[socket.socket] = field(default_factory=list)

    @property
    def server_name(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)


@pytest.fixture
def silent_peers() -> Iterator[Any]:
    peers: list[SilentPeer] = []

    def make() -> SilentPeer:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        peer = SilentPeer(sock)
        threading.Thread(target=peer.serve, daemon=True).start()
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.sock.close()
        for conn in peer.accepted:
            conn.close()


def hostile_headers(origin: str) -> dict[str, str]:
    """X-Matrix from ``origin`` with a signature no key will verify."""
    key = FakeRemote(origin).key  # any key: the origin's real one is never known
    return {
        "Authorization": sign_request("GET", DOWNLOAD, "localhost", origin=origin, signing_key=key)
    }


@pytest.fixture
def key_fetches() -> Iterator[None]:
    yield
    keyring.fetches.wait_idle(10)


@pytest.mark.usefixtures("key_fetches")
def test_requests_waiting_for_a_silent_key_server_hold_no_thread(
    app: Any, silent_peers: Any
) -> None:
    """Eight requests from a server whose key server never answers: one fetch, the
    requests parked on the loop, ``/versions`` answered at once, then every one of them
    401 once the fetch's deadline has passed."""
    peer = silent_peers()

    async def scenario() -> None:
        hostile = [
            request(app, "GET", DOWNLOAD, headers=hostile_headers(peer.server_name))
            for _ in range(8)
        ]
        await until(lambda: app.caps.total == 8, "eight parked requests")
        versions = await request(app, "GET", "/_matrix/client/versions").reply(timeout=2)
        assert versions.status == 200
        for exchange in hostile:
            reply = await exchange.reply(timeout=10)
            assert reply.status == 401, reply.body
            assert reply.json()["errcode"] == "M_UNAUTHORIZED"

    with msc3870_settings(**FAST_FAILING):
        run(scenario)
    assert len(peer.accepted) == 1, "one key fetch for all eight requests"


@pytest.mark.usefixtures("key_fetches")
def test_past_the_fetch_pool_requests_are_refused_at_once(app: Any, silent_peers: Any) -> None:
    first, second = silent_peers(), silent_peers()

    async def scenario() -> None:
        waiting = request(app, "GET", DOWNLOAD, headers=hostile_headers(first.server_name))
        await until(lambda: len(first.accepted) == 1, "the first origin's fetch")
        refused = await call(app, "GET", DOWNLOAD, headers=hostile_headers(second.server_name))
        assert refused.status == 401
        assert not waiting.task.done()
        assert (await waiting.reply(timeout=10)).status == 401

    with msc3870_settings(**FAST_FAILING, FEDERATION_KEY_FETCHES=1):
        run(scenario)
    assert len(second.accepted) == 0


@pytest.mark.usefixtures("key_fetches")
def test_federation_requests_in_flight_are_capped_per_address_on_the_loop(
    app: Any, silent_peers: Any
) -> None:
    """Past the cap, refused before any thread runs the request (so a burst from one
    address cannot queue ahead of everyone else); other addresses are not affected."""
    peer = silent_peers()
    headers = hostile_headers(peer.server_name)

    async def scenario() -> None:
        waiting = [request(app, "GET", DOWNLOAD, headers=headers) for _ in range(3)]
        await until(lambda: app.caps.total == 3, "three parked requests")
        ran: list[Any] = []
        real_run = app._run
        app._run = lambda *args, **kwargs: ran.append(args) or real_run(*args, **kwargs)
        try:
            refused = await call(app, "GET", DOWNLOAD, headers=headers)
        finally:
            app._run = real_run
        assert refused.status == 429
        assert refused.json()["errcode"] == "M_LIMIT_EXCEEDED"
        assert refused.headers["retry-after"] == "1"
        assert ran == [], "refused without a thread"
        elsewhere = request(app, "GET", DOWNLOAD, headers=headers, client="127.0.0.9")
        await until(lambda: app.caps.total == 4, "another address's request parked")
        for exchange in [*waiting, elsewhere]:
            assert (await exchange.reply(timeout=10)).status == 401
        assert not app.federation_in_flight.counts

    with msc3870_settings(**FAST_FAILING, FEDERATION_REQUESTS_PER_ADDRESS=3):
        run(scenario)


def test_without_the_asgi_handler_a_fetch_in_flight_is_shared(db: None, silent_peers: Any) -> None:
    """Django's test client (and any WSGI server) waits in its thread, but still for the
    one fetch of that origin."""
    peer = silent_peers()
    answers: list[int] = []

    def one() -> None:
        answers.append(
            Client().get(DOWNLOAD, headers=hostile_headers(peer.server_name)).status_code
        )

    with msc3870_settings(**FAST_FAILING):
        threads = [threading.Thread(target=one) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
    assert answers == [401] * 4
    assert len(peer.accepted) == 1


def test_failing_x_matrix_attempts_are_limited_per_client_address(db: None) -> None:
    """Malformed credentials cost nothing to send: past the failure rate of an address,
    its requests are refused before any verification work (429); other addresses are
    not affected."""
    malformed = {"Authorization": "X-Matrix"}
    with msc3870_settings(FEDERATION_AUTH_FAILURE_RATE="3/min"):
        statuses = [
            Client(REMOTE_ADDR="127.0.0.7").get(DOWNLOAD, headers=malformed) for _ in range(4)
        ]
        other = Client(REMOTE_ADDR="127.0.0.8").get(DOWNLOAD, headers=malformed)
    assert [r.status_code for r in statuses] == [401, 401, 401, 429]
    assert statuses[-1].json()["errcode"] == "M_LIMIT_EXCEEDED"
    assert int(statuses[-1]["Retry-After"]) >= 1
    assert other.status_code == 401


@pytest.mark.parametrize(
    ("a", "b"),
    [("Example.ORG", "example.org"), ("example.org:8448", "example.org"), ("[::1]:8448", "[::1]")],
)
def test_per_origin_rate_limits_normalise_the_origin(a: str, b: str) -> None:
    throttle = OriginThrottle()

    @dataclass
    class Fake:
        user: ServerOrigin

    assert throttle.key(Fake(ServerOrigin(a))) == throttle.key(Fake(ServerOrigin(b)))  # type: ignore[arg-type]
    assert throttle.key(Fake(ServerOrigin("example.org:8449"))) != throttle.key(  # type: ignore[arg-type]
        Fake(ServerOrigin("example.org"))
    )
