"""The error vocabulary: every Matrix error code this app sends or reads (``Codes``), and
the errors services raise, each carrying its code, HTTP status and headers.

Services raise these; the API layer (``msc3870.api.errors``) and the project's HTTP
server (``mediarepo.server``) render them as ``{"errcode", "error"}`` with
``MatrixError.headers()``.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any, ClassVar, TypeGuard


class Codes(StrEnum):
    """Every errcode this app sends or reads, as Synapse's ``Codes``.

    A ``StrEnum`` (``str`` and ``Enum``) rather than ``(str, Enum)``: a member is its value
    wherever a string goes, in JSON, comparisons and dict keys as with both, and in
    ``str()`` and f-strings too, where ``(str, Enum)`` would write ``Codes.FORBIDDEN``.
    Rows store the plain value (``str(code)``).
    """

    UNKNOWN = "M_UNKNOWN"
    MISSING_TOKEN = "M_MISSING_TOKEN"
    UNKNOWN_TOKEN = "M_UNKNOWN_TOKEN"
    UNAUTHORIZED = "M_UNAUTHORIZED"
    FORBIDDEN = "M_FORBIDDEN"
    GUEST_ACCESS_FORBIDDEN = "M_GUEST_ACCESS_FORBIDDEN"
    NOT_FOUND = "M_NOT_FOUND"
    UNRECOGNIZED = "M_UNRECOGNIZED"
    CANNOT_OVERWRITE_MEDIA = "M_CANNOT_OVERWRITE_MEDIA"
    TOO_LARGE = "M_TOO_LARGE"
    LIMIT_EXCEEDED = "M_LIMIT_EXCEEDED"
    NOT_YET_UPLOADED = "M_NOT_YET_UPLOADED"
    INVALID_PARAM = "M_INVALID_PARAM"
    MISSING_PARAM = "M_MISSING_PARAM"
    BAD_JSON = "M_BAD_JSON"
    NOT_JSON = "M_NOT_JSON"
    # MSC2246's unstable spellings of the two above, which clients in the field may still
    # read (protocol.md); this server sends the stable ones.
    FI_MAU_NOT_YET_UPLOADED = "FI.MAU.MSC2246_NOT_YET_UPLOADED"
    FI_MAU_CANNOT_OVERWRITE_MEDIA = "FI.MAU.MSC2246_CANNOT_OVERWRITE_MEDIA"

    @staticmethod
    def in_spec_namespace(value: object) -> TypeGuard[str]:
        """Whether ``value`` is an errcode of the spec's ``M_`` namespace, known here or
        not (a homeserver's ``M_USER_LOCKED`` is passed on as it is)."""
        return isinstance(value, str) and value.startswith("M_")


# RFC 9110 (11.6.1): a 401 must carry a challenge. Clients authenticate with a bearer
# token (RFC 6750 names the error of a token that was sent and refused); other servers
# with X-Matrix signatures. The Matrix spec defines no challenge of its own, and clients
# read the errcode, so these only make the answer well-formed HTTP.
BEARER_CHALLENGE = 'Bearer realm="matrix"'
INVALID_TOKEN_CHALLENGE = BEARER_CHALLENGE + ', error="invalid_token"'
_CHALLENGES: dict[str, str] = {
    Codes.MISSING_TOKEN: BEARER_CHALLENGE,
    Codes.UNAUTHORIZED: 'X-Matrix realm="matrix"',
}


class MatrixError(Exception):
    """What a client hears: ``errcode``, ``status``, a message and any extra body fields;
    each subclass is one kind, with its code, status and default message."""

    status: int = 500
    errcode: str = Codes.UNKNOWN
    default_message: str = "Internal error"

    def __init__(self, message: str | None = None, **extra: Any) -> None:
        self.message = message or self.default_message
        self.extra = extra
        super().__init__(self.message)

    def as_dict(self) -> dict[str, Any]:
        """The body: ``{"errcode", "error"}`` and the extra fields (``retry_after_ms``)."""
        return {"errcode": self.errcode, "error": self.message, **self.extra}

    def headers(self) -> dict[str, str]:
        """HTTP's own words for what the body says: how to authenticate after a 401, when
        to retry (``retry_after_ms``, in whole seconds, at least one) (RFC 9110)."""
        headers: dict[str, str] = {}
        if self.status == 401:
            headers["WWW-Authenticate"] = _CHALLENGES.get(self.errcode, INVALID_TOKEN_CHALLENGE)
        retry_after_ms = self.extra.get("retry_after_ms")
        if retry_after_ms is not None:
            headers["Retry-After"] = str(max(1, math.ceil(int(retry_after_ms) / 1000)))
        return headers


class MissingToken(MatrixError):
    status, errcode, default_message = 401, Codes.MISSING_TOKEN, "Missing access token"


class UnknownToken(MatrixError):
    status, errcode, default_message = 401, Codes.UNKNOWN_TOKEN, "Unknown or expired access token"


class Unauthorized(MatrixError):
    """A federation request whose X-Matrix signature does not verify (or is missing)."""

    status, errcode, default_message = 401, Codes.UNAUTHORIZED, "Unauthorized"


class Forbidden(MatrixError):
    status, errcode, default_message = 403, Codes.FORBIDDEN, "Forbidden"


class GuestAccessForbidden(MatrixError):
    status, errcode, default_message = 403, Codes.GUEST_ACCESS_FORBIDDEN, "Guests cannot upload"


class NotFound(MatrixError):
    status, errcode, default_message = 404, Codes.NOT_FOUND, "Media not found"


class Unrecognized(MatrixError):
    status, errcode, default_message = 404, Codes.UNRECOGNIZED, "Unrecognized request"


class CannotOverwrite(MatrixError):
    status, errcode, default_message = (
        409,
        Codes.CANNOT_OVERWRITE_MEDIA,
        "Media already has content",
    )


class TooLarge(MatrixError):
    status, errcode, default_message = 413, Codes.TOO_LARGE, "Upload is too large"


class LimitExceeded(MatrixError):
    status, errcode, default_message = 429, Codes.LIMIT_EXCEEDED, "Too many requests"

    def __init__(self, message: str | None = None, *, retry_after_ms: int) -> None:
        super().__init__(message, retry_after_ms=max(0, int(retry_after_ms)))


class NotYetUploaded(MatrixError):
    status, errcode, default_message = (
        504,
        Codes.NOT_YET_UPLOADED,
        "Media has not been uploaded yet",
    )


class NothingUploaded(MatrixError):
    """/complete before anything reached the upload URL."""

    status, errcode, default_message = (
        400,
        Codes.NOT_YET_UPLOADED,
        "Nothing has been uploaded to this media's upload URL",
    )


class InvalidParam(MatrixError):
    status, errcode, default_message = 400, Codes.INVALID_PARAM, "Invalid parameter"


class MissingParam(MatrixError):
    status, errcode, default_message = 400, Codes.MISSING_PARAM, "Missing parameter"


class BadRequest(MatrixError):
    """A request this server will not act on, in Synapse's words (its ``SynapseError(400,
    ...)`` without an errcode): another server's user or media where only ours are."""

    status, errcode, default_message = 400, Codes.UNKNOWN, "Bad request"


class BadJson(MatrixError):
    status, errcode, default_message = 400, Codes.BAD_JSON, "Body is not a JSON object"


class NotJson(MatrixError):
    status, errcode, default_message = 400, Codes.NOT_JSON, "Body is not valid JSON"


class Rejection(MatrixError):
    """Media refused, with the errcode, status and reason its requester hears.

    One shape for every refusal of media: a check refusing an upload (it raises this as
    ``msc3870.screening.Rejection``), an upload's rejection told again from its row
    (``for_uploader``), a failed fetch of another server's media
    (``msc3870.federation.remote_media.FetchFailed``).
    """

    status, errcode, default_message = 403, Codes.FORBIDDEN, "Upload rejected"
    #: The usual status of an upload refused with an errcode (else 403), when the status
    #: it was refused with is not a client error (``for_uploader``).
    UPLOADER_STATUS: ClassVar[dict[str, int]] = {
        Codes.TOO_LARGE: 413,
        Codes.INVALID_PARAM: 400,
        Codes.NOT_YET_UPLOADED: 400,
        Codes.FORBIDDEN: 403,
    }

    def __init__(
        self, reason: str, *, errcode: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        if errcode is not None:
            self.errcode = errcode
        if status is not None:
            self.status = status

    @classmethod
    def for_uploader(cls, reason: str, errcode: str, status: int | None) -> Rejection:
        """A refused upload as its uploader hears it: the status it was refused with if it
        is a client error, else the errcode's usual one. A 2xx, 3xx or 5xx would tell the
        uploader the upload worked, moved or may be retried, none of which is true."""
        errcode = errcode or Codes.FORBIDDEN
        if status is None or not 400 <= status <= 499:
            status = cls.UPLOADER_STATUS.get(errcode, 403)
        return cls(reason or cls.default_message, errcode=errcode, status=status)


class UploadAbandoned(MatrixError):
    status, errcode, default_message = (
        408,
        Codes.UNKNOWN,
        "The upload was abandoned (it took too long, or was sent again); upload again",
    )


class BodyTooSlow(MatrixError):
    """A body that stopped arriving, or arrives too slowly to be waited for."""

    status, errcode, default_message = 408, Codes.UNKNOWN, "The request body arrived too slowly"


class StorageUnavailable(MatrixError):
    status, errcode, default_message = 503, Codes.UNKNOWN, "Media storage is unavailable"


class ServiceUnavailable(MatrixError):
    """A service this server depends on (the database, the cache, the broker) could not
    be reached: try again, as for the storage; not a bug of this server (500)."""

    status, errcode, default_message = 503, Codes.UNKNOWN, "Service temporarily unavailable"


# The exceptions of a service that is down or restarting, by module and class name (the
# clients are optional dependencies: nothing is imported to recognise them).
_OUTAGES = frozenset(
    {
        ("django.db.utils", "OperationalError"),
        ("django.db.utils", "InterfaceError"),
        ("redis.exceptions", "ConnectionError"),
        ("redis.exceptions", "TimeoutError"),
        ("kombu.exceptions", "OperationalError"),
    }
)


def outage(exc: BaseException) -> ServiceUnavailable | None:
    """A 503 for an exception that says a backing service is unavailable, else None."""
    if any((cls.__module__, cls.__qualname__) in _OUTAGES for cls in type(exc).__mro__):
        return ServiceUnavailable()
    return None


class HomeserverUnavailable(MatrixError):
    status, errcode, default_message = 502, Codes.UNKNOWN, "Homeserver could not check the token"


class RangeNotSatisfiable(MatrixError):
    status, errcode, default_message = 416, Codes.UNKNOWN, "Requested range not satisfiable"


# Refusals of the HTTP layer itself, before any view: the application's ASGI handler
# (``msc3870.asgi``) and the project's server (``mediarepo.server``) send these.


class URITooLong(MatrixError):
    status, errcode, default_message = 414, Codes.UNKNOWN, "Request URI is too long"


class HeadersTooLarge(MatrixError):
    status, errcode, default_message = 431, Codes.UNKNOWN, "Request headers are too large"


class InvalidHttpRequest(MatrixError):
    status, errcode, default_message = 400, Codes.UNKNOWN, "Invalid HTTP request"
