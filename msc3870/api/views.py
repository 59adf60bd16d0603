"""HTTP handlers: authenticate, read parameters, call a service, render. Nothing else."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.http import HttpRequest, HttpResponseBase, JsonResponse
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import DEFAULTS as DRF_DEFAULTS
from rest_framework.settings import IMPORT_STRINGS as DRF_IMPORT_STRINGS
from rest_framework.settings import APISettings
from rest_framework.views import APIView

from .. import downloads, redaction, thumbnails, uploads, validation
from ..auth import MatrixTokenAuthentication, is_admin
from ..conf import app_settings
from ..errors import BadRequest, Codes, GuestAccessForbidden, InvalidParam, MatrixError
from ..models import Media
from ..previews.service import preview_url
from ..stores import Readable
from ..waiting import AUTHENTICATED, LEGACY
from .deferred import answer
from .errors import exception_handler, parse_json_object
from .responses import Servable, serve
from .throttling import LeakyBucketThrottle

SPEC_VERSIONS = [
    "r0.0.1",
    "r0.1.0",
    "r0.2.0",
    "r0.3.0",
    "r0.4.0",
    "r0.5.0",
    "r0.6.0",
    "r0.6.1",
    *(f"v1.{minor}" for minor in range(1, 17)),
]

UNSTABLE_FEATURES = {
    "fi.mau.msc2246": True,
    "com.beeper.msc3870": True,
    # The proposal's own (mistyped) prefix; some readers look for it.
    "com.beeper.msc3880": True,
    "org.matrix.msc3916.stable": True,
    # Media self-redaction (RedactView).
    "uk.timedout.msc4322": True,
}


class JSONOnlyNegotiation(BaseContentNegotiation):
    """Errors are JSON whatever the client's Accept header says (a download may send
    ``Accept: image/*``)."""

    def select_parser(self, request: Request, parsers: list[Any]) -> Any:
        return parsers[0] if parsers else None

    def select_renderer(
        self, request: Request, renderers: list[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        return renderers[0], renderers[0].media_type


class CreateMediaThrottle(LeakyBucketThrottle):
    """``MSC3870["CREATE_RATE"]`` per Matrix user."""

    scope = "create"
    setting = "CREATE_RATE"

    def rate(self) -> str | None:
        return app_settings.CREATE_RATE


class MatrixJSONRenderer(JSONRenderer):
    """DRF's JSONRenderer with its output pinned: the base class reads UNICODE_JSON,
    COMPACT_JSON and STRICT_JSON from the host's REST_FRAMEWORK when DRF is imported."""

    ensure_ascii = False
    compact = True
    strict = True


class MatrixRequest(Request):
    """A DRF request whose anonymous user is DRF's default whatever the host's
    UNAUTHENTICATED_USER/TOKEN say (None there would break ``request.user`` checks)."""

    def _not_authenticated(self) -> None:
        from django.contrib.auth.models import AnonymousUser

        self._authenticator = None
        self.user = AnonymousUser()
        self.auth = None


# DRF's defaults alone, never the host's REST_FRAMEWORK: what APIView reads through
# ``self.settings`` at request time (view name/description, format suffix, ...). A
# non-empty dict, or APISettings falls back to the host's settings.
_PINNED_DRF_SETTINGS = APISettings(
    user_settings={"EXCEPTION_HANDLER": "msc3870.api.errors.exception_handler"},
    defaults=DRF_DEFAULTS,
    import_strings=DRF_IMPORT_STRINGS,
)


class MatrixView(APIView):
    """Base of the app's views, configured here so a host's REST_FRAMEWORK cannot change
    the wire behaviour.

    APIView takes every policy from REST_FRAMEWORK (class attributes bound when DRF is
    imported, or ``api_settings`` read per request), so each one is set here: a host's
    URLPathVersioning made /versions 404, its renderers, parsers, authentication,
    permissions, throttles, metadata, exception handler or anonymous user would change
    answers too. Pagination and filter backends are GenericAPIView's, not used here.
    """

    authentication_classes = [MatrixTokenAuthentication]
    permission_classes = [IsAuthenticated]
    renderer_classes = [MatrixJSONRenderer]
    parser_classes: list[Any] = []
    content_negotiation_class = JSONOnlyNegotiation
    throttle_classes: list[Any] = []
    versioning_class = None
    # OPTIONS answers {} (as Synapse does), not DRF's description of the view.
    metadata_class = None
    schema = None
    settings = _PINNED_DRF_SETTINGS

    def get_exception_handler(self) -> Any:
        return exception_handler

    def initialize_request(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Request:
        return MatrixRequest(
            request,
            parsers=self.get_parsers(),
            authenticators=self.get_authenticators(),
            negotiator=self.get_content_negotiator(),
            parser_context=self.get_parser_context(request),
        )

    def options(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return Response({})


def _json_body(request: Request) -> dict[str, Any]:
    """The body of /create and /complete. No field is defined, so only a body that claims
    to be JSON (or says nothing) is checked; form posts of empty forms are ignored."""
    content_type = (request.content_type or "").split(";")[0].strip().lower()
    if content_type and not content_type.endswith("json"):
        return {}
    # A malformed Content-Length is the client's error (Django's body reader would
    # raise ValueError on it under WSGI).
    _content_length(request)
    return parse_json_object(request._request.body)


def _content_length(request: Request) -> int | None:
    raw = request.META.get("CONTENT_LENGTH")
    if raw in (None, ""):
        return None
    try:
        value = int(raw)
    except ValueError as exc:
        raise InvalidParam("Invalid Content-Length") from exc
    if value < 0:
        raise InvalidParam("Invalid Content-Length")
    return value


class _LengthRequired(MatrixError):
    status, errcode, default_message = 411, Codes.UNKNOWN, "Content-Length is required"


def request_body(request: Request) -> tuple[Readable, int | None]:
    """The raw body as a stream (never read into memory) and its announced length."""
    django_request: HttpRequest = request._request
    length = _content_length(request)
    if length is not None:
        return django_request, length
    if "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
        # gunicorn decodes chunked bodies and says so with wsgi.input_terminated.
        if request.META.get("wsgi.input_terminated"):
            return request.META["wsgi.input"], None
        raise _LengthRequired()
    return django_request, 0


def _filename(request: Request) -> str | None:
    return request.query_params.get("filename")


class CreateView(MatrixView):
    throttle_classes = [CreateMediaThrottle]

    def post(self, request: Request) -> Response:
        _json_body(request)  # no fields are defined; only its syntax is checked
        created = uploads.create_media(request.user)
        upload = created.upload
        expires_ms = int(created.media.unused_expires_at.timestamp() * 1000)
        return Response(
            {
                "content_uri": created.media.mxc_uri,
                "unused_expires_at": expires_ms,
                # mautrix-python's MediaCreateResponse reads this misspelling.
                "unused_expired_at": expires_ms,
                "upload_method": upload.method,
                "upload_url": upload.url,
                "com.beeper.msc3870.upload_url": upload.url,
            }
        )


def _json_response(body: dict[str, Any]) -> HttpResponseBase:
    # Rendered here (not by DRF's Response) so that an answer given after a wait, outside
    # the view, is the same bytes.
    return JsonResponse(body)


class UploadToMediaView(MatrixView):
    def put(self, request: Request, server_name: str, media_id: str) -> HttpResponseBase:
        body, length = request_body(request)
        return answer(
            request,
            lambda: uploads.upload_to_media(
                request.user,
                server_name,
                media_id,
                body,
                content_length=length,
                content_type=request.content_type or None,
                filename=_filename(request),
            ),
            # The spec answers {}; mautrix-python's upload_media(mxc=...) reads content_uri
            # from it (and fails without), as from every other upload answer.
            lambda media: _json_response({"content_uri": media.mxc_uri}),
        )


class CompleteView(MatrixView):
    def post(self, request: Request, server_name: str, media_id: str) -> HttpResponseBase:
        _json_body(request)
        return answer(
            request,
            lambda: uploads.complete_url_upload(
                request.user, server_name, media_id, filename=_filename(request)
            ),
            lambda media: _json_response({"content_uri": media.mxc_uri}),
        )


class UploadView(MatrixView):
    def post(self, request: Request) -> HttpResponseBase:
        body, length = request_body(request)
        return answer(
            request,
            lambda: uploads.upload_new_media(
                request.user,
                body,
                content_length=length,
                content_type=request.content_type or None,
                filename=_filename(request),
            ),
            lambda media: _json_response({"content_uri": media.mxc_uri}),
        )


class UploadURLView(MatrixView):
    """The upload URL of storages that cannot presign: the signed token is the credential."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    def put(self, request: Request, token: str) -> Response:
        body, length = request_body(request)
        written = uploads.receive_url_upload(
            token, body, content_length=length, content_type=request.content_type or None
        )
        response = Response({})
        response["ETag"] = f'"{written.sha256}"'
        return response


class DownloadView(MatrixView):
    """``/_matrix/client/v1/media/download``: authenticated; redirects if configured."""

    public_cache = False
    wait_kind = AUTHENTICATED

    def allow_redirect(self, request: Request) -> bool:
        return app_settings.REDIRECT_DOWNLOADS

    def timeout_ms(self, request: Request) -> int:
        params = request.query_params
        return downloads.download_timeout_ms(
            params.get("timeout_ms", params.get("fi.mau.msc2246.timeout_ms"))
        )

    def frozen_after(self) -> datetime | None:
        """Media created after this time is not served to this view (None: all is)."""
        return None

    def fetch_remote(self, request: Request) -> bool:
        """Whether other servers' media not held yet is fetched for this request (on
        behalf of its user, who is charged the bytes)."""
        return True

    def bypass_quarantine(self, request: Request) -> bool:
        """``admin_unsafely_bypass_quarantine=true``: quarantined media is served to an
        admin, as Synapse's client download does; anyone else asking is told 400."""
        if request.query_params.get("admin_unsafely_bypass_quarantine") != "true":
            return False
        if not is_admin(request.user, request.auth):
            raise BadRequest("Must be a server admin to bypass quarantine")
        return True

    def get(
        self, request: Request, server_name: str, media_id: str, file_name: str | None = None
    ) -> HttpResponseBase:
        serving = self.serving(request)
        # The name a link asks the browser to save as obeys the upload's rules (no RLO).
        file_name = validation.clean_filename(file_name) or None
        bypass = self.bypass_quarantine(request)
        return answer(
            request,
            self.finding(request, server_name, media_id, bypass_quarantine=bypass),
            lambda media: serving(Servable.of_media(media, file_name)),
            kind=self.wait_kind,
            share_key=("download", file_name, bypass, *self.serving_key(request)),
        )

    def finding(
        self, request: Request, server_name: str, media_id: str, *, bypass_quarantine: bool = False
    ) -> Callable[[], Media]:
        """How this request finds its media (waiting, freeze and fetching as the view
        says); holds the values, not the request."""
        timeout_ms = self.timeout_ms(request)
        frozen_after = self.frozen_after()
        fetch_for = str(request.user) if self.fetch_remote(request) else None
        return lambda: downloads.media_for_download(
            server_name,
            media_id,
            timeout_ms=timeout_ms,
            frozen_after=frozen_after,
            fetch_for=fetch_for,
            bypass_quarantine=bypass_quarantine,
        )

    def serving_key(self, request: Request) -> tuple[Any, ...]:
        """Everything ``serving`` depends on, for parked requests to share an answer."""
        return (
            type(self).__name__,
            request.META.get("HTTP_RANGE"),
            request.META.get("HTTP_IF_NONE_MATCH"),
            self.allow_redirect(request),
        )

    def serving(self, request: Request) -> Callable[[Servable], HttpResponseBase]:
        """How to serve an item to this request; holds only the few values it needs, not
        the request (an answer given after a wait is made outside the view)."""
        range_header = request.META.get("HTTP_RANGE")
        if_none_match = request.META.get("HTTP_IF_NONE_MATCH")
        allow_redirect = self.allow_redirect(request)
        public_cache = self.public_cache

        def respond(item: Servable) -> HttpResponseBase:
            return serve(
                item,
                range_header=range_header,
                if_none_match=if_none_match,
                allow_redirect=allow_redirect,
                public_cache=public_cache,
            )

        return respond


class LegacyMediaMixin:
    """The deprecated ``/_matrix/media/v3`` reads: unauthenticated, cacheable by shared
    caches for minutes (``responses.LEGACY_CACHE_SECONDS``), redirected only when the
    client opts in with ``allow_redirect=true``, blind to media created after
    ``LEGACY_MEDIA_FREEZE_AFTER`` (MSC3916's freeze), and serving other servers' media
    only if already held."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    public_cache = True
    wait_kind = LEGACY

    def allow_redirect(self, request: Request) -> bool:
        return request.query_params.get("allow_redirect", "").lower() == "true"

    def timeout_ms(self, request: Request) -> int:
        params = request.query_params
        return downloads.download_timeout_ms(
            params.get("timeout_ms", params.get("fi.mau.msc2246.timeout_ms")),
            maximum=app_settings.LEGACY_DOWNLOAD_TIMEOUT_MS_MAX,
        )

    def frozen_after(self) -> datetime | None:
        return app_settings.LEGACY_MEDIA_FREEZE_AFTER

    def bypass_quarantine(self, request: Request) -> bool:
        # Synapse honours it on the authenticated download only; ignored here, as there.
        return False

    def fetch_remote(self, request: Request) -> bool:
        # Never, whatever allow_remote says (as Synapse with authenticated media on): a
        # request without a token would make this server fetch and keep media for nobody
        # it could charge.
        return False


class LegacyDownloadView(LegacyMediaMixin, DownloadView):
    """``/_matrix/media/v3/download``."""


class ThumbnailView(DownloadView):
    """``/_matrix/client/v1/media/thumbnail``: authenticated."""

    def get(  # type: ignore[override]
        self, request: Request, server_name: str, media_id: str
    ) -> HttpResponseBase:
        params = request.query_params
        width, height, method = thumbnails.parse_request(
            params.get("width"), params.get("height"), params.get("method")
        )
        animated = params.get("animated", "").lower() == "true"
        serving = self.serving(request)

        def render(media: Media) -> HttpResponseBase:
            if thumbnails.serves_original(media, animated):
                return serving(Servable.of_media(media, None))
            return serving(
                Servable.of_thumbnail(
                    thumbnails.thumbnail(media, width, height, method), remote=media.is_remote
                )
            )

        return answer(
            request,
            self.finding(request, server_name, media_id),
            render,
            kind=self.wait_kind,
            share_key=("thumbnail", width, height, method, animated, *self.serving_key(request)),
        )


class LegacyThumbnailView(LegacyMediaMixin, ThumbnailView):
    """``/_matrix/media/v3/thumbnail``."""


class PreviewURLView(MatrixView):
    """``/_matrix/client/v1/media/preview_url`` (and the legacy ``/_matrix/media/v3``
    one, authenticated too, as Synapse): Open Graph fields of ``url``."""

    def get(self, request: Request) -> HttpResponseBase:
        params = request.query_params
        user = request.user
        url, ts = params.get("url"), params.get("ts")
        return answer(
            request,
            lambda: preview_url(str(user), url, ts, is_guest=getattr(user, "is_guest", False)),
            _json_response,
            share_key=("preview_url",),
        )


class RedactView(MatrixView):
    """MSC4322: the uploader (or a server admin) deletes media; ``{}`` on success and on
    media already redacted."""

    def post(self, request: Request, server_name: str, media_id: str) -> Response:
        body = _json_body(request)
        reason = body.get("reason", "")
        if not isinstance(reason, str):
            raise InvalidParam("reason must be a string")
        if request.user.is_guest:
            raise GuestAccessForbidden("Guests cannot redact media")
        redaction.redact(
            server_name,
            media_id,
            user_id=request.user.user_id,
            is_admin=lambda: is_admin(request.user, request.auth),
            reason=reason,
        )
        return Response({})


class ConfigView(MatrixView):
    def get(self, request: Request) -> Response:
        return Response({"m.upload.size": app_settings.MAX_UPLOAD_SIZE})


class VersionsView(MatrixView):
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    def get(self, request: Request) -> Response:
        return Response({"versions": SPEC_VERSIONS, "unstable_features": UNSTABLE_FEATURES})
