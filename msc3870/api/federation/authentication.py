"""DRF authentication and throttling of requests from other servers.

``XMatrixAuthentication`` makes ``request.user`` the requesting server (``ServerOrigin``)
once its X-Matrix signature verifies, and refuses everything else with 401
``M_UNAUTHORIZED`` (as Synapse does, even when no credential is given: a federation
endpoint has no anonymous access to fall back to). Anyone can send a credential that
fails, so failures are counted per client address (``FEDERATION_AUTH_FAILURE_RATE``):
past the rate, the address's requests are refused with 429 before any work. A request
whose origin's keys are being fetched is handed to the server to park
(``RetryWhenDone``) rather than wait in its thread. ``OriginThrottle`` is a leaky bucket
per origin server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from django.http import HttpRequest
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from ...conf import app_settings
from ...errors import LimitExceeded, Unauthorized
from ...federation import keyring
from ...federation.xmatrix import authenticate_request
from ...ratelimit import LeakyBucket
from ...server_names import DEFAULT_FEDERATION_PORT, InvalidServerName, parse_server_name
from ...waiting import Deadline, RetryWhenDone
from ..deferred import can_park, requester_of
from ..throttling import LeakyBucketThrottle


@dataclass(frozen=True)
class ServerOrigin:
    """The server a federation request came from, in DRF's ``request.user`` slot."""

    server_name: str

    # What DRF's IsAuthenticated and Django's templates look at.
    is_authenticated = True
    is_anonymous = False

    def __str__(self) -> str:
        return self.server_name


class AuthFailures:
    """Failed X-Matrix authentications of one client address, as a leaky bucket."""

    def __init__(self, address: str) -> None:
        self.bucket = f"msc3870:throttle:xmatrix-failures:{address}"

    def refuse_if_over(self) -> None:
        rate = app_settings.FEDERATION_AUTH_FAILURE_RATE
        if not rate:
            return
        wait = LeakyBucket.from_rate(rate, "FEDERATION_AUTH_FAILURE_RATE").wait(self.bucket)
        if wait is not None:
            raise LimitExceeded(
                "Too many failed authentications from this address",
                retry_after_ms=math.ceil(wait * 1000),
            )

    def record(self) -> None:
        if rate := app_settings.FEDERATION_AUTH_FAILURE_RATE:
            LeakyBucket.from_rate(rate, "FEDERATION_AUTH_FAILURE_RATE").take(self.bucket)


class XMatrixAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[ServerOrigin, None]:
        # The Django request: xmatrix reads the raw path and every Authorization header
        # from its ASGI scope (DRF's wrapper would hide neither, but it is not needed).
        # GET requests have no body, so no "content" is signed.
        django_request: HttpRequest = request._request
        failures = AuthFailures(str(django_request.META.get("REMOTE_ADDR") or ""))
        failures.refuse_if_over()
        park = can_park(django_request)
        try:
            origin = authenticate_request(django_request, wait=not park)
        except keyring.KeyFetchPending as pending:
            deadline = Deadline(pending.deadline)
            raise RetryWhenDone(
                pending.future, deadline, requester=requester_of(django_request)
            ) from None
        except Unauthorized:
            failures.record()
            raise
        return ServerOrigin(origin), None

    def authenticate_header(self, request: Request) -> str:
        return "X-Matrix"


class OriginThrottle(LeakyBucketThrottle):
    """``MSC3870["FEDERATION_MEDIA_RATE"]`` per origin server (download and thumbnail
    share one bucket). Runs after authentication, so only a server that proved who it is
    spends its own budget: unsigned requests cannot use up another server's."""

    scope = "federation-media"
    setting = "FEDERATION_MEDIA_RATE"

    def rate(self) -> str | None:
        return app_settings.FEDERATION_MEDIA_RATE

    def key(self, request: Request) -> str:
        return f"msc3870:throttle:{self.scope}:{normalised_origin(str(request.user))}"


def normalised_origin(server_name: str) -> str:
    """One spelling per server for per-origin limits: host names are case-insensitive,
    and ``:8448`` is where a server without a port is reached anyway."""
    try:
        host, port = parse_server_name(server_name)
    except InvalidServerName:
        return server_name
    host = host.lower()
    return host if port in (None, DEFAULT_FEDERATION_PORT) else f"{host}:{port}"
