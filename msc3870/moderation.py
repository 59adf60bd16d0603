"""What moderators can do to media: the one place every moderation action goes through,
whoever calls it (the admin, an admin API, a management command, a script).

Single items: ``quarantine``, ``approve``, ``reject``, ``purge``, ``protect``,
``unprotect``, ``rescreen``. Many items: ``moderate_many`` (a queryset or ids),
``quarantine_user_media``, ``quarantine_content`` (and ``block_hash``/``unblock_hash``),
``delete_local_media_before``, ``purge_remote_cache_before``, ``rescreen_many``.

Each state change is a compare-and-set transition; side effects (deleting objects of
media that will never be served again) follow explicitly. Every change that wins is
recorded here, in the same transaction, as an append-only ``ModerationRecord`` (who,
what, why, the state before and after), and as an admin ``LogEntry`` when the actor is a
Django user: whatever calls moderation, the same trail is written, and a change that lost
a race leaves none. State signals are sent once that transaction has committed, and
waiting downloads of this and every other process are woken then (``lifecycle``).

Bulk actions work in ``Batches`` (``BATCH_SIZE`` items by default): ids are read a batch
at a time (by primary key, never a list of everything), each batch is one transaction with
one compare-and-set ``UPDATE`` per source state and one record per row it moved. Deletion
by date selects media with a ``DeletionFilter``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from typing import Any

from django.apps import apps
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from . import lifecycle
from .cleanup import schedule_object_deletion, schedule_objects_deletion
from .errors import Codes, StorageUnavailable
from .models import (
    BlockedHash,
    Media,
    MediaState,
    ModerationAction,
    ModerationRecord,
    UploadMethod,
)
from .screening import Rejection, ScreeningContext, check_user_quota
from .signals import send_state_signal
from .sniffing import SNIFF_BYTES
from .stores import get_store

log = logging.getLogger(__name__)
S = MediaState
A = ModerationAction

# Who acted: a Django user (staff in the admin), or a name (a Matrix user id, a process).
Actor = AbstractBaseUser | str

# What the uploader is told about a moderator's rejection. The moderator's reason goes to
# the audit record only: it may name reporters or rooms the uploader must not learn of.
PUBLIC_REJECTION_REASON = "Rejected by a moderator"

# Rows read, moved and recorded per transaction by the bulk actions.
BATCH_SIZE = 500

SHA256_RE = re.compile(r"[0-9a-f]{64}")

# The states each action may start from (the admin offers an action on a media's page
# only in these).
SOURCE_STATES: dict[ModerationAction, frozenset[str]] = {
    A.QUARANTINE: frozenset({S.COMPLETE}),
    A.APPROVE: frozenset({S.QUARANTINED}),
    A.REJECT: frozenset({S.COMPLETE, S.QUARANTINED}),
    A.PURGE: frozenset(
        state for state in S.values if S.DELETED in lifecycle.ALLOWED_TRANSITIONS[state]
    ),
    # Flags, not transitions: any media not purged.
    A.PROTECT: frozenset(state for state in S.values if state != S.DELETED),
    A.UNPROTECT: frozenset(state for state in S.values if state != S.DELETED),
    A.RESCREEN: frozenset({S.COMPLETE}),
}

# The state each transition leads to.
TARGET_STATES: dict[ModerationAction, str] = {
    A.QUARANTINE: S.QUARANTINED,
    A.APPROVE: S.COMPLETE,
    A.REJECT: S.REJECTED,
    A.PURGE: S.DELETED,
}
_REJECTION_FIELDS = {
    "rejection_errcode": Codes.FORBIDDEN.value,
    "rejection_reason": PUBLIC_REJECTION_REASON,
}
# Actions after which the bytes are deleted.
_DESTRUCTIVE = frozenset({A.REJECT, A.PURGE})


# ---------------------------------------------------------------------- one item


def quarantine(media: Media, *, by: Actor, reason: str = "", skip_protected: bool = False) -> bool:
    """Stop serving complete media, keeping its bytes for review. True if this call
    quarantined it; False if it was not complete (or lost a race), or, with
    ``skip_protected`` (Synapse's quarantine API skips protected media), if protected."""
    return _moderate(
        media, A.QUARANTINE, S.QUARANTINED, by=by, reason=reason, skip_protected=skip_protected
    )


def approve(media: Media, *, by: Actor, reason: str = "") -> bool:
    """Serve quarantined media again. True if this call did; False if not quarantined."""
    return _moderate(media, A.APPROVE, S.COMPLETE, by=by, reason=reason)


def reject(media: Media, *, by: Actor, reason: str = "") -> bool:
    """Stop serving complete or quarantined media for good and delete the bytes (after
    hashing them: a moderator's rejection blocks identical uploads). True if this call
    rejected it."""
    won = _moderate(media, A.REJECT, S.REJECTED, by=by, reason=reason, **_REJECTION_FIELDS)
    if won:
        schedule_object_deletion(media.pk)
    return won


def purge(media: Media, *, by: Actor, reason: str = "", spare_quarantined: bool = False) -> bool:
    """Delete the media in any state, protected or not; the row stays as a tombstone so
    the id is never reused. True if this call purged it. ``spare_quarantined``: not if it
    is quarantined, even if a moderator quarantines it while this runs (an uploader
    redacting their own media must not destroy what a moderator holds)."""
    from_states = SOURCE_STATES[A.PURGE] - {S.QUARANTINED} if spare_quarantined else None
    won = _moderate(media, A.PURGE, S.DELETED, by=by, reason=reason, from_states=from_states)
    if won:
        schedule_object_deletion(media.pk)
    return won


def protect(media: Media, *, by: Actor, reason: str = "") -> bool:
    """Mark media safe from quarantine by user or by content and from deletion by date
    (Synapse's ``safe_from_quarantine``). Its state does not change, and a moderator can
    still quarantine, reject or purge it by itself. True if this call protected it; False
    if it was already protected or is purged."""
    return _set_protected(media, True, by=by, reason=reason)


def unprotect(media: Media, *, by: Actor, reason: str = "") -> bool:
    """Undo ``protect``. True if this call did; False if it was not protected."""
    return _set_protected(media, False, by=by, reason=reason)


def actor_name(by: Actor) -> str:
    return by.get_username() if isinstance(by, AbstractBaseUser) else by


def _moderate(
    media: Media,
    action: ModerationAction,
    to_state: str,
    *,
    by: Actor,
    reason: str,
    skip_protected: bool = False,
    from_states: Collection[str] | None = None,
    **fields: Any,
) -> bool:
    """Move ``media`` to ``to_state`` from any of the action's source states (or of
    ``from_states``) and record it; True if this call won.

    The record must say which state the media left, so the compare-and-set names the one
    state just read, not all the source states. On PostgreSQL the row lock makes the read
    and the update agree; where there is no row lock (SQLite), a row changed in between
    makes the update lose, and the state is read again. States only move forward or
    between a few states, so a handful of rounds is plenty; a row that keeps changing
    under us counts as lost.
    """
    if from_states is None:
        from_states = SOURCE_STATES[action]
    # Protection is part of the compare-and-set: media protected meanwhile stays.
    extra_where = Q(protected=False) if skip_protected else None
    for _round in range(len(S.values)):
        with transaction.atomic():
            row = _locked_state(media.pk)
            if row is None:
                return False
            state_before, protected = row
            if state_before not in from_states or (skip_protected and protected):
                return False
            # The signal is sent once the record is committed with the transition.
            if not lifecycle.transition(
                media,
                [state_before],
                to_state,
                extra_where=extra_where,
                send_signal=False,
                moderated_by=actor_name(by),
                **fields,
            ):
                continue
            _record(by, [media], action, reason, state_before, to_state, media.state_changed_at)
            transaction.on_commit(lambda: send_state_signal(to_state, [media.pk]))
            return True
    return False


def _locked_state(pk: int) -> tuple[str, bool] | None:
    """The state and protection flag of a media row, locked for the transaction where
    the database has row locks; None if the row is gone."""
    row: tuple[str, bool] | None = (
        Media.objects.select_for_update().filter(pk=pk).values_list("state", "protected").first()
    )
    return row


def _set_protected(media: Media, value: bool, *, by: Actor, reason: str) -> bool:
    """Set the protection flag if it is not set so already (compare-and-set on the flag
    and the state just read), and record it with that state."""
    action = A.PROTECT if value else A.UNPROTECT
    for _round in range(len(S.values)):
        with transaction.atomic():
            row = _locked_state(media.pk)
            if row is None:
                return False
            state, protected = row
            if protected == value or state not in SOURCE_STATES[action]:
                return False
            if not lifecycle.update_if_state(
                media, state, extra_where=Q(protected=not value), protected=value
            ):
                continue
            _record(by, [media], action, reason, state, state, timezone.now())
            return True
    return False


def _record(
    by: Actor,
    items: list[Media],
    action: ModerationAction,
    reason: str,
    state_before: str,
    state_after: str,
    at: datetime,
) -> None:
    """The audit trail of changes that won, inside their transaction: one record per
    item (``items``: instances holding at least pk, server name and media id)."""
    common = {
        "actor": actor_name(by),
        "action": action,
        "reason": reason,
        "state_before": state_before,
        "state_after": state_after,
        "at": at,  # the transition's own timestamp
    }
    if len(items) == 1:
        ModerationRecord.objects.create(media=items[0], mxc_uri=items[0].mxc_uri, **common)
    else:
        ModerationRecord.objects.bulk_create(
            [ModerationRecord(media_id=item.pk, mxc_uri=item.mxc_uri, **common) for item in items]
        )
    _log_admin_entries(by, items, action, reason, state_before, state_after)


def _log_admin_entries(
    by: Actor,
    items: list[Any],
    action: ModerationAction,
    reason: str,
    state_before: str,
    state_after: str,
) -> None:
    """Django's admin log (the media's History page) for actors that are Django users;
    the app may be used in a project without the admin."""
    if not isinstance(by, AbstractBaseUser) or by.pk is None or not items:
        return
    if not apps.is_installed("django.contrib.admin"):
        return
    from django.contrib.admin.models import CHANGE, LogEntry

    label = ModerationAction(action).label
    if state_before == state_after:
        message = f"{label} (while {state_before})."
    else:
        message = f"{label}: {state_before} -> {state_after}."
    if reason:
        message += f" Reason: {reason}"
    LogEntry.objects.log_actions(by.pk, items, CHANGE, change_message=message)


# ---------------------------------------------------------------------- many items


@dataclass(frozen=True)
class BulkResult:
    """What a bulk action did: ``done`` items changed (transitions won, flags set),
    ``looked_at`` items of the selection looked at (the rest were in a state, or had a
    flag, that the action does not apply to, or changed meanwhile)."""

    done: int
    looked_at: int

    @property
    def skipped(self) -> int:
        return self.looked_at - self.done


Selection = QuerySet[Media] | Iterable[int]


@dataclass(frozen=True)
class Batches:
    """How a bulk action reads its selection: ``size`` items per transaction, and no more
    than ``limit`` items looked at in all (None: every one). A caller bounding its work
    runs the action again for the rest: what was acted on has left a queryset's filter."""

    size: int = BATCH_SIZE
    limit: int | None = None


def moderate_many(
    selection: Selection,
    action: ModerationAction,
    *,
    by: Actor,
    reason: str = "",
    skip_protected: bool = False,
    batches: Batches = Batches(),
    on_moved: Callable[[list[int]], None] | None = None,
) -> BulkResult:
    """Apply ``action`` (quarantine, approve, reject, purge, protect, unprotect) to each
    media of ``selection``: an unsliced queryset (read ``batches.size`` primary keys at a
    time, in key order, so rows that leave its filter as they are acted on are neither
    skipped nor repeated) or an iterable of primary keys (consumed a batch at a time).

    One compare-and-set per item, as the single-item functions make, and one record per
    item that changed; media in a state the action does not start from is skipped, and
    so is protected media with ``skip_protected``. Reject and purge then delete the bytes
    of what they moved (one task per batch). Re-screening is ``rescreen_many``.

    ``batches.limit``: look at no more than this many items. ``on_moved`` is given each
    batch's primary keys that changed, after the batch's transaction.
    """
    if action in (A.PROTECT, A.UNPROTECT):
        act = _flag_each_batch(action == A.PROTECT, by, reason)
    elif action in TARGET_STATES:
        act = _move_each_batch(action, by, reason, skip_protected)
    else:
        raise ValueError(f"{action} is not a bulk moderation action")

    def act_and_tell(pks: list[int]) -> int:
        changed = act(pks)
        if on_moved is not None and changed:
            on_moved(changed)
        return len(changed)

    return _each_batch(selection, batches, act_and_tell)


def _flag_each_batch(value: bool, by: Actor, reason: str) -> Callable[[list[int]], list[int]]:
    """What protecting (``value``) or unprotecting does to one batch: the keys changed."""
    return lambda pks: _set_protected_batch(pks, value, by, reason)


def _move_each_batch(
    action: ModerationAction, by: Actor, reason: str, skip_protected: bool
) -> Callable[[list[int]], list[int]]:
    """What a transition does to one batch, the deletion of the bytes it leaves unserved
    included: the keys moved."""
    fields = _REJECTION_FIELDS if action == A.REJECT else {}
    extra_where = Q(protected=False) if skip_protected else None

    def move(pks: list[int]) -> list[int]:
        moved = _transition_batch(
            pks, action, by=by, reason=reason, extra_where=extra_where, **fields
        )
        if action in _DESTRUCTIVE:
            schedule_objects_deletion(moved)
        return moved

    return move


def quarantine_user_media(
    user_id: str,
    *,
    by: Actor,
    reason: str = "",
    batches: Batches = Batches(),
    on_moved: Callable[[list[int]], None] | None = None,
) -> int:
    """Quarantine every complete media ``user_id`` uploaded to this server, except
    protected media (Synapse's ``POST /_synapse/admin/v1/user/{user_id}/media/quarantine``);
    returns how many this call quarantined (``num_quarantined``).

    Skips protected media, media not complete (already quarantined, rejected, purged,
    and uploads still arriving or being checked when it runs: they complete afterwards),
    and other users' media with the same bytes (Synapse quarantines those too; here
    ``quarantine_content`` does, and new uploads of quarantined bytes are refused anyway
    by ``check_not_blocked``). Batched: any number of items, a batch in memory at a time;
    ``batches`` and ``on_moved`` as ``moderate_many`` takes them.
    """
    if not user_id:
        raise ValueError("A user id is required")
    selection = Media.objects.filter(user_id=user_id, state=S.COMPLETE, protected=False)
    return moderate_many(
        selection,
        A.QUARANTINE,
        by=by,
        reason=reason,
        skip_protected=True,
        batches=batches,
        on_moved=on_moved,
    ).done


def quarantine_content(
    sha256: str,
    *,
    by: Actor,
    reason: str = "",
    block: bool = True,
    batches: Batches = Batches(),
) -> int:
    """Quarantine every complete media with these bytes (SHA-256, hex), local and other
    servers', except protected media; with ``block`` (the default) block the hash first
    (``block_hash``), so that uploads and fetches of the same bytes are refused from now
    on, whether or not any of these media is kept. Returns how many this call
    quarantined.

    Skips protected media and media not complete. Media whose bytes were never hashed is
    not found by its hash: with ``SHA256_WHEN = "needed"`` only bytes that other media
    may share are hashed, and identical bytes always may (same size and first bytes), so
    this misses nothing that has a twin; ``quarantine_content_of`` hashes an item first.
    An upload screened while this runs, against the list as it was before the block, may
    still complete; ``rescreen`` finds it.
    """
    sha256 = valid_sha256(sha256)
    if block:
        block_hash(sha256, by=by, reason=reason)
    selection = Media.objects.filter(sha256=sha256, state=S.COMPLETE, protected=False)
    return moderate_many(
        selection, A.QUARANTINE, by=by, reason=reason, skip_protected=True, batches=batches
    ).done


def quarantine_content_of(media: Media, *, by: Actor, reason: str = "", block: bool = True) -> int:
    """``quarantine_content`` of the bytes of ``media`` (hashed now if they never were),
    this media included unless protected; returns how many this call quarantined.
    Raises ``ValueError`` if its bytes are gone and were never hashed."""
    sha256 = content_sha256(media)
    if sha256 is None:
        raise ValueError(f"The bytes of {media.mxc_uri} are gone and were never hashed")
    return quarantine_content(sha256, by=by, reason=reason, block=block)


def content_sha256(media: Media) -> str | None:
    """The SHA-256 of the bytes of ``media``: recorded, else computed from the stored
    bytes (and recorded on every row serving them); None if there are none."""
    fresh = Media.objects.filter(pk=media.pk).values_list("sha256", "storage_key").first()
    if fresh is None:
        return None
    sha256, key = fresh
    if sha256:
        return sha256
    if not key:
        return None
    from .screening import record_sha256

    return record_sha256(get_store(), key)


def valid_sha256(sha256: str) -> str:
    """A SHA-256 in hex, lower-cased; ``ValueError`` if it is not one."""
    normal = (sha256 or "").strip().lower()
    if not SHA256_RE.fullmatch(normal):
        raise ValueError("Not a SHA-256 in hex")
    return normal


def block_hash(
    sha256: str,
    *,
    by: Actor,
    reason: str = "",
    size: int | None = None,
    prefix_sha256: str = "",
) -> bool:
    """Put a SHA-256 on the block list: uploads and fetches of these bytes are refused
    (``check_not_blocked``) until ``unblock_hash``, whether or not any media with them is
    kept. True if this call blocked it; False if it was blocked already.

    The size and first-bytes hash of the bytes (what ``SHA256_WHEN = "needed"`` decides
    by whether to hash an upload) are taken from media with this hash when not given. A
    hash blocked with neither (bytes this server never held) is matched only on uploads
    that are hashed anyway: ``SHA256_WHEN = "always"``, or bytes other media may share.
    """
    sha256 = valid_sha256(sha256)
    if size is None:
        size, prefix_sha256 = _fingerprint(sha256)
    blocked = BlockedHash(
        sha256=sha256,
        size=size,
        prefix_sha256=prefix_sha256,
        reason=reason,
        actor=actor_name(by),
    )
    try:
        with transaction.atomic():
            blocked.save(force_insert=True)
            _log_block(by, blocked, added=True)
    except IntegrityError:
        return False  # an active block of this hash exists (partial unique constraint)
    return True


def unblock_hash(sha256: str, *, by: Actor, reason: str = "") -> bool:
    """Lift the block of a SHA-256 (the row stays, as history). True if this call lifted
    it. Media quarantined with these bytes stays quarantined, and while it is, identical
    uploads are still refused (``check_not_blocked``): approve or purge it too."""
    sha256 = valid_sha256(sha256)
    with transaction.atomic():
        active = BlockedHash.objects.active().select_for_update().filter(sha256=sha256).first()
        if active is None:
            return False
        lifted = (
            BlockedHash.objects.active()
            .filter(pk=active.pk)
            .update(unblocked_at=timezone.now(), unblocked_by=actor_name(by), unblock_reason=reason)
        )
        if lifted:
            _log_block(by, active, added=False)
        return bool(lifted)


def is_hash_blocked(sha256: str) -> bool:
    return BlockedHash.objects.active().filter(sha256=valid_sha256(sha256)).exists()


def _fingerprint(sha256: str) -> tuple[int | None, str]:
    """The size and first-bytes hash of the bytes with this SHA-256, from media that
    recorded them, else read from stored bytes; (None, "") if unknown."""
    rows = Media.objects.filter(sha256=sha256).exclude(size__isnull=True)
    recorded = rows.exclude(prefix_sha256="").values_list("size", "prefix_sha256").first()
    if recorded is not None:
        return recorded
    stored = (
        rows.filter(objects_deleted_at__isnull=True)
        .exclude(storage_key="")
        .values_list("size", "storage_key")
        .first()
    )
    if stored is None:
        return None, ""
    size, key = stored
    try:
        prefix = get_store().read_prefix(key, SNIFF_BYTES)[:SNIFF_BYTES]
    except FileNotFoundError:
        return size, ""
    if len(prefix) != min(size, SNIFF_BYTES):
        return size, ""
    return size, hashlib.sha256(prefix).hexdigest()


def _log_block(by: Actor, blocked: BlockedHash, *, added: bool) -> None:
    if not isinstance(by, AbstractBaseUser) or by.pk is None:
        return
    if not apps.is_installed("django.contrib.admin"):
        return
    from django.contrib.admin.models import ADDITION, CHANGE, LogEntry

    message = "Blocked." if added else "Unblocked."
    LogEntry.objects.log_actions(
        by.pk, [blocked], ADDITION if added else CHANGE, change_message=message
    )


# Given a batch's ``mxc://`` URIs, those to keep.
KeepHook = Callable[[list[str]], Collection[str]]


@dataclass(frozen=True)
class DeletionFilter:
    """Which media a deletion by date selects (``delete_local_media_before``,
    ``purge_remote_cache_before``): the admin API's ``before_ts`` and ``size_gt``, the
    retention sweep's rules, the commands' options, built once by the caller.

    ``before``: an aware datetime; media last served before it, or never served and
    created before it ("served" is ``last_accessed_at``, kept to the hour by every
    download and thumbnail); with ``by_age``, created before it, served since or not.
    ``size_gt``: only larger than this many bytes. ``keep``: a caller that can tell which
    media to spare (profile pictures, room avatars: this server cannot know them) returns
    those of a batch's ``mxc://`` URIs to keep. This server's media only:
    ``include_quarantined`` (by default only complete media) and ``include_protected``
    (by default never protected media).
    """

    before: datetime
    size_gt: int = 0
    by_age: bool = False
    keep: KeepHook | None = None
    include_quarantined: bool = False
    include_protected: bool = False

    def _dated(self) -> Q:
        return Q(created_at__lt=self.before) if self.by_age else _unused_since(self.before)

    def local(self) -> Q:
        """This server's media with bytes that the filter selects."""
        states = [S.COMPLETE, S.QUARANTINED] if self.include_quarantined else [S.COMPLETE]
        condition = (
            ~Q(upload_method=UploadMethod.REMOTE)
            & Q(state__in=states, size__gt=self.size_gt)
            & self._dated()
        )
        if not self.include_protected:
            condition &= Q(protected=False)
        return condition

    def remote(self) -> Q:
        """Other servers' complete, unprotected media that the filter selects."""
        if self.include_quarantined or self.include_protected:
            raise ValueError("Other servers' quarantined and protected media stays cached")
        condition = (
            Q(upload_method=UploadMethod.REMOTE, state=S.COMPLETE, protected=False) & self._dated()
        )
        if self.size_gt:
            condition &= Q(size__gt=self.size_gt)
        return condition


def delete_local_media_before(
    which: DeletionFilter,
    *,
    by: Actor,
    reason: str = "",
    on_deleted: Callable[[list[str]], None] | None = None,
    batches: Batches = Batches(),
) -> int:
    """Purge this server's own media that ``which`` selects (Synapse's
    ``POST /_synapse/admin/v1/media/delete?before_ts=&size_gt=``); returns how many this
    call purged. Each is a purge: recorded, bytes deleted, a tombstone row kept.

    As Synapse by default: only media with bytes (complete; quarantined too with
    ``include_quarantined``), never protected media (unless ``include_protected``),
    never other servers' media (``purge_remote_cache_before``).

    What this server cannot know: which media are profile pictures or room avatars
    (Synapse's ``keep_profiles``): profiles and room state live on the homeserver; a
    caller that can tell passes ``which.keep``. ``on_deleted`` is given each batch's
    purged media ids (Synapse answers with the list). ``batches.limit``: look at no more
    than this many items; what is left is found by the next call.
    """
    condition = which.local()
    purged = 0
    for pks in _batches(Media.objects.filter(condition), batches):
        if which.keep is not None:
            pks = _without_kept(pks, which.keep)
        # The conditions again, in the compare-and-set: media served or protected since
        # it was read stays.
        moved = _transition_batch(pks, A.PURGE, by=by, reason=reason, extra_where=condition)
        schedule_objects_deletion(moved)
        purged += len(moved)
        if on_deleted is not None and moved:
            on_deleted(list(Media.objects.filter(pk__in=moved).values_list("media_id", flat=True)))
    return purged


def purge_remote_cache_before(
    which: DeletionFilter, *, by: Actor, reason: str = "", batches: Batches = Batches()
) -> int:
    """Delete other servers' media that ``which`` selects from the cache (Synapse's
    ``POST /_synapse/admin/v1/purge_media_cache?before_ts=``); returns how many this
    call deleted (``deleted``). ``which`` may not include quarantined or protected media
    (``ValueError``).

    Only complete, unprotected media: quarantined media stays, as in Synapse, and so do
    rejected rows (they keep refusing the bytes). Each is recorded as a purge, then
    deleted as the eviction sweep deletes (``maintenance.delete_evicted``): objects and
    thumbnails unless other media shares them, then the row, so that the next request
    fetches the media again. With the storage down, the rows stay DELETED and the
    eviction sweep finishes them. ``batches.limit``: look at no more than this many items.
    """
    from . import maintenance

    condition = which.remote()
    deleted = 0
    storage_down = False
    for pks in _batches(Media.objects.filter(condition), batches):
        if which.keep is not None:
            pks = _without_kept(pks, which.keep)
        # No moderator on the row: it is an eviction, which a request may fetch again.
        moved = _transition_batch(
            pks, A.PURGE, by=by, reason=reason, extra_where=condition, moderated_by=""
        )
        deleted += len(moved)
        if moved and not storage_down:
            try:
                maintenance.delete_evicted(moved)
            except StorageUnavailable as exc:
                log.warning("Purged remote media stays for the eviction sweep: %s", exc)
                storage_down = True
    return deleted


def _unused_since(before: datetime) -> Q:
    """Last served before ``before``, or never served and created before it."""
    return Q(last_accessed_at__lt=before) | Q(last_accessed_at__isnull=True, created_at__lt=before)


def _without_kept(pks: list[int], keep: KeepHook) -> list[int]:
    rows = list(Media.objects.filter(pk__in=pks).values_list("pk", "server_name", "media_id"))
    kept = set(keep([f"mxc://{server}/{media_id}" for _, server, media_id in rows]))
    return [pk for pk, server, media_id in rows if f"mxc://{server}/{media_id}" not in kept]


# ---------------------------------------------------------------------- re-screening


def rescreen_checks() -> list[Callable[[ScreeningContext], None]]:
    """The configured checks, but the quota: it judges the uploader's other media, not
    these bytes."""
    from .conf import app_settings

    return [check for check in app_settings.CHECKS if check is not check_user_quota]


def rescreen(media: Media, *, by: Actor, reason: str = "") -> str:
    """Run the checks again on the stored bytes of complete media (after a signature
    update, say). A refusal quarantines it, recorded with the check's reason ("quarantined");
    a pass leaves it as it is, recorded too ("passed"). Protection does not spare media
    from a refusal.

    "skipped": not complete, or it changed while the checks ran (nothing recorded).
    "missing": its stored object is gone (nothing recorded; the storage needs looking at).
    A check that fails (clamd down) raises, and nothing is recorded.
    """
    fresh = Media.objects.filter(pk=media.pk).first()
    if fresh is None or fresh.state != S.COMPLETE or not fresh.storage_key:
        return "skipped"
    store = get_store()
    found = store.head_with_prefix(fresh.storage_key, SNIFF_BYTES)
    if found is None:
        return "missing"
    info, prefix = found
    ctx = ScreeningContext(
        media=fresh, store=store, key=fresh.storage_key, info=info, _prefix=prefix
    )
    try:
        for check in rescreen_checks():
            check(ctx)
    except Rejection as rejection:
        note = _rescreen_note(f"refused by the checks: {rejection.reason}", reason)
        won = _moderate(media, A.RESCREEN, S.QUARANTINED, by=by, reason=note)
        return "quarantined" if won else "skipped"
    note = _rescreen_note("passed the checks", reason)
    return "passed" if _record_unchanged(media, A.RESCREEN, S.COMPLETE, by, note) else "skipped"


@dataclass
class RescreenResult:
    """Counts of ``rescreen``'s answers over a selection; ``failed``: a check failed
    (logged; the item is left as it is)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    def __getitem__(self, outcome: str) -> int:
        return self.counts.get(outcome, 0)


def rescreen_many(
    selection: Selection, *, by: Actor, reason: str = "", batches: Batches = Batches()
) -> RescreenResult:
    """``rescreen`` each media of ``selection`` (as ``moderate_many`` reads it); the
    counts of each outcome, and "failed" for items whose checks failed (logged, left as
    they are, the next items go on)."""
    result = RescreenResult()
    for pks in _pk_batches(selection, batches):
        for media in Media.objects.filter(pk__in=pks).order_by("pk"):
            try:
                result.add(rescreen(media, by=by, reason=reason))
            except Exception:
                log.exception("Re-screening %s failed", media.mxc_uri)
                result.add("failed")
    return result


def _rescreen_note(outcome: str, reason: str) -> str:
    return f"Re-screen: {outcome}" + (f" (asked: {reason})" if reason else "")


def _record_unchanged(
    media: Media, action: ModerationAction, state: str, by: Actor, reason: str
) -> bool:
    """Record an action that changes nothing, while the media is still in ``state``."""
    with transaction.atomic():
        current = (
            Media.objects.select_for_update()
            .filter(pk=media.pk)
            .values_list("state", flat=True)
            .first()
        )
        if current != state:
            return False
        _record(by, [media], action, reason, state, state, timezone.now())
        return True


# ---------------------------------------------------------------------- batches


def _batches(queryset: QuerySet[Media], batches: Batches) -> Iterator[list[int]]:
    """Primary keys of ``queryset``, ``batches.size`` at a time, in key order,
    ``batches.limit`` in all at most; each batch read after the previous one was acted on."""
    ordered = queryset.order_by("pk").values_list("pk", flat=True)
    last: int | None = None
    left = batches.limit
    while left is None or left > 0:
        page = ordered if last is None else ordered.filter(pk__gt=last)
        batch = list(page[: batches.size if left is None else min(batches.size, left)])
        if not batch:
            return
        yield batch
        last = batch[-1]
        if left is not None:
            left -= len(batch)


def _pk_batches(selection: Selection, batches: Batches) -> Iterator[list[int]]:
    if isinstance(selection, QuerySet):
        yield from _batches(selection, batches)
        return
    ids = iter(selection) if batches.limit is None else islice(selection, batches.limit)
    while batch := list(islice(ids, batches.size)):
        yield batch


def _each_batch(
    selection: Selection, batches: Batches, act: Callable[[list[int]], int]
) -> BulkResult:
    done = looked_at = 0
    for pks in _pk_batches(selection, batches):
        looked_at += len(pks)
        done += act(pks)
    return BulkResult(done=done, looked_at=looked_at)


def _transition_batch(
    pks: list[int],
    action: ModerationAction,
    *,
    by: Actor,
    reason: str,
    extra_where: Q | None = None,
    **fields: Any,
) -> list[int]:
    """Move those of ``pks`` in one of the action's source states to its target state,
    in one transaction: one compare-and-set ``UPDATE`` per source state (so that each
    record says which state its row left), one record per row moved. The primary keys
    moved; the state's signal is sent once committed."""
    to_state = TARGET_STATES[action]
    values = {"moderated_by": actor_name(by), **fields}
    moved_all: list[int] = []
    if not pks:
        return moved_all
    with transaction.atomic():
        remaining = list(pks)
        # Only the states the batch holds: one UPDATE each, not one per possible state.
        present = set(
            Media.objects.filter(pk__in=pks, state__in=SOURCE_STATES[action])
            .values_list("state", flat=True)
            .distinct()
        )
        for source in sorted(present):
            if not remaining:
                break
            moved = _transition_from(source, remaining, action, by, reason, extra_where, values)
            moved_set = set(moved)
            remaining = [pk for pk in remaining if pk not in moved_set]
            moved_all.extend(moved)
        if moved_all:
            transaction.on_commit(lambda: send_state_signal(to_state, moved_all))
    return moved_all


def _transition_from(
    source: str,
    pks: list[int],
    action: ModerationAction,
    by: Actor,
    reason: str,
    extra_where: Q | None,
    values: dict[str, Any],
) -> list[int]:
    """Move those of ``pks`` still in ``source`` to the action's target state (one
    compare-and-set ``UPDATE`` setting ``values``) and record each; the keys moved.
    Inside the caller's transaction, the signal left to it."""
    to_state = TARGET_STATES[action]
    stamp = timezone.now()
    moved = lifecycle.transition_many(
        pks, [source], to_state, extra_where=extra_where, stamp=stamp, send_signal=False, **values
    )
    if moved:
        items = list(
            Media.objects.filter(pk__in=moved).only("pk", "server_name", "media_id", "state")
        )
        _record(by, items, action, reason, source, to_state, stamp)
    return moved


def _set_protected_batch(pks: list[int], value: bool, by: Actor, reason: str) -> list[int]:
    """``_set_protected`` of a batch in one transaction: a compare-and-set per row on the
    flag and the state read, one record per row changed; the primary keys changed."""
    action = A.PROTECT if value else A.UNPROTECT
    changed: dict[str, list[Media]] = {}
    with transaction.atomic():
        rows = (
            Media.objects.select_for_update()
            .filter(pk__in=pks, state__in=SOURCE_STATES[action])
            .exclude(protected=value)
            .only("pk", "server_name", "media_id", "state")
        )
        for row in rows:
            if Media.objects.filter(pk=row.pk, state=row.state, protected=not value).update(
                protected=value
            ):
                changed.setdefault(row.state, []).append(row)
        now = timezone.now()
        for state, items in sorted(changed.items()):
            _record(by, items, action, reason, state, state, now)
    return [item.pk for items in changed.values() for item in items]
