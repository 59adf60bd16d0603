"""The request side of a URL preview: answered from the cache, or from the one fetch of
the URL that every request for it waits on.

1. ``preview_url`` checks the URL (``guard.check_url``: 400/403 before anything else) and
   looks up the URL's row for the current time bucket (or the previous one, while its
   answer is fresh): one query, the row and its media together.
2. No row: ``_claim`` inserts one, with its media row in PROCESSING, in one transaction;
   the unique (URL digest, bucket) lets exactly one of any number of concurrent requests
   win, and only the winner starts the fetch (task ``msc3870.fetch_url_preview``: a
   Celery worker, or a thread of this process's background pool without a broker),
   after the requester's rate (``URL_PREVIEW_RATE``) and, without a broker, this
   process's fetch slots allow one more.
3. Every request, the winner's too, answers from the row once its media leaves
   PROCESSING, waiting for that on the request plane's wake-up hub as downloads do
   (``MediaWait``): no thread per waiter.

A failure is answered from its row for ``URL_PREVIEW_FAILURE_SECONDS``, then the next
request deletes it and fetches again; so is a fetch whose process died (its row still
PROCESSING well past the fetch's deadline).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from .. import queue
from ..conf import app_settings
from ..errors import GuestAccessForbidden, InvalidParam, LimitExceeded
from ..errors import Unrecognized as PreviewsOff
from ..models import Media, MediaState, UploadMethod, URLPreview
from ..ratelimit import LeakyBucket
from ..validation import new_media_id
from ..waiting import Deadline, MediaWait
from . import guard
from .answers import PreviewFailed, PreviewNotReady, render
from .fetch import fail, fetch_url_preview

S = MediaState

# Waiting requests are answered within the fetch's deadline and this much more (the
# image's screening); past it, 504 and the fetch goes on for the next request.
SCREENING_GRACE_SECONDS = 15.0
# A fetch still PROCESSING this long after its deadline was abandoned (its process died).
ABANDONED_AFTER_EXTRA_SECONDS = 60.0
# Without a broker a process runs at most this many fetches at once (on the background
# pool, or waiting for one of its threads): past it, 429 rather than a queue.
FETCH_SLOTS = 8
BUSY_RETRY_MS = 2000


def preview_url(user_id: str, url: str | None, ts: str | None, *, is_guest: bool = False) -> Any:
    """The Open Graph answer for ``url`` asked by ``user_id`` (``ts``: the time the
    client would like a preview as of, in ms; answers are for the time they are fetched,
    as Synapse's are once its cache has expired). ``MediaWait`` while it is fetched."""
    if not guard.enabled():
        raise PreviewsOff()
    if is_guest:
        # As Synapse: a guest cannot make the server fetch.
        raise GuestAccessForbidden("Guests cannot preview URLs")
    url = guard.check_url(url)
    _check_ts(ts)
    deadline = Deadline.after_seconds(
        app_settings.URL_PREVIEW_TIMEOUT_SECONDS + SCREENING_GRACE_SECONDS
    )
    row = _row_to_serve(url, user_id)
    return _answered(row.media, deadline, row)


def _check_ts(ts: str | None) -> None:
    if ts is None:
        return
    try:
        value = int(ts)
    except ValueError as exc:
        raise InvalidParam("ts must be a number of milliseconds") from exc
    if value < 0:
        raise InvalidParam("ts must be a number of milliseconds")


def url_digest(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


def current_bucket(now: float | None = None) -> int:
    return int((time.time() if now is None else now) // app_settings.URL_PREVIEW_CACHE_SECONDS)


def _row_to_serve(url: str, requester: str) -> URLPreview:
    digest = url_digest(url)
    bucket = current_bucket()
    for _attempt in range(3):
        rows = {
            row.bucket: row
            for row in URLPreview.objects.select_related("media").filter(
                url_sha256=digest, bucket__in=(bucket, bucket - 1)
            )
        }
        now = timezone.now()
        fresh = [rows[b] for b in (bucket, bucket - 1) if b in rows and _usable(rows[b], now)]
        if fresh:
            return fresh[0]
        stale = rows.get(bucket)
        if stale is not None:
            # A failure past its time, or an abandoned fetch: forgotten, fetched again.
            _forget(stale)
            continue
        claimed = _claim(url, digest, bucket, requester)
        if claimed is not None:
            return claimed
    raise PreviewNotReady()


def _usable(row: URLPreview, now: datetime) -> bool:
    if row.media.state == S.PROCESSING and not row.media.storage_key:
        return not _abandoned(row.media, now)
    return row.expires_at > now


def _abandoned(media: Media, now: datetime) -> bool:
    started = media.processing_started_at or media.state_changed_at
    limit = app_settings.URL_PREVIEW_TIMEOUT_SECONDS + ABANDONED_AFTER_EXTRA_SECONDS
    return now - started > timedelta(seconds=limit)


def _forget(row: URLPreview) -> None:
    """Delete a stale row (compare-and-set on its time: of racing requests one deletes,
    the others find the new row), and the media row it was waited on if it holds no
    bytes (an image stays: its mxc:// may have been handed out)."""
    with transaction.atomic():
        deleted, _ = URLPreview.objects.filter(pk=row.pk, expires_at=row.expires_at).delete()
        if deleted:
            Media.objects.filter(pk=row.media_id, storage_key="").exclude(state=S.COMPLETE).delete()


def _claim(url: str, digest: str, bucket: int, requester: str) -> URLPreview | None:
    """Insert the row that stands for the fetch; the winner starts it. A loser gets the
    winner's row (None if it is gone already). LimitExceeded if no fetch may start."""
    rate = _rate()
    if rate is not None:
        wait = rate.wait(_rate_key(requester))
        if wait is not None:
            raise LimitExceeded(
                "Too many URL previews; try again later", retry_after_ms=math.ceil(wait * 1000)
            )
    slot = _reserve_slot()
    now = timezone.now()
    try:
        with transaction.atomic():
            media = Media.objects.create(
                server_name=app_settings.SERVER_NAME,
                media_id=new_media_id(),
                user_id="",
                state=S.PROCESSING,
                unused_expires_at=now,
                upload_method=UploadMethod.PREVIEW,
                processing_started_at=now,
            )
            row = URLPreview.objects.create(
                url=url,
                url_sha256=digest,
                bucket=bucket,
                media=media,
                requester=requester,
                created_at=now,
                expires_at=now + timedelta(seconds=app_settings.URL_PREVIEW_CACHE_SECONDS),
            )
    except IntegrityError:
        if slot:
            _slots.release()
        return (
            URLPreview.objects.select_related("media")
            .filter(url_sha256=digest, bucket=bucket)
            .first()
        )
    except BaseException:
        if slot:
            _slots.release()
        raise
    if rate is not None:
        rate.charge(_rate_key(requester), 1)
    _dispatch(row, requester, slot)
    return row


def _rate() -> LeakyBucket | None:
    rate = app_settings.URL_PREVIEW_RATE
    return LeakyBucket.from_rate(rate, "URL_PREVIEW_RATE") if rate else None


def _rate_key(requester: str) -> str:
    return f"msc3870:throttle:url-preview:{requester}"


class _Slots:
    """Fetches a process without a broker admits at once (running or waiting for a
    thread of the background pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.admitted = 0

    def reserve(self) -> bool:
        with self._lock:
            if self.admitted >= FETCH_SLOTS:
                return False
            self.admitted += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.admitted = max(0, self.admitted - 1)


_slots = _Slots()


def _reserve_slot() -> bool:
    if queue.has_broker():
        return False
    if not _slots.reserve():
        raise LimitExceeded("Too many URL previews in flight", retry_after_ms=BUSY_RETRY_MS)
    return True


def _dispatch(row: URLPreview, requester: str, slot: bool) -> None:
    """Queue the fetch once the row is committed: to Celery, or without a broker on this
    process's background pool (in the slot reserved for it). A broker that refuses fails
    the preview at once: its waiters hear 502 rather than wait for nothing."""

    def here() -> None:
        try:
            fetch_url_preview(row.pk)
        finally:
            if slot:
                _slots.release()

    queue.send(
        "msc3870.fetch_url_preview",
        row.pk,
        here=here,
        background=True,
        refused=lambda exc: fail(row, PreviewFailed(reason=f"could not be queued: {exc}")),
    )


# ----------------------------------------------------------------------- the answer


def _answered(media: Media | None, deadline: Deadline, row: URLPreview | None = None) -> Any:
    """The answer once ``media`` (the row a preview's fetch is waited on) has left
    PROCESSING; ``MediaWait`` until then, 504 past the deadline. ``row``: its preview,
    if already read with it."""
    if media is None:
        raise PreviewFailed(reason="the preview's rows were deleted meanwhile")
    if media.state == S.PROCESSING:
        if deadline.passed:
            raise PreviewNotReady()
        raise MediaWait(media.pk, S.PROCESSING, deadline, partial(_resumed, deadline=deadline))
    if row is None or row.media_id != media.pk:
        row = URLPreview.objects.filter(media_id=media.pk).first()
    if row is None:
        raise PreviewFailed(reason="the preview's row was deleted meanwhile")
    return render(row, media)


def _resumed(media: Media | None, *, deadline: Deadline) -> Any:
    return _answered(media, deadline)
