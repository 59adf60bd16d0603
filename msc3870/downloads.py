"""Downloads: the media behind an mxc:// id, for client, legacy and federation reads.

A read of this server's media is decided from its row (``msc3870.availability``); one of
another server's is fetched first if it is not held (``msc3870.federation.remote_media``).
Either may wait (``MediaWait``) while the bytes are uploaded, fetched or checked.
"""

from __future__ import annotations

from datetime import datetime

from .availability import available, local_media, quarantined_for_admin
from .conf import app_settings
from .errors import InvalidParam
from .federation import remote_media
from .models import Media
from .validation import validate_mxc
from .waiting import Deadline


def download_timeout_ms(requested: str | None, *, maximum: int | None = None) -> int:
    cap = app_settings.DOWNLOAD_TIMEOUT_MS_MAX if maximum is None else maximum
    if requested in (None, ""):
        return min(app_settings.DOWNLOAD_TIMEOUT_MS, cap)
    try:
        value = int(requested)
    except ValueError as exc:
        raise InvalidParam("timeout_ms must be an integer") from exc
    if value < 0:
        raise InvalidParam("timeout_ms must not be negative")
    return min(value, cap)


def media_for_download(
    server_name: str,
    media_id: str,
    *,
    timeout_ms: int,
    frozen_after: datetime | None = None,
    fetch_for: str | None = None,
    bypass_quarantine: bool = False,
) -> Media:
    """The complete media behind an mxc:// id; ``MediaWait`` (up to ``timeout_ms``) while
    it is being uploaded or checked. Media created after ``frozen_after`` is not found (the
    legacy unauthenticated endpoints' freeze, MSC3916), before and after any wait.

    Another server's media is served if held; with ``fetch_for`` (the Matrix user asking,
    charged what is fetched) it is fetched first (``msc3870.federation.remote_media``),
    and waited for as an upload is. ``bypass_quarantine`` (an admin's request, decided by
    the caller) serves quarantined media too."""
    validate_mxc(server_name, media_id)
    if bypass_quarantine and (held := quarantined_for_admin(server_name, media_id)):
        return held
    if server_name != app_settings.SERVER_NAME:
        return remote_media.media_for_download(
            server_name,
            media_id,
            deadline=Deadline.after_ms(timeout_ms),
            frozen_after=frozen_after,
            fetch_for=fetch_for,
        )
    return available(
        local_media(server_name, media_id),
        Deadline.after_ms(timeout_ms),
        frozen_after=frozen_after,
    )
