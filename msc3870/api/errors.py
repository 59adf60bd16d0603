"""Every error under /_matrix is ``{"errcode", "error"}`` with the right status."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from rest_framework import exceptions as drf
from rest_framework.response import Response

from ..errors import (
    BadJson,
    Codes,
    Forbidden,
    InvalidParam,
    LimitExceeded,
    MatrixError,
    MissingToken,
    NotJson,
    TooLarge,
    UnknownToken,
    Unrecognized,
    outage,
)
from ..waiting import RetryWhenDone
from .deferred import DeferredResponse

log = logging.getLogger(__name__)

# The paths whose clients read Matrix errors: the Matrix APIs and Synapse's admin API.
API_PREFIXES = ("/_matrix/", "/_synapse/admin/")


class MethodNotAllowed(MatrixError):
    status, errcode, default_message = 405, Codes.UNRECOGNIZED, "Method not allowed"


def to_matrix_error(exc: BaseException) -> MatrixError | None:
    if isinstance(exc, MatrixError):
        return exc
    if isinstance(exc, RequestDataTooBig):
        return TooLarge("Request body is too large")
    if isinstance(exc, drf.NotAuthenticated):
        return MissingToken()
    if isinstance(exc, drf.AuthenticationFailed):
        return UnknownToken()
    if isinstance(exc, drf.PermissionDenied | DjangoPermissionDenied):
        return Forbidden()
    if isinstance(exc, drf.MethodNotAllowed):
        return MethodNotAllowed()
    if isinstance(exc, drf.Throttled):
        return LimitExceeded(retry_after_ms=int((exc.wait or 1) * 1000))
    if isinstance(exc, drf.ParseError):
        return NotJson()
    if isinstance(exc, drf.ValidationError):
        return InvalidParam(str(exc.detail))
    if isinstance(exc, Http404 | drf.NotFound):
        return Unrecognized()
    if isinstance(exc, drf.APIException):
        error = MatrixError(str(exc.detail))
        error.status = exc.status_code
        return error
    unavailable = outage(exc)
    if unavailable is not None:
        # The client hears "try again"; the operator reads which service and why.
        log.warning("%s: %s: %s", unavailable.message, type(exc).__name__, exc)
    return unavailable


def exception_handler(
    exc: Exception, context: dict[str, Any]
) -> Response | DeferredResponse | None:
    """DRF exception handler: Matrix errors for everything DRF or the services raise; a
    request that must wait for work off the request threads is handed to the server."""
    if isinstance(exc, RetryWhenDone):
        return DeferredResponse(exc)
    error = to_matrix_error(exc)
    if error is None:
        return None  # a bug: the middleware turns it into M_UNKNOWN 500 and it is logged
    return Response(error.as_dict(), status=error.status, headers=error.headers())


def json_error(error: MatrixError) -> JsonResponse:
    return JsonResponse(error.as_dict(), status=error.status, headers=error.headers())


class MatrixErrorMiddleware:
    """Turn Django's own error pages under /_matrix/ and /_synapse/admin/ (unknown path,
    405, 500) into Matrix errors, so clients never parse HTML."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if not request.path.startswith(API_PREFIXES) or response.status_code < 400:
            return response
        if response.get("Content-Type", "").startswith("application/json"):
            return response
        if response.status_code == 404:
            return json_error(Unrecognized())
        if response.status_code == 405:
            return json_error(MethodNotAllowed())
        error = MatrixError("Bad request" if response.status_code < 500 else "Internal error")
        error.status = response.status_code
        return json_error(error)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not request.path.startswith(API_PREFIXES):
            return None
        error = to_matrix_error(exception)
        if error is None:
            log.exception("Unhandled error on %s %s", request.method, request.path)
            error = MatrixError("Internal error")
        return json_error(error)


def parse_json_object(raw: bytes, *, max_size: int = 64 * 1024) -> dict[str, Any]:
    """Bodies of /create and /complete: empty, or a JSON object.

    Both endpoints define no field, so a body over ``max_size`` is refused unparsed (413),
    which also bounds the parser's work; nesting past the parser's recursion limit
    (RecursionError) is not JSON this server accepts (400).
    """
    if len(raw) > max_size:
        raise TooLarge(f"A JSON body may be at most {max_size} bytes")
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise NotJson() from exc
    if not isinstance(value, dict):
        raise BadJson()
    return value
