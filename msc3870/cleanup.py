"""Deleting the objects of media that will never be served again (rejected, expired,
purged, evicted), and only those: identical content is stored once, so an object goes
only when no live media serves it; a missing object counts as deleted. Every function is
idempotent: a sweep or task that runs twice deletes nothing twice.
"""

from __future__ import annotations

import logging

from django.utils import timezone

from . import queue, storage_keys
from .models import Media, MediaState
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
