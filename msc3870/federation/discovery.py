"""Server discovery (spec "Server Discovery", "Resolving server names"): where to send a
request for another server, and which name its TLS certificate and Host header carry.

In the spec's order:

1. an IP literal: that address, its port or 8448;
2. a host name with an explicit port: that host and port;
3. ``https://<host>/.well-known/matrix/server`` (fetched through ``outbound``, so the
   address guard applies, redirects included) names a delegated ``host[:port]``, which is
   then resolved by steps 1, 2, 4, 5 and 6, with the delegated name as the TLS and Host
   name;
4. SRV ``_matrix-fed._tcp.<host>``: connect to the target and port, TLS and Host still
   ``<host>``;
5. SRV ``_matrix._tcp.<host>`` (deprecated), the same way;
6. ``<host>:8448``.

Results are kept in Django's cache (every process shares them when the cache does): an
hour when the server said something (well-known or SRV), ten minutes when it said nothing,
so a server that starts publishing is found soon. Every address is still checked at
connect time by ``outbound``: discovery only names hosts.

Inside an ``outbound.deadline()`` block, discovery ends by the block's deadline: the
well-known fetch is an outbound request (bounded by it), and each SRV lookup gets
min(``DNS_TIMEOUT_SECONDS``, time left) as its lifetime. Running out of time is a
DiscoveryError, never cached: a step cut short said nothing about the server.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import dns.exception
import dns.resolver
from django.core.cache import cache

from ..server_names import DEFAULT_FEDERATION_PORT, InvalidServerName, parse_server_name
from . import outbound

log = logging.getLogger(__name__)

CACHE_SECONDS = 60 * 60
CACHE_SECONDS_WITHOUT_DELEGATION = 10 * 60
WELL_KNOWN_OPTIONS = outbound.Options(max_bytes=50 * 1024, timeout=10.0)
DNS_TIMEOUT_SECONDS = 10.0
SRV_SERVICES = ("_matrix-fed._tcp", "_matrix._tcp")


class DiscoveryError(Exception):
    """The server name cannot be resolved to a destination."""


@dataclass(frozen=True)
class Destination:
    """Where requests for a server go.

    ``host``/``port`` make the URL (TLS verifies ``host``, as the spec asks of the
    delegated name); ``connect_host``/``connect_port`` are where the connection goes (an
    SRV target); ``host_header`` is the ``Host`` the request carries."""

    host: str
    port: int
    connect_host: str
    connect_port: int
    host_header: str

    @property
    def base_url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def overrides(self) -> Mapping[tuple[str, int], tuple[str, int]]:
        """For ``outbound.connect_to``."""
        if (self.connect_host, self.connect_port) == (self.host, self.port):
            return {}
        return {(self.host.strip("[]"), self.port): (self.connect_host, self.connect_port)}


def resolve(server_name: str) -> Destination:
    """The destination of ``server_name``, cached. Raises DiscoveryError."""
    key = f"msc3870:discovery:{server_name}"
    cached = cache.get(key)
    if isinstance(cached, dict):
        return Destination(**cached)
    destination, delegated = _resolve(server_name)
    cache.set(
        key, asdict(destination), CACHE_SECONDS if delegated else CACHE_SECONDS_WITHOUT_DELEGATION
    )
    return destination


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _resolve(server_name: str) -> tuple[Destination, bool]:
    """The destination, and whether the server delegated (well-known or SRV)."""
    try:
        host, port = parse_server_name(server_name)
    except InvalidServerName as exc:
        raise DiscoveryError(str(exc)) from exc
    if _is_ip_literal(host) or port is not None:
        port = port or DEFAULT_FEDERATION_PORT
        return Destination(host, port, host, port, server_name), False
    delegated = _well_known(host)
    if delegated is not None:
        try:
            d_host, d_port = parse_server_name(delegated)
        except InvalidServerName:
            d_host, d_port = None, None
            log.info("Ignoring the well-known delegation of %s to %r", server_name, delegated)
        if d_host is not None:
            if _is_ip_literal(d_host) or d_port is not None:
                d_port = d_port or DEFAULT_FEDERATION_PORT
                return Destination(d_host, d_port, d_host, d_port, delegated), True
            return _by_srv(d_host), True
    destination = _by_srv(host)
    return destination, destination.connect_host != host or destination.port != 8448


def _by_srv(host: str) -> Destination:
    """Steps 4 to 6 for a host name without a port."""
    for service in SRV_SERVICES:
        target = _srv(f"{service}.{host}")
        if target is not None:
            return Destination(host, target[1], target[0], target[1], host)
    return Destination(host, DEFAULT_FEDERATION_PORT, host, DEFAULT_FEDERATION_PORT, host)


def _out_of_time() -> bool:
    left = outbound.remaining()
    return left is not None and left <= 0


def _srv(name: str) -> tuple[str, int] | None:
    """The SRV target to use (lowest priority, then by weight, as RFC 2782), or None when
    there is no record or the record says the service is not offered (target ".")."""
    left = outbound.remaining()
    if left is not None and left <= 0:
        raise DiscoveryError(f"No time left to look up {name}")
    lifetime = DNS_TIMEOUT_SECONDS if left is None else min(DNS_TIMEOUT_SECONDS, left)
    try:
        answer = dns.resolver.resolve(name, "SRV", lifetime=lifetime)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
        return None
    except dns.exception.DNSException as exc:
        if _out_of_time():
            raise DiscoveryError(f"SRV lookup of {name} ran out of time") from exc
        # A timeout is not "no record", but the spec's next step is still the best guess.
        log.info("SRV lookup of %s failed: %s", name, exc)
        return None
    records = list(answer)
    if not records:
        return None
    best = min(r.priority for r in records)
    candidates = [r for r in records if r.priority == best]
    weights = [r.weight for r in candidates]
    record = random.choices(candidates, weights=weights)[0] if any(weights) else candidates[0]
    target = record.target.to_text(omit_final_dot=True)
    if not target or target == ".":
        return None
    return target, int(record.port)


def _well_known(host: str) -> str | None:
    """The ``m.server`` of ``https://<host>/.well-known/matrix/server``, or None."""
    url = f"https://{host}/.well-known/matrix/server"
    try:
        response = outbound.request("GET", url, options=WELL_KNOWN_OPTIONS)
    except outbound.OutboundError as exc:
        if _out_of_time():
            raise DiscoveryError(f"The well-known fetch of {host} ran out of time") from exc
        log.info("No well-known for %s: %s", host, exc)
        return None
    if response.status != 200:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    delegated = body.get("m.server") if isinstance(body, dict) else None
    return delegated if isinstance(delegated, str) and delegated else None
