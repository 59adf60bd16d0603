"""What a preview answers: its fields, or the error its requester hears."""

from __future__ import annotations

from typing import Any

from ..errors import Codes, MatrixError
from ..models import Media, MediaState, URLPreview

S = MediaState

# The Open Graph fields of a preview's image: the page's own are replaced by those of the
# copy kept here (a client never needs to reach the page's host), and left out of the
# answer while that copy is not served (refused by the checks, quarantined, deleted).
IMAGE_FIELDS = (
    "og:image",
    "og:image:type",
    "og:image:width",
    "og:image:height",
    "og:image:secure_url",
    "og:image:url",
    "matrix:image:size",
)


class PreviewFailed(MatrixError):
    """A preview that could not be made: what the requester hears (fixed words by kind,
    never the addresses or errors behind it)."""

    status, errcode, default_message = 502, Codes.UNKNOWN, "Could not preview the URL"

    def __init__(
        self,
        message: str | None = None,
        *,
        errcode: str | None = None,
        status: int | None = None,
        reason: str = "",
    ) -> None:
        super().__init__(message)
        if errcode:
            self.errcode = errcode
        if status:
            self.status = status
        #: For the log and the row's ``last_error``: may name addresses and URLs.
        self.reason = reason or self.message


class PreviewNotReady(MatrixError):
    status, errcode, default_message = (
        504,
        Codes.UNKNOWN,
        "The preview is taking too long; try again later",
    )


def render(row: URLPreview, media: Media) -> dict[str, Any]:
    """The answer of a finished preview: its error, or its fields, with its image's only
    while the image is served."""
    if row.error_status:
        raise PreviewFailed(
            row.error_message or None, errcode=row.error_errcode or None, status=row.error_status
        )
    og = dict(row.og or {})
    if not (media.state == S.COMPLETE and media.storage_key):
        for field in IMAGE_FIELDS:
            og.pop(field, None)
    return og
