"""Copying a version served from the upload URL's bucket to its media's own key, off the
uploader's path (stores that keep versions: ``S3_INCOMING_BUCKET``).

A URL upload's verdict serves the version of the upload URL's object that ``/complete``
looked at (``incoming/<id>@<version>``, ``storage_keys.pinned``), so the first download
waits for no copy. Then, in the background (task ``msc3870.copy_to_served_key``):

1. that version is copied to the media's served key (``media/..``) in the media bucket;
2. the row switches to the copy with one compare-and-set on the version copied
   (``UPDATE ... SET storage_key = <served key> WHERE storage_key = <that version>``, live
   rows only);
3. every version of the upload URL's object is deleted.

Each step is safe to repeat: a redelivered task finds the row switched and stops. A row
that died meanwhile (purged, rejected by a moderator) is not switched: the copy is
deleted unless live media serves it, and the row's cleanup deletes the versions. Rows
still served from the upload URL's bucket after ``STUCK_AFTER_SECONDS`` are queued
again by the stuck sweep (``queue_stuck``).
"""

from __future__ import annotations

import logging
from datetime import datetime

from django.db.models import F

from . import logs, queue, storage_keys
from .content_types import UNKNOWN_TYPE
from .models import Media
from .stores import get_store

log = logging.getLogger(__name__)

TASK = "msc3870.copy_to_served_key"


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
    if live.filter(pk=media.pk, storage_key=pinned).update(storage_key=served):
        # Nothing serves the upload URL's object now: its versions, the one copied and
        # any a later PUT made, all go.
        store.delete(pinned)
        return True
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
