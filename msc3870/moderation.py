"""What moderators can do to media: quarantine, approve, reject, purge.

Each action is one compare-and-set transition; side effects (deleting objects of media
that will never be served again) follow explicitly.
"""

from __future__ import annotations

from . import lifecycle
from .models import Media, MediaState
from .pipeline import schedule_object_deletion

S = MediaState


def quarantine(media: Media, *, by: str) -> bool:
    """Stop serving complete media, keeping its bytes for review."""
    return lifecycle.transition(media, [S.COMPLETE], S.QUARANTINED, moderated_by=by)


def approve(media: Media, *, by: str) -> bool:
    """Serve quarantined media again."""
    return lifecycle.transition(media, [S.QUARANTINED], S.COMPLETE, moderated_by=by)


def reject(media: Media, *, by: str, reason: str = "Rejected by a moderator") -> bool:
    """Stop serving for good and delete the bytes."""
    won = lifecycle.transition(
        media,
        [S.COMPLETE, S.QUARANTINED],
        S.REJECTED,
        moderated_by=by,
        rejection_errcode="M_FORBIDDEN",
        rejection_reason=reason,
    )
    if won:
        schedule_object_deletion(media.pk)
    return won


def purge(media: Media, *, by: str) -> bool:
    """Delete the media in any state; the row stays as a tombstone so the id is never reused."""
    sources = [state for state in S.values if S.DELETED in lifecycle.ALLOWED_TRANSITIONS[state]]
    won = lifecycle.transition(media, sources, S.DELETED, moderated_by=by)
    if won:
        schedule_object_deletion(media.pk)
    return won
