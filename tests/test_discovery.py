"""Server discovery (msc3870.federation.discovery), with dnspython mocked at the resolver
call and the well-known fetched through a stubbed ``outbound.request``; and the connection
override that SRV needs, against a real server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import dns.name
import dns.resolver
import pytest

from msc3870.federation import discovery, outbound
from msc3870.federation.discovery import Destination

from .conftest import msc3870_settings
from .federation_helpers import local_server, send


class World:
    """The DNS and well-known answers of a test, and which were asked."""

    def __init__(self) -> None:
        self.srv: dict[str, list[tuple[int, int, int, str]]] = {}
        self.well_known: dict[str, Any] = {}
        self.asked: list[str] = []

    def resolve(self, name: str, rdtype: str, **kwargs: Any) -> list[Any]:
        assert rdtype == "SRV"
        self.asked.append(name)
        if name not in self.srv:
            raise dns.resolver.NXDOMAIN()
        return [
            SimpleNamespace(
                priority=priority, weight=weight, port=port, target=dns.name.from_text(target)
            )
            for priority, weight, port, target in self.srv[name]
        ]

    def request(self, method: str, url: str, **kwargs: Any) -> outbound.Response:
        self.asked.append(url)
        answer = self.well_known.get(url)
        if answer is None:
            raise outbound.OutboundError("connection refused")
        return outbound.Response(200, {}, url, answer)  # type: ignore[arg-type]


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    from django.core.cache import cache

    cache.clear()
    state = World()
    monkeypatch.setattr(dns.resolver, "resolve", state.resolve)
    monkeypatch.setattr(outbound, "request", state.request)
    yield state
    cache.clear()


def test_ip_literals_and_explicit_ports_are_taken_as_they_are(world: World) -> None:
    assert discovery.resolve("1.2.3.4") == Destination("1.2.3.4", 8448, "1.2.3.4", 8448, "1.2.3.4")
    assert discovery.resolve("[2001:db8::1]:8000") == Destination(
        "[2001:db8::1]", 8000, "[2001:db8::1]", 8000, "[2001:db8::1]:8000"
    )
    assert discovery.resolve("example.org:1234") == Destination(
        "example.org", 1234, "example.org", 1234, "example.org:1234"
    )
    assert world.asked == []


def test_well_known_with_a_port(world: World) -> None:
    world.well_known["https://example.org/.well-known/matrix/server"] = (
        b'{"m.server": "matrix.example.org:443"}'
    )
    destination = discovery.resolve("example.org")
    assert destination == Destination(
        "matrix.example.org", 443, "matrix.example.org", 443, "matrix.example.org:443"
    )
    assert destination.base_url == "https://matrix.example.org:443"
    assert world.asked == ["https://example.org/.well-known/matrix/server"]


def test_well_known_without_a_port_then_srv_of_the_delegated_name(world: World) -> None:
    world.well_known["https://example.org/.well-known/matrix/server"] = (
        b'{"m.server": "matrix.example.org"}'
    )
    world.srv["_matrix-fed._tcp.matrix.example.org"] = [
        (20, 0, 9999, "backup.example.net."),
        (10, 5, 8443, "fed.example.net."),
    ]
    destination = discovery.resolve("example.org")
    # TLS and Host: the delegated name; the connection: the SRV target of lowest priority.
    assert destination == Destination(
        "matrix.example.org", 8443, "fed.example.net", 8443, "matrix.example.org"
    )
    assert destination.overrides() == {("matrix.example.org", 8443): ("fed.example.net", 8443)}


def test_no_well_known_then_srv_then_the_deprecated_srv(world: World) -> None:
    world.srv["_matrix._tcp.example.org"] = [(10, 0, 8449, "old.example.org.")]
    destination = discovery.resolve("example.org")
    assert destination == Destination("example.org", 8449, "old.example.org", 8449, "example.org")
    assert world.asked == [
        "https://example.org/.well-known/matrix/server",
        "_matrix-fed._tcp.example.org",
        "_matrix._tcp.example.org",
    ]


def test_nothing_published_is_port_8448(world: World) -> None:
    world.well_known["https://example.org/.well-known/matrix/server"] = b"not json"
    world.srv["_matrix-fed._tcp.example.org"] = [(0, 0, 0, ".")]  # "service not offered"
    assert discovery.resolve("example.org") == Destination(
        "example.org", 8448, "example.org", 8448, "example.org"
    )


def test_results_are_cached(world: World) -> None:
    world.srv["_matrix-fed._tcp.example.org"] = [(10, 0, 8443, "fed.example.org.")]
    first = discovery.resolve("example.org")
    asked = len(world.asked)
    assert discovery.resolve("example.org") == first
    assert len(world.asked) == asked


def test_connect_to_sends_the_connection_elsewhere_through_the_guard(db: None) -> None:
    def hello(handler: Any) -> None:
        send(handler, 200, handler.headers["Host"].encode(), {"Content-Type": "text/plain"})

    with local_server({"/hello": hello}) as server:
        url = f"http://media.example.invalid:{server.port}/hello"
        route = {("media.example.invalid", server.port): ("127.0.0.1", server.port)}
        with msc3870_settings(FEDERATION_IP_RANGE_ALLOWLIST=["127.0.0.1/32"]):
            with outbound.connect_to(route):
                answer = outbound.request("GET", url, headers={"Host": "example.invalid"})
            assert answer.content == b"example.invalid"
        # The guard still judges the address connected to.
        with outbound.connect_to(route), pytest.raises(outbound.AddressNotAllowed):
            outbound.request("GET", url)
