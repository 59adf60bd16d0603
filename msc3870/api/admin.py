"""Synapse's media admin API, ``/_synapse/admin/v1/...``: the requests the synapse-admin
and ketesa web UIs send for media, answered as Synapse answers them (paths, parameters,
field names, pagination, errors). What each does is ``msc3870.synapse_admin``.

Every request needs an access token (401 ``M_MISSING_TOKEN``) of an admin (403
``M_FORBIDDEN``, ``msc3870.auth.is_admin``), decided before any parameter is read, so a
caller who is not an admin learns nothing from the answer. Parameters are read as
Synapse's ``parse_integer``/``parse_string``/``parse_boolean``/``parse_enum`` read them:
400 ``M_MISSING_PARAM`` or ``M_INVALID_PARAM`` naming the parameter. Rooms are not here:
a media server has none (the homeserver keeps answering ``room/...``).
"""

from __future__ import annotations

from typing import Any

from rest_framework.request import Request
from rest_framework.response import Response

from .. import synapse_admin
from ..auth import is_admin, validate_user_id
from ..conf import app_settings
from ..errors import BadRequest, Forbidden, InvalidParam, MissingParam
from ..validation import MEDIA_ID_RE
from .errors import MethodNotAllowed
from .views import MatrixView

# Synapse refuses a before_ts that reads as a time in 1970 in ms: the caller gave seconds.
MIN_BEFORE_TS = 30_000_000_000
DEFAULT_LIMIT = 100


class AdminView(MatrixView):
    """An admin's request: authenticated, then an admin, before anything else."""

    def check_permissions(self, request: Request) -> None:
        super().check_permissions(request)  # 401 without a token
        if not is_admin(request.user, request.auth):
            raise Forbidden("You are not a server admin")

    def actor(self, request: Request) -> str:
        return str(request.user)


# ------------------------------------------------------------------ parameters


def int_param(
    request: Request, name: str, default: int | None = None, *, required: bool = False
) -> int | None:
    """Synapse's ``parse_integer``: absent is the default (400 ``M_MISSING_PARAM`` if
    required); not an integer, or negative, 400 ``M_INVALID_PARAM``."""
    raw = request.query_params.get(name)
    if raw is None:
        if required:
            raise MissingParam(f"Missing required integer query parameter {name}")
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise InvalidParam(f"Query parameter {name} must be an integer") from exc
    if value < 0:
        raise InvalidParam(f"Query parameter {name} must be a positive integer.")
    return value


def choice_param(request: Request, name: str, default: str, allowed: list[str]) -> str:
    """Synapse's ``parse_string`` with ``allowed_values``."""
    value = request.query_params.get(name, default)
    if value not in allowed:
        raise InvalidParam(f"Query parameter {name!r} must be one of [{', '.join(allowed)}]")
    return value


def bool_param(request: Request, name: str, default: bool) -> bool:
    """Synapse's ``parse_boolean``: ``true`` or ``false``, nothing else."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if raw not in ("true", "false"):
        raise InvalidParam(f"Boolean query parameter {name!r} must be one of ['true', 'false']")
    return raw == "true"


def backwards(request: Request, default: str = "f") -> bool:
    """``dir``: ``f`` (forwards, ascending) or ``b`` (backwards)."""
    return choice_param(request, "dir", default, ["b", "f"]) == "b"


def before_ts_param(request: Request) -> int:
    before_ts = int_param(request, "before_ts", required=True)
    assert before_ts is not None
    if before_ts < MIN_BEFORE_TS:
        raise InvalidParam(
            "Query parameter before_ts you provided is from the year 1970. "
            "Double check that you are providing a timestamp in milliseconds."
        )
    return before_ts


def user_id_param(user_id: str) -> str:
    """A user id in the path: 400 ``M_INVALID_PARAM`` if it is not one."""
    return validate_user_id(user_id)


def media_id_param(media_id: str) -> str:
    if not MEDIA_ID_RE.fullmatch(media_id):
        raise InvalidParam("Invalid media id")
    return media_id


def user_media_order(request: Request) -> tuple[str, bool]:
    """The order of a user's media: newest first if neither ``order_by`` nor ``dir`` is
    given (as Synapse, for compatibility), else ``order_by`` (``created_ts`` by default)
    in ``dir`` (forwards by default)."""
    params = request.query_params
    if "order_by" not in params and "dir" not in params:
        return "created_ts", True
    order_by = choice_param(
        request, "order_by", "created_ts", list(synapse_admin.USER_MEDIA_ORDERS)
    )
    return order_by, backwards(request)


def page_params(request: Request) -> tuple[int, int]:
    start = int_param(request, "from", 0)
    limit = int_param(request, "limit", DEFAULT_LIMIT)
    assert start is not None and limit is not None
    return start, limit


def page_body(page: synapse_admin.Page, key: str) -> dict[str, Any]:
    body: dict[str, Any] = {key: page.items, "total": page.total}
    if page.next_token is not None:
        body["next_token"] = page.next_token
    return body


# ------------------------------------------------------------------ endpoints


class UserMediaView(AdminView):
    """``GET`` and ``DELETE /_synapse/admin/v1/users/{user_id}/media``."""

    def get(self, request: Request, user_id: str) -> Response:
        user_id = user_id_param(user_id)
        start, limit = page_params(request)
        order_by, back = user_media_order(request)
        page = synapse_admin.user_media(
            user_id, start=start, limit=limit, order_by=order_by, backwards=back
        )
        return Response(page_body(page, "media"))

    def delete(self, request: Request, user_id: str) -> Response:
        user_id = user_id_param(user_id)
        start, limit = page_params(request)
        order_by, back = user_media_order(request)
        deleted = synapse_admin.delete_user_media(
            user_id,
            start=start,
            limit=limit,
            order_by=order_by,
            backwards=back,
            by=self.actor(request),
        )
        return Response({"deleted_media": deleted, "total": len(deleted)})


class QuarantineUserMediaView(AdminView):
    """``POST /_synapse/admin/v1/user/{user_id}/media/quarantine``."""

    def post(self, request: Request, user_id: str) -> Response:
        user_id = user_id_param(user_id)
        count = synapse_admin.quarantine_user(user_id, by=self.actor(request))
        return Response({"num_quarantined": count})


class QuarantineMediaView(AdminView):
    """``POST /_synapse/admin/v1/media/quarantine/{server_name}/{media_id}``."""

    def post(self, request: Request, server_name: str, media_id: str) -> Response:
        synapse_admin.quarantine(server_name, media_id, by=self.actor(request))
        return Response({})


class UnquarantineMediaView(AdminView):
    """``POST /_synapse/admin/v1/media/unquarantine/{server_name}/{media_id}``."""

    def post(self, request: Request, server_name: str, media_id: str) -> Response:
        synapse_admin.unquarantine(server_name, media_id, by=self.actor(request))
        return Response({})


def delete_before(request: Request, actor: str, server_name: str | None = None) -> Response:
    """Deletion by date and size, at either path. ``keep_profiles`` is read (and refused
    if not a boolean) but cannot be honoured: which media are avatars only the homeserver
    knows. Protect them instead."""
    before_ts = before_ts_param(request)
    size_gt = int_param(request, "size_gt", 0)
    bool_param(request, "keep_profiles", True)
    assert size_gt is not None
    # The older path names the server, which must be this one (checked after the
    # parameters, as Synapse does).
    if server_name is not None and server_name != app_settings.SERVER_NAME:
        raise BadRequest("Can only delete local media")
    deleted = synapse_admin.delete_before(before_ts, size_gt, by=actor)
    return Response({"deleted_media": deleted, "total": len(deleted)})


class DeleteMediaBeforeView(AdminView):
    """``POST /_synapse/admin/v1/media/delete?before_ts=&size_gt=&keep_profiles=``."""

    def post(self, request: Request) -> Response:
        return delete_before(request, self.actor(request))


class MediaView(AdminView):
    """``/_synapse/admin/v1/media/{a}/{b}``, which Synapse routes by method as well as path:
    ``GET`` and ``DELETE media/{server_name}/{media_id}`` (one item's ``media_info``, its
    deletion), ``POST media/protect/{media_id}`` and ``media/unprotect/{media_id}``, and
    the older ``POST media/{server_name}/delete`` (deletion by date)."""

    def get(self, request: Request, first: str, second: str) -> Response:
        return Response({"media_info": synapse_admin.media_info(first, second)})

    def delete(self, request: Request, first: str, second: str) -> Response:
        deleted = synapse_admin.delete(first, second, by=self.actor(request))
        return Response({"deleted_media": deleted, "total": len(deleted)})

    def post(self, request: Request, first: str, second: str) -> Response:
        if first in ("protect", "unprotect"):
            media_id = media_id_param(second)
            synapse_admin.set_protected(media_id, first == "protect", by=self.actor(request))
            return Response({})
        if second == "delete":
            return delete_before(request, self.actor(request), server_name=first)
        raise MethodNotAllowed()


class PurgeMediaCacheView(AdminView):
    """``POST /_synapse/admin/v1/purge_media_cache?before_ts=``."""

    def post(self, request: Request) -> Response:
        before_ts = before_ts_param(request)
        return Response(
            {"deleted": synapse_admin.purge_remote_cache(before_ts, by=self.actor(request))}
        )


class UserMediaStatisticsView(AdminView):
    """``GET /_synapse/admin/v1/statistics/users/media``."""

    def get(self, request: Request) -> Response:
        order_by = choice_param(
            request, "order_by", "user_id", list(synapse_admin.STATISTICS_ORDERS)
        )
        start, limit = page_params(request)
        from_ts = int_param(request, "from_ts", 0)
        until_ts = int_param(request, "until_ts")
        assert from_ts is not None
        if until_ts is not None and until_ts <= from_ts:
            raise InvalidParam("Query parameter until_ts must be greater than from_ts.")
        search_term = request.query_params.get("search_term")
        if search_term == "":
            raise InvalidParam("Query parameter search_term cannot be an empty string.")
        page = synapse_admin.users_media_statistics(
            synapse_admin.StatisticsFilter(
                from_ts=from_ts, until_ts=until_ts, search_term=search_term
            ),
            start=start,
            limit=limit,
            order_by=order_by,
            backwards=backwards(request),
        )
        return Response(page_body(page, "users"))
