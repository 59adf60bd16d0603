"""Outbound HTTP to other servers, safe against server-side request forgery and against
peers that never finish answering.

Every request this server makes on behalf of someone else (keys, remote media, a
``Location`` a remote server hands us) goes through here:

- **Addresses are checked at connect time.** The connection classes below resolve the host
  once, refuse the host if ANY address it resolves to is denied (a DNS answer mixing a
  public and a private address is an attack, as Synapse's resolver judges it), and connect
  to the very addresses they checked. There is no resolve-then-connect window for DNS
  rebinding, and every redirect hop opens its connection through the same classes.
- Denied by default: private, loopback, link-local, multicast, reserved, documentation and
  unspecified ranges of IPv4 and IPv6, and the IPv6 forms that carry or reach an IPv4
  address (IPv4-compatible ``::/96``, IPv4-translated ``::ffff:0:0:0/96``, local-use NAT64
  ``64:ff9b:1::/48``, Teredo ``2001::/32``). IPv6 addresses that carry an IPv4 address
  (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, IPv4-translated
  ``::ffff:0:a.b.c.d``, 6to4 ``2002::/16``, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``
  with the IPv4 address in the last 32 bits) are judged by that IPv4 address too.
  ``MSC3870["FEDERATION_IP_RANGE_DENYLIST"]`` replaces the default list,
  ``["FEDERATION_IP_RANGE_ALLOWLIST"]`` exempts ranges from it (the allowlist wins, on
  any form of the address); ``0.0.0.0`` and ``::`` are always denied.
- No proxy from the environment (a proxy would make the checked address the proxy's),
  no ``.netrc``.
- Bodies are streamed with a byte limit (``Content-Length`` first, then while reading);
  TLS certificates are verified unless ``MSC3870["FEDERATION_VERIFY_TLS"]`` is off.

**One deadline, from the first DNS query to the last body byte.** ``stream()`` and
``request()`` end by their total deadline (``Options.total_timeout``, or the enclosing
``deadline()`` block's if that is earlier), whatever the peer does, at every phase:

- DNS: ``getaddrinfo`` runs on a daemon thread and is waited for at most
  min(``timeout``, time left). It cannot be interrupted, so a lookup that outlives its
  caller keeps its thread until the resolver gives up; at most
  ``MAX_DNS_LOOKUPS_IN_FLIGHT`` run at once per process, and a lookup that finds them all
  taken fails at once instead of queueing behind a hung resolver. (Daemon threads rather
  than a ``ThreadPoolExecutor``: its workers are joined at interpreter exit, so a hung
  lookup would hold up a worker's shutdown.)
- connect and the TLS handshake: the socket timeout is min(``timeout``, time left), set
  before connect and again after it (CPython bounds a whole handshake by the socket
  timeout).
- the status line, the headers and every body read, on every redirect hop: one
  watchdog thread keeps a heap of request deadlines and shuts down (``SHUT_RDWR``) the
  sockets of a request whose deadline passed, so a blocked read returns at once however
  slowly the peer trickles bytes. It holds a duplicate of each socket (``dup()``: TLS
  wrapping detaches the original object, and our own descriptor can never be reused by
  another connection), and a request's entry is cancelled under the watchdog's lock
  before the request's connections close, so it never touches a socket after its
  request ended. A request cut this way raises ``OutboundTimeout``. (A watchdog rather
  than checks between reads: ``http.client`` reads the head line by line with the
  per-read timeout restarting on each byte, out of our reach.)

``deadline(seconds)`` sets an outer deadline for a block of several requests and
lookups (blocks nest; the earlier deadline wins) and ``remaining()`` tells the time left
in it; server discovery honours it for its DNS queries too.

This is synchronous (requests and urllib3); async callers run it in a thread
(``asyncio.to_thread`` carries the ``deadline()`` block along).
"""

from __future__ import annotations

import heapq
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NameResolutionError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.util.connection import allowed_gai_family
from urllib3.util.timeout import _DEFAULT_TIMEOUT

from ..conf import app_settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# IANA's special-purpose registries, the ranges no federation peer lives in (Synapse's
# DEFAULT_IP_RANGE_BLACKLIST plus 0.0.0.0/8, 240.0.0.0/4 and 100::/64).
DEFAULT_IP_RANGE_DENYLIST: tuple[str, ...] = (
    "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches the local host
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # carrier-grade NAT
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local (cloud metadata services live here)
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",  # documentation
    "192.88.99.0/24",  # 6to4 relay anycast
    "192.168.0.0/16",  # private
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # documentation
    "203.0.113.0/24",  # documentation
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and 255.255.255.255 broadcast
    "::/128",  # unspecified
    "::1/128",  # loopback
    "100::/64",  # discard-only
    "2001:db8::/32",  # documentation
    "fc00::/7",  # unique local (private)
    "fe80::/10",  # link-local
    "fec0::/10",  # site-local (deprecated)
    "ff00::/8",  # multicast
    # IPv6 forms that carry an IPv4 address, or reach one through a gateway or relay:
    "::/96",  # IPv4-compatible (deprecated): ::a.b.c.d
    "::ffff:0:0:0/96",  # IPv4-translated (RFC 2765): ::ffff:0:a.b.c.d
    "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): the operator's own translator
    "2001::/32",  # Teredo: tunnelled to an IPv4 host through a relay
)
# Whatever the operator configures: these mean "this host" to connect().
ALWAYS_DENIED: tuple[str, ...] = ("0.0.0.0/32", "::/128")

# IPv6 ranges whose last 32 bits are an IPv4 address (IPv4-compatible, IPv4-translated,
# and NAT64: the well-known prefix, and the local-use one in its common /96 layout).
_IPV4_IN_LAST_32_BITS = tuple(
    ipaddress.IPv6Network(net)
    for net in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48")
)
# The unspecified and loopback addresses are not IPv4-compatible ones (RFC 4291): an
# allowlist naming 0.0.0.0/8 must not open ::1.
_NOT_IPV4_COMPATIBLE = (ipaddress.IPv6Address("::"), ipaddress.IPv6Address("::1"))

DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_TIMEOUT_SECONDS = 10.0
# getaddrinfo calls running at once in this process; see the module docstring.
MAX_DNS_LOOKUPS_IN_FLIGHT = 32
MAX_REDIRECTS = 5
_CHUNK = 64 * 1024


class OutboundError(Exception):
    """A request to another server failed: refused here, unreachable, or a bad answer."""


class AddressNotAllowed(OutboundError):
    """The host resolved to an address outbound requests may not reach."""


class ResponseTooLarge(OutboundError):
    pass


class OutboundTimeout(OutboundError):
    pass


@lru_cache(maxsize=32)
def _networks(ranges: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    try:
        return tuple(ipaddress.ip_network(r, strict=False) for r in ranges)
    except ValueError as exc:
        raise OutboundError(f"Bad IP range in the federation IP range lists: {exc}") from exc


def _embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address leads to: connect() to ``::ffff:127.0.0.1`` reaches
    127.0.0.1, a 6to4 or NAT64 gateway forwards to the IPv4 address inside, and the
    IPv4-compatible and IPv4-translated forms name one too."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found = [v4 for v4 in (ip.ipv4_mapped, ip.sixtofour) if v4 is not None]
    if ip not in _NOT_IPV4_COMPATIBLE and any(ip in net for net in _IPV4_IN_LAST_32_BITS):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


@dataclass(frozen=True)
class IPPolicy:
    """Which addresses outbound requests may reach."""

    deny: tuple[IPNetwork, ...]
    allow: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls) -> IPPolicy:
        """Federation's: ``FEDERATION_IP_RANGE_DENYLIST`` and ``_ALLOWLIST``."""
        return cls.from_lists(
            app_settings.FEDERATION_IP_RANGE_DENYLIST, app_settings.FEDERATION_IP_RANGE_ALLOWLIST
        )

    @classmethod
    def from_lists(cls, deny: Iterable[str] | None, allow: Iterable[str]) -> IPPolicy:
        """A deny list of CIDRs (None: ``DEFAULT_IP_RANGE_DENYLIST``; ``ALWAYS_DENIED`` is
        added to any) and an allowlist that wins over it."""
        return cls(
            deny=_networks(
                (*(DEFAULT_IP_RANGE_DENYLIST if deny is None else tuple(deny)), *ALWAYS_DENIED)
            ),
            allow=_networks(tuple(allow)),
        )

    def allows(self, address: str | IPAddress) -> bool:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        candidates: list[IPAddress] = [ip, *_embedded_ipv4(ip)]
        # The allowlist wins, on any form of the address (an operator who allows
        # 127.0.0.1 means ::ffff:127.0.0.1 too).
        if any(c in net for c in candidates for net in self.allow if c.version == net.version):
            return True
        return not any(
            c in net for c in candidates for net in self.deny if c.version == net.version
        )


def _sockaddr_ip(sockaddr: tuple[Any, ...]) -> IPAddress:
    # An IPv6 link-local answer carries its zone ("fe80::1%eth0"); the zone does not
    # change which range the address is in.
    return ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])


# --- deadlines ------------------------------------------------------------------------

# The monotonic time by which the requests and lookups of the current block must end.
_deadline_at: ContextVar[float | None] = ContextVar("msc3870_outbound_deadline", default=None)


@contextmanager
def _until(at: float) -> Iterator[None]:
    current = _deadline_at.get()
    token = _deadline_at.set(at if current is None else min(at, current))
    try:
        yield
    finally:
        _deadline_at.reset(token)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Within the block, every request and DNS lookup made here ends within ``seconds``
    from now (each also keeps its own limits). Blocks nest: the earlier deadline wins."""
    with _until(time.monotonic() + max(seconds, 0.0)):
        yield


def remaining() -> float | None:
    """Seconds left before the enclosing ``deadline()`` block's end (0 once it passed),
    or None outside any block."""
    at = _deadline_at.get()
    return None if at is None else max(0.0, at - time.monotonic())


def _bounded(timeout: float | None) -> float | None:
    """``timeout`` cut to the time left; OutboundTimeout at once if none is left."""
    left = remaining()
    if left is None:
        return timeout
    if left <= 0:
        raise OutboundTimeout("The deadline passed")
    return left if timeout is None else min(timeout, left)


class _Watch:
    """The sockets of one request (duplicates owned by the watchdog) and its deadline."""

    __slots__ = ("at", "ended", "fired", "sockets")

    def __init__(self, at: float) -> None:
        self.at = at
        self.sockets: list[socket.socket] = []
        self.fired = False  # the deadline passed and the sockets were shut down
        self.ended = False  # the request ended: the watchdog no longer touches it

    def __lt__(self, other: _Watch) -> bool:
        return self.at < other.at


class _Watchdog:
    """One thread that shuts down the sockets of requests whose deadline passed."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._heap: list[_Watch] = []
        self._compact_at = 1024
        self._thread: threading.Thread | None = None

    def watch(self, at: float) -> _Watch:
        watch = _Watch(at)
        with self._lock:
            if len(self._heap) >= self._compact_at:
                # Ended requests leave their entries until they reach the top: drop them
                # now and then, so a burst of long deadlines cannot grow the heap for good.
                self._heap = [w for w in self._heap if not w.ended]
                heapq.heapify(self._heap)
                self._compact_at = max(1024, 2 * len(self._heap))
            heapq.heappush(self._heap, watch)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="msc3870-outbound-watchdog", daemon=True
                )
                self._thread.start()
            self._lock.notify()
        return watch

    def add(self, watch: _Watch, sock: socket.socket) -> None:
        """Watch ``sock`` too; OutboundTimeout if the request's deadline already passed."""
        duplicate = sock.dup()
        with self._lock:
            if not watch.fired and not watch.ended:
                watch.sockets.append(duplicate)
                return
        duplicate.close()
        raise OutboundTimeout("The deadline passed")

    def end(self, watch: _Watch) -> bool:
        """The request ends: forget its sockets. Whether the watchdog had cut it."""
        with self._lock:
            watch.ended = True
            sockets, watch.sockets = watch.sockets, []
        for duplicate in sockets:
            duplicate.close()
        return watch.fired

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0].ended or self._heap[0].at <= now):
                    watch = heapq.heappop(self._heap)
                    if not watch.ended:
                        watch.fired = True
                        for duplicate in watch.sockets:
                            # Not connected yet, or already closed by the peer: nothing to cut.
                            with suppress(OSError):
                                duplicate.shutdown(socket.SHUT_RDWR)
                self._lock.wait(self._heap[0].at - now if self._heap else None)


_watchdog = _Watchdog()
# The socket a new connection gets is watched for the request that makes it.
_current_watch: ContextVar[_Watch | None] = ContextVar("msc3870_outbound_watch", default=None)

_dns_lock = threading.Lock()
_dns_in_flight = 0


def _reset_after_fork() -> None:
    # A forked child (a prefork worker) has none of the parent's threads, and may have
    # inherited their locks held.
    global _watchdog, _dns_lock, _dns_in_flight
    _watchdog = _Watchdog()
    _dns_lock = threading.Lock()
    _dns_in_flight = 0


os.register_at_fork(after_in_child=_reset_after_fork)


def _getaddrinfo(host: str, port: int, timeout: float | None) -> list[Any]:
    """``socket.getaddrinfo`` for a TCP connection, waited for at most ``timeout`` and
    never past the deadline. Raises OutboundTimeout, OutboundError (too many lookups in
    flight) or socket.gaierror."""
    family = allowed_gai_family()
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:  # a literal: nothing to look up, nothing to wait for
        return socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    wait = _bounded(timeout)
    global _dns_in_flight
    with _dns_lock:
        if _dns_in_flight >= MAX_DNS_LOOKUPS_IN_FLIGHT:
            raise OutboundError(f"Too many DNS lookups in flight to resolve {host}")
        _dns_in_flight += 1
    answer: list[list[Any]] = []
    failure: list[BaseException] = []
    done = threading.Event()

    def lookup() -> None:
        global _dns_in_flight
        try:
            answer.append(socket.getaddrinfo(host, port, family, socket.SOCK_STREAM))
        except BaseException as exc:
            failure.append(exc)
        finally:
            with _dns_lock:
                _dns_in_flight -= 1
            done.set()

    threading.Thread(target=lookup, name="msc3870-dns", daemon=True).start()
    if not done.wait(wait):
        raise OutboundTimeout(f"Resolving {host} took more than {wait:.1f} s")
    if failure:
        raise failure[0]
    return answer[0]


def guarded_connect(
    host: str,
    port: int,
    *,
    timeout: float | None,
    policy: IPPolicy | None = None,
    source_address: tuple[str, int] | None = None,
    socket_options: Iterable[tuple[int, int, int | bytes]] | None = None,
) -> socket.socket:
    """Resolve ``host`` once, refuse it if any address is denied, connect to a checked one.

    ``timeout`` bounds the lookup and each connect attempt, and is cut to what is left of
    the deadline; the socket leaves with the timeout that is left, for the TLS handshake.
    Raises AddressNotAllowed, OutboundTimeout, OutboundError, or OSError
    (socket.gaierror for names that do not resolve)."""
    policy = policy or IPPolicy.from_settings()
    host = host.strip("[]")
    infos = _getaddrinfo(host, port, timeout)
    if not infos:
        raise OSError(f"{host} resolved to no address")
    addresses = [_sockaddr_ip(info[4]) for info in infos]
    denied = sorted({str(ip) for ip in addresses if not policy.allows(ip)})
    if denied:
        raise AddressNotAllowed(
            f"{host} resolves to {', '.join(denied)}, which outbound requests may not reach"
        )
    watch = _current_watch.get()
    error: OSError | None = None
    for family, socktype, proto, _canonname, sockaddr in infos:
        sock = socket.socket(family, socktype, proto)
        try:
            if watch is not None:
                _watchdog.add(watch, sock)
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(_bounded(timeout))
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            sock.settimeout(_bounded(timeout))
            return sock
        except OSError as exc:
            error = exc
            sock.close()
        except BaseException:
            sock.close()
            raise
    assert error is not None
    raise error


# Server discovery (SRV) names a host to connect to that is not the one in the URL: TLS
# must still verify the URL's host (the server's delegated name). ``connect_to`` maps
# (URL host, port) to the address to connect to, for the requests of one block.
_connect_overrides: ContextVar[Mapping[tuple[str, int], tuple[str, int]] | None] = ContextVar(
    "msc3870_connect_overrides", default=None
)
# The addresses the connections of the current request may reach (None: federation's,
# ``IPPolicy.from_settings``). URL previews pass their own lists (``Options(policy=)``).
_current_policy: ContextVar[IPPolicy | None] = ContextVar("msc3870_outbound_policy", default=None)


@contextmanager
def connect_to(overrides: Mapping[tuple[str, int], tuple[str, int]]) -> Iterator[None]:
    """Within the block, connections to ``(host, port)`` go to the mapped host and port
    (still through the address guard); TLS verifies and Host names the URL's host."""
    token = _connect_overrides.set(
        {(host.lower(), port): target for (host, port), target in overrides.items()}
    )
    try:
        yield
    finally:
        _connect_overrides.reset(token)


class _GuardedConnectionMixin:
    """urllib3 connection whose socket comes from ``guarded_connect``.

    Only the socket is replaced: TLS still verifies the certificate against the host name
    of the URL (and sends it as SNI), so connecting to the checked IP costs nothing in
    authentication."""

    host: str
    port: int
    timeout: Any
    source_address: tuple[str, int] | None
    socket_options: Any
    _dns_host: str

    def _new_conn(self) -> socket.socket:
        timeout = None if self.timeout is _DEFAULT_TIMEOUT else self.timeout
        host, port = (_connect_overrides.get() or {}).get(
            (self._dns_host.lower(), self.port), (self._dns_host, self.port)
        )
        try:
            return guarded_connect(
                host,
                port,
                timeout=timeout,
                policy=_current_policy.get(),
                source_address=self.source_address,
                socket_options=self.socket_options,
            )
        except OutboundError:
            raise  # not an OSError: urllib3 passes it up untouched, requests too
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc  # type: ignore[arg-type]
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to connect: {exc}") from exc  # type: ignore[arg-type]


class GuardedHTTPConnection(_GuardedConnectionMixin, HTTPConnection):
    pass


class GuardedHTTPSConnection(_GuardedConnectionMixin, HTTPSConnection):
    pass


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    """A requests adapter whose every connection goes through ``guarded_connect``."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _GuardedHTTPPool,
            "https": _GuardedHTTPSPool,
        }

    def proxy_manager_for(self, *args: Any, **kwargs: Any) -> Any:
        # Through a proxy the address checked would be the proxy's, not the target's.
        raise OutboundError("Outbound requests do not use proxies")


class _Session(requests.Session):
    def resolve_redirects(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """Never: requests reads a redirect's whole body here, even with
        ``allow_redirects=False`` (to prepare ``Response.next``). ``stream`` follows
        redirects itself, without reading their bodies."""
        return iter(())


def new_session() -> requests.Session:
    session = _Session()
    session.trust_env = False  # no proxies, .netrc or CA bundle from the environment
    session.max_redirects = MAX_REDIRECTS
    adapter = GuardedAdapter(max_retries=0)
    # Only http(s): requests refuses other schemes, and these two are guarded.
    session.adapters.clear()
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


@dataclass(frozen=True)
class Options:
    """How one outbound request may go, built once by its caller.

    ``max_bytes``: the body's limit (``Content-Length`` first, then while reading).
    ``timeout`` bounds the DNS lookup, connecting, and each read; ``total_timeout``
    (default: six times ``timeout``) the whole exchange from the first DNS query to the
    last body byte, redirects included. ``allow_redirects``: follow at most five, each
    hop through the address guard. ``policy``: the addresses it may reach (default: the
    federation lists)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    total_timeout: float | None = None
    allow_redirects: bool = True
    policy: IPPolicy | None = None

    @property
    def total(self) -> float:
        return self.total_timeout or self.timeout * 6


@dataclass
class StreamedResponse:
    """An answer whose body is read on demand, never beyond ``max_bytes``."""

    status: int
    headers: CaseInsensitiveDict[str]
    url: str
    max_bytes: int
    _response: requests.Response = field(repr=False)
    _deadline: float = field(repr=False)
    _watch: _Watch = field(repr=False)
    _read: int = field(default=0, repr=False)

    def iter_bytes(self, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        """The body (content-decoded), in chunks; raises ResponseTooLarge past the limit
        (a gzip bomb counts by what it expands to) and OutboundTimeout past the deadline.

        Each chunk is one read from the socket (``read1``); a read blocked at the deadline
        is cut by the watchdog."""
        raw = self._response.raw
        while True:
            try:
                chunk = raw.read1(chunk_size, decode_content=True)
            except ReadTimeoutError as exc:
                raise OutboundTimeout(f"Reading from {self.url} timed out") from exc
            except (HTTPError, OSError) as exc:
                if self._watch.fired:
                    raise OutboundTimeout(f"Response from {self.url} took too long") from exc
                raise OutboundError(f"Reading the response from {self.url} failed: {exc}") from exc
            if not chunk:
                # A body that ends with the connection looks complete once the watchdog
                # shut the socket down: it is not.
                if self._watch.fired:
                    raise OutboundTimeout(f"Response from {self.url} took too long")
                return
            self._read += len(chunk)
            if self._read > self.max_bytes:
                raise ResponseTooLarge(f"Response from {self.url} exceeds {self.max_bytes} bytes")
            if time.monotonic() > self._deadline:
                raise OutboundTimeout(f"Response from {self.url} took too long")
            yield chunk

    def read(self) -> bytes:
        return b"".join(self.iter_bytes())


@contextmanager
def stream(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    data: bytes | None = None,
    options: Options = Options(),
) -> Iterator[StreamedResponse]:
    """Send a request and yield its response with the body unread, within the limits of
    ``options``.

    The whole exchange ends by ``options.total``, or by an enclosing ``deadline()``
    block's end if earlier: a peer trickling bytes cannot hold a thread. Raises
    AddressNotAllowed, ResponseTooLarge (``Content-Length`` over the limit: nothing is
    read), OutboundTimeout or OutboundError."""
    at = _deadline_for(method, url, options.total)
    watch = _watchdog.watch(at)
    session = new_session()
    response: requests.Response | None = None
    try:
        sent = _Sent(method, url, dict(headers or {}), data)
        response = _send_watched(session, watch, at, sent, options)
        _refuse_announced_oversize(sent, response, options.max_bytes)
        yield StreamedResponse(
            status=response.status_code,
            headers=response.headers,
            url=response.url,
            max_bytes=options.max_bytes,
            _response=response,
            _deadline=at,
            _watch=watch,
        )
    finally:
        # The watchdog lets go of the sockets before they close, never after.
        _watchdog.end(watch)
        if response is not None:
            response.close()
        session.close()


@dataclass(frozen=True)
class _Sent:
    """What a request sends: its method, URL, headers and body."""

    method: str
    url: str
    headers: dict[str, str]
    data: bytes | None


def _refuse_announced_oversize(sent: _Sent, response: requests.Response, limit: int) -> None:
    """ResponseTooLarge before a byte of the body is read, if its ``Content-Length``
    says it is over ``limit``."""
    length = response.headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise ResponseTooLarge(
            f"{sent.method} {sent.url}: Content-Length {length} exceeds {limit} bytes"
        )


def _deadline_for(method: str, url: str, total: float) -> float:
    """When the whole exchange must be over: ``total`` from now, or an enclosing
    ``deadline()`` block's end if sooner."""
    at = time.monotonic() + total
    outer = _deadline_at.get()
    if outer is not None:
        at = min(at, outer)
    if at <= time.monotonic():
        raise OutboundTimeout(f"{method} {url}: the deadline passed before it started")
    return at


def _send_watched(
    session: requests.Session, watch: _Watch, at: float, sent: _Sent, options: Options
) -> requests.Response:
    """The response's head, every connection made under ``watch`` (which cuts them at
    ``at``) and judged by ``options.policy``."""
    method, url = sent.method, sent.url
    watch_token = _current_watch.set(watch)
    policy_token = _current_policy.set(options.policy)
    try:
        with _until(at):
            response = _send_following_redirects(session, sent, options)
    except OutboundError as exc:
        # Cut by the watchdog, or by a socket timeout that was the time left (a TLS
        # handshake that never completes fails as an SSL error): a timeout either way.
        late = watch.fired or time.monotonic() >= at
        if late and not isinstance(exc, (OutboundTimeout, AddressNotAllowed)):
            raise OutboundTimeout(f"{method} {url} took too long") from exc
        raise
    finally:
        _current_policy.reset(policy_token)
        _current_watch.reset(watch_token)
    # Cut while reading the head, a response can look whole with headers missing.
    if watch.fired:
        response.close()
        raise OutboundTimeout(f"{method} {url} took too long")
    return response


def _send_following_redirects(
    session: requests.Session, sent: _Sent, options: Options
) -> requests.Response:
    """Redirects are followed here rather than by requests, which reads each redirect's
    whole body into memory first (a huge body behind a 302 would get past the limit, or
    hold the thread). A redirect's body is never read: its connection is closed."""
    method, url, headers, data = sent.method, sent.url, sent.headers, sent.data
    timeout, allow_redirects = options.timeout, options.allow_redirects
    for _hop in range(MAX_REDIRECTS + 1):
        try:
            response = session.request(
                method,
                url,
                headers=headers,
                data=data,
                stream=True,
                timeout=_bounded(timeout),
                allow_redirects=False,
                verify=app_settings.FEDERATION_VERIFY_TLS,
            )
        except requests.Timeout as exc:
            raise OutboundTimeout(f"{method} {url} timed out") from exc
        except requests.RequestException as exc:
            raise OutboundError(f"{method} {url} failed: {exc}") from exc
        location = session.get_redirect_target(response) if allow_redirects else None
        if not location:
            return response
        response.close()
        next_url = urljoin(url, location)
        if urlsplit(next_url).scheme not in ("http", "https"):
            raise OutboundError(f"{url} redirects to a non-HTTP URL")
        # What browsers and requests do: 303 (and 301/302 after a POST) becomes a GET
        # without a body; 307 and 308 repeat the request as it was.
        if response.status_code == 303 or (response.status_code in (301, 302) and method == "POST"):
            method, data = "GET", None
            headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        # Credentials are for the host they were made for, and so is a Host header set
        # by server discovery.
        if urlsplit(next_url).netloc != urlsplit(url).netloc:
            headers = {
                k: v for k, v in headers.items() if k.lower() not in ("authorization", "host")
            }
        url = next_url
    raise OutboundError(f"More than {MAX_REDIRECTS} redirects")


@dataclass(frozen=True)
class Response:
    status: int
    headers: CaseInsensitiveDict[str]
    url: str
    content: bytes


def request(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    data: bytes | None = None,
    options: Options = Options(),
) -> Response:
    """``stream`` with the body read (at most ``options.max_bytes``), within the same
    deadline."""
    with stream(method, url, headers=headers, data=data, options=options) as response:
        content = response.read()
        return Response(response.status, response.headers, response.url, content)
