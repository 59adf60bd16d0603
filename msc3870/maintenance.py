"""Periodic sweeps: expiry, deletion of dead objects, stuck screening, orphaned uploads,
the remote media cache.

Each sweep works in bounded batches, moves rows with compare-and-set updates and treats a
missing object as deleted, so it can run twice, or on two hosts at once, without harm.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.core.cache import cache
from django.db.models import Q, Sum
from django.utils import timezone

from . import lifecycle, served_copies, storage_keys, verdicts
from .cleanup import (
    ObjectDeleter,
    delete_objects_of,
    give_up_on_body,
)
from .conf import app_settings
from .errors import StorageUnavailable
from .models import (
    AWAITING_UPLOAD_STATES,
    LIVE_STATES,
    TOMBSTONE_STATES,
    Media,
    MediaState,
    UploadMethod,
    URLPreview,
)
from .stores import MediaStore, get_store

log = logging.getLogger(__name__)
S = MediaState

DEFAULT_BATCH = 1000
DEFAULT_MAX_BATCHES = 20
# Where the orphan sweep stopped (the last key it looked at). Lost with the cache, the
# walk starts again from the beginning: nothing is missed, some keys are looked at twice.
ORPHAN_SWEEP_CURSOR = "msc3870:orphan-sweep:cursor"
ORPHAN_SWEEP_CURSOR_SECONDS = 7 * 86400
# Upload keys looked up (one query) and deleted (one request) at a time.
ORPHAN_BATCH = 200
# An over-full remote media cache is evicted down to this fraction of its bound, so that
# the sweep does not run again for every few new fetches.
REMOTE_CACHE_LOW_WATER = 0.9


@dataclass
class SweepResult:
    moved: int = 0
    objects_deleted: int = 0
    storage_error: str = ""
    rows_deleted: int = 0


def expire_pending(
    *, batch_size: int = DEFAULT_BATCH, max_batches: int = DEFAULT_MAX_BATCHES
) -> SweepResult:
    """PENDING past ``unused_expires_at`` -> EXPIRED, and delete what reached its URL.

    Each batch is one statement (``lifecycle.expire_due``); its objects are deleted in the
    background while the next batch is moved (``cleanup.ObjectDeleter``). If the storage
    fails, expiry goes on without it: the rows stay marked as not cleaned and
    ``delete_dead_objects`` deletes their objects once the storage is back.
    """
    result = SweepResult()
    with ObjectDeleter() as deleter:
        for _ in range(max_batches):
            rows = lifecycle.expire_due(timezone.now(), batch_size)
            if not rows:
                break
            result.moved += len(rows)
            deleter.delete(rows)
    result.objects_deleted = deleter.cleaned
    result.storage_error = deleter.storage_error
    return result


def delete_dead_objects(
    *, batch_size: int = DEFAULT_BATCH, max_batches: int = DEFAULT_MAX_BATCHES
) -> SweepResult:
    """Delete objects of rejected, expired and deleted media not yet cleaned up, the rows
    of failed fetches of other servers' media, and the versions of upload URLs' objects
    that media served before its copy (``served_copies``)."""
    result = SweepResult(rows_deleted=delete_failed_fetches(batch_size=batch_size))
    for _ in range(max_batches):
        pks = list(Media.objects.dead_uncleaned().values_list("pk", flat=True)[:batch_size])
        if not pks:
            break
        deleted = delete_objects_of(pks)
        result.objects_deleted += deleted
        if deleted == 0:
            break  # another sweep took them; do not spin
    copied_before = timezone.now() - served_copies.versions_kept()
    result.objects_deleted += served_copies.delete_copied_versions(copied_before, batch_size)
    return result


def redispatch_stuck(
    *, older_than: timedelta | None = None, batch_size: int = DEFAULT_BATCH
) -> int:
    """Re-queue screening of media left in PROCESSING longer than ``STUCK_AFTER_SECONDS``
    (worker died, broker was down), and the copies of media still served from the upload
    URL's bucket that long after completing (``served_copies``)."""
    if older_than is None:
        older_than = timedelta(seconds=app_settings.STUCK_AFTER_SECONDS)
    now = timezone.now()
    count = 0
    stuck = Media.objects.filter(
        state=S.PROCESSING, processing_started_at__lte=now - older_than
    ).order_by("processing_started_at")[:batch_size]
    for media in stuck:
        if media.storage_key or media.upload_method == UploadMethod.URL:
            verdicts.dispatch(media)
            count += 1
        elif media.processing_started_at > now - max(older_than, in_flight_upload_timeout()):
            continue  # its body may still be arriving
        else:
            count += int(give_up_on_body(media))
    return count + served_copies.queue_stuck(now - older_than, batch_size)


def in_flight_upload_timeout() -> timedelta:
    """How long a body streaming through this server may take (``IN_FLIGHT_UPLOAD_SECONDS``)."""
    return timedelta(seconds=app_settings.IN_FLIGHT_UPLOAD_SECONDS)


def delete_orphaned_uploads(*, limit: int = 10_000) -> int:
    """Delete objects under ``incoming/`` whose media no longer waits for them, and the
    partial files of uploads whose process died (local disk only).

    A client can PUT to its URL again after /complete (S3 cannot refuse it); those bytes
    are never served, and this removes them (every version, where the store keeps them;
    not while a version of the key is served, before its copy to the media's key). Each
    run looks at ``limit`` keys at most and the next one resumes after the last key it
    looked at, so keys of media still waiting cannot hide later orphans however many
    they are.
    """
    store = get_store()
    deleted = 0
    sweep_partials = getattr(store, "delete_stale_partials", None)
    if sweep_partials is not None:
        # Same patience as for a PUT still streaming: older partial files have no writer.
        deleted += sweep_partials(in_flight_upload_timeout())
    batch: list[str] = []
    for key in _incoming_keys_from_cursor(store, limit):
        batch.append(key)
        if len(batch) >= ORPHAN_BATCH:
            deleted += _delete_orphans(store, batch)
            batch = []
    if batch:
        deleted += _delete_orphans(store, batch)
    return deleted


def _incoming_keys_from_cursor(store: MediaStore, limit: int) -> Iterator[str]:
    """The upload keys after where the last run stopped, ``limit`` at most; where this
    walk stops is kept for the next run (forgotten once a walk reaches the end)."""
    # Stores list keys in ascending order (S3 by UTF-8 bytes, the disk sorted; media ids
    # are ASCII), so "after the cursor" is a string comparison. The keys before it are
    # still listed (list_keys takes no start key) but cost no query and no deletion.
    cursor: str = cache.get(ORPHAN_SWEEP_CURSOR) or ""
    looked_at = 0
    last = ""
    for key in store.list_keys(storage_keys.INCOMING_PREFIX):
        if key <= cursor:
            continue
        if looked_at >= limit:
            cache.set(ORPHAN_SWEEP_CURSOR, last, ORPHAN_SWEEP_CURSOR_SECONDS)
            return
        looked_at += 1
        last = key
        yield key
    # The walk reached the end: the next run starts from the beginning.
    cache.delete(ORPHAN_SWEEP_CURSOR)


def _delete_orphans(store: MediaStore, keys: list[str]) -> int:
    """Delete those of the upload ``keys`` whose media no longer needs them; how many."""
    ids = {storage_keys.media_id_of(key): key for key in keys}
    waiting = _upload_urls_needed(list(ids))
    orphans = [key for media_id, key in ids.items() if media_id not in waiting]
    store.delete_many(orphans)
    return len(orphans)


def _upload_urls_needed(media_ids: list[str]) -> set[str]:
    """Those of ``media_ids`` whose upload URL's object is still needed: awaited, or a
    version of it served, or served until lately (the cleanup sweep deletes those
    versions once no download of them can be running)."""
    return set(
        Media.objects.filter(media_id__in=media_ids)
        .filter(
            Q(state__in=AWAITING_UPLOAD_STATES)
            | Q(state__in=LIVE_STATES, storage_key__startswith=storage_keys.INCOMING_PREFIX)
            | Q(incoming_copied_at__isnull=False)
        )
        .values_list("media_id", flat=True)
    )


def delete_old_tombstones(*, batch_size: int = DEFAULT_BATCH) -> int:
    """Delete rows of expired, purged and check-rejected media whose objects are gone, after
    ``TOMBSTONE_RETENTION_DAYS``. Moderators' verdicts stay: they block re-uploads."""
    days = app_settings.TOMBSTONE_RETENTION_DAYS
    if days is None:
        return 0
    cutoff = timezone.now() - timedelta(days=days)
    old = Media.objects.filter(
        state__in=TOMBSTONE_STATES,
        objects_deleted_at__lte=cutoff,
        state_changed_at__lte=cutoff,
    ).exclude(state=S.REJECTED, moderated_by__gt="")
    pks = list(old.values_list("pk", flat=True)[:batch_size])
    if not pks:
        return 0
    deleted, _ = Media.objects.filter(pk__in=pks).delete()
    return deleted


# ---------------------------------------------------------------------------- URL previews

# A preview's fetch still running this long after its deadline was abandoned.
PREVIEW_ABANDONED_AFTER_EXTRA_SECONDS = 60


def expire_url_previews(
    *, batch_size: int = DEFAULT_BATCH, max_batches: int = DEFAULT_MAX_BATCHES
) -> SweepResult:
    """Delete the previews past their time (answers after ``URL_PREVIEW_CACHE_SECONDS``,
    failures after ``URL_PREVIEW_FAILURE_SECONDS``, fetches abandoned by a dead process),
    with the media rows they were waited on that hold nothing to serve; and purge
    previews' images older than ``URL_PREVIEW_IMAGE_RETENTION_SECONDS`` (their objects
    go with the cleanup sweep, unless other media shares them). Moderated and protected
    images stay."""
    now = timezone.now()
    return SweepResult(
        rows_deleted=_delete_due_previews(now, batch_size, max_batches),
        moved=_purge_old_preview_images(now, batch_size, max_batches),
    )


def _delete_due_previews(now: datetime, batch_size: int, max_batches: int) -> int:
    """Delete the previews past their time, and the media rows they were waited on that
    hold nothing to serve; the rows deleted."""
    abandoned = now - timedelta(
        seconds=app_settings.URL_PREVIEW_TIMEOUT_SECONDS + PREVIEW_ABANDONED_AFTER_EXTRA_SECONDS
    )
    due = URLPreview.objects.filter(expires_at__lte=now).filter(
        ~Q(media__state=S.PROCESSING) | Q(media__processing_started_at__lte=abandoned)
    )
    rows_deleted = 0
    for _ in range(max_batches):
        batch = list(due.values_list("pk", "media_id")[:batch_size])
        if not batch:
            break
        deleted, _ = URLPreview.objects.filter(pk__in=[pk for pk, _ in batch]).delete()
        rows_deleted += deleted
        # Rows that were only waited on (no image, a failure, an image refused and
        # deleted): nobody was handed their mxc://.
        handles, _ = (
            Media.objects.filter(
                pk__in=[media_pk for _, media_pk in batch],
                upload_method=UploadMethod.PREVIEW,
                moderated_by="",
            )
            .filter(Q(storage_key="") | Q(objects_deleted_at__isnull=False))
            .exclude(state__in=[S.COMPLETE, S.QUARANTINED])
            .delete()
        )
        rows_deleted += handles
    return rows_deleted


def _purge_old_preview_images(now: datetime, batch_size: int, max_batches: int) -> int:
    """Move previews' unprotected images past ``URL_PREVIEW_IMAGE_RETENTION_SECONDS`` to
    DELETED; how many."""
    retention = now - timedelta(seconds=app_settings.URL_PREVIEW_IMAGE_RETENTION_SECONDS)
    old = Media.objects.filter(
        upload_method=UploadMethod.PREVIEW,
        state=S.COMPLETE,
        protected=False,
        completed_at__lte=retention,
    )
    purged = 0
    for _ in range(max_batches):
        pks = list(old.values_list("pk", flat=True)[:batch_size])
        if not pks:
            break
        moved = lifecycle.transition_many(pks, [S.COMPLETE], S.DELETED)
        purged += len(moved)
        if not moved:
            break
    return purged


# ---------------------------------------------------------------------------- remote media


def _remote() -> Q:
    # The condition of the remote media index (msc3870_remote_state_access), written the
    # same way so that every query below can use it.
    return Q(upload_method=UploadMethod.REMOTE)


def delete_failed_fetches(*, batch_size: int = DEFAULT_BATCH) -> int:
    """Delete the rows of failed fetches (no bytes, not a moderator's) once
    ``REMOTE_MEDIA_FAILURE_SECONDS`` have passed: a request would delete such a row and
    fetch again anyway, and nothing else needs it (not a 30-day tombstone)."""
    cutoff = timezone.now() - timedelta(seconds=app_settings.REMOTE_MEDIA_FAILURE_SECONDS)
    failed = Media.objects.remote().filter(
        state=S.REJECTED,
        storage_key="",
        moderated_by="",
        objects_deleted_at__isnull=False,
        state_changed_at__lte=cutoff,
    )
    pks = list(failed.values_list("pk", flat=True)[:batch_size])
    if not pks:
        return 0
    # The conditions again: a row a moderator acted on meanwhile stays.
    deleted, _ = failed.filter(pk__in=pks).delete()
    return deleted


def remote_cache_bytes() -> int:
    """Bytes of other servers' media held: the size of every remote row with bytes, once
    per row (content shared with other media is counted for each)."""
    total = (
        Media.objects.remote().live().exclude(storage_key="").aggregate(total=Sum("size"))["total"]
    )
    return int(total or 0)


def evict_remote_media(
    *, batch_size: int = DEFAULT_BATCH, max_batches: int = DEFAULT_MAX_BATCHES
) -> SweepResult:
    """Keep other servers' media under ``REMOTE_MEDIA_CACHE_MAX_BYTES``: past it, delete
    the least recently served (``last_accessed_at``) until the total is under
    ``REMOTE_CACHE_LOW_WATER`` of it. Only complete media no moderator acted on goes
    (quarantined, approved, protected or otherwise moderated media stays).

    Each evicted row moves to DELETED (compare-and-set), its objects and thumbnails are
    deleted unless live media serves the same key (``cleanup.delete_objects_of``, as for
    all dead media), then the row itself goes, so that a later request fetches the media
    again. A sweep that stops half-way (storage down, process killed) leaves DELETED rows
    that the next one finishes first; a missing object counts as deleted."""
    result = SweepResult()
    try:
        _finish_evictions(result, batch_size=batch_size)
        bound = app_settings.REMOTE_MEDIA_CACHE_MAX_BYTES
        if bound is None:
            return result
        total = remote_cache_bytes()
        if total <= bound:
            return result
        target = int(bound * REMOTE_CACHE_LOW_WATER)
        for _ in range(max_batches):
            if total <= target:
                break
            chosen = _least_recently_served(total - target, batch_size)
            if not chosen:
                break
            moved = lifecycle.transition_many(
                list(chosen),
                [S.COMPLETE],
                S.DELETED,
                extra_where=_remote() & Q(moderated_by="", protected=False),
            )
            result.moved += len(moved)
            total -= sum(chosen[pk] for pk in moved)
            _finish_evictions(result, batch_size=batch_size, pks=moved)
    except StorageUnavailable as exc:
        log.warning("Eviction of remote media stops until the storage is back: %s", exc)
        result.storage_error = exc.message
    if result.moved:
        log.info("Evicted %s remote media from the cache", result.moved)
    return result


def _least_recently_served(excess: int, batch_size: int) -> dict[int, int]:
    """Evictable remote media (complete, no moderator's, unprotected), least recently
    served first, until their sizes cover ``excess`` bytes or ``batch_size`` rows:
    primary key -> size."""
    candidates = (
        Media.objects.remote()
        .filter(state=S.COMPLETE, moderated_by="", protected=False)
        .order_by("last_accessed_at", "pk")
        .values_list("pk", "size")[:batch_size]
    )
    chosen: dict[int, int] = {}
    for pk, size in candidates:
        if sum(chosen.values()) >= excess:
            break
        chosen[pk] = size or 0
    return chosen


def delete_evicted(pks: list[int]) -> SweepResult:
    """Finish the eviction of remote media moved to DELETED with no moderator on the row
    (``evict_remote_media``, ``moderation.purge_remote_cache_before``): delete their
    objects, then their rows. Raises ``StorageUnavailable``; the sweep finishes them."""
    result = SweepResult(moved=len(pks))
    _finish_evictions(result, batch_size=len(pks), pks=pks)
    return result


def _finish_evictions(
    result: SweepResult, *, batch_size: int, pks: list[int] | None = None
) -> None:
    """Delete the objects, then the rows, of evicted media (``pks``, or any a stopped
    sweep left: remote, DELETED and no moderator's, which a purge always names)."""
    evicted = Media.objects.remote().filter(state=S.DELETED, moderated_by="")
    if pks is None:
        pks = list(evicted.values_list("pk", flat=True)[:batch_size])
    if not pks:
        return
    result.objects_deleted += delete_objects_of(pks)
    deleted, _ = evicted.filter(pk__in=pks, objects_deleted_at__isnull=False).delete()
    result.rows_deleted += deleted
