"""DRF authentication and throttling of requests from other servers.

``XMatrixAuthentication`` makes ``request.user`` the requesting server (``ServerOrigin``)
once its X-Matrix signature verifies, and refuses everything else with 401
``M_UNAUTHORIZED`` (as Synapse does, even when no credential is given: a federation
endpoint has no anonymous access to fall back to). ``OriginThrottle`` is a leaky bucket
per origin server.
"""

from __future__ import annotations

from dataclasses import dataclass

from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from ..api.throttling import LeakyBucketThrottle
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


class OriginThrottle(LeakyBucketThrottle):
    """``MSC3870["FEDERATION_MEDIA_RATE"]`` per origin server (download and thumbnail
    share one bucket). Runs after authentication, so only a server that proved who it is
    spends its own budget: unsigned requests cannot use up another server's."""

    scope = "federation-media"
    setting = "FEDERATION_MEDIA_RATE"

    def rate(self) -> str | None:
        return app_settings.FEDERATION_MEDIA_RATE
