"""Endpoints other servers call.

- ``GET /_matrix/key/v2/server``: this server's verify keys, self-signed, for deployments
  that route it here (otherwise the homeserver publishes them: see the README).
- ``GET /_matrix/federation/v1/media/download/{mediaId}`` and ``.../thumbnail/{mediaId}``
  (spec v1.11, MSC3916): local media to X-Matrix authenticated servers, as
  ``multipart/mixed`` (``multipart.py``), never a top-level redirect. As Synapse's
  ``FederationMediaDownloadServlet`` and ``FederationMediaThumbnailServlet``: only media of
  this server, ``timeout_ms`` (default 20 s, at most 60 s) for media still uploading,
  ``width``, ``height``, ``method``, ``animated`` as the client thumbnail endpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db import transaction
from django.http import HttpResponse, HttpResponseBase, StreamingHttpResponse
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from ... import downloads, metrics, thumbnails
from ...conf import app_settings
from ...federation.keys import key_server_response
from ...federation.multipart import MultipartMedia
from ...models import Media
from ...stores import get_store
from ...waiting import AUTHENTICATED
from ..deferred import answer
from ..headers import add_security_headers
from ..responses import CACHE_SECONDS, Servable
from ..views import MatrixView
from .authentication import OriginThrottle, XMatrixAuthentication


class KeyServerView(MatrixView):
    """Unauthenticated, as the spec has it. The deprecated ``/{keyId}`` suffix answers
    the same (every key), as Synapse does."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    def get(self, request: Request, key_id: str | None = None) -> Response:
        return Response(key_server_response())


class FederationView(MatrixView):
    """Base of the endpoints that answer other servers: X-Matrix (401 ``M_UNAUTHORIZED``
    for anything that does not verify, the destination included), a per-origin rate;
    every other DRF policy pinned by ``MatrixView``, so a host's REST_FRAMEWORK changes
    nothing."""

    authentication_classes = [XMatrixAuthentication]
    permission_classes = [IsAuthenticated]
    throttle_classes = [OriginThrottle]

    @classmethod
    def as_route(cls) -> Any:
        """Each state change commits on its own, as for the client views (a host's
        ATOMIC_REQUESTS would hold a transaction open across the wait)."""
        return transaction.non_atomic_requests(cls.as_view())


def multipart_answer(item: Servable, *, allow_redirect: bool) -> HttpResponseBase:
    """The multipart answer for one stored item: a ``Location`` part with a short-lived
    signed storage URL when redirects are on and the store can sign, else the bytes,
    streamed from storage (never held whole)."""
    store = get_store()
    framing = MultipartMedia()
    response: HttpResponseBase
    url = None
    if allow_redirect and store.can_redirect:
        url = store.download_url(
            item.key,
            content_type=item.content_type,
            disposition=item.disposition,
            lifetime=app_settings.DOWNLOAD_URL_LIFETIME,
        )
    if url:
        metrics.served("redirect", item.size)
        response = HttpResponse(framing.location(url), content_type=framing.content_type)
        # The URL expires: no cache may keep the answer longer than a minute.
        response["Cache-Control"] = "private, max-age=60"
    else:
        body, length = framing.file(item.content_type, item.disposition, item.stream(), item.size)
        response = StreamingHttpResponse(body, content_type=framing.content_type)
        response["Content-Length"] = str(length)
        # The answer depends on the requester's signature: private, as client downloads.
        response["Cache-Control"] = f"private, max-age={CACHE_SECONDS}"
    return add_security_headers(response)


class FederationMediaView(FederationView):
    """What the download and thumbnail endpoints share: local media only (the server
    name is ours, so remote media, which has another, is never found), the wait for
    pending media parked as for clients (``msc3870.api.deferred``)."""

    def timeout_ms(self, request: Request) -> int:
        # Capped at DOWNLOAD_TIMEOUT_MS_MAX (60 s, Synapse's MAXIMUM_ALLOWED_MAX_TIMEOUT_MS).
        return downloads.download_timeout_ms(request.query_params.get("timeout_ms"))

    def answer_with(
        self, request: Request, media_id: str, render: Callable[[Media], HttpResponseBase]
    ) -> HttpResponseBase:
        timeout_ms = self.timeout_ms(request)
        server_name = app_settings.SERVER_NAME
        return answer(
            request,
            lambda: downloads.media_for_download(server_name, media_id, timeout_ms=timeout_ms),
            render,
            kind=AUTHENTICATED,
        )


class FederationDownloadView(FederationMediaView):
    """``GET /_matrix/federation/v1/media/download/{mediaId}``."""

    def get(self, request: Request, media_id: str) -> HttpResponseBase:
        # The render runs after a wait outside the view: it holds values, not the request.
        allow_redirect = app_settings.REDIRECT_DOWNLOADS
        return self.answer_with(
            request,
            media_id,
            lambda media: multipart_answer(
                Servable.of_media(media, None), allow_redirect=allow_redirect
            ),
        )


class FederationThumbnailView(FederationMediaView):
    """``GET /_matrix/federation/v1/media/thumbnail/{mediaId}``: made, stored and chosen
    as for the client endpoint (an animated original is served as it is when asked for)."""

    def get(self, request: Request, media_id: str) -> HttpResponseBase:
        params = request.query_params
        width, height, method = thumbnails.parse_request(
            params.get("width"), params.get("height"), params.get("method")
        )
        animated = params.get("animated", "").lower() == "true"
        allow_redirect = app_settings.REDIRECT_DOWNLOADS

        def render(media: Media) -> HttpResponseBase:
            if thumbnails.serves_original(media, animated):
                item = Servable.of_media(media, None)
            else:
                item = Servable.of_thumbnail(thumbnails.thumbnail(media, width, height, method))
            return multipart_answer(item, allow_redirect=allow_redirect)

        return self.answer_with(request, media_id, render)
