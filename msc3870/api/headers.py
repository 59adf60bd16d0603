"""Download response headers, in one place (as Synapse's ``synapse/media/_base.py``)."""

from __future__ import annotations

from urllib.parse import quote

from django.http import HttpResponseBase

from ..content_types import base_type

# Types a browser may render in place (spec v1.12). Everything else is an attachment.
INLINE_CONTENT_TYPES = frozenset(
    {
        "text/css",
        "text/plain",
        "text/csv",
        "application/json",
        "application/ld+json",
        "image/jpeg",
        "image/gif",
        "image/png",
        "image/apng",
        "image/webp",
        "image/avif",
        "video/mp4",
        "video/webm",
        "video/ogg",
        "video/quicktime",
        "audio/mp4",
        "audio/webm",
        "audio/aac",
        "audio/mpeg",
        "audio/ogg",
        "audio/wave",
        "audio/wav",
        "audio/x-wav",
        "audio/x-pn-wav",
        "audio/flac",
        "audio/x-flac",
    }
)

CONTENT_SECURITY_POLICY = (
    "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; "
    "style-src 'unsafe-inline'; media-src 'self'; object-src 'self';"
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Security-Policy": "sandbox;",
    "Cross-Origin-Resource-Policy": "cross-origin",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow, noarchive, noimageindex",
}

# RFC 2616 token characters: anything else goes in filename*= (RFC 5987/6266).
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ^_`abcdefghijklmnopqrstuvwxyz|~"
)


def served_content_type(content_type: str) -> str:
    return content_type or "application/octet-stream"


def content_disposition(content_type: str, filename: str | None, *, thumbnail: bool = False) -> str:
    disposition = (
        "inline" if thumbnail or base_type(content_type) in INLINE_CONTENT_TYPES else "attachment"
    )
    if not filename:
        return disposition
    if all(c in _TOKEN_CHARS for c in filename):
        return f"{disposition}; filename={filename}"
    return f"{disposition}; filename*=utf-8''{quote(filename, safe='')}"


def add_security_headers(response: HttpResponseBase) -> HttpResponseBase:
    for name, value in SECURITY_HEADERS.items():
        response[name] = value
    return response
