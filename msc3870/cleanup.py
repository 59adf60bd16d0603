"""Deleting the objects of media that will never be served again (rejected, expired,
purged, evicted), and only those: identical content is stored once, so an object goes
only when no live media serves it; a missing object counts as deleted. Every function is
idempotent: a sweep or task that runs twice deletes nothing twice.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from types import TracebackType
from typing import Any

from django.db.models import Q
from django.utils import timezone

from . import lifecycle, queue, sql, storage_keys
from .conf import app_settings
from .errors import Codes, StorageUnavailable
from .models import Media, MediaState, UploadMethod
from .screening import record_sha256
from .stores import get_store
from .thumbnails import thumbnail_keys

log = logging.getLogger(__name__)
S = MediaState


def schedule_object_deletion(pk: int) -> None:
    """Delete a dead media's objects in the background once this transaction commits. If
    that cannot be queued, the cleanup sweep deletes them later."""
    queue.send("msc3870.delete_objects", pk)


def schedule_objects_deletion(pks: list[int]) -> None:
    """Batch form of ``schedule_object_deletion``: one task for a batch of dead media
    (bulk moderation), once this transaction commits."""
    if pks:
        queue.send("msc3870.delete_objects_many", list(pks))


def delete_objects(pk: int) -> bool:
    """Delete the storage objects of media that will never be served again. Idempotent."""
    return delete_objects_of([pk]) == 1


def unrecorded_upload_keys(media: Media) -> list[str]:
    """Keys this media's upload requests stored and no row records: those of requests that
    died between storing their bytes and recording them (a killed process, the database
    gone at that write). Listed while the row still holds the dead request's claim, so
    that no request claiming the id later can have stored one yet."""
    prefix = storage_keys.upload_prefix(media.served_key)
    directory = prefix.rsplit("/", 1)[0] + "/"  # the local store lists directories
    keys = [key for key in get_store().list_keys(directory) if key.startswith(prefix)]
    recorded = set(Media.objects.filter(storage_key__in=keys).values_list("storage_key", flat=True))
    return [key for key in keys if key not in recorded]


def give_up_on_body(media: Media) -> bool:
    """Free the claim of a PUT or POST whose body will never be recorded (its process died,
    lost the database at the recording write, or its uploader sent the PUT again): a PUT's
    id is pending again, a POST's media rejected, and what the request stored without
    recording it is deleted. Only while the row still holds that claim, bytes unrecorded:
    a request of the claim recording first wins, and one finishing later finds its claim
    gone and deletes its own key. True if the claim was freed here."""
    try:
        leftovers = unrecorded_upload_keys(media)
    except StorageUnavailable as exc:
        # Given up on later instead: given up on now, its bytes would stay.
        log.warning("Upload %s is given up on later: %s", media.media_id, exc)
        return False
    claim = lifecycle.same_claim(media) & Q(storage_key="")
    if media.upload_method == UploadMethod.PUT:
        moved = lifecycle.transition(
            media,
            [S.PROCESSING],
            S.PENDING,
            extra_where=claim,
            upload_method="",
            processing_started_at=None,
        )
    else:
        moved = lifecycle.transition(
            media,
            [S.PROCESSING],
            S.REJECTED,
            extra_where=claim,
            rejection_errcode=Codes.UNKNOWN.value,
            rejection_reason="Upload was interrupted",
        )
        if moved:
            schedule_object_deletion(media.pk)
    if moved and leftovers:
        # Deleting a key its request deletes too is harmless.
        try:
            get_store().delete_many(leftovers)
        except StorageUnavailable as exc:
            log.warning("Objects of an interrupted upload are left: %s: %s", leftovers, exc)
    return moved


def hash_blocked_content(pks: list[int]) -> None:
    """Content a moderator rejected stays blocked by its SHA-256 (``check_not_blocked``)
    once its bytes are gone: hash, before they go, what was never hashed
    (``SHA256_WHEN`` "needed" hashes only content that other media may share)."""
    keys = (
        Media.objects.filter(pk__in=pks, state=S.REJECTED, sha256="")
        .exclude(moderated_by="")
        .exclude(storage_key="")
        .values_list("storage_key", flat=True)
        .distinct()
    )
    store = get_store()
    for key in keys:
        if record_sha256(store, key) is None:
            log.warning("Rejected content at %s is gone before it was hashed", key)


def object_keys(
    media_id: str,
    storage_key: str,
    upload_method: str,
    completed_at: object,
    server_name: str = "",
) -> set[str]:
    """Only the keys a row's history can have made: an id that expired unused has at most
    its incoming object, so an expiry batch is one batched delete. Another server's media
    has no incoming object (its id may be one of ours: never touch our upload's), nor has a
    preview's image."""
    if not (upload_method or storage_key or completed_at):
        # Never uploaded to (most rows of an expiry sweep): only the upload URL's object,
        # known without building a model instance per row.
        return {storage_keys.incoming(media_id)}
    probe = Media(server_name=server_name, media_id=media_id, upload_method=upload_method)
    keys = set() if probe.is_fetched else {probe.incoming_key}
    if upload_method or storage_key:
        keys.add(probe.served_key)
    if storage_key:
        keys.add(storage_key)
    if completed_at:
        keys.update(thumbnail_keys(probe))
    return keys


def keys_of(media: Media) -> set[str]:
    """``object_keys`` of a row at hand, before any thumbnail was made."""
    return object_keys(
        media.media_id, media.storage_key, media.upload_method, None, media.server_name
    )


def delete_objects_of(pks: list[int]) -> int:
    """Batch form: one query, one batched delete in storage, one update.

    Only rows that are dead (not live) and not yet cleaned are touched; a missing object
    counts as deleted. Returns how many rows this call marked as cleaned.
    """
    rows = list(
        Media.objects.dead_uncleaned()
        .filter(pk__in=pks)
        .values_list(
            "pk", "media_id", "storage_key", "upload_method", "completed_at", "server_name"
        )
    )
    if not rows:
        return 0
    hash_blocked_content([row[0] for row in rows])
    keys: set[str] = set()
    for _, *history in rows:
        keys |= object_keys(*history)
    # Identical content is stored once: keep objects that live media still serve.
    # (The blank-key exclusion repeats the partial index's condition, so PostgreSQL uses
    # the index for a long IN list too.)
    keys -= set(
        Media.objects.live()
        .filter(storage_key__in=keys)
        .exclude(storage_key="")
        .values_list("storage_key", flat=True)
    )
    get_store().delete_many(sorted(keys))
    return (
        Media.objects.dead_uncleaned()
        .filter(pk__in=[row[0] for row in rows])
        .update(objects_deleted_at=timezone.now())
    )


# Upload URL objects the expiry sweep lists before deleting (one ListObjectsV2 page).
LISTED_INCOMING_MAX = 999


class ObjectDeleter:
    """Deletes the objects of media a sweep just moved to a dead state while the sweep
    goes on with its next batch: each batch's keys are one batched delete on a pool of
    ``DELETE_CONCURRENCY`` threads (S3: one DeleteObjects per 1,000 keys), at most that
    many in flight; once a batch's delete is done its rows are marked cleaned, on the
    caller's thread (the pool only talks to the store). Rows whose keys other media may
    share (anything but an upload URL's object) go through ``delete_objects_of`` instead.

    Most ids that expire never received a byte, and a store cannot be told which did
    without asking. Where a listing is cheaper than deletes (S3), the objects under
    ``incoming/`` are listed after each batch is moved, while there are at most
    ``LISTED_INCOMING_MAX`` of them (one request), and only the batch's keys found there
    are deleted; past that, the listing stops for the run and every key is sent. An
    upload still arriving at the instant its id expired may land after the listing: the
    orphan sweep deletes it, as the bucket's lifecycle rule would.

    After a storage failure nothing more is sent: ``storage_error`` says why, and the rows
    not marked stay for ``delete_dead_objects``. Use as a context manager: leaving it waits
    for the deletes in flight."""

    def __init__(self) -> None:
        self.cleaned = 0
        self.storage_error = ""
        self._store = get_store()
        self._concurrency = app_settings.DELETE_CONCURRENCY
        self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="msc3870-delete")
        self._in_flight: deque[tuple[Future[None], list[int]]] = deque()
        self._list_incoming = self._store.lists_cheaper_than_deletes

    def __enter__(self) -> ObjectDeleter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            while self._in_flight:
                self._finish_oldest()
        finally:
            self._pool.shutdown(wait=True)

    def delete(self, rows: Sequence[Sequence[Any]]) -> None:
        """Delete the objects of dead rows given as ``sql.EXPIRED_COLUMNS`` (primary key,
        media id, storage key, upload method, completed at, server name)."""
        if self.storage_error or not rows:
            return
        pks: list[int] = []
        keys: list[str] = []
        shared: list[int] = []
        for pk, *history in rows:
            row_keys = object_keys(*history)
            # An upload URL's object is never the served key of any media: no other row
            # can share it, so it needs no look-up.
            if all(key.startswith(storage_keys.INCOMING_PREFIX) for key in row_keys):
                pks.append(pk)
                keys.extend(row_keys)
            else:
                shared.append(pk)
        try:
            if shared:
                self.cleaned += delete_objects_of(shared)
            if keys and self._list_incoming:
                existing = self._incoming_keys()
                if existing is not None:
                    keys = [key for key in keys if key in existing]
            if pks and not keys:
                self._mark_cleaned(pks)
                return
            while len(self._in_flight) >= self._concurrency:
                self._finish_oldest()
        except StorageUnavailable as exc:
            self._stop(exc)
            return
        if pks:
            self._in_flight.append((self._pool.submit(self._store.delete_many, keys), pks))

    def _incoming_keys(self) -> set[str] | None:
        """Every key under ``incoming/`` if there are few; None (and no more listing in
        this run) if there are more."""
        listed = list(
            islice(self._store.list_keys(storage_keys.INCOMING_PREFIX), LISTED_INCOMING_MAX + 1)
        )
        if len(listed) > LISTED_INCOMING_MAX:
            self._list_incoming = False
            return None
        return set(listed)

    def _mark_cleaned(self, pks: list[int]) -> None:
        now = timezone.now()
        cleaned = sql.mark_cleaned(pks, now)
        if cleaned is None:
            dead = Media.objects.dead_uncleaned().filter(pk__in=pks)
            cleaned = dead.update(objects_deleted_at=now)
        self.cleaned += cleaned

    def _finish_oldest(self) -> None:
        future, pks = self._in_flight.popleft()
        try:
            future.result()
        except StorageUnavailable as exc:
            self._stop(exc)
            return
        self._mark_cleaned(pks)

    def _stop(self, exc: StorageUnavailable) -> None:
        if not self.storage_error:
            log.warning("Deletes stop until the storage is back: %s", exc)
            self.storage_error = exc.message
