"""DRF authentication and throttling of requests from other servers.

``XMatrixAuthentication`` makes ``request.user`` the requesting server (``ServerOrigin``)
once its X-Matrix signature verifies, and refuses everything else with 401
``M_UNAUTHORIZED`` (as Synapse does, even when no credential is given: a federation
endpoint has no anonymous access to fall back to). ``OriginThrottle`` is a leaky bucket
per origin server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle, SimpleRateThrottle

from ..conf import app_settings
from .xmatrix import authenticate_request


@dataclass(frozen=True)
class ServerOrigin:
    """The server a federation request came from, in DRF's ``request.user`` slot."""

    server_name: str

    # What DRF's IsAuthenticated and Django's templates look at.
    is_authenticated = True
    is_anonymous = False

    def __str__(self) -> str:
        return self.server_name


class XMatrixAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[ServerOrigin, None]:
        # The Django request: xmatrix reads the raw path and every Authorization header
        # from its ASGI scope (DRF's wrapper would hide neither, but it is not needed).
        # GET requests have no body, so no "content" is signed.
        origin = authenticate_request(request._request)
        return ServerOrigin(origin), None

    def authenticate_header(self, request: Request) -> str:
        return "X-Matrix"


def leaky_bucket(key: str, rate: str, setting: str) -> float | None:
    """Count one request against the bucket at ``key`` with capacity N refilled at N per
    period (``rate`` is "N/period", DRF's syntax); None if it fits, else the seconds until
    it would. One small cache entry per key, whatever the rate (the shared cache, so all
    web processes count together when ``REDIS_URL`` is set)."""
    try:
        capacity, period = SimpleRateThrottle.parse_rate(None, rate)  # type: ignore[arg-type]
    except (KeyError, ValueError, IndexError) as exc:
        raise ImproperlyConfigured(
            f"MSC3870[{setting!r}] must look like '600/min' (N per s, min, hour or day)"
        ) from exc
    if not capacity or not period:
        raise ImproperlyConfigured(f"MSC3870[{setting!r}] must allow at least one request")
    now = time.time()
    level, at = cache.get(key) or (0.0, now)
    level = max(0.0, level - (now - at) * capacity / period)
    if level + 1 > capacity:
        return (level + 1 - capacity) * period / capacity
    cache.set(key, (level + 1, now), period)
    return None


class OriginThrottle(BaseThrottle):
    """``MSC3870["FEDERATION_MEDIA_RATE"]`` per origin server (download and thumbnail
    share one bucket). Runs after authentication, so only a server that proved who it is
    spends its own budget: unsigned requests cannot use up another server's."""

    scope = "federation-media"

    def __init__(self) -> None:
        self.retry_after: float | None = None

    def allow_request(self, request: Request, view: Any) -> bool:
        rate = app_settings.FEDERATION_MEDIA_RATE
        if not rate:
            return True
        key = f"msc3870:throttle:{self.scope}:{request.user}"
        self.retry_after = leaky_bucket(key, rate, "FEDERATION_MEDIA_RATE")
        return self.retry_after is None

    def wait(self) -> float | None:
        return self.retry_after
