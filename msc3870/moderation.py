"""What moderators can do to media: quarantine, approve, reject, purge.

Each action is one compare-and-set transition; side effects (deleting objects of media
that will never be served again) follow explicitly. Every transition that wins is
recorded here, in the same transaction, as an append-only ``ModerationRecord`` (who,
what, why, the state before and after), and as an admin ``LogEntry`` when the actor is a
Django user: whatever calls moderation (the admin, a command, a future admin API), the
same trail is written, and a transition that lost a race leaves none.
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction

from . import lifecycle
from .cleanup import schedule_object_deletion
from .errors import Codes
from .models import Media, MediaState, ModerationAction, ModerationRecord
from .signals import send_state_signal

S = MediaState

# Who acted: a Django user (staff in the admin), or a name (a Matrix user id, a process).
Actor = AbstractBaseUser | str

# What the uploader is told about a moderator's rejection. The moderator's reason goes to
# the audit record only: it may name reporters or rooms the uploader must not learn of.
PUBLIC_REJECTION_REASON = "Rejected by a moderator"

# The states each action may start from (the admin offers an action on a media's page
# only in these).
SOURCE_STATES: dict[ModerationAction, frozenset[str]] = {
    ModerationAction.QUARANTINE: frozenset({S.COMPLETE}),
    ModerationAction.APPROVE: frozenset({S.QUARANTINED}),
    ModerationAction.REJECT: frozenset({S.COMPLETE, S.QUARANTINED}),
    ModerationAction.PURGE: frozenset(
        state for state in S.values if S.DELETED in lifecycle.ALLOWED_TRANSITIONS[state]
    ),
}


def quarantine(media: Media, *, by: Actor, reason: str = "") -> bool:
    """Stop serving complete media, keeping its bytes for review."""
    return _moderate(media, ModerationAction.QUARANTINE, S.QUARANTINED, by=by, reason=reason)


def approve(media: Media, *, by: Actor, reason: str = "") -> bool:
    """Serve quarantined media again."""
    return _moderate(media, ModerationAction.APPROVE, S.COMPLETE, by=by, reason=reason)


def reject(media: Media, *, by: Actor, reason: str = "") -> bool:
    """Stop serving for good and delete the bytes."""
    won = _moderate(
        media,
        ModerationAction.REJECT,
        S.REJECTED,
        by=by,
        reason=reason,
        rejection_errcode=Codes.FORBIDDEN.value,
        rejection_reason=PUBLIC_REJECTION_REASON,
    )
    if won:
        schedule_object_deletion(media.pk)
    return won


def purge(media: Media, *, by: Actor, reason: str = "") -> bool:
    """Delete the media in any state; the row stays as a tombstone so the id is never reused."""
    won = _moderate(media, ModerationAction.PURGE, S.DELETED, by=by, reason=reason)
    if won:
        schedule_object_deletion(media.pk)
    return won


def actor_name(by: Actor) -> str:
    return by.get_username() if isinstance(by, AbstractBaseUser) else by


def _moderate(
    media: Media,
    action: ModerationAction,
    to_state: str,
    *,
    by: Actor,
    reason: str,
    **fields: Any,
) -> bool:
    """Move ``media`` to ``to_state`` from any of the action's source states and record
    it; True if this call won.

    The record must say which state the media left, so the compare-and-set names the one
    state just read, not all the source states. On PostgreSQL the row lock makes the read
    and the update agree; where there is no row lock (SQLite), a row changed in between
    makes the update lose, and the state is read again. States only move forward or
    between a few states, so a handful of rounds is plenty; a row that keeps changing
    under us counts as lost.
    """
    actor = actor_name(by)
    from_states = SOURCE_STATES[action]
    for _round in range(len(S.values)):
        with transaction.atomic():
            state_before = (
                Media.objects.select_for_update()
                .filter(pk=media.pk)
                .values_list("state", flat=True)
                .first()
            )
            if state_before not in from_states:
                return False
            # The signal is sent once the record is committed with the transition.
            if not lifecycle.transition(
                media, [state_before], to_state, send_signal=False, moderated_by=actor, **fields
            ):
                continue
            record = ModerationRecord.objects.create(
                media=media,
                mxc_uri=media.mxc_uri,
                actor=actor,
                action=action,
                reason=reason,
                state_before=state_before,
                state_after=to_state,
                at=media.state_changed_at,  # the transition's own timestamp
            )
            _log_admin_entry(by, media, record)
            transaction.on_commit(lambda: send_state_signal(to_state, [media.pk]))
            return True
    return False


def _log_admin_entry(by: Actor, media: Media, record: ModerationRecord) -> None:
    """Django's admin log (the media's History page) for actors that are Django users;
    the app may be used in a project without the admin."""
    if not isinstance(by, AbstractBaseUser) or by.pk is None:
        return
    if not apps.is_installed("django.contrib.admin"):
        return
    from django.contrib.admin.models import CHANGE, LogEntry

    message = f"{record.get_action_display()}: {record.state_before} -> {record.state_after}."
    if record.reason:
        message += f" Reason: {record.reason}"
    LogEntry.objects.log_actions(by.pk, [media], CHANGE, change_message=message)
