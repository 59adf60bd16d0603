"""Download responses: a redirect to signed storage, or the bytes streamed with Range."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from django.http import HttpResponse, HttpResponseBase, StreamingHttpResponse

from .. import metrics
from ..conf import app_settings
from ..errors import RangeNotSatisfiable
from ..models import Media
from ..stores import get_store
from ..thumbnails import Thumbnail
from .errors import json_error
from .headers import add_security_headers, content_disposition, served_content_type

_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
# Media never changes once complete, but moderation can withdraw it: a client's own cache
# (authenticated downloads are private) keeps it a day.
CACHE_SECONDS = 86400
# Unauthenticated (legacy) answers may sit in shared caches (CDNs, proxies), where a
# moderator cannot reach them: quarantined media must leave them within minutes.
LEGACY_CACHE_SECONDS = 300


def cache_control(public_cache: bool) -> str:
    if public_cache:
        return f"public, max-age={LEGACY_CACHE_SECONDS}"
    return f"private, max-age={CACHE_SECONDS}"


def media_etag(media: Media) -> str:
    """The ETag of a media's bytes: its id, whose bytes never change once complete.

    Never the SHA-256: with ``SHA256_WHEN = "needed"`` only media that other media may
    share is hashed, so a hash where an id was expected would tell anyone who downloads
    that some other upload, perhaps another user's private file, has the same size and
    first bytes. The id tells nothing its URL does not, and needs no secret (an HMAC of
    the storage key would also give twins one tag, and change if the key were rotated).
    """
    return f'"{media.media_id}"'


@dataclass(frozen=True)
class Servable:
    """Bytes in storage and the headers they are served with."""

    key: str
    size: int
    content_type: str
    disposition: str
    etag: str | None
    #: Another server's media (or its thumbnail): counted apart when served.
    remote: bool = False

    @classmethod
    def of_media(cls, media: Media, filename: str | None) -> Servable:
        content_type = served_content_type(media.content_type)
        return cls(
            key=media.storage_key,
            size=media.size or 0,
            content_type=content_type,
            disposition=content_disposition(content_type, filename or media.filename or None),
            etag=media_etag(media),
            remote=media.is_remote,
        )

    @classmethod
    def of_thumbnail(cls, thumbnail: Thumbnail, *, remote: bool = False) -> Servable:
        return cls(
            key=thumbnail.key,
            size=thumbnail.size,
            content_type=thumbnail.content_type,
            disposition="inline",  # thumbnails are always inline
            etag=None,
            remote=remote,
        )

    @property
    def source(self) -> str:
        """The ``msc3870_served_bytes`` label of its bytes when streamed."""
        return "remote" if self.remote else "local"

    def stream(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Its bytes from storage (``start``..``end`` inclusive), counted as served."""
        return metrics.counting(self.source, get_store().iter_bytes(self.key, start, end))


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range as (start, end) inclusive; None = serve everything.

    Malformed and multi-range headers are ignored (RFC 9110 allows it); an unsatisfiable
    range raises ``RangeNotSatisfiable``, and so does any range of an empty object (there is
    no byte to point at, and ``bytes 0--1/0`` is not a Content-Range).
    """
    if not header:
        return None
    match = _RANGE_RE.fullmatch(header.strip())
    if not match or (not match.group(1) and not match.group(2)):
        return None

    def number(digits: str) -> int:
        # int() refuses more than 4300 digits (ValueError); any number past
        # the object's size means the same thing, so cap it without converting it all.
        digits = digits.lstrip("0") or "0"
        return int(digits) if len(digits) <= 18 else 10**18

    first, last = match.group(1), match.group(2)
    if not first:  # suffix: the last N bytes
        length = number(last)
        if length == 0 or size == 0:
            raise RangeNotSatisfiable()
        return max(0, size - length), size - 1
    start = number(first)
    if last and number(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable()
    end = min(number(last), size - 1) if last else size - 1
    return start, end


def serve(
    item: Servable,
    *,
    range_header: str | None,
    if_none_match: str | None,
    allow_redirect: bool,
    public_cache: bool,
) -> HttpResponseBase:
    """A download's answer: a redirect to signed storage where allowed and possible, else
    304, 416, or the bytes (all of them, or one range)."""
    if allow_redirect and (redirect := _redirect(item, public_cache)) is not None:
        return redirect
    if item.etag and if_none_match and item.etag in [t.strip() for t in if_none_match.split(",")]:
        response: HttpResponseBase = HttpResponse(status=304)
    else:
        try:
            response = _bytes(item, parse_range(range_header, item.size))
        except RangeNotSatisfiable as exc:
            response = json_error(exc)
            response["Content-Range"] = f"bytes */{item.size}"
            return add_security_headers(response)
    response["Accept-Ranges"] = "bytes"
    response["Cache-Control"] = cache_control(public_cache)
    if item.etag:
        response["ETag"] = item.etag
    return add_security_headers(response)


def _redirect(item: Servable, public_cache: bool) -> HttpResponseBase | None:
    """307 to a signed URL of the store, answering with our headers; None where the store
    cannot sign one."""
    store = get_store()
    if not store.can_redirect:
        return None
    url = store.download_url(
        item.key,
        content_type=item.content_type,
        disposition=item.disposition,
        lifetime=app_settings.DOWNLOAD_URL_LIFETIME,
        # What the store answers with, whatever the object carries: our caching.
        cache_control=cache_control(public_cache),
    )
    if not url:
        return None
    metrics.served("redirect", item.size)
    response = HttpResponse(status=307)
    response["Location"] = url
    # The signed URL expires: caches must not keep the redirect longer.
    response["Cache-Control"] = "private, max-age=60"
    return add_security_headers(response)


def _bytes(item: Servable, byte_range: tuple[int, int] | None) -> HttpResponseBase:
    """The bytes, streamed: all of them (200), or ``byte_range`` (206)."""
    if byte_range is None:
        response = StreamingHttpResponse(item.stream(), content_type=item.content_type)
        response["Content-Length"] = str(item.size)
    else:
        start, end = byte_range
        response = StreamingHttpResponse(
            item.stream(start, end), status=206, content_type=item.content_type
        )
        response["Content-Length"] = str(end - start + 1)
        response["Content-Range"] = f"bytes {start}-{end}/{item.size}"
    response["Content-Disposition"] = item.disposition
    return response
