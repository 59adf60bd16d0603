"""Errors of the media domain, each carrying its Matrix error code and HTTP status.

Services raise these; the API layer renders them as ``{"errcode", "error"}``.
"""

from __future__ import annotations

from typing import Any


class MatrixError(Exception):
    status: int = 500
    errcode: str = "M_UNKNOWN"
    default_message: str = "Internal error"

    def __init__(self, message: str | None = None, **extra: Any) -> None:
        self.message = message or self.default_message
        self.extra = extra
        super().__init__(self.message)

    def as_dict(self) -> dict[str, Any]:
        return {"errcode": self.errcode, "error": self.message, **self.extra}


class MissingToken(MatrixError):
    status, errcode, default_message = 401, "M_MISSING_TOKEN", "Missing access token"


class UnknownToken(MatrixError):
    status, errcode, default_message = 401, "M_UNKNOWN_TOKEN", "Unknown or expired access token"


class Unauthorized(MatrixError):
    """A federation request whose X-Matrix signature does not verify (or is missing)."""

    status, errcode, default_message = 401, "M_UNAUTHORIZED", "Unauthorized"


class Forbidden(MatrixError):
    status, errcode, default_message = 403, "M_FORBIDDEN", "Forbidden"


class GuestAccessForbidden(MatrixError):
    status, errcode, default_message = 403, "M_GUEST_ACCESS_FORBIDDEN", "Guests cannot upload"


class NotFound(MatrixError):
    status, errcode, default_message = 404, "M_NOT_FOUND", "Media not found"


class Unrecognized(MatrixError):
    status, errcode, default_message = 404, "M_UNRECOGNIZED", "Unrecognized request"


class CannotOverwrite(MatrixError):
    status, errcode, default_message = (
        409,
        "M_CANNOT_OVERWRITE_MEDIA",
        "Media already has content",
    )


class TooLarge(MatrixError):
    status, errcode, default_message = 413, "M_TOO_LARGE", "Upload is too large"


class LimitExceeded(MatrixError):
    status, errcode, default_message = 429, "M_LIMIT_EXCEEDED", "Too many requests"

    def __init__(self, message: str | None = None, *, retry_after_ms: int) -> None:
        super().__init__(message, retry_after_ms=max(0, int(retry_after_ms)))


class NotYetUploaded(MatrixError):
    status, errcode, default_message = (
        504,
        "M_NOT_YET_UPLOADED",
        "Media has not been uploaded yet",
    )


class NothingUploaded(MatrixError):
    """/complete before anything reached the upload URL."""

    status, errcode, default_message = (
        400,
        "M_NOT_YET_UPLOADED",
        "Nothing has been uploaded to this media's upload URL",
    )


class InvalidParam(MatrixError):
    status, errcode, default_message = 400, "M_INVALID_PARAM", "Invalid parameter"


class BadJson(MatrixError):
    status, errcode, default_message = 400, "M_BAD_JSON", "Body is not a JSON object"


class NotJson(MatrixError):
    status, errcode, default_message = 400, "M_NOT_JSON", "Body is not valid JSON"


class UploadRejected(MatrixError):
    """The post-upload checks refused the bytes. Status and code come from the check."""

    def __init__(self, message: str, *, errcode: str = "M_FORBIDDEN", status: int = 403) -> None:
        self.errcode = errcode
        self.status = status
        super().__init__(message)


class UploadAbandoned(MatrixError):
    status, errcode, default_message = (
        408,
        "M_UNKNOWN",
        "The upload took too long and was abandoned; upload again",
    )


class StorageUnavailable(MatrixError):
    status, errcode, default_message = 503, "M_UNKNOWN", "Media storage is unavailable"


class HomeserverUnavailable(MatrixError):
    status, errcode, default_message = 502, "M_UNKNOWN", "Homeserver could not check the token"


class RangeNotSatisfiable(MatrixError):
    status, errcode, default_message = 416, "M_UNKNOWN", "Requested range not satisfiable"
