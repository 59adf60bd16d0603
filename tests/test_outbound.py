"""The SSRF guard of outbound requests, against a real HTTP server on 127.0.0.1: refused by
default, allowed when the allowlist opens 127.0.0.1, refused again when it closes, on
every redirect hop, at connect time, with size limits and TLS verification; and the one
deadline from the first DNS query to the last body byte, against local peers that stall
at each phase (DNS is always a patched ``getaddrinfo``: no test makes a real lookup)."""

from __future__ import annotations

import gzip
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from msc3870.federation import outbound
from msc3870.federation.outbound import AddressNotAllowed, IPPolicy, Options

from .federation_helpers import (
    SLACK_SECONDS,
    LocalServer,
    local_server,
    self_signed_tls,
    send,
    silent_server,
)
from .helpers import msc3870_settings

LOOPBACK_OPEN = msc3870_settings(FEDERATION_IP_RANGE_ALLOWLIST=["127.0.0.1/32"])


def _ok(handler: BaseHTTPRequestHandler) -> None:
    send(handler, 200, b"hello", {"Content-Type": "text/plain"})


def _big(handler: BaseHTTPRequestHandler) -> None:
    send(handler, 200, b"x" * 10_000, {"Content-Type": "application/octet-stream"})


def _big_chunked(handler: BaseHTTPRequestHandler) -> None:
    # No Content-Length: only counting while reading can stop it.
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    for _ in range(10):
        handler.wfile.write(b"3e8\r\n" + b"y" * 1000 + b"\r\n")
    handler.wfile.write(b"0\r\n\r\n")


def _gzip_bomb(handler: BaseHTTPRequestHandler) -> None:
    body = gzip.compress(b"\0" * 1_000_000)  # about 1 KiB on the wire
    send(handler, 200, body, {"Content-Encoding": "gzip"})


def _trickle(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "100")
    handler.end_headers()
    try:
        for _ in range(100):
            handler.wfile.write(b"z")
            handler.wfile.flush()
            time.sleep(0.1)
    except OSError:
        pass  # the client gave up, as it should


def _redirect(target: str) -> Any:
    def route(handler: BaseHTTPRequestHandler) -> None:
        send(handler, 302, b"", {"Location": target})

    return route


def _redirect_with_endless_body(target: str) -> Any:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", target)
        handler.send_header("Content-Length", str(10**9))
        handler.end_headers()
        try:
            handler.wfile.write(b"r" * 65536)
            handler.wfile.flush()
            time.sleep(3)  # then nothing more: a client reading it would hang here
        except OSError:
            pass

    return route


@pytest.fixture
def server() -> Iterator[LocalServer]:
    routes = {
        "/ok": _ok,
        "/big": _big,
        "/big-chunked": _big_chunked,
        "/gzip-bomb": _gzip_bomb,
        "/trickle": _trickle,
        "/to-metadata": _redirect("http://169.254.169.254/latest/meta-data/"),
        "/to-private": _redirect("http://10.0.0.1/"),
    }
    with local_server(routes) as running:
        routes["/to-ok"] = _redirect(f"{running.url}/ok")
        routes["/to-ok-endless-body"] = _redirect_with_endless_body("/ok")
        routes["/loop"] = _redirect("/loop")
        yield running


# --- the policy, address by address ---------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.1.2.3",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.251",
        "255.255.255.255",
        "192.0.2.1",
        "::1",
        "::",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "2001:db8::1",
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "::7f00:1",  # IPv4-compatible 127.0.0.1
        "::a00:1",  # IPv4-compatible 10.0.0.1
        "::808:808",  # IPv4-compatible, even of a public address: deprecated
        "::ffff:0:7f00:1",  # IPv4-translated 127.0.0.1
        "::ffff:0:808:808",  # IPv4-translated, even of a public address
        "64:ff9b:1::7f00:1",  # local-use NAT64 of 127.0.0.1
        "64:ff9b:1:2::808:808",  # local-use NAT64: the operator's translator
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
        "2001::1",  # Teredo
    ],
)
def test_default_policy_refuses_internal_addresses(address: str) -> None:
    assert not IPPolicy.from_settings().allows(address)


@pytest.mark.parametrize(
    "address", ["::7f00:1", "::ffff:0:7f00:1", "64:ff9b:1::7f00:1", "::ffff:127.0.0.1"]
)
def test_the_allowlist_wins_for_an_allowed_ipv4_in_any_embedding_form(address: str) -> None:
    with LOOPBACK_OPEN:
        assert IPPolicy.from_settings().allows(address)
        # Only that IPv4 address: its neighbour in the same form stays refused.
        assert not IPPolicy.from_settings().allows(address[:-1] + "2")


@pytest.mark.parametrize(
    "address", ["::7f00:1", "::ffff:0:7f00:1", "64:ff9b:1::7f00:1", "64:ff9b::7f00:1"]
)
def test_embedded_ipv4_is_judged_by_a_configured_denylist(address: str) -> None:
    # A denylist that names only IPv4 ranges still catches the IPv6 forms that carry them.
    with msc3870_settings(FEDERATION_IP_RANGE_DENYLIST=["127.0.0.0/8"]):
        policy = IPPolicy.from_settings()
        assert not policy.allows(address)
        assert policy.allows(address.replace("7f00:1", "808:808"))


def test_allowing_ipv4_ranges_never_opens_ipv6_loopback_or_unspecified() -> None:
    # ::1 and :: lie in ::/96 but are not IPv4-compatible addresses of 0.0.0.1 and 0.0.0.0.
    with msc3870_settings(FEDERATION_IP_RANGE_ALLOWLIST=["0.0.0.0/8"]):
        policy = IPPolicy.from_settings()
        assert not policy.allows("::1")
        assert not policy.allows("::")


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "64:ff9b::808:808"]
)
def test_default_policy_allows_public_addresses(address: str) -> None:
    assert IPPolicy.from_settings().allows(address)


def test_allowlist_wins_over_the_denylist_in_either_form() -> None:
    with LOOPBACK_OPEN:
        policy = IPPolicy.from_settings()
        assert policy.allows("127.0.0.1")
        assert policy.allows("::ffff:127.0.0.1")  # the same address, mapped
        assert not policy.allows("127.0.0.2")
        assert not policy.allows("::1")


def test_a_configured_denylist_replaces_the_default_but_never_unspecified() -> None:
    with msc3870_settings(FEDERATION_IP_RANGE_DENYLIST=["203.0.113.0/24"]):
        policy = IPPolicy.from_settings()
        assert policy.allows("10.0.0.1")
        assert not policy.allows("203.0.113.9")
        assert not policy.allows("0.0.0.0")
        assert not policy.allows("::")


# --- real requests --------------------------------------------------------------------


def test_loopback_server_is_refused_by_default_and_never_reached(server: LocalServer) -> None:
    with pytest.raises(AddressNotAllowed, match=r"127\.0\.0\.1"):
        outbound.request("GET", f"{server.url}/ok")
    assert server.hits == []


def test_loopback_server_is_reached_when_the_allowlist_opens_it(server: LocalServer) -> None:
    with LOOPBACK_OPEN:
        response = outbound.request("GET", f"{server.url}/ok")
    assert (response.status, response.content) == (200, b"hello")
    assert server.hits == ["/ok"]
    # ...and refused again once it closes.
    with pytest.raises(AddressNotAllowed):
        outbound.request("GET", f"{server.url}/ok")
    assert server.hits == ["/ok"]


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8448/",
        "http://[::ffff:127.0.0.1]:8448/",
        "http://[fe80::1]:8448/",
        "https://0.0.0.0:8448/",
    ],
)
def test_internal_ip_literals_are_refused_before_connecting(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[object] = []

    def connect(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("no connection may be attempted")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    with pytest.raises(AddressNotAllowed):
        outbound.request("GET", url, options=Options(timeout=30))
    assert attempts == []  # refused, not tried (nor timed out trying)


def test_a_hostname_resolving_to_loopback_is_refused(server: LocalServer) -> None:
    with pytest.raises(AddressNotAllowed, match="localhost resolves to"):
        outbound.request("GET", f"http://localhost:{server.port}/ok")
    assert server.hits == []


def test_a_redirect_to_a_private_address_is_refused(server: LocalServer) -> None:
    with LOOPBACK_OPEN:
        for path in ("/to-metadata", "/to-private"):
            with pytest.raises(AddressNotAllowed):
                outbound.request("GET", f"{server.url}{path}")
    assert server.hits == ["/to-metadata", "/to-private"]


def test_allowed_redirects_are_followed_through_the_guard(server: LocalServer) -> None:
    with LOOPBACK_OPEN:
        response = outbound.request("GET", f"{server.url}/to-ok")
        assert (response.status, response.content) == (200, b"hello")
        not_followed = outbound.request(
            "GET", f"{server.url}/to-ok", options=Options(allow_redirects=False)
        )
    assert not_followed.status == 302
    assert server.hits == ["/to-ok", "/ok", "/to-ok"]


def test_a_redirects_body_is_never_read(server: LocalServer) -> None:
    # The redirect announces 10**9 bytes and sends 64 KiB: read against max_bytes=100 it
    # would be too large; read at all it would stall, then end short (an error either way).
    with LOOPBACK_OPEN:
        response = outbound.request(
            "GET", f"{server.url}/to-ok-endless-body", options=Options(max_bytes=100)
        )
    assert (response.status, response.content) == (200, b"hello")
    assert server.hits == ["/to-ok-endless-body", "/ok"]


def test_redirect_loops_end(server: LocalServer) -> None:
    with LOOPBACK_OPEN, pytest.raises(outbound.OutboundError, match="redirects"):
        outbound.request("GET", f"{server.url}/loop")
    assert server.hits == ["/loop"] * 6


def test_a_policy_of_its_own_judges_every_hop_instead_of_federations(
    server: LocalServer,
) -> None:
    """URL previews pass their own lists (``Options(policy=)``): they, not federation's,
    decide every connection of the request, redirect hops included, and only for it."""
    own = outbound.IPPolicy.from_lists(None, ["127.0.0.1/32"])
    # Federation's lists would deny this.
    response = outbound.request("GET", f"{server.url}/to-ok", options=Options(policy=own))
    assert (response.status, response.content) == (200, b"hello")
    with pytest.raises(AddressNotAllowed):
        outbound.request("GET", f"{server.url}/ok")  # the policy was for that request only
    closed = outbound.IPPolicy.from_lists(["127.0.0.0/8"], [])
    with LOOPBACK_OPEN, pytest.raises(AddressNotAllowed):
        # Federation's lists would allow this.
        outbound.request("GET", f"{server.url}/ok", options=Options(policy=closed))
    with pytest.raises(AddressNotAllowed):
        outbound.request("GET", f"{server.url}/to-metadata", options=Options(policy=own))
    assert server.hits == ["/to-ok", "/ok", "/to-metadata"]


def test_an_empty_deny_list_still_denies_this_host() -> None:
    policy = outbound.IPPolicy.from_lists([], [])
    assert not policy.allows("0.0.0.0") and not policy.allows("::")
    assert policy.allows("127.0.0.1")


def test_mixed_public_and_private_answers_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_getaddrinfo(host: str, port: int, *args: Any) -> list[Any]:
        assert host == "mixed.example"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(AddressNotAllowed, match=r"127\.0\.0\.1"):
        outbound.request("GET", "http://mixed.example/")


@pytest.mark.parametrize(
    "address", ["::7f00:1", "::ffff:0:7f00:1", "64:ff9b:1::7f00:1", "2001:0:4136:e378::1"]
)
def test_a_name_resolving_to_an_ipv4_embedding_form_is_refused_before_connecting(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    connects: list[Any] = []

    def fake_getaddrinfo(host: str, port: int, *args: Any) -> list[Any]:
        assert host == "embedded.example"
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))]

    def recording_connect(self: socket.socket, sockaddr: Any) -> None:
        connects.append(sockaddr)
        raise ConnectionRefusedError("test: no network")

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", recording_connect)
    with pytest.raises(AddressNotAllowed, match=r"embedded\.example resolves to"):
        outbound.guarded_connect("embedded.example", 8448, timeout=5)
    with pytest.raises(AddressNotAllowed):
        outbound.request("GET", "https://embedded.example:8448/", options=Options(timeout=5))
    assert connects == []


def test_the_connection_goes_to_the_address_that_was_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DNS rebinding: a name that is public when checked and loopback when connecting. The
    guard resolves once and connects to what it checked, so the second answer is never
    asked for."""
    answers = iter(["93.184.216.34", "127.0.0.1"])
    lookups: list[str] = []
    connects: list[Any] = []

    def rebinding_getaddrinfo(host: str, port: int, *args: Any) -> list[Any]:
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    def recording_connect(self: socket.socket, address: Any) -> None:
        connects.append(address)
        raise ConnectionRefusedError("test: no network")

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    with pytest.raises(outbound.OutboundError):
        outbound.request("GET", "http://rebind.example/")
    assert lookups == ["rebind.example"]
    assert connects == [("93.184.216.34", 80)]


def test_proxies_from_the_environment_are_not_used(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://10.9.9.9:3128")
    monkeypatch.setenv("http_proxy", "http://10.9.9.9:3128")
    with LOOPBACK_OPEN:
        response = outbound.request("GET", f"{server.url}/ok", options=Options(timeout=5))
        assert response.content == b"hello"


# --- limits ---------------------------------------------------------------------------


def test_content_length_over_the_limit_is_refused_before_reading(server: LocalServer) -> None:
    with LOOPBACK_OPEN, pytest.raises(outbound.ResponseTooLarge, match="Content-Length"):
        outbound.request("GET", f"{server.url}/big", options=Options(max_bytes=9_999))
    with LOOPBACK_OPEN:
        response = outbound.request("GET", f"{server.url}/big", options=Options(max_bytes=10_000))
        assert len(response.content) == 10_000


def test_a_body_without_length_is_stopped_while_streaming(server: LocalServer) -> None:
    received = []
    with (
        LOOPBACK_OPEN,
        outbound.stream("GET", f"{server.url}/big-chunked", options=Options(max_bytes=2500)) as r,
        pytest.raises(outbound.ResponseTooLarge),
    ):
        for chunk in r.iter_bytes(1000):
            received.append(chunk)
    assert sum(map(len, received)) <= 2500


def test_a_compressed_body_counts_by_its_decoded_size(server: LocalServer) -> None:
    with LOOPBACK_OPEN, pytest.raises(outbound.ResponseTooLarge):
        outbound.request("GET", f"{server.url}/gzip-bomb", options=Options(max_bytes=100_000))


def test_a_trickling_peer_is_stopped_at_the_deadline(server: LocalServer) -> None:
    # A byte every 0.1 s: the per-read timeout (2 s) never fires, and the whole body would
    # arrive in 10 s. Only the total deadline can raise OutboundTimeout.
    with (
        LOOPBACK_OPEN,
        outbound.stream(
            "GET", f"{server.url}/trickle", options=Options(timeout=2, total_timeout=0.5)
        ) as r,
        pytest.raises(outbound.OutboundTimeout),
    ):
        r.read()


# --- TLS ------------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[LocalServer]:
    pytest.importorskip("cryptography")
    with local_server({"/ok": _ok}, tls=self_signed_tls(tmp_path)) as running:
        yield running


def test_tls_certificates_are_verified_by_default(tls_server: LocalServer) -> None:
    with LOOPBACK_OPEN, pytest.raises(outbound.OutboundError, match="CERTIFICATE_VERIFY_FAILED"):
        outbound.request("GET", f"{tls_server.url}/ok", options=Options(timeout=5))


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_verification_can_be_turned_off_for_tests(tls_server: LocalServer) -> None:
    with msc3870_settings(
        FEDERATION_IP_RANGE_ALLOWLIST=["127.0.0.1/32"], FEDERATION_VERIFY_TLS=False
    ):
        response = outbound.request("GET", f"{tls_server.url}/ok", options=Options(timeout=5))
        assert response.content == b"hello"
    with msc3870_settings(FEDERATION_VERIFY_TLS=False), pytest.raises(AddressNotAllowed):
        outbound.request("GET", f"{tls_server.url}/ok", options=Options(timeout=5))  # still guarded


# --- one deadline, from the first DNS query to the last body byte ---------------------


def _trickled_head(at_once: bytes, trickled: bytes) -> Any:
    """A response head sent as ``at_once``, then ``trickled`` a byte every 0.1 s: each read
    gets a byte well within any per-read timeout."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        try:
            handler.wfile.write(at_once)
            handler.wfile.flush()
            for byte in trickled:
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass  # the client gave up, as it should
        handler.close_connection = True

    return route


def _slow_redirect(handler: BaseHTTPRequestHandler) -> None:
    time.sleep(0.8)
    send(handler, 302, b"", {"Location": "/slow-redirect"})


def _endless_body(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    try:
        for _ in range(1000):
            handler.wfile.write(b"e")
            handler.wfile.flush()
            time.sleep(0.05)
    except OSError:
        pass


@pytest.fixture
def slow_server() -> Iterator[LocalServer]:
    routes = {
        "/ok": _ok,
        # The status line itself, then the headers, a byte at a time: about 20 s in all.
        "/slow-status-line": _trickled_head(b"", b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"s" * 200),
        "/slow-headers": _trickled_head(b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"s" * 200),
        "/slow-redirect": _slow_redirect,
        "/endless-body": _endless_body,
    }
    with local_server(routes) as running:
        yield running


def _assert_ends_in_time(started: float, seconds: float) -> None:
    elapsed = time.monotonic() - started
    assert elapsed < seconds + SLACK_SECONDS, f"took {elapsed:.1f} s, deadline {seconds} s"


@pytest.mark.timeout(15)
@pytest.mark.parametrize("path", ["/slow-status-line", "/slow-headers"])
def test_a_peer_trickling_its_response_head_is_cut_at_the_deadline(
    path: str, slow_server: LocalServer
) -> None:
    # A byte every 0.1 s: the per-read timeout (2 s) never fires, and the head would take
    # 20 s. Only the total deadline can end it.
    started = time.monotonic()
    with (
        LOOPBACK_OPEN,
        pytest.raises(outbound.OutboundTimeout),
        outbound.stream(
            "GET", f"{slow_server.url}{path}", options=Options(timeout=2, total_timeout=1.5)
        ),
    ):
        pass
    _assert_ends_in_time(started, 1.5)


@pytest.fixture
def tls_context(tmp_path: Path) -> Any:
    pytest.importorskip("cryptography")
    return self_signed_tls(tmp_path)


@pytest.mark.timeout(15)
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_peer_that_never_speaks_is_cut_at_the_deadline(scheme: str) -> None:
    # The connection is accepted, then nothing: no response (http), no TLS handshake
    # (https). The per-operation timeout (30 s) would wait it out; the deadline does not.
    with silent_server() as port, LOOPBACK_OPEN:
        started = time.monotonic()
        with pytest.raises(outbound.OutboundTimeout):
            outbound.request(
                "GET",
                f"{scheme}://127.0.0.1:{port}/",
                options=Options(timeout=30, total_timeout=1.5),
            )
        _assert_ends_in_time(started, 1.5)


@pytest.fixture
def blocking_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """``getaddrinfo`` that hangs for names (as a resolver whose server never answers),
    until the test ends; yields the names asked for."""
    real_getaddrinfo = socket.getaddrinfo
    release = threading.Event()
    asked: list[str] = []

    def hanging_getaddrinfo(host: str, port: int, *args: Any) -> list[Any]:
        try:
            return real_getaddrinfo(host, port, *args, flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            pass  # a name, not a literal: hang
        asked.append(host)
        release.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "test: the resolver never answered")

    monkeypatch.setattr(socket, "getaddrinfo", hanging_getaddrinfo)
    yield asked
    release.set()
    # The lookups the test left hanging end now: let them free their places.
    for _ in range(500):
        if outbound._dns_in_flight == 0:
            break
        time.sleep(0.01)


@pytest.mark.timeout(15)
def test_a_dns_lookup_that_never_answers_is_cut_at_the_deadline(blocking_dns: list[str]) -> None:
    started = time.monotonic()
    with pytest.raises(outbound.OutboundTimeout, match=r"slow-dns\.example"):
        outbound.request(
            "GET", "https://slow-dns.example/", options=Options(timeout=30, total_timeout=1.5)
        )
    _assert_ends_in_time(started, 1.5)
    assert blocking_dns == ["slow-dns.example"]
    # ...and by the per-operation timeout when that is the shorter.
    started = time.monotonic()
    with pytest.raises(outbound.OutboundTimeout):
        outbound.guarded_connect("slow-dns.example", 443, timeout=1)
    _assert_ends_in_time(started, 1)


@pytest.mark.timeout(15)
def test_dns_lookups_in_flight_are_capped_and_the_next_fails_at_once(
    blocking_dns: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbound, "MAX_DNS_LOOKUPS_IN_FLIGHT", 2)
    failures: list[BaseException] = []

    def lookup(name: str) -> None:
        try:
            outbound.guarded_connect(name, 443, timeout=3)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=lookup, args=(f"hung{i}.example",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for _ in range(500):
        if len(blocking_dns) == 2:
            break
        time.sleep(0.01)
    assert len(blocking_dns) == 2
    started = time.monotonic()
    with pytest.raises(outbound.OutboundError, match="Too many DNS lookups"):
        outbound.guarded_connect("third.example", 443, timeout=3)
    assert time.monotonic() - started < 0.5  # not queued behind the hung ones
    assert "third.example" not in blocking_dns
    for thread in threads:
        thread.join(10)
    assert [type(exc) for exc in failures] == [outbound.OutboundTimeout] * 2


@pytest.mark.timeout(15)
def test_every_redirect_hop_is_within_the_same_deadline(slow_server: LocalServer) -> None:
    # Each hop answers in 0.8 s, well within the per-operation timeout; six of them would
    # take 4.8 s.
    started = time.monotonic()
    with LOOPBACK_OPEN, pytest.raises(outbound.OutboundTimeout):
        outbound.request(
            "GET", f"{slow_server.url}/slow-redirect", options=Options(timeout=5, total_timeout=2)
        )
    _assert_ends_in_time(started, 2)


def test_deadline_blocks_nest_and_the_earlier_wins() -> None:
    assert outbound.remaining() is None
    with outbound.deadline(5):
        assert 4 < (outbound.remaining() or 0) <= 5
        with outbound.deadline(1):
            assert 0 < (outbound.remaining() or 0) <= 1
        with outbound.deadline(60):
            assert (outbound.remaining() or 0) <= 5
        assert (outbound.remaining() or 0) > 4
    assert outbound.remaining() is None


@pytest.mark.timeout(15)
def test_an_outer_deadline_covers_several_requests(slow_server: LocalServer) -> None:
    started = time.monotonic()
    with LOOPBACK_OPEN, outbound.deadline(2):
        assert outbound.request("GET", f"{slow_server.url}/ok").content == b"hello"
        time.sleep(0.5)
        # Its own limits (10 s per read, 60 s in all) would let it run 50 s: the block's
        # deadline cuts it, on time.
        with pytest.raises(outbound.OutboundTimeout):
            outbound.request("GET", f"{slow_server.url}/endless-body")
        _assert_ends_in_time(started, 2)
        # Once the deadline passed, a request fails at once, without connecting.
        with pytest.raises(outbound.OutboundTimeout):
            outbound.request("GET", f"{slow_server.url}/ok")
        with pytest.raises(outbound.OutboundTimeout):
            outbound.guarded_connect("127.0.0.1", slow_server.port, timeout=5)
    assert slow_server.hits == ["/ok", "/endless-body"]


@pytest.mark.timeout(15)
def test_an_outer_deadline_bounds_dns_lookups(blocking_dns: list[str]) -> None:
    started = time.monotonic()
    with outbound.deadline(1), pytest.raises(outbound.OutboundTimeout):
        outbound.guarded_connect("slow-dns.example", 443, timeout=30)
    _assert_ends_in_time(started, 1)


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_the_watchdog_lets_go_of_every_socket_when_requests_end(
    server: LocalServer,
) -> None:
    with LOOPBACK_OPEN:
        outbound.request("GET", f"{server.url}/ok")  # warm up (imports, the watchdog)
        before = _open_descriptors()
        for _ in range(20):
            outbound.request("GET", f"{server.url}/ok")
            outbound.request("GET", f"{server.url}/to-ok")
            with pytest.raises(outbound.OutboundTimeout):
                outbound.request(
                    "GET", f"{server.url}/trickle", options=Options(timeout=2, total_timeout=0.2)
                )
    assert _open_descriptors() <= before + 2
