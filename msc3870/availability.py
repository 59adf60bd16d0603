"""Whether a media row may be served now: served (its access noted), waited for while it
is uploaded or checked, or not found. Downloads of this server's media and of other
servers' (``msc3870.federation.remote_media``) decide it here alike."""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import partial

from django.utils import timezone

from . import sql
from .errors import NotFound, NotYetUploaded
from .models import AWAITING_UPLOAD_STATES, Media, MediaState
from .validation import check_local
from .waiting import Deadline, MediaWait

S = MediaState


def local_media(server_name: str, media_id: str) -> Media:
    check_local(server_name, media_id)
    media = sql.media_by_mxc(server_name, media_id)
    if media is None:
        raise NotFound()
    return media


def available(
    media: Media | None, deadline: Deadline, *, frozen_after: datetime | None = None
) -> Media:
    """``media`` if it can be served now; else ``MediaWait`` (until ``deadline``) while
    it is uploaded or checked, 504 once the deadline has passed, 404 for anything else.
    Media created after ``frozen_after`` is not found, before and after any wait."""
    if media is None:
        raise NotFound()
    if frozen_after is not None and media.created_at > frozen_after:
        # As Synapse answers for media stored once authenticated media is on: it exists
        # only for authenticated requests. Decided now, not after the wait: the creation
        # time never changes, and an unauthenticated request should not hold a waiter.
        raise NotFound()
    if media.state == S.COMPLETE and media.storage_key:
        note_access(media)
        return media
    if not _awaiting_upload(media):
        # Rejected (by the checks or a moderator), quarantined, expired, purged: not found,
        # as the contract says. Only the uploader hears why (``_outcome``, at /complete and
        # the upload answers): a recipient learns nothing of what the checks found.
        raise NotFound()
    if deadline.passed:
        raise NotYetUploaded()
    wait_until = deadline
    if media.state == S.PENDING:
        # An id that expires unused is answered 404 at its expiry, not at the deadline.
        until_expiry = (media.unused_expires_at - timezone.now()).total_seconds()
        wait_until = Deadline(min(deadline.at, Deadline.after_seconds(until_expiry).at))
    raise MediaWait(
        media.pk,
        AWAITING_UPLOAD_STATES,
        wait_until,
        partial(available, deadline=deadline, frozen_after=frozen_after),
    )


def quarantined_for_admin(server_name: str, media_id: str) -> Media | None:
    """Quarantined media with its bytes, for an admin who asked to see it anyway
    (``admin_unsafely_bypass_quarantine``, as Synapse); None for anything else, which is
    served, waited for or not found as for anyone."""
    media = sql.media_by_mxc(server_name, media_id)
    if media is None or media.state != S.QUARANTINED or not media.storage_key:
        return None
    note_access(media)
    return media


# Serving media records the time at most this often per media: the remote cache is
# evicted, and local media deleted by date, in least recently served order, and an hour
# apart is recent enough to tell.
ACCESS_GRANULARITY = timedelta(hours=1)


def note_access(media: Media) -> None:
    """Record that ``media`` is served, decided from the row already read: one UPDATE
    per media and ``ACCESS_GRANULARITY`` at most, none on most downloads."""
    now = timezone.now()
    if media.last_accessed_at is not None and now - media.last_accessed_at < ACCESS_GRANULARITY:
        return
    sql.update_media(media.pk, {"last_accessed_at": now})
    media.last_accessed_at = now


def _awaiting_upload(media: Media) -> bool:
    if media.state == S.PROCESSING:
        return True
    return media.state == S.PENDING and media.unused_expires_at > timezone.now()
