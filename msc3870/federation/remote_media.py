"""Other servers' media, fetched when a client of ours asks for it.

Route of one ``mxc://other.server/id``, top to bottom:

1. ``media_for_download`` (called by ``downloads.media_for_download``) looks the row up
   (``server_name`` = the other server). None: it INSERTs one in PROCESSING with upload
   method ``remote``; the unique constraint on (server_name, media_id) lets exactly one of
   any number of concurrent requests win, and only the winner starts the fetch (the task
   ``msc3870.fetch_remote_media``: a Celery worker, or a thread of this process without a
   broker). Every request, the winner too, then waits for the row to leave PROCESSING on
   the request plane's wake-up hub, as downloads of local uploads do: no thread per waiter.
2. ``fetch_remote_media`` (the task) resolves the server (``discovery``), asks its
   ``/_matrix/federation/v1/media/download/{id}`` signed with our key, and on
   ``M_UNRECOGNIZED`` the legacy ``/_matrix/media/v3/download/{server}/{id}
   ?allow_remote=false``. The ``multipart/mixed`` answer is parsed as it streams
   (python-multipart); a ``Location`` part is followed through ``outbound`` (address guard
   on every hop, no credentials). ``MAX_UPLOAD_SIZE`` is enforced from ``Content-Length``
   and while streaming. The bytes go to the row's served key (under ``remote/<server>/``,
   never where our own ids live), then through the same screening as local uploads
   (``verdicts.screen_row``: type checks, block list, dedup, clamav), which ends in
   COMPLETE or REJECTED and wakes the waiters.
3. A failed fetch (unreachable, unknown there, too large, refused address) moves the row to
   REJECTED with the status to answer (404 for media the server does not have, else 502)
   and no storage key. Clients hear one of three fixed messages (``CLIENT_MESSAGES``):
   the detail (addresses, ports, URLs, urllib3's words) is an oracle for our network, so
   it goes to the log and the row's ``last_error`` only. For
   ``REMOTE_MEDIA_FAILURE_SECONDS`` every request gets that answer from the row at once;
   after that the next request deletes the dead row (compare-and-set on its state and
   time: one request wins) and fetches again, and the cleanup sweep deletes rows no
   request came back for. Media rejected by screening or by a moderator is never fetched
   again: its row stays.

What a fetch may cost is decided before its row is inserted (``_admit_fetch``): the
requester's byte bucket (``REMOTE_MEDIA_DOWNLOAD_PER_SECOND`` / ``_BURST_COUNT``, charged
with the bytes a fetch read once it ends, to the requester whose request started it), the
fetches in flight across the deployment (``REMOTE_MEDIA_MAX_FETCHES``) and, without a
broker, this process's fetch threads. Past any of them the answer is 429 at once. Only
requests on behalf of a user fetch (the legacy unauthenticated endpoints serve what is
held); media already held, and waiting for a fetch another request started, cost nothing.
Serving held media records when (``last_accessed_at``, at most once an hour per media,
``availability.note_access``), which the cache's eviction sweep
(``maintenance.evict_remote_media``) orders by.

Thumbnails of remote media are made here from the fetched original, as for local media.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import Message
from functools import partial
from typing import Any
from urllib.parse import quote

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from .. import lifecycle, logs, metrics, queue, sql
from ..conf import app_settings
from ..errors import Codes, LimitExceeded, NotFound, NotYetUploaded, Rejection, TooLarge
from ..models import Media, MediaState, UploadMethod
from ..ratelimit import LeakyBucket
from ..stores import ChunkReader, get_store
from ..waiting import Deadline, MediaWait
from . import discovery, outbound
from .xmatrix import sign_request

log = logging.getLogger(__name__)
S = MediaState

# The multipart framing around the bytes: boundaries, part headers and the JSON part.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024
# One connect or read may take this long; the whole fetch REMOTE_MEDIA_TIMEOUT_SECONDS.
REQUEST_TIMEOUT_SECONDS = 30.0
# A fetch still PROCESSING without bytes this long after the fetch deadline was abandoned
# (its process died): the next request fails it and fetches again.
ABANDONED_AFTER_EXTRA_SECONDS = 60
# When a request refused because too many fetches are in flight may try again: most
# fetches take a second or two.
FETCHES_BUSY_RETRY_MS = 2000
# Without a broker a process admits FETCH_SLOTS fetches at once (running or waiting for a
# thread): past that, 429 rather than a queue.
FETCH_SLOTS = 16

GENERIC_MESSAGE = "Could not fetch remote media"
#: What clients hear of a failed fetch, by errcode (anything else: ``GENERIC_MESSAGE``).
CLIENT_MESSAGES: dict[str, str] = {
    Codes.NOT_FOUND: "Remote media not found",
    Codes.TOO_LARGE: "Remote media is too large",
}


class FetchFailed(Rejection):
    """A fetch of another server's media failed. ``reason`` is for the log and moderators
    (it may name addresses, ports and URLs); clients hear ``client_message`` only."""

    status, errcode = 502, Codes.UNKNOWN

    def __init__(
        self, reason: str, *, errcode: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(reason, errcode=errcode, status=status)
        self.message = client_message(self.errcode)


# ----------------------------------------------------------------------- the request side


def fetching_enabled() -> bool:
    """Fetching needs our signing key (federation is off without ``SIGNING_KEY_PATH``)."""
    return app_settings.FETCH_REMOTE_MEDIA and bool(app_settings.SIGNING_KEY_PATH)


def media_for_download(
    server_name: str,
    media_id: str,
    *,
    deadline: Deadline,
    frozen_after: datetime | None = None,
    fetch_for: str | None = None,
) -> Media:
    """The complete media ``mxc://server_name/media_id`` of another server; ``MediaWait``
    while it is fetched or screened. ``fetch_for``: the Matrix user on whose behalf it is
    fetched if not held yet (charged the bytes); None: only what is held is served."""
    media = sql.media_by_mxc(server_name, media_id)
    if frozen_after is not None and timezone.now() > frozen_after:
        # Anything fetched now would be created after the freeze, and not served to this
        # request anyway.
        fetch_for = None
    if fetch_for is not None and fetching_enabled():
        media = _row_to_serve(media, server_name, media_id, fetch_for)
    return _remote_downloadable(media, deadline=deadline, frozen_after=frozen_after)


def is_fetch_failure(media: Media) -> bool:
    """A row whose fetch failed (as opposed to bytes refused by screening or a moderator,
    which keep their storage key or their moderator)."""
    return (
        media.is_remote
        and media.state == S.REJECTED
        and not media.storage_key
        and not media.moderated_by
    )


def _row_to_serve(
    media: Media | None, server_name: str, media_id: str, requester: str
) -> Media | None:
    for _attempt in range(3):
        if media is None:
            media = _claim(server_name, media_id, requester)
            if media is not None:
                return media
        elif _abandoned(media):
            _fail(media, FetchFailed("The fetch was abandoned"))
            media = _forget_failure(media)
        elif is_fetch_failure(media) and _failure_forgotten(media):
            media = _forget_failure(media)
        elif _evicted(media):
            # Evicted from the cache by a sweep that stopped before deleting the row.
            media = _forget(media, S.DELETED)
        else:
            return media
    return media


def _claim(server_name: str, media_id: str, requester: str) -> Media | None:
    """Insert the row that stands for the fetch; the winner starts it. A loser gets the
    winner's row (None if it vanished meanwhile). LimitExceeded if no fetch may start."""
    slot = _admit_fetch(requester)
    now = timezone.now()
    try:
        with transaction.atomic():
            media = Media.objects.create(
                server_name=server_name,
                media_id=media_id,
                user_id="",
                state=S.PROCESSING,
                unused_expires_at=now,
                upload_method=UploadMethod.REMOTE,
                processing_started_at=now,
                last_accessed_at=now,
            )
    except IntegrityError:
        if slot:
            _pool.release()
        return sql.media_by_mxc(server_name, media_id)
    except BaseException:
        if slot:
            _pool.release()
        raise
    dispatch_fetch(media, requester)
    return media


def download_bucket() -> LeakyBucket | None:
    """Each user's bucket of fetched bytes (None: not limited)."""
    per_second = app_settings.REMOTE_MEDIA_DOWNLOAD_PER_SECOND
    if per_second is None:
        return None
    return LeakyBucket(
        capacity=app_settings.REMOTE_MEDIA_DOWNLOAD_BURST_COUNT, per_second=per_second
    )


def bucket_key(requester: str) -> str:
    return f"msc3870:throttle:remote-media:{requester}"


def _admit_fetch(requester: str) -> bool:
    """Whether a new fetch may start for ``requester``: LimitExceeded if its bucket is
    full, if ``REMOTE_MEDIA_MAX_FETCHES`` fetches are in flight, or (no broker) if this
    process's fetch slots are taken. True if a slot of this process was reserved (the
    fetch releases it)."""
    bucket = download_bucket()
    if bucket is not None:
        wait = bucket.wait(bucket_key(requester))
        if wait is not None:
            raise LimitExceeded(
                "Too much remote media fetched; try again later",
                retry_after_ms=math.ceil(wait * 1000),
            )
    if fetches_in_flight() >= app_settings.REMOTE_MEDIA_MAX_FETCHES:
        raise LimitExceeded(
            "Too many remote media fetches in flight", retry_after_ms=FETCHES_BUSY_RETRY_MS
        )
    if queue.has_broker():
        return False
    if not _pool.reserve():
        raise LimitExceeded(
            "Too many remote media fetches in flight", retry_after_ms=FETCHES_BUSY_RETRY_MS
        )
    return True


def fetches_in_flight() -> int:
    """Fetches started and not done (rows of other servers' media in PROCESSING without
    bytes), counted up to ``REMOTE_MEDIA_MAX_FETCHES`` from the remote media index. Those
    abandoned (their process died) are not."""
    limit = app_settings.REMOTE_MEDIA_MAX_FETCHES
    started_after = timezone.now() - timedelta(
        seconds=app_settings.REMOTE_MEDIA_TIMEOUT_SECONDS + ABANDONED_AFTER_EXTRA_SECONDS
    )
    return (
        Media.objects.filter(
            upload_method=UploadMethod.REMOTE,
            state=S.PROCESSING,
            storage_key="",
            processing_started_at__gt=started_after,
        )
        .values("pk")[:limit]
        .count()
    )


def _failure_forgotten(media: Media) -> bool:
    age = timezone.now() - media.state_changed_at
    return age >= timedelta(seconds=app_settings.REMOTE_MEDIA_FAILURE_SECONDS)


def _abandoned(media: Media) -> bool:
    if not (media.is_remote and media.state == S.PROCESSING and not media.storage_key):
        return False
    started = media.processing_started_at or media.state_changed_at
    limit = app_settings.REMOTE_MEDIA_TIMEOUT_SECONDS + ABANDONED_AFTER_EXTRA_SECONDS
    return timezone.now() - started > timedelta(seconds=limit)


def _evicted(media: Media) -> bool:
    """Evicted from the cache, objects deleted, row not yet (a purge names a moderator)."""
    return (
        media.is_remote
        and media.state == S.DELETED
        and not media.moderated_by
        and media.objects_deleted_at is not None
    )


def _forget_failure(media: Media) -> Media | None:
    return _forget(media, S.REJECTED)


def _forget(media: Media, state: str) -> Media | None:
    """Delete a failed fetch's (or an evicted media's) row so that the id can be fetched
    again. Compare-and-set on its state and time: of racing requests one deletes, the
    others see the new row."""
    Media.objects.filter(pk=media.pk, state=state, state_changed_at=media.state_changed_at).delete()
    return sql.media_by_mxc(media.server_name, media.media_id)


def _remote_downloadable(
    media: Media | None, *, deadline: Deadline, frozen_after: datetime | None
) -> Media:
    from ..availability import available

    if media is None:
        raise NotFound()
    if is_fetch_failure(media):
        raise FetchFailed(
            media.rejection_reason,
            errcode=media.rejection_errcode or None,
            status=media.rejection_status or None,
        )
    if media.state == S.PROCESSING:
        if frozen_after is not None and media.created_at > frozen_after:
            raise NotFound()
        if deadline.passed:
            raise NotYetUploaded()
        raise MediaWait(
            media.pk,
            S.PROCESSING,
            deadline,
            partial(_remote_downloadable, deadline=deadline, frozen_after=frozen_after),
        )
    # Serving it records the access (``availability.note_access``), as for local media.
    return available(media, deadline, frozen_after=frozen_after)


def client_message(errcode: str) -> str:
    return CLIENT_MESSAGES.get(errcode, GENERIC_MESSAGE)


# ----------------------------------------------------------------------- dispatch


class _FetchPool:
    """The fetches a process without a broker admits: at most ``FETCH_SLOTS`` at once
    (running on the background pool of ``msc3870.queue``, or waiting for a thread). A slot
    is reserved before the fetch's row is inserted and released when the fetch ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._admitted = 0

    def reserve(self) -> bool:
        with self._lock:
            if self._admitted >= FETCH_SLOTS:
                return False
            self._admitted += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._admitted = max(0, self._admitted - 1)

    @property
    def admitted(self) -> int:
        return self._admitted


_pool = _FetchPool()


def dispatch_fetch(media: Media, requester: str | None = None) -> None:
    """Queue the fetch once the row is committed: to Celery, or without a broker on the
    process's background pool (in the slot ``_admit_fetch`` reserved; the request that
    claimed the row waits on the hub like the others). A broker that refuses fails the
    fetch at once: the waiters hear 502 instead of waiting for nothing. ``requester`` is
    charged the bytes."""

    def here() -> None:
        try:
            fetch_remote_media(media.pk, requester)
        finally:
            _pool.release()

    queue.send(
        "msc3870.fetch_remote_media",
        media.pk,
        requester,
        here=here,
        background=True,
        refused=lambda exc: _fail(media, FetchFailed("The fetch could not be queued")),
    )


# ----------------------------------------------------------------------- the fetch


@dataclass(frozen=True)
class Fetched:
    size: int
    sha256: str
    content_type: str
    filename: str


class Meter:
    """Counts the bytes read from other servers for one fetch (bodies, error bodies and
    followed ``Location`` parts alike)."""

    def __init__(self) -> None:
        self.bytes = 0

    def count(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.bytes += len(chunk)
            yield chunk


def _body(response: outbound.StreamedResponse, meter: Meter) -> Iterator[bytes]:
    return meter.count(response.iter_bytes())


def fetch_remote_media(pk: int, requester: str | None = None) -> str:
    """The task's body: fetch, store and screen one claimed row. Starts from the row's
    state, so a redelivered task does nothing twice. The bytes read are charged to
    ``requester``'s bucket (the user whose request started the fetch), whatever the
    outcome. Timed, counted by outcome and written as one line."""
    meter = Meter()
    outcome = "failed"
    step: logs.Step | None = None
    try:
        with logs.step("fetch", user=requester or "") as step:
            outcome = _fetch_remote_media(pk, requester, meter)
            step.fields.update(outcome=outcome, bytes=meter.bytes)
            return outcome
    finally:
        if step is not None:
            metrics.fetched(outcome, meter.bytes)


def _fetch_remote_media(pk: int, requester: str | None, meter: Meter) -> str:
    from ..verdicts import record_failure, screen_row

    media = Media.objects.filter(pk=pk).first()
    if media is None or not media.is_remote or media.state != S.PROCESSING:
        return "skipped"
    logs.annotate(media_id=media.media_id, server_name=media.server_name)
    if not media.storage_key:
        # The fetch starts now, perhaps after waiting for a thread or a worker: it counts
        # as abandoned only that long after this.
        if not lifecycle.update_if_state(
            media, S.PROCESSING, extra_where=Q(storage_key=""), processing_started_at=timezone.now()
        ):
            return "skipped"
        try:
            fetched = download(media, meter)
        except FetchFailed as failure:
            return _fail(media, failure)
        except Exception as exc:
            log.exception("Fetching %s failed", media.mxc_uri)
            return _fail(media, FetchFailed(f"Fetching failed: {type(exc).__name__}: {exc}"))
        finally:
            _charge(requester, meter.bytes)
        if not lifecycle.update_if_state(
            media,
            S.PROCESSING,
            storage_key=media.served_key,
            size=fetched.size,
            sha256=fetched.sha256,
            declared_content_type=fetched.content_type,
            filename=fetched.filename,
        ):
            get_store().delete(media.served_key)
            return "skipped"
    try:
        return screen_row(media)
    except Exception as exc:
        # As for local uploads: recorded, and the stuck sweep screens it again.
        log.exception("Screening of %s failed", media.mxc_uri)
        record_failure(media.pk, exc)
        return "failed"


def _charge(requester: str | None, fetched_bytes: int) -> None:
    bucket = download_bucket()
    if bucket is None or requester is None or not fetched_bytes:
        return
    try:
        bucket.charge(bucket_key(requester), fetched_bytes)
    except Exception:  # a cache outage must not fail the fetch it measured
        log.exception("Could not charge %s bytes to %s", fetched_bytes, requester)


def _fail(media: Media, failure: FetchFailed) -> str:
    """The row of a failed fetch: REJECTED, no bytes, the client's words in
    ``rejection_reason`` and the detail in ``last_error`` (for moderators) and the log."""
    get_store().delete(media.served_key)
    if not lifecycle.transition(
        media,
        [S.PROCESSING],
        S.REJECTED,
        storage_key="",
        rejection_errcode=str(failure.errcode),
        rejection_status=failure.status,
        rejection_reason=failure.message,
        last_error=f"remote fetch: {failure.reason}"[:1000],
        objects_deleted_at=timezone.now(),
    ):
        return "skipped"
    log.info("Could not fetch %s: %s", media.mxc_uri, failure.reason)
    return "failed"


def download(media: Media, meter: Meter | None = None) -> Fetched:
    """Fetch the bytes of ``media`` into its served key, counting what is read in
    ``meter``. Raises FetchFailed (its reason is for the log and moderators: it may name
    addresses, ports and URLs)."""
    meter = meter or Meter()
    deadline = Deadline.after_seconds(app_settings.REMOTE_MEDIA_TIMEOUT_SECONDS)
    try:
        destination = discovery.resolve(media.server_name)
    except discovery.DiscoveryError as exc:
        raise FetchFailed(f"Cannot resolve {media.server_name}: {exc}") from exc
    try:
        with outbound.connect_to(destination.overrides()):
            fetched = _federation_download(media, destination, deadline, meter)
            if fetched is None:
                fetched = _legacy_download(media, destination, deadline, meter)
            return fetched
    except (outbound.ResponseTooLarge, TooLarge) as exc:
        raise FetchFailed(
            f"The remote media is larger than {app_settings.MAX_UPLOAD_SIZE} bytes",
            errcode=Codes.TOO_LARGE,
        ) from exc
    except outbound.AddressNotAllowed as exc:
        raise FetchFailed(f"Refused to connect: {exc}") from exc
    except outbound.OutboundError as exc:
        raise FetchFailed(f"Could not reach {media.server_name}: {exc}") from exc


def _options(deadline: Deadline, max_bytes: int, allow_redirects: bool) -> outbound.Options:
    """A fetch's request options: its byte limit, and timeouts within what is left of
    the fetch's ``deadline``."""
    remaining = max(deadline.remaining, 1.0)
    return outbound.Options(
        max_bytes=max_bytes,
        timeout=min(REQUEST_TIMEOUT_SECONDS, remaining),
        total_timeout=remaining,
        allow_redirects=allow_redirects,
    )


def _federation_download(
    media: Media, destination: discovery.Destination, deadline: Deadline, meter: Meter
) -> Fetched | None:
    """The federation endpoint (spec v1.11); None if the server does not know it."""
    uri = f"/_matrix/federation/v1/media/download/{quote(media.media_id, safe='')}"
    headers = {
        "Host": destination.host_header,
        # The signature covers this exact URI: no redirects (the spec forbids them here).
        "Authorization": sign_request("GET", uri, media.server_name),
    }
    limit = app_settings.MAX_UPLOAD_SIZE
    with outbound.stream(
        "GET",
        destination.base_url + uri,
        headers=headers,
        options=_options(deadline, limit + MULTIPART_OVERHEAD_BYTES, allow_redirects=False),
    ) as response:
        if response.status == 200:
            return _store_multipart(media, response, deadline, meter)
        errcode = _errcode(response, meter)
        if response.status in (400, 404) and errcode == Codes.UNRECOGNIZED:
            return None
        raise _failure(media, response.status, errcode)


def _legacy_download(
    media: Media, destination: discovery.Destination, deadline: Deadline, meter: Meter
) -> Fetched:
    """The deprecated unauthenticated endpoint, for servers older than v1.11. Signed all
    the same (as Synapse does); redirects followed through the address guard, without our
    credentials once the host changes."""
    uri = (
        f"/_matrix/media/v3/download/{quote(media.server_name, safe=':')}/"
        f"{quote(media.media_id, safe='')}?allow_remote=false&allow_redirect=true"
    )
    headers = {
        "Host": destination.host_header,
        "Authorization": sign_request("GET", uri, media.server_name),
    }
    with outbound.stream(
        "GET",
        destination.base_url + uri,
        headers=headers,
        options=_options(deadline, app_settings.MAX_UPLOAD_SIZE, allow_redirects=True),
    ) as response:
        if response.status != 200:
            raise _failure(media, response.status, _errcode(response, meter))
        return _store_plain(media, response, meter)


def _errcode(response: outbound.StreamedResponse, meter: Meter) -> str | None:
    try:
        body = json.loads(b"".join(_limited(_body(response, meter), MAX_ERROR_BODY_BYTES)))
    except (ValueError, outbound.OutboundError):
        return None
    errcode = body.get("errcode") if isinstance(body, dict) else None
    return errcode if isinstance(errcode, str) else None


def _limited(chunks: Iterator[bytes], limit: int) -> Iterator[bytes]:
    read = 0
    for chunk in chunks:
        read += len(chunk)
        if read > limit:
            raise ValueError("error body too large")
        yield chunk


def _failure(media: Media, status: int, errcode: str | None) -> FetchFailed:
    if status == 404:
        return FetchFailed(
            f"{media.server_name} does not have this media", errcode=Codes.NOT_FOUND, status=404
        )
    return FetchFailed(f"{media.server_name} answered {status} {errcode or ''}".strip())


def _store_plain(media: Media, response: outbound.StreamedResponse, meter: Meter) -> Fetched:
    """A body that is the file itself (legacy endpoint, or a ``Location`` followed)."""
    written = get_store().write_stream(
        media.served_key,
        ChunkReader(_body(response, meter)),
        max_size=app_settings.MAX_UPLOAD_SIZE,
    )
    return Fetched(
        size=written.size,
        sha256=written.sha256,
        content_type=_content_type(response.headers.get("Content-Type")),
        filename=_filename(response.headers.get("Content-Disposition")),
    )


def _store_multipart(
    media: Media, response: outbound.StreamedResponse, deadline: Deadline, meter: Meter
) -> Fetched:
    kind, params = parse_options_header(response.headers.get("Content-Type", ""))
    boundary = params.get(b"boundary")
    if kind != b"multipart/mixed" or not boundary:
        raise FetchFailed(f"{media.server_name} answered a download that is not multipart/mixed")
    reader = _MediaPartReader(_body(response, meter), boundary)
    headers = reader.media_headers()
    location = headers.get("location")
    if location:
        with outbound.stream(
            "GET",
            location,
            options=_options(deadline, app_settings.MAX_UPLOAD_SIZE, allow_redirects=True),
        ) as followed:
            if followed.status != 200:
                raise FetchFailed(f"The Location of {media.mxc_uri} answered {followed.status}")
            return _store_plain(media, followed, meter)
    written = get_store().write_stream(
        media.served_key, reader, max_size=app_settings.MAX_UPLOAD_SIZE
    )
    return Fetched(
        size=written.size,
        sha256=written.sha256,
        content_type=_content_type(headers.get("content-type")),
        filename=_filename(headers.get("content-disposition")),
    )


class _MediaPartReader:
    """The second part of a ``multipart/mixed`` body (the first is the JSON metadata), as
    a ``Readable``: the response is parsed as it is read, a chunk at a time, so nothing
    but the current chunk is held in memory."""

    MAX_METADATA_BYTES = 64 * 1024

    def __init__(self, chunks: Iterator[bytes], boundary: bytes) -> None:
        self._chunks = chunks
        self._part = -1
        self._field = bytearray()
        self._value = bytearray()
        self._headers: list[dict[str, str]] = []
        self._media_headers_done = False
        self._media_done = False
        self._metadata = 0
        self._ready = bytearray()
        callbacks: Any = {
            "on_part_begin": self._on_part_begin,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
        }
        self._parser = MultipartParser(boundary, callbacks)

    def _on_part_begin(self) -> None:
        self._part += 1
        self._headers.append({})

    def _on_header_end(self) -> None:
        name = bytes(self._field).decode("latin-1").strip().lower()
        self._headers[-1][name] = bytes(self._value).decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _on_headers_finished(self) -> None:
        if self._part == 1:
            self._media_headers_done = True

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == 0:
            self._metadata += end - start
            if self._metadata > self.MAX_METADATA_BYTES:
                raise FetchFailed("The metadata part of the multipart answer is too large")
        elif self._part == 1:
            self._ready.extend(data[start:end])

    def _on_part_end(self) -> None:
        if self._part == 1:
            self._media_done = True

    def _feed(self) -> None:
        chunk = next(self._chunks, None)
        if chunk is None:
            raise FetchFailed("The multipart answer ended before its media part did")
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise FetchFailed(f"Malformed multipart answer: {exc}") from exc

    def media_headers(self) -> dict[str, str]:
        """The headers of the media part (lowercased names), reading as far as them."""
        while not self._media_headers_done:
            self._feed()
        if self._headers[0].get("content-type", "").split(";")[0].strip() != "application/json":
            raise FetchFailed("The first part of the multipart answer is not JSON")
        return self._headers[1]

    def read(self, size: int = -1, /) -> bytes:
        # As a file's read(): ``size`` bytes unless the part ends first (stores may take a
        # short read for the end, the S3 store's part uploads do).
        self.media_headers()
        want = size if size is not None and size > 0 else 1024 * 1024
        while len(self._ready) < want and not self._media_done:
            self._feed()
        out = bytes(self._ready[:want])
        del self._ready[:want]
        return out


def _content_type(value: str | None) -> str:
    value = (value or "").strip()
    if len(value) > 255 or any(ord(c) < 0x20 for c in value):
        return ""
    return value


def _filename(disposition: str | None) -> str:
    """The file name of a ``Content-Disposition`` (``filename*`` of RFC 6266 first), if it
    passes the upload rules; else none (the bytes are still worth serving)."""
    from ..errors import InvalidParam
    from ..validation import clean_filename

    if not disposition:
        return ""
    message = Message()
    message["Content-Disposition"] = disposition
    try:
        name = message.get_filename() or ""
        return clean_filename(name)
    except (InvalidParam, ValueError, LookupError):
        return ""
