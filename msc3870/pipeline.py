"""Post-upload work: move the bytes out of the client's reach, check them, decide.

``screen_media`` is the body of the screening task. It takes a primary key, starts from
what the row says, and every step is a compare-and-set or safe to repeat, so a
redelivered or re-dispatched task does no harm.
"""

from __future__ import annotations

import logging

from django.db.models import F
from django.utils import timezone

from . import lifecycle
from .models import Media, MediaState, UploadMethod
from .screening import Rejection, ScreeningContext, run_checks
from .storage import get_store

log = logging.getLogger(__name__)
S = MediaState


def dispatch_screening(media: Media) -> bool:
    """Queue the screening task; False (and the reason on the row) if the broker refused.

    Media left in PROCESSING is re-dispatched by the stuck sweep, so a broker outage
    delays screening but loses nothing.
    """
    from .tasks import screen_media_task

    try:
        screen_media_task.delay(media.pk)
    except Exception as exc:  # broker down, connection refused, ...
        log.warning("Could not queue screening of %s: %s", media.mxc_uri, exc)
        Media.objects.filter(pk=media.pk).update(last_error=f"queueing failed: {exc}"[:1000])
        return False
    return True


def screen_media(pk: int) -> str:
    """Screen one media row in PROCESSING; returns what happened (for logs and tests)."""
    media = Media.objects.filter(pk=pk).first()
    if media is None or media.state != S.PROCESSING:
        return "skipped"
    Media.objects.filter(pk=pk).update(attempts=F("attempts") + 1)
    store = get_store()
    if not media.storage_key:
        if media.upload_method != UploadMethod.URL:
            return "receiving"  # a PUT is still streaming its body
        # Move the bytes out of the upload URL's reach before looking at them.
        incoming = store.head(media.incoming_key)
        if incoming is not None:
            if incoming.content_type and not media.declared_content_type:
                # S3 keeps the Content-Type of the client's PUT with the object.
                lifecycle.update_if_state(
                    media, S.PROCESSING, declared_content_type=incoming.content_type[:255]
                )
            store.move(media.incoming_key, media.served_key)
        elif store.head(media.served_key) is None:
            return _reject(media, Rejection("Nothing was uploaded", errcode="M_NOT_YET_UPLOADED"))
        # (else: an earlier attempt moved the bytes and died before recording it)
        if not lifecycle.update_if_state(media, S.PROCESSING, storage_key=media.served_key):
            return "skipped"
    info = store.head(media.storage_key)
    if info is None:
        return _reject(media, Rejection("The stored object is missing", errcode="M_UNKNOWN"))
    ctx = ScreeningContext(media=media, store=store, key=media.storage_key, info=info)
    try:
        findings = run_checks(ctx)
    except Rejection as rejection:
        return _reject(media, rejection)
    won = lifecycle.transition(
        media,
        [S.PROCESSING],
        S.COMPLETE,
        completed_at=timezone.now(),
        last_error="",
        **findings,
    )
    return "complete" if won else "skipped"


def _reject(media: Media, rejection: Rejection) -> str:
    if not lifecycle.transition(
        media,
        [S.PROCESSING],
        S.REJECTED,
        rejection_errcode=rejection.errcode,
        rejection_reason=rejection.reason[:1000],
    ):
        return "skipped"
    log.info("Rejected %s: %s", media.mxc_uri, rejection.reason)
    delete_objects(media.pk)
    return "rejected"


def record_failure(pk: int, exc: BaseException) -> None:
    """Background work failed (retryable): keep the reason on the row, not only in logs."""
    Media.objects.filter(pk=pk).update(last_error=f"{type(exc).__name__}: {exc}"[:1000])


def delete_objects(pk: int) -> bool:
    """Delete the storage objects of media that will never be served again. Idempotent."""
    return delete_objects_of([pk]) == 1


def delete_objects_of(pks: list[int]) -> int:
    """Batch form: one query, one batched delete in storage, one update.

    Only rows that are dead (not live) and not yet cleaned are touched; a missing object
    counts as deleted. Returns how many rows this call marked as cleaned.
    """
    rows = list(
        Media.objects.filter(pk__in=pks, objects_deleted_at__isnull=True)
        .exclude(state__in=lifecycle.LIVE_STATES)
        .values_list("pk", "media_id", "storage_key")
    )
    if not rows:
        return 0
    keys: set[str] = set()
    for _, media_id, storage_key in rows:
        probe = Media(media_id=media_id)
        keys.update((probe.incoming_key, probe.served_key))
        if storage_key:
            keys.add(storage_key)
    get_store().delete_many(sorted(keys))
    return (
        Media.objects.filter(pk__in=[row[0] for row in rows], objects_deleted_at__isnull=True)
        .exclude(state__in=lifecycle.LIVE_STATES)
        .update(objects_deleted_at=timezone.now())
    )
