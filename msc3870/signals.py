"""Signals for host projects, sent after a state change has been committed.

Every signal is sent with ``sender=Media`` and ``media_pks``: the rows that changed (one
for a request or a task, a batch for a sweep). Receivers that raise are logged and do not
undo the change. A receiver may see a row again if a sweep is retried.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from django.dispatch import Signal

from .models import Media, MediaState

log = logging.getLogger(__name__)

media_completed = Signal()  # passed its checks, or approved by a moderator: now served
media_rejected = Signal()  # failed a check, or rejected by a moderator
media_expired = Signal()  # no upload before unused_expires_at
media_quarantined = Signal()  # withheld by a moderator
media_deleted = Signal()  # purged; the row stays as a tombstone

SIGNAL_FOR_STATE: dict[str, Signal] = {
    MediaState.COMPLETE: media_completed,
    MediaState.REJECTED: media_rejected,
    MediaState.EXPIRED: media_expired,
    MediaState.QUARANTINED: media_quarantined,
    MediaState.DELETED: media_deleted,
}


def send_state_signal(state: str, media_pks: Sequence[int]) -> None:
    signal = SIGNAL_FOR_STATE.get(state)
    if signal is None or not media_pks:
        return
    for receiver, result in signal.send_robust(sender=Media, media_pks=list(media_pks)):
        if isinstance(result, Exception):
            log.error("Receiver %r of the %s signal failed: %r", receiver, state, result)
