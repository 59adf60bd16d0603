"""The fetch of one URL preview (task ``msc3870.fetch_url_preview``), top to bottom:

1. ``fetch_url_preview`` takes a claimed row (its media in PROCESSING, no bytes) and runs
   everything below inside one ``outbound.deadline`` (``URL_PREVIEW_TIMEOUT_SECONDS``):
   the page, its oEmbed answer and its image share it, and whatever is still open when
   it passes is shut down, the origin's connection with it.
2. ``_page``: the URL, or the oEmbed endpoint a provider of ``URL_PREVIEW_OEMBED_PROVIDERS``
   names for it, fetched through ``outbound`` with the preview's address policy (checked
   at connect time, on every redirect hop), ``Accept`` naming only what is read, and the
   answer's type checked against that allowlist before a byte of its body is read:
   - HTML: its first ``URL_PREVIEW_MAX_HTML_BYTES`` parsed (``html.parse_page``), then its
     oEmbed discovery link fetched (a failure there only loses what it would add);
   - an image: stored as the preview's image;
   - an oEmbed endpoint's JSON: read as Open Graph (``oembed.parse``).
3. The fields are merged: the page's Open Graph tags, then its title and meta
   description, then oEmbed's, then what was gleaned from its text and images; the
   oEmbed author's name is a title only when nothing else gave one.
4. ``_image``: the ``og:image`` (resolved against the page's final URL; http(s) only)
   fetched the same way into the media row's own key (``preview/``: never where uploads
   live), at most ``URL_PREVIEW_MAX_BYTES`` (and ``MAX_UPLOAD_SIZE``), and named in the
   answer as ``mxc://<this server>/<id>`` with its type, size and dimensions; a failure
   there only loses the image.
5. ``_finish`` writes the answer on the row, then ends the media row's PROCESSING, which
   wakes every request waiting for the preview: the image is screened like an upload
   (``verdicts.screen_row``: type lists, block list, clamd; COMPLETE or REJECTED), and
   without an image the row becomes a tombstone (DELETED). An image refused by the
   checks, or later quarantined, is left out of the answers (``service.render``).
6. A failure (``fail``) writes the error clients hear (fixed words by kind) and the
   detail for moderators and the log, then ends PROCESSING (REJECTED, no bytes).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from email.message import Message
from typing import Any
from urllib.parse import urljoin, urlsplit

from django.db.models import Q
from django.utils import timezone
from PIL import Image

from .. import lifecycle, logs
from ..conf import app_settings
from ..content_types import base_type
from ..errors import Codes, InvalidParam, TooLarge
from ..federation import outbound
from ..models import Media, MediaState, URLPreview
from ..stores import ChunkReader, get_store
from . import guard, oembed
from .answers import IMAGE_FIELDS, PreviewFailed
from .html import parse_page

log = logging.getLogger(__name__)
S = MediaState

USER_AGENT = "mediarepo (bot; URL previews)"
# One connect or one read may take this long; the whole preview URL_PREVIEW_TIMEOUT_SECONDS.
REQUEST_TIMEOUT_SECONDS = 10.0
# What is read, by the answer's Content-Type: anything else is not read at all.
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
IMAGE_TYPES = frozenset(
    {"image/png", "image/apng", "image/jpeg", "image/pjpeg", "image/jpg", "image/gif"}
    | {"image/webp"}
)
JSON_TYPES = frozenset({"application/json", "text/json", "application/json+oembed"})
PAGE_ACCEPT = "text/html,application/xhtml+xml;q=0.9,image/*;q=0.8"
IMAGE_ACCEPT = "image/png,image/jpeg,image/gif,image/webp"
JSON_ACCEPT = "application/json"
# An image's dimensions are read from its first bytes (the header; a JPEG's may follow
# a large EXIF block).
DIMENSIONS_FROM_BYTES = 256 * 1024
# Fields whose name or value is longer are dropped (as Synapse).
MAX_KEY_LENGTH = 50
MAX_VALUE_LENGTH = 1000

# What clients hear, by kind: never the addresses, ports or errors behind it (a name
# that resolves to an internal address is "could not fetch", as an unreachable one).
COULD_NOT_FETCH = "Could not fetch the URL"
TOO_SLOW = "The URL took too long to answer"
TOO_LARGE = "The URL's content is too large to preview"
NOT_PREVIEWABLE = "The URL's content type cannot be previewed"


@dataclass(frozen=True)
class StoredImage:
    size: int
    sha256: str
    content_type: str
    width: int | None
    height: int | None
    filename: str


def fetch_url_preview(pk: int) -> str:
    """The task's body: fetch, answer and end one claimed preview. Starts from the rows'
    state, so a redelivered task does nothing twice. Timed and written as one line."""
    outcome = "failed"
    with logs.step("url_preview") as step:
        outcome = _fetch(pk)
        step.fields["outcome"] = outcome
    return outcome


def _fetch(pk: int) -> str:
    row = URLPreview.objects.select_related("media").filter(pk=pk).first()
    if row is None:
        return "skipped"
    media = row.media
    logs.annotate(media_id=media.media_id)
    if media.state != S.PROCESSING or media.storage_key:
        return "skipped"
    # The fetch starts now, perhaps after waiting for a thread or a worker: it counts as
    # abandoned only that long after this.
    if not lifecycle.update_if_state(
        media, S.PROCESSING, extra_where=Q(storage_key=""), processing_started_at=timezone.now()
    ):
        return "skipped"
    try:
        with outbound.deadline(app_settings.URL_PREVIEW_TIMEOUT_SECONDS):
            og, image = _build(row.url, media)
    except PreviewFailed as failure:
        return fail(row, failure)
    except Exception as exc:
        log.exception("Previewing %s failed", row.url)
        return fail(row, PreviewFailed(reason=f"{type(exc).__name__}: {exc}"))
    return _finish(row, media, og, image)


def _build(url: str, media: Media) -> tuple[dict[str, Any], StoredImage | None]:
    endpoint = oembed.endpoint_for(url)
    og, image, author, base = _page(url, endpoint, media)
    if image is None:
        image_url = og.pop("og:image", None)
        for field in IMAGE_FIELDS:
            og.pop(field, None)  # they describe the page's image, not the one kept
        if isinstance(image_url, str) and image_url.strip():
            image = _image(urljoin(base, image_url.strip()), media)
    if not og.get("og:title") and author:
        og["og:title"] = author
    return og, image


def _page(
    url: str, endpoint: str | None, media: Media
) -> tuple[dict[str, Any], StoredImage | None, str | None, str]:
    """The fields of the URL (its page, image or oEmbed answer), the image if the URL was
    one, the oEmbed author, and the URL relative links are resolved against."""
    if endpoint is not None:
        with _fetching(endpoint, JSON_ACCEPT, JSON_TYPES) as response:
            answer = oembed.parse(url, response.read())
        return dict(answer.og), None, answer.author_name, url
    with _fetching(url, PAGE_ACCEPT, HTML_TYPES | IMAGE_TYPES) as response:
        kind = base_type(response.headers.get("Content-Type", ""))
        final_url = response.url
        if kind in IMAGE_TYPES:
            image = _store_image(response, media, kind)
            fields = {"og:description": image.filename} if image.filename else {}
            return fields, image, None, final_url
        body = _first_bytes(response, app_settings.URL_PREVIEW_MAX_HTML_BYTES)
        page = parse_page(body, response.headers.get("Content-Type"))
    found: dict[str, Any] = {}
    author = None
    if page.oembed_url:
        discovered = _discovered(urljoin(final_url, page.oembed_url), url)
        if discovered is not None:
            found, author = discovered.og, discovered.author_name
    # Lowest first: what was gleaned, then oEmbed, then the title and meta description,
    # then the page's Open Graph tags.
    return {**page.gleaned, **found, **page.declared, **page.tags}, None, author, final_url


def _discovered(endpoint: str, url: str) -> oembed.OEmbed | None:
    """The oEmbed answer a page links to; None if it cannot be had (not a failure of the
    preview)."""
    if urlsplit(endpoint).scheme not in guard.SCHEMES:
        return None
    try:
        with _fetching(endpoint, JSON_ACCEPT, JSON_TYPES) as response:
            return oembed.parse(url, response.read())
    except PreviewFailed as failure:
        log.info("oEmbed of %s not used: %s", url, failure.reason)
        return None


def _image(url: str, media: Media) -> StoredImage | None:
    """The page's image stored as the preview's; None if it cannot be had."""
    if urlsplit(url).scheme not in guard.SCHEMES:
        return None  # data: and the like are not fetched
    try:
        with _fetching(url, IMAGE_ACCEPT, IMAGE_TYPES) as response:
            kind = base_type(response.headers.get("Content-Type", ""))
            return _store_image(response, media, kind)
    except PreviewFailed as failure:
        log.info("Image %s of a preview not kept: %s", url, failure.reason)
        return None


@contextmanager
def _fetching(url: str, accept: str, types: frozenset[str]) -> Iterator[outbound.StreamedResponse]:
    """A GET through the guard with the preview's address policy: the response with its
    body unread, if it is a 200 of one of ``types``. Every failure, while connecting or
    while the caller reads, is a ``PreviewFailed``."""
    headers = {
        "User-Agent": USER_AGENT,
        "Accept": accept,
        "Accept-Language": ", ".join(app_settings.URL_PREVIEW_ACCEPT_LANGUAGE),
    }
    try:
        with outbound.stream(
            "GET",
            url,
            headers=headers,
            options=outbound.Options(
                max_bytes=app_settings.URL_PREVIEW_MAX_BYTES,
                timeout=REQUEST_TIMEOUT_SECONDS,
                total_timeout=app_settings.URL_PREVIEW_TIMEOUT_SECONDS,
                policy=guard.policy(),
            ),
        ) as response:
            if response.status != 200:
                raise PreviewFailed(
                    f"The URL answered HTTP {int(response.status)}",
                    reason=f"{url} answered {response.status}",
                )
            kind = base_type(response.headers.get("Content-Type", ""))
            if kind not in types:
                raise PreviewFailed(NOT_PREVIEWABLE, reason=f"{url} is {kind or 'untyped'}")
            yield response
    except (outbound.ResponseTooLarge, TooLarge) as exc:
        raise PreviewFailed(TOO_LARGE, errcode=Codes.TOO_LARGE, reason=f"{url}: {exc}") from exc
    except outbound.OutboundTimeout as exc:
        raise PreviewFailed(TOO_SLOW, reason=f"{url}: {exc}") from exc
    except outbound.OutboundError as exc:
        raise PreviewFailed(COULD_NOT_FETCH, reason=f"{url}: {exc}") from exc


def _first_bytes(response: outbound.StreamedResponse, limit: int) -> bytes:
    """At most ``limit`` bytes of the body; the rest is never read (the connection is
    closed with the response)."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


def _store_image(response: outbound.StreamedResponse, media: Media, kind: str) -> StoredImage:
    """Stream an image answer to the media row's own key (a failed write leaves nothing
    there)."""
    limit = min(app_settings.URL_PREVIEW_MAX_BYTES, app_settings.MAX_UPLOAD_SIZE)
    try:
        written = get_store().write_stream(
            media.served_key,
            ChunkReader(response.iter_bytes()),
            max_size=limit,
            keep_first=DIMENSIONS_FROM_BYTES,
        )
    except InvalidParam as exc:  # ended before its Content-Length
        raise PreviewFailed(COULD_NOT_FETCH, reason=f"{response.url}: {exc}") from exc
    width, height = _dimensions(written.first_bytes)
    return StoredImage(
        size=written.size,
        sha256=written.sha256,
        content_type=kind,
        width=width,
        height=height,
        filename=_filename(response.headers.get("Content-Disposition")),
    )


def _dimensions(first_bytes: bytes) -> tuple[int | None, int | None]:
    """Width and height from an image's header (Pillow reads only the header here)."""
    try:
        with Image.open(io.BytesIO(first_bytes)) as image:
            width, height = image.size
    except Exception:  # a header Pillow cannot read: the answer goes without them
        return None, None
    return int(width), int(height)


def _filename(disposition: str | None) -> str:
    if not disposition:
        return ""
    message = Message()
    message["Content-Disposition"] = disposition
    try:
        name = message.get_filename() or ""
    except (ValueError, LookupError):
        return ""
    name = " ".join(name.split())
    return name if len(name) <= 255 and name.isprintable() else ""


# ----------------------------------------------------------------------- the end


def _finish(row: URLPreview, media: Media, og: dict[str, Any], image: StoredImage | None) -> str:
    from ..verdicts import record_failure, screen_row

    if image is not None:
        og.update(
            {
                "og:image": media.mxc_uri,
                "og:image:type": image.content_type,
                "matrix:image:size": image.size,
            }
        )
        if image.width and image.height:
            og["og:image:width"], og["og:image:height"] = image.width, image.height
    if not URLPreview.objects.filter(pk=row.pk).update(og=_pruned(og)):
        get_store().delete(media.served_key)  # forgotten meanwhile (taken for abandoned)
        return "skipped"
    if image is None:
        # Nothing to keep: the row's PROCESSING ends (its waiters wake) as a tombstone.
        lifecycle.transition(
            media,
            [S.PROCESSING],
            S.DELETED,
            send_signal=False,
            objects_deleted_at=timezone.now(),
        )
        return "answered"
    if not lifecycle.update_if_state(
        media,
        S.PROCESSING,
        extra_where=Q(storage_key=""),
        storage_key=media.served_key,
        size=image.size,
        sha256=image.sha256,
        declared_content_type=image.content_type,
        filename=image.filename,
    ):
        get_store().delete(media.served_key)
        return "skipped"
    try:
        screen_row(media)
    except Exception as exc:
        # As for uploads: recorded, and the stuck sweep screens it again.
        log.exception("Screening of %s failed", media.mxc_uri)
        record_failure(media.pk, exc)
        return "failed"
    return "answered"


def _pruned(og: dict[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for key, value in og.items():
        if value is None or value == "":
            continue
        if len(key) > MAX_KEY_LENGTH or len(str(value)) > MAX_VALUE_LENGTH:
            log.info("Dropping the overlong field %s of a preview", key[:MAX_KEY_LENGTH])
            continue
        kept[key] = value
    return kept


def fail(row: URLPreview, failure: PreviewFailed) -> str:
    """A preview that could not be made: its row answers ``failure`` to every request
    for ``URL_PREVIEW_FAILURE_SECONDS``; the media row's PROCESSING ends without bytes."""
    now = timezone.now()
    URLPreview.objects.filter(pk=row.pk).update(
        error_status=failure.status,
        error_errcode=str(failure.errcode),
        error_message=failure.message[:255],
        last_error=failure.reason[:1000],
        expires_at=now + timedelta(seconds=app_settings.URL_PREVIEW_FAILURE_SECONDS),
    )
    get_store().delete(row.media.served_key)
    lifecycle.transition(
        row.media_id,
        [S.PROCESSING],
        S.REJECTED,
        send_signal=False,
        storage_key="",
        rejection_errcode=str(failure.errcode),
        rejection_status=failure.status,
        rejection_reason=failure.message[:1000],
        last_error=f"url preview: {failure.reason}"[:1000],
        objects_deleted_at=now,
    )
    log.info("Could not preview %s: %s", row.url, failure.reason)
    return "failed"
