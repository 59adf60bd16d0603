"""Users deleting their own media: MSC4322 (simple media self-redaction),
``POST /_matrix/client/v1/media/redact/{server_name}/{media_id}``.

Only the user who created the id, or a server admin, may redact it. A redaction is a
purge (``moderation.purge``): the row becomes a DELETED tombstone at once, so every read
path answers 404 from the next request on and downloads waiting on it are woken; the
objects (and thumbnails) go with the cleanup task unless other media shares the same
bytes; the id is never reused. It is recorded in the moderation trail with the user as
actor, so moderators can see who removed what. Redacting media already redacted (or
purged) is a no-op, as the proposal says.

What the uploader may not do: redact media a moderator quarantined (it stays for the
moderators: an abusive uploader must not destroy what they hold), nor another server's
media (nobody here uploaded it; an admin may, and it is then never fetched again).
"""

from __future__ import annotations

from collections.abc import Callable

from . import moderation
from .errors import Forbidden, NotFound
from .models import Media, MediaState
from .validation import validate_mxc

S = MediaState

UPLOADER_REASON = "Redacted by its uploader (MSC4322)"
ADMIN_REASON = "Redacted by a server admin (MSC4322)"


def redact(
    server_name: str,
    media_id: str,
    *,
    user_id: str,
    is_admin: Callable[[], bool],
    reason: str = "",
) -> bool:
    """Redact ``mxc://server_name/media_id`` for ``user_id``; True if this call purged it,
    False if it was already gone. ``is_admin`` is asked only when being the uploader is
    not enough (it may ask the homeserver). Raises ``NotFound`` for media this server does
    not hold, ``Forbidden`` for media the user may not redact."""
    validate_mxc(server_name, media_id)
    media = Media.objects.filter(server_name=server_name, media_id=media_id).first()
    if media is None:
        raise NotFound("Unknown media")
    uploader = not media.is_fetched and media.user_id == user_id
    # An admin acts as one on others' media, and on their own once a moderator holds it.
    admin = (not uploader or media.state == S.QUARANTINED) and is_admin()
    if not (uploader or admin):
        raise Forbidden("Only the uploader or a server admin may redact this media")
    if media.state == S.DELETED:
        return False
    if not admin and media.state == S.QUARANTINED:
        raise Forbidden("This media is held by a moderator")
    note = ADMIN_REASON if admin else UPLOADER_REASON
    purged = moderation.purge(
        media,
        by=user_id,
        reason=f"{note}: {reason}" if reason else note,
        spare_quarantined=not admin,
    )
    if not purged and not admin:
        media.refresh_from_db(fields=["state"])
        if media.state == S.QUARANTINED:  # quarantined while this ran
            raise Forbidden("This media is held by a moderator")
    return purged
