"""Which URLs a preview may fetch, and from which addresses.

Every fetch of a preview (the page, its oEmbed answer, its image, every redirect hop)
goes through ``msc3870.federation.outbound`` with the policy made here from
``URL_PREVIEW_IP_RANGE_DENYLIST`` / ``_ALLOWLIST``: addresses are checked at connect
time, so a name that resolves to an internal address, or a redirect to one, is refused
as the federation's requests are. What can be told from the URL alone is told before
any fetch: http(s) only, a host, a port in range, an IP literal the policy refuses.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from ..conf import app_settings
from ..errors import Forbidden, InvalidParam, MissingParam
from ..federation.outbound import IPPolicy

# Longer URLs are refused (browsers and servers commonly stop near 8 KiB; the row keeps
# the URL whole).
MAX_URL_LENGTH = 4096
SCHEMES = ("http", "https")


def policy() -> IPPolicy:
    return IPPolicy.from_lists(
        app_settings.URL_PREVIEW_IP_RANGE_DENYLIST, app_settings.URL_PREVIEW_IP_RANGE_ALLOWLIST
    )


def enabled() -> bool:
    """Previews are on, and not with an empty deny list (``manage.py check`` refuses it:
    msc3870.E031; a deployment that skipped the checks is refused here too)."""
    return app_settings.URL_PREVIEW_ENABLED and app_settings.URL_PREVIEW_IP_RANGE_DENYLIST != []


def check_url(url: str | None) -> str:
    """``url`` if a preview may be asked for it: 400 ``M_MISSING_PARAM`` without one, 400
    ``M_INVALID_PARAM`` for anything but an absolute http(s) URL with a host (``file:``,
    ``data:``, ``ftp:``, ``gopher:``, ...), 403 ``M_FORBIDDEN`` for an IP literal in a
    denied range (IPv6 ones too, in every form)."""
    if not url:
        raise MissingParam("Missing the url parameter")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidParam("The URL is too long")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise InvalidParam("The URL holds spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise InvalidParam("Not a URL") from exc
    if parts.scheme.lower() not in SCHEMES:
        raise InvalidParam("Only http and https URLs can be previewed")
    if not host:
        raise InvalidParam("The URL has no host")
    if port == 0:
        raise InvalidParam("The URL's port is out of range")
    literal = _address_named(host)
    if literal is not None and not policy().allows(literal):
        raise Forbidden("IP address blocked")
    return url


def _address_named(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address an IP literal names, the shorthand and numeric IPv4 forms the C
    library reads as addresses too (``127.1``, ``2130706433``, ``0x7f.0.0.1``): judged
    here, before anything would resolve them."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None  # a name
