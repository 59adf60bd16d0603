"""Copying a version served from the upload URL's bucket to its media's own key, off the
uploader's path (stores that keep versions: ``S3_INCOMING_BUCKET``).

A URL upload's verdict serves the version of the upload URL's object that ``/complete``
looked at (``incoming/<id>@<version>``, ``storage_keys.pinned``), so the first download
waits for no copy. Then, in the background (task ``msc3870.copy_to_served_key``):

1. that version is copied to the media's served key (``media/..``) in the media bucket;
2. the row switches to the copy with one compare-and-set on the version copied
   (``UPDATE ... SET storage_key = <served key> WHERE storage_key = <that version>``, live
   rows only), noting when (``incoming_copied_at``);
3. every version of the upload URL's object is deleted by the cleanup sweep once no
   download of the version can still be running (``delete_copied_versions``): a redirect
   handed out just before the switch is followed later, and a proxied read streams one GET
   for as long as its client takes.

Each step is safe to repeat: a redelivered task finds the row switched and stops. A row
that died meanwhile (purged, rejected by a moderator) is not switched: the copy is
deleted unless live media serves it, and the row's cleanup deletes the versions. Rows
still served from the upload URL's bucket after ``STUCK_AFTER_SECONDS`` are queued
again by the stuck sweep (``queue_stuck``).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.db.models import F
from django.utils import timezone

from . import logs, queue, storage_keys
from .conf import app_settings
from .content_types import UNKNOWN_TYPE
from .models import Media
from .stores import get_store

log = logging.getLogger(__name__)

TASK = "msc3870.copy_to_served_key"
#: How long the versions stay after the switch, at least: a proxied read of a large
#: version by a slow client outlives any redirect's lifetime.
VERSIONS_KEPT_SECONDS = 3600


def versions_kept() -> timedelta:
    """How long after the switch the versions of an upload URL's object stay: past any
    redirect to one (``DOWNLOAD_URL_LIFETIME``) and ``VERSIONS_KEPT_SECONDS``."""
    return timedelta(seconds=max(VERSIONS_KEPT_SECONDS, app_settings.DOWNLOAD_URL_LIFETIME))


def copy_to_served_key(pk: int) -> bool:
    """Copy the version media ``pk`` is served from to its served key and switch the row
    to it; True if this call switched it."""
    media = Media.objects.filter(pk=pk).first()
    if media is None or not storage_keys.is_pinned_incoming(media.storage_key):
        return False
    with logs.step("served_copy", media_id=media.media_id) as step:
        switched = _copy_and_switch(media)
        step.fields["outcome"] = "switched" if switched else "skipped"
    return switched


def _copy_and_switch(media: Media) -> bool:
    pinned, served = media.storage_key, media.served_key
    store = get_store()
    try:
        # Served with our type only, as a move does; downloads set the decided type.
        store.copy(pinned, served, content_type=UNKNOWN_TYPE)
    except FileNotFoundError:
        # The version is gone: the row died and its cleanup ran, or the version was
        # deleted behind the app's back (the row then says so).
        log.warning("Version %s of %s is gone before its copy", pinned, media.mxc_uri)
        Media.objects.filter(pk=media.pk, storage_key=pinned).update(
            last_error=f"served version {pinned} is missing"
        )
        return False
    live = Media.objects.live()
    switched = live.filter(pk=media.pk, storage_key=pinned)
    if switched.update(storage_key=served, incoming_copied_at=timezone.now()):
        return True  # the versions go later (delete_copied_versions)
    if not live.filter(storage_key=served).exists():
        # The row died while its version was copied (else another run switched it, and
        # the copy is what it serves now).
        store.delete(served)
    return False


def queue_stuck(completed_before: datetime, batch_size: int) -> int:
    """Queue again the copies of live media still served from the upload URL's bucket
    that completed before ``completed_before`` (a task lost with its worker, a broker
    that refused it); how many were queued."""
    pks = list(
        Media.objects.live()
        .filter(
            storage_key__startswith=storage_keys.INCOMING_PREFIX,
            completed_at__lte=completed_before,
        )
        .order_by(F("completed_at").asc())
        .values_list("pk", flat=True)[:batch_size]
    )
    for pk in pks:
        queue.send(TASK, pk)
    return len(pks)


def delete_copied_versions(copied_before: datetime, batch_size: int) -> int:
    """Delete every version of the upload URL's objects of rows that switched to their
    copy before ``copied_before`` (the one copied, and any a later PUT made); how many
    rows were done. A row that died since has had them deleted by its cleanup: deleting
    again finds nothing."""
    due = Media.objects.filter(incoming_copied_at__lte=copied_before)
    rows = list(due.values_list("pk", "media_id")[:batch_size])
    if not rows:
        return 0
    get_store().delete_many([storage_keys.incoming(media_id) for _, media_id in rows])
    return due.filter(pk__in=[pk for pk, _ in rows]).update(incoming_copied_at=None)
