"""Server names (spec appendix "Server Name"): the one grammar the app checks them with,
in mxc:// ids, user ids, federation origins and settings.

``server_name = hostname [ ":" port ]`` where hostname is an IPv4 literal, a bracketed IPv6
literal or a DNS name (letters, digits, dots and hyphens, starting and ending with a
letter or digit). Where a server is really reached (``.well-known`` delegation, SRV
records) is ``msc3870.federation.discovery``'s job; ``server_base_url`` here is only what
discovery ends with when a server publishes neither: its own host and port, 8448 by
default.
"""

from __future__ import annotations

import ipaddress
import re

DEFAULT_FEDERATION_PORT = 8448

_HOST_PORT_RE = re.compile(r"(\[[^\]]*\]|[^:\[\]]+)(?::([0-9]{1,5}))?")
_IPV4_RE = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")
_IPV6_RE = re.compile(r"\[([0-9A-Fa-f:.]{2,45})\]")
_DNS_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253}[A-Za-z0-9])?")


class InvalidServerName(ValueError):
    pass


def parse_server_name(server_name: str) -> tuple[str, int | None]:
    """``(host, port)`` of a server name; host keeps the brackets of an IPv6 literal.

    Stricter than the grammar where it is loose: IP literals must be real addresses and
    ports must be 1 to 65535, so a name we accept is one we can also connect to."""
    # An IPv6 literal's colons are inside its brackets; any other colon starts the port.
    parts = _HOST_PORT_RE.fullmatch(server_name)
    if not parts:
        raise InvalidServerName(f"Not a server name: {server_name!r}")
    host, port = parts.group(1), int(parts.group(2)) if parts.group(2) else None
    if port is not None and not 1 <= port <= 65535:
        raise InvalidServerName(f"Bad port in server name {server_name!r}")
    if match := _IPV6_RE.fullmatch(host):
        try:
            ipaddress.IPv6Address(match.group(1))
        except ValueError as exc:
            raise InvalidServerName(f"Bad IPv6 literal in {server_name!r}") from exc
    elif _IPV4_RE.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError as exc:
            raise InvalidServerName(f"Bad IPv4 literal in {server_name!r}") from exc
    elif not _DNS_NAME_RE.fullmatch(host):
        raise InvalidServerName(f"Not a server name: {server_name!r}")
    return host, port


def is_valid_server_name(server_name: str) -> bool:
    try:
        parse_server_name(server_name)
    except InvalidServerName:
        return False
    return True


def server_base_url(server_name: str) -> str:
    """``https://host:port`` of a server, without discovery (see the module docstring)."""
    host, port = parse_server_name(server_name)
    return f"https://{host}:{port or DEFAULT_FEDERATION_PORT}"
