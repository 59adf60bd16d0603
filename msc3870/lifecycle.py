"""The media state machine.

Every transition is one ``UPDATE ... WHERE pk = %s AND state IN (...)``: it wins or it
does not, so two requests, or a request and a task, can race without corrupting a row.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from . import logs, metrics, sql, wakeup
from .models import Media, MediaState
from .signals import send_state_signal

S = MediaState

ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    # PENDING -> COMPLETE or REJECTED: a PUT screened in its own request stores its bytes
    # unclaimed and records them with their verdict in one write (uploads.upload_to_media).
    S.PENDING: frozenset({S.PROCESSING, S.COMPLETE, S.REJECTED, S.EXPIRED, S.DELETED}),
    # PROCESSING -> PENDING: an upload PUT failed before any byte was kept (too big,
    # client went away), so the id may be used again.
    S.PROCESSING: frozenset({S.COMPLETE, S.REJECTED, S.PENDING, S.DELETED}),
    S.COMPLETE: frozenset({S.QUARANTINED, S.REJECTED, S.DELETED}),
    S.QUARANTINED: frozenset({S.COMPLETE, S.REJECTED, S.DELETED}),
    S.REJECTED: frozenset({S.DELETED}),
    S.EXPIRED: frozenset({S.DELETED}),
    S.DELETED: frozenset(),
}


class IllegalTransition(ValueError):
    pass


def check_transition(from_states: Iterable[str], to_state: str) -> list[str]:
    sources = list(from_states)
    for source in sources:
        if to_state not in ALLOWED_TRANSITIONS[source]:
            raise IllegalTransition(f"{source} -> {to_state} is not a media transition")
    return sources


def transition(
    media: Media | int,
    from_states: Iterable[str],
    to_state: str,
    *,
    extra_where: Q | None = None,
    unexpired_at: datetime | None = None,
    send_signal: bool = True,
    durable: bool = True,
    **fields: Any,
) -> bool:
    """Move one row to ``to_state`` if it is in one of ``from_states``; True if this call won.

    ``fields`` are written in the same UPDATE. ``unexpired_at``: only if the id has not
    expired by then (``unused_expires_at`` later). On success a ``Media`` instance passed
    in is updated in memory too, and the state's signal is sent (unless the caller is
    inside a transaction and sends it after the commit itself). ``durable=False``: a move
    that a database crash may undo without harm, such as a claim that the next step
    confirms (``sql.update_media``).
    """
    sources = check_transition(from_states, to_state)
    pk = media.pk if isinstance(media, Media) else media
    now = timezone.now()
    values = {"state": to_state, "state_changed_at": now, **fields}
    where = sql.equalities(extra_where)
    if where is not None and sql.writable(values):
        won = (
            sql.update_media(
                pk, values, states=sources, unexpired_at=unexpired_at, where=where, durable=durable
            )
            == 1
        )
    else:
        query = Media.objects.filter(pk=pk, state__in=sources)
        if extra_where is not None:
            query = query.filter(extra_where)
        if unexpired_at is not None:
            query = query.filter(unused_expires_at__gt=unexpired_at)
        won = query.update(**values) == 1
    if won and isinstance(media, Media):
        logs.annotate(media_id=media.media_id)
        media.state = to_state
        media.state_changed_at = now
        for name, value in fields.items():
            if not hasattr(value, "resolve_expression"):  # F(...) is written, not mirrored
                setattr(media, name, value)
    if won:
        _moved(pk, to_state, send_signal=send_signal)
    return won


def _moved(pk: int, to_state: str, *, send_signal: bool = True) -> None:
    """What follows a won transition: requests of this process waiting on the row wake
    once the change is visible, the state's signal is sent, and it is counted and noted
    on the line of the request or step that made it."""
    metrics.transitioned(to_state)
    logs.annotate(state=to_state)
    transaction.on_commit(lambda: wakeup.announce(pk, to_state))
    if send_signal:
        send_state_signal(to_state, [pk])


def claim(
    server_name: str,
    media_id: str,
    from_states: Iterable[str],
    to_state: str,
    *,
    user_id: str,
    unexpired_at: datetime | None = None,
    durable: bool = True,
    **fields: Any,
) -> Media | None:
    """``transition`` of ``mxc://server_name/media_id`` if ``user_id`` owns it: the row as
    this call left it, or None if the row is missing, another's, expired or in another
    state. Where the database returns updated rows this is one statement, the read and
    the compare-and-set together; elsewhere a read, then ``transition``."""
    sources = check_transition(from_states, to_state)
    now = timezone.now()
    values = {"state": to_state, "state_changed_at": now, **fields}
    if not (sql.returns_updated_rows() and sql.writable(values)):
        media = sql.media_by_mxc(server_name, media_id)
        if media is None or media.user_id != user_id:
            return None
        won = transition(
            media, sources, to_state, unexpired_at=unexpired_at, durable=durable, **fields
        )
        return media if won else None
    media = sql.claim_media(
        server_name,
        media_id,
        values,
        where={"user_id": user_id},
        states=sources,
        unexpired_at=unexpired_at,
        durable=durable,
    )
    if media is not None:
        logs.annotate(media_id=media.media_id)
        _moved(media.pk, to_state)
    return media


def transition_many(
    pks: list[int],
    from_states: Iterable[str],
    to_state: str,
    *,
    extra_where: Q | None = None,
    stamp: datetime | None = None,
    send_signal: bool = True,
    **fields: Any,
) -> list[int]:
    """Bulk form of ``transition`` for sweeps and bulk moderation: returns the primary
    keys this call moved.

    The rows moved are told apart from those a concurrent sweep moved by the exact
    ``state_changed_at`` this call wrote (``stamp``, now if not given: a caller recording
    the transitions passes its own). ``send_signal=False``: the caller, inside a
    transaction, sends the state's signal once it commits.
    """
    sources = check_transition(from_states, to_state)
    stamp = stamp or timezone.now()
    query = Media.objects.filter(pk__in=pks, state__in=sources)
    if extra_where is not None:
        query = query.filter(extra_where)
    if not query.update(state=to_state, state_changed_at=stamp, **fields):
        return []
    moved = list(
        Media.objects.filter(pk__in=pks, state=to_state, state_changed_at=stamp).values_list(
            "pk", flat=True
        )
    )
    _moved_many(moved, to_state, send_signal=send_signal)
    return moved


def _moved_many(moved: list[int], to_state: str, *, send_signal: bool = True) -> None:
    """``_moved`` for many rows: waiters woken after the commit, the signal, the count."""
    transaction.on_commit(lambda: wakeup.announce_many(moved, to_state))
    metrics.transitioned(to_state, len(moved))
    if send_signal:
        send_state_signal(to_state, moved)


def expire_due(now: datetime, limit: int) -> list[tuple[Any, ...]]:
    """PENDING -> EXPIRED for up to ``limit`` ids whose ``unused_expires_at`` has passed at
    ``now``, the earliest first; returns the moved rows' ``sql.EXPIRED_COLUMNS`` (primary
    key first). One statement where the database returns updated rows; elsewhere a pick,
    ``transition_many`` (the expiry condition repeated, so a /complete that claimed a row
    in between wins) and a read of what moved."""
    check_transition([S.PENDING], S.EXPIRED)
    rows = sql.expire_due(now, limit)
    if rows is not None:
        _moved_many([row[0] for row in rows], S.EXPIRED)
        return rows
    due = Media.objects.filter(state=S.PENDING, unused_expires_at__lte=now)
    pks = list(due.order_by("unused_expires_at").values_list("pk", flat=True)[:limit])
    if not pks:
        return []
    moved = transition_many(pks, [S.PENDING], S.EXPIRED, extra_where=Q(unused_expires_at__lte=now))
    return list(Media.objects.filter(pk__in=moved).values_list(*sql.EXPIRED_COLUMNS))


def update_if_state(
    media: Media, state: str, *, extra_where: Q | None = None, **fields: Any
) -> bool:
    """Write fields only while the row is still in ``state`` (no transition), and matches
    ``extra_where`` if given."""
    where = sql.equalities(extra_where)
    if where is not None and sql.writable(fields):
        won = sql.update_media(media.pk, fields, states=[state], where=where) == 1
    else:
        query = Media.objects.filter(pk=media.pk, state=state)
        if extra_where is not None:
            query = query.filter(extra_where)
        won = query.update(**fields) == 1
    if won:
        for name, value in fields.items():
            if sql.is_plain(value):  # F(...) is written, not mirrored
                setattr(media, name, value)
    return won


def same_claim(media: Media) -> Q:
    """The claim ``media`` holds in memory, as a condition for the row.

    After the stuck sweep resets an abandoned upload, the id can be claimed again; the
    first claimant, finishing late, must then change nothing. A claim is told apart by the
    ``processing_started_at`` it wrote (the reset clears it, every claim sets a new one).
    """
    return Q(processing_started_at=media.processing_started_at)
