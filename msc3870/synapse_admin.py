"""Synapse's media admin API (``/_synapse/admin/v1``) in the domain's terms: what each
endpoint reads and changes, with Synapse's shapes (media ids, times in ms, offset pages,
``deleted_media``). The HTTP side (who is an admin, parameters, errors) is
``msc3870.api.admin``.

Every change goes through ``msc3870.moderation`` with the admin's Matrix user id as the
actor, so the admin API leaves the same records as the admin site and the commands.
Where Synapse acts on more than the item named, so does this: quarantining or releasing
an item does it to every copy of its bytes (Synapse quarantines by SHA-256 since 1.128),
and quarantining a user's media quarantines other copies of those bytes too.

No request holds a thread for minutes changing media: a request acts on
``ADMIN_API_ITEMS_PER_REQUEST`` items at most. Deleting by date, purging the remote cache
and quarantining a user's media do that many, answer with what they did, and queue the
rest (task ``msc3870.admin_bulk``), which goes on the same way, that many per task, until
nothing is left. Lists are pages of the size asked for, as in Synapse: the web UIs
compute the offsets of their pages themselves, from page sizes up to 1000.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db.models import Case, CharField, Count, F, QuerySet, Sum, Value, When
from django.db.models.functions import Coalesce, StrIndex, Substr

from . import moderation, queue
from .conf import app_settings
from .errors import BadRequest, NotFound
from .models import LIVE_STATES, Media, MediaState, ModerationAction, UploadMethod
from .validation import validate_mxc

S = MediaState
A = ModerationAction

BULK_TASK = "msc3870.admin_bulk"

# Synapse's MediaSortOrder: the admin API's name of each order and the column it sorts.
USER_MEDIA_ORDERS: dict[str, str] = {
    "media_id": "media_id",
    "upload_name": "filename",
    "created_ts": "created_at",
    "last_access_ts": "last_accessed_at",
    "media_length": "size",
    "media_type": "content_type",
    "quarantined_by": "quarantined_by",
    "safe_from_quarantine": "protected",
}
# Synapse's UserSortOrder values the statistics accept. There are no display names
# here (profiles live on the homeserver): "displayname" sorts by user id.
STATISTICS_ORDERS: dict[str, str] = {
    "media_length": "media_length",
    "media_count": "media_count",
    "user_id": "user_id",
    "displayname": "user_id",
}


def items_per_request() -> int:
    return app_settings.ADMIN_API_ITEMS_PER_REQUEST


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def is_local_user(user_id: str) -> bool:
    return user_id.rpartition(":")[2] == app_settings.SERVER_NAME


# ---------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Page:
    """One page of a list, as Synapse pages: an offset (``from``) into a stable order,
    ``next_token`` the offset of the next page if there is one."""

    items: list[dict[str, Any]]
    total: int
    next_token: int | None

    @classmethod
    def of(cls, items: list[dict[str, Any]], total: int, start: int, limit: int) -> Page:
        # Synapse's own rule: a next page while the one asked for did not reach the end.
        more = start + limit < total
        return cls(items, total, start + len(items) if more else None)


def _local_media() -> QuerySet[Media]:
    """This server's media with a row Synapse would have: every upload not yet expired,
    rejected or purged (Synapse deletes those rows)."""
    return Media.objects.filter(
        server_name=app_settings.SERVER_NAME, state__in=LIVE_STATES
    ).exclude(upload_method=UploadMethod.REMOTE)


def _user_media(user_id: str) -> QuerySet[Media]:
    if not is_local_user(user_id):
        raise BadRequest("Can only look up local users")
    return _local_media().filter(user_id=user_id)


def _quarantined_by() -> Case:
    return Case(
        When(state=S.QUARANTINED, then=F("moderated_by")),
        default=Value(None),
        output_field=CharField(),
    )


def _in_order(selection: QuerySet[Media], order_by: str, backwards: bool) -> QuerySet[Media]:
    """Synapse's order: the column asked for, then the media id ascending, so that equal
    values page in a stable order."""
    column = USER_MEDIA_ORDERS[order_by]
    if column == "quarantined_by":
        selection = selection.annotate(quarantined_by=_quarantined_by())
    primary = F(column).desc() if backwards else F(column).asc()
    return selection.order_by(primary, "media_id")


def user_media(user_id: str, *, start: int, limit: int, order_by: str, backwards: bool) -> Page:
    """``GET users/{user_id}/media``: a page of a local user's media."""
    selection = _user_media(user_id)
    rows = list(_in_order(selection, order_by, backwards)[start : start + limit])
    return Page.of([media_entry(media) for media in rows], selection.count(), start, limit)


def media_entry(media: Media) -> dict[str, Any]:
    """A local media as Synapse lists it (``LocalMedia``, every field, in its order)."""
    return {
        "media_id": media.media_id,
        "media_type": media.content_type or media.declared_content_type,
        "media_length": media.size,
        "upload_name": media.filename or None,
        "created_ts": _ms(media.created_at),
        "url_cache": None,
        "last_access_ts": _ms(media.last_accessed_at),
        "quarantined_by": _quarantiner(media),
        "safe_from_quarantine": media.protected,
        "user_id": media.user_id,
        "authenticated": _authenticated(media),
        "sha256": media.sha256 or None,
    }


def _quarantiner(media: Media) -> str | None:
    if media.state != S.QUARANTINED:
        return None
    return media.moderated_by or "system"  # a re-screening quarantines as the process


def _authenticated(media: Media) -> bool:
    """Served only to authenticated requests: created after the legacy endpoints' freeze,
    as Synapse marks media stored once authenticated media is on."""
    frozen_after = app_settings.LEGACY_MEDIA_FREEZE_AFTER
    return frozen_after is not None and media.created_at > frozen_after


def media_info(server_name: str, media_id: str) -> dict[str, Any]:
    """``GET media/{server_name}/{media_id}``: one local or cached remote media."""
    validate_mxc(server_name, media_id)
    if server_name != app_settings.SERVER_NAME:
        media = (
            Media.objects.filter(server_name=server_name, media_id=media_id)
            .filter(upload_method=UploadMethod.REMOTE, state__in=(S.COMPLETE, S.QUARANTINED))
            .first()
        )
        if media is None:
            raise NotFound("Unknown media")
        return {
            "media_origin": server_name,
            "user_id": None,
            "media_id": media.media_id,
            "media_type": media.content_type,
            "media_length": media.size,
            "upload_name": media.filename or None,
            "created_ts": _ms(media.created_at),
            "filesystem_id": None,
            "url_cache": None,
            "last_access_ts": _ms(media.last_accessed_at),
            "quarantined_by": _quarantiner(media),
            "authenticated": True,  # fetched over authenticated federation media only
            "safe_from_quarantine": None,
            "sha256": media.sha256 or None,
        }
    media = _local_media().filter(media_id=media_id).first()
    if media is None:
        raise NotFound("Unknown media")
    return {
        "media_origin": None,
        **media_entry(media),
        "filesystem_id": None,
    }


@dataclass(frozen=True)
class StatisticsFilter:
    """Which media ``users_media_statistics`` counts: created from ``from_ts`` (ms; 0,
    Synapse's default, is no bound) until ``until_ts`` (ms, None: no bound), of users
    whose localpart holds ``search_term`` (None: every user)."""

    from_ts: int = 0
    until_ts: int | None = None
    search_term: str | None = None

    def apply(self, selection: QuerySet[Media]) -> QuerySet[Media]:
        """``selection`` narrowed to the media the filter counts."""
        if self.from_ts:
            selection = selection.filter(created_at__gte=from_ms(self.from_ts))
        if self.until_ts:
            selection = selection.filter(created_at__lte=from_ms(self.until_ts))
        if self.search_term:
            localpart = Substr("user_id", 2, StrIndex("user_id", Value(":")) - 2)
            selection = selection.annotate(localpart=localpart).filter(
                localpart__icontains=self.search_term
            )
        return selection


def users_media_statistics(
    which: StatisticsFilter, *, start: int, limit: int, order_by: str, backwards: bool
) -> Page:
    """``GET statistics/users/media``: each local user's count and bytes of media, as
    Synapse counts them (every row of theirs, whatever its state), of the media ``which``
    selects. Equal values are ordered by user id, so that pages neither repeat nor miss
    a user (Synapse orders by the column alone)."""
    users = (
        which.apply(_local_media())
        .values("user_id")
        .annotate(media_count=Count("pk"), media_length=Coalesce(Sum("size"), 0))
    )
    column = STATISTICS_ORDERS[order_by]
    order = [F(column).desc() if backwards else F(column).asc()]
    if column != "user_id":
        order.append(F("user_id").asc())
    rows = users.order_by(*order)[start : start + limit]
    items = [
        {
            "user_id": row["user_id"],
            "displayname": None,
            "media_count": row["media_count"],
            "media_length": row["media_length"],
        }
        for row in rows
    ]
    return Page.of(items, users.count(), start, limit)


# ---------------------------------------------------------------------- one item


def _row(server_name: str, media_id: str) -> Media | None:
    validate_mxc(server_name, media_id)
    return Media.objects.filter(server_name=server_name, media_id=media_id).first()


def quarantine(server_name: str, media_id: str, *, by: str) -> int:
    """``POST media/quarantine/{server_name}/{media_id}``: quarantine the item and every
    other complete copy of its bytes, local or remote, except protected media; how many.
    Nothing for unknown or protected media, as Synapse (which answers ``{}`` either way).
    The hash is not put on the block list: while a copy stays quarantined, uploads of the
    same bytes are refused anyway, and unquarantining lets them in again, as in Synapse."""
    media = _row(server_name, media_id)
    if media is None or media.protected:
        return 0
    reason = "Admin API: quarantine"
    if media.sha256:
        return moderation.quarantine_content(media.sha256, by=by, reason=reason, block=False)
    return int(moderation.quarantine(media, by=by, reason=reason, skip_protected=True))


def unquarantine(server_name: str, media_id: str, *, by: str) -> int:
    """``POST media/unquarantine/{server_name}/{media_id}``: serve the item again, and
    every other quarantined copy of its bytes (Synapse releases by hash too); how many."""
    media = _row(server_name, media_id)
    if media is None:
        return 0
    reason = "Admin API: unquarantine"
    if media.sha256:
        copies = Media.objects.filter(sha256=media.sha256, state=S.QUARANTINED)
        return moderation.moderate_many(copies, A.APPROVE, by=by, reason=reason).done
    return int(moderation.approve(media, by=by, reason=reason))


def set_protected(media_id: str, protected: bool, *, by: str) -> bool:
    """``POST media/protect/{media_id}`` and ``unprotect``: this server's media only, as
    Synapse's ``safe_from_quarantine`` is a flag of local media. Nothing for unknown media."""
    media = _row(app_settings.SERVER_NAME, media_id)
    if media is None or media.is_remote:
        return False
    if protected:
        return moderation.protect(media, by=by, reason="Admin API: protect")
    return moderation.unprotect(media, by=by, reason="Admin API: unprotect")


def delete(server_name: str, media_id: str, *, by: str) -> list[str]:
    """``DELETE media/{server_name}/{media_id}``: purge one local media; the ids purged."""
    validate_mxc(server_name, media_id)
    if server_name != app_settings.SERVER_NAME:
        raise BadRequest("Can only delete local media")
    media = _local_media().filter(media_id=media_id).first()
    if media is None:
        raise NotFound("Unknown media")
    return [media_id] if moderation.purge(media, by=by, reason="Admin API: delete") else []


# ---------------------------------------------------------------------- many items


def delete_user_media(
    user_id: str, *, start: int, limit: int, order_by: str, backwards: bool, by: str
) -> list[str]:
    """``DELETE users/{user_id}/media``: purge the page of the user's media that
    ``user_media`` would list (Synapse: the 100 newest, with no parameters), at most
    ``ADMIN_API_ITEMS_PER_REQUEST`` of it; the ids purged, in that order."""
    selection = _user_media(user_id)
    limit = min(limit, items_per_request())
    page = list(
        _in_order(selection, order_by, backwards).values_list("pk", "media_id")[
            start : start + limit
        ]
    )
    purged: set[int] = set()
    moderation.moderate_many(
        [pk for pk, _ in page],
        A.PURGE,
        by=by,
        reason="Admin API: delete the user's media",
        on_moved=purged.update,
    )
    return [media_id for pk, media_id in page if pk in purged]


def delete_before(before_ts: int, size_gt: int, *, by: str) -> list[str]:
    """``POST media/delete?before_ts=&size_gt=``: purge local media last served (never
    served: created) before ``before_ts`` (ms) and larger than ``size_gt`` bytes, neither
    quarantined nor protected; the ids this call purged. Past the request's share, the
    rest is queued."""
    deleted: list[str] = []
    limit = items_per_request()
    moderation.delete_local_media_before(
        moderation.DeletionFilter(from_ms(before_ts), size_gt=size_gt),
        by=by,
        reason="Admin API: delete by date and size",
        on_deleted=deleted.extend,
        batches=moderation.Batches(limit=limit),
    )
    if len(deleted) >= limit:
        _go_on("delete_before", before_ts=before_ts, size_gt=size_gt, by=by)
    return deleted


def purge_remote_cache(before_ts: int, *, by: str) -> int:
    """``POST purge_media_cache?before_ts=``: delete other servers' media last served
    before ``before_ts`` (ms), except quarantined media; how many this call deleted."""
    limit = items_per_request()
    count = moderation.purge_remote_cache_before(
        moderation.DeletionFilter(from_ms(before_ts)),
        by=by,
        reason="Admin API: purge the remote media cache",
        batches=moderation.Batches(limit=limit),
    )
    if count >= limit:
        _go_on("purge_remote_cache", before_ts=before_ts, by=by)
    return count


def quarantine_user(user_id: str, *, by: str) -> int:
    """``POST user/{user_id}/media/quarantine``: quarantine the user's complete media,
    except protected media, and, as Synapse, every other complete copy of the same bytes;
    how many this call quarantined (``num_quarantined``)."""
    reason = "Admin API: quarantine the user's media"
    hashes: set[str] = set()

    def note_hashes(pks: list[int]) -> None:
        rows = Media.objects.filter(pk__in=pks).exclude(sha256="")
        hashes.update(rows.values_list("sha256", flat=True))

    limit = items_per_request()
    count = moderation.quarantine_user_media(
        user_id, by=by, reason=reason, batches=moderation.Batches(limit=limit), on_moved=note_hashes
    )
    if count >= limit:
        _go_on("quarantine_user", user_id=user_id, by=by)
    for sha256 in sorted(hashes):
        count += moderation.quarantine_content(sha256, by=by, reason=reason, block=False)
    return count


# The bulk actions whose rest is queued, by the name the task carries.
BULK_ACTIONS: dict[str, Callable[..., object]] = {
    "delete_before": delete_before,
    "purge_remote_cache": purge_remote_cache,
    "quarantine_user": quarantine_user,
}


def _go_on(action: str, **kwargs: Any) -> None:
    """Queue the rest of a bulk action: the task runs it again (what was done has left
    its selection), and queues itself again while a run does a full share."""
    queue.send(BULK_TASK, action, kwargs, background=True)


def run_bulk(action: str, kwargs: dict[str, Any]) -> None:
    """The queued rest of a bulk action (task ``msc3870.admin_bulk``)."""
    BULK_ACTIONS[action](**kwargs)
