"""Server discovery (msc3870.federation.discovery), with dnspython mocked at the resolver
call and the well-known fetched through a stubbed ``outbound.request``; and the connection
override that SRV needs, against a real server on 127.0.0.1."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dns.name
import dns.resolver
import pytest

from msc3870.federation import discovery, outbound
from msc3870.federation.discovery import Destination

from .federation_helpers import SLACK_SECONDS, local_server, self_signed_tls, send, silent_server
from .helpers import msc3870_settings


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


# --- under an outer deadline ----------------------------------------------------------


class SlowDNS:
    """SRV lookups against a DNS server that never answers: each waits out the lifetime it
    is given, as dnspython does, then times out. Records the lifetimes."""

    def __init__(self) -> None:
        self.lifetimes: list[float] = []

    def resolve(self, name: str, rdtype: str, *, lifetime: float, **kwargs: Any) -> Any:
        self.lifetimes.append(lifetime)
        time.sleep(lifetime)
        raise dns.resolver.LifetimeTimeout(timeout=lifetime, errors={})


@pytest.fixture
def slow_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowDNS]:
    from django.core.cache import cache

    cache.clear()
    state = SlowDNS()
    monkeypatch.setattr(dns.resolver, "resolve", state.resolve)
    real_getaddrinfo = socket.getaddrinfo

    def literals_only(host: str, port: int, *args: Any) -> Any:
        # The well-known fetch must never look a name up for real.
        return real_getaddrinfo(host, port, *args, flags=socket.AI_NUMERICHOST)

    monkeypatch.setattr(socket, "getaddrinfo", literals_only)
    yield state
    cache.clear()


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
@pytest.mark.parametrize("well_known", ["never answers", "answers 404"])
def test_discovery_ends_by_an_outer_deadline(
    well_known: str, slow_dns: SlowDNS, tmp_path: Path
) -> None:
    """The well-known server accepts the connection and never completes TLS (or answers
    404 at once), and both SRV lookups would wait DNS_TIMEOUT_SECONDS: discovery ends by
    the block's deadline with a DiscoveryError, and caches nothing."""
    from django.core.cache import cache

    def not_found(handler: Any) -> None:
        send(handler, 404, b"{}")

    with ExitStack() as stack:
        if well_known == "never answers":
            port = stack.enter_context(silent_server())
        else:
            routes = {"/.well-known/matrix/server": not_found}
            port = stack.enter_context(local_server(routes, tls=self_signed_tls(tmp_path))).port
        stack.enter_context(
            msc3870_settings(
                FEDERATION_IP_RANGE_ALLOWLIST=["127.0.0.1/32"], FEDERATION_VERIFY_TLS=False
            )
        )
        stack.enter_context(outbound.connect_to({("example.org", 443): ("127.0.0.1", port)}))
        started = time.monotonic()
        with outbound.deadline(2), pytest.raises(discovery.DiscoveryError, match="time"):
            discovery.resolve("example.org")
        elapsed = time.monotonic() - started
    assert elapsed < 2 + SLACK_SECONDS, f"took {elapsed:.1f} s"
    assert all(lifetime <= 2 for lifetime in slow_dns.lifetimes)
    assert cache.get("msc3870:discovery:example.org") is None


def test_a_lookup_after_the_deadline_passed_fails_at_once(slow_dns: SlowDNS) -> None:
    with outbound.deadline(0), pytest.raises(discovery.DiscoveryError):
        discovery.resolve("example.org")
    assert slow_dns.lifetimes == []


def test_srv_lookups_outside_a_deadline_keep_their_own_lifetime(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    lifetimes: list[float] = []
    resolve = world.resolve

    def recording(name: str, rdtype: str, **kwargs: Any) -> Any:
        lifetimes.append(kwargs["lifetime"])
        return resolve(name, rdtype, **kwargs)

    monkeypatch.setattr(dns.resolver, "resolve", recording)
    assert discovery.resolve("example.org").port == 8448
    assert lifetimes == [discovery.DNS_TIMEOUT_SECONDS] * 2
