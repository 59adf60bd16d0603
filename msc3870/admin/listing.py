"""The media list of the console: previews, filters, search, and a paginator that never
counts the whole table.

At a million rows every query of the list is an index range with a limit: newest first
(``msc3870_created``, ``msc3870_state_created``, ``msc3870_user_created``), a search by
mxc id (the unique index), by uploader (``msc3870_user_created``), by SHA-256
(``msc3870_sha256``) or by filename (a trigram index on PostgreSQL, migration 0013).
Counts stop a few pages past the page shown (``CappedPaginator``).
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any

from django.contrib import admin
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from .. import dashboard, thumbnails
from ..conf import app_settings
from ..content_types import base_type
from ..models import Media, MediaState, UploadMethod

S = MediaState

# Type families a moderator filters by (the content type's top level).
FAMILIES = {"image": "Images", "video": "Video", "audio": "Audio", "text": "Text"}
# The shortest search that also looks in filenames (trigrams need three characters).
FILENAME_SEARCH_MIN = 3
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
# A client or legacy download or thumbnail URL pasted as it is.
MEDIA_URL_RE = re.compile(r"/(?:download|thumbnail)/([^/?#]+)/([^/?#]+)")
# Pages past the one shown that the count looks at: beyond them it says "more than".
COUNT_LOOKAHEAD_PAGES = 10
# Size of the list's previews (shown at half size: sharp on high-density screens).
PREVIEW_SIZE = (96, 96, "crop")
LARGE_PREVIEW_SIZE = (800, 600, "scale")


def family(content_type: str) -> str:
    top = base_type(content_type).split("/", 1)[0]
    return top if top in FAMILIES else "other"


def has_viewable_bytes(media: Media) -> bool:
    """Whether the console can show the bytes: kept (served or quarantined: what a
    moderator judges) and still stored."""
    return (
        media.state in (S.COMPLETE, S.QUARANTINED)
        and bool(media.storage_key)
        and media.objects_deleted_at is None
    )


def has_thumbnail(media: Media) -> bool:
    return (
        has_viewable_bytes(media)
        and base_type(media.content_type) in thumbnails.THUMBNAILABLE
        and (media.size or 0) <= app_settings.THUMBNAIL_MAX_SOURCE_BYTES
    )


# Type icons: no request, no decoding, no user content in them.
_ICON = (
    '<svg class="msc3870-icon" xmlns="http://www.w3.org/2000/svg" width="48" height="48" '
    'viewBox="0 0 48 48" role="img" aria-label="{label}"><rect x="4" y="2" width="40" '
    'height="44" rx="5" fill="{colour}"/><text x="24" y="30" font-family="sans-serif" '
    'font-size="11" font-weight="bold" text-anchor="middle" fill="#fff">{text}</text></svg>'
)
ICONS: dict[str, tuple[str, str, str]] = {
    # key: (text, colour, label)
    "image": ("IMG", "#4a7c59", "image"),
    "video": ("VID", "#7b4f9d", "video"),
    "audio": ("AUD", "#b5651d", "audio"),
    "text": ("TXT", "#4f6d8f", "text"),
    "other": ("FILE", "#6b6b6b", "file"),
    "gone": ("GONE", "#a33", "no bytes"),
    "waiting": ("…", "#999", "no bytes yet"),
}


def icon_svg(kind: str) -> str:
    text, colour, label = ICONS.get(kind, ICONS["other"])
    return _ICON.format(text=text, colour=colour, label=label)


def icon_kind(media: Media) -> str:
    if media.state in (S.PENDING, S.PROCESSING):
        return "waiting"
    if not has_viewable_bytes(media):
        return "gone"
    return family(media.content_type)


def preview_cell(media: Media) -> SafeString:
    if has_thumbnail(media):
        url = reverse("admin:msc3870_media_preview", args=[media.pk])
        return format_html(
            '<img class="msc3870-preview" src="{}" loading="lazy" width="48" height="48" '
            'alt="preview of {}">',
            url,
            media.mxc_uri,
        )
    return mark_safe(icon_svg(icon_kind(media)))  # fixed markup: no user input in it


def search(queryset: QuerySet[Media], term: str) -> QuerySet[Media]:
    """Media matching a search, by indexed lookups only: an mxc URI or a download URL
    (exact), a SHA-256 (exact), a Matrix user id (exact), else a media id of this server
    or ``server/media_id`` (exact) or a part of a filename (three characters or more)."""
    term = term.strip()
    if not term:
        return queryset
    if term.startswith("mxc://"):
        server, _, media_id = term.removeprefix("mxc://").partition("/")
        return queryset.filter(server_name=server, media_id=media_id)
    if match := MEDIA_URL_RE.search(term):
        return queryset.filter(server_name=match[1], media_id=match[2])
    if SHA256_RE.fullmatch(term):
        return queryset.filter(sha256=term.lower())
    if term.startswith("@"):
        return queryset.filter(user_id=term)
    condition = Q(server_name=app_settings.SERVER_NAME, media_id=term)
    if "/" in term:
        server, _, media_id = term.partition("/")
        condition |= Q(server_name=server, media_id=media_id)
    if len(term) >= FILENAME_SEARCH_MIN:
        condition |= Q(filename__icontains=term)
    return queryset.filter(condition)


class CappedPaginator(Paginator):
    """Counts no further than ``count_limit`` rows (``capped`` then): a count of a
    million rows on each page view would cost more than the page itself."""

    def __init__(self, object_list: Any, per_page: int, *args: Any, count_limit: int) -> None:
        super().__init__(object_list, per_page, *args)
        self.count_limit = count_limit

    @cached_property
    def count(self) -> int:
        # COUNT(*) over a subquery with this LIMIT: at most count_limit rows are read,
        # in the list's own index order.
        return self.object_list[: self.count_limit].count()

    @property
    def capped(self) -> bool:
        return self.count >= self.count_limit


def count_limit(request: HttpRequest, per_page: int) -> int:
    try:
        page = max(1, int(request.GET.get("p", "1")))
    except ValueError:
        page = 1
    return (page + COUNT_LOOKAHEAD_PAGES) * per_page + 1


class TypeFamilyFilter(admin.SimpleListFilter):
    title = "type"
    parameter_name = "type"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [*FAMILIES.items(), ("other", "Other")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Media]) -> QuerySet[Media]:
        value = self.value()
        if value in FAMILIES:
            return queryset.filter(of_family(value))
        if value == "other":
            families = Q()
            for name in FAMILIES:
                families |= of_family(name)
            return queryset.exclude(families)
        return queryset


def of_family(name: str) -> Q:
    """Types of a family, as stored (a declared type is kept as the client wrote it: in
    practice lower case, sometimes capitalised). Plain prefixes, not a case-insensitive
    match: PostgreSQL estimates these from the column's statistics and reads the list's
    index newest first; an UPPER(...) it has no statistics for makes it scan the table."""
    condition = Q()
    for spelling in (name, name.capitalize(), name.upper()):
        condition |= Q(content_type__startswith=f"{spelling}/")
    return condition


class OriginFilter(admin.SimpleListFilter):
    title = "origin"
    parameter_name = "origin"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("local", "This server"), ("remote", "Other servers")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Media]) -> QuerySet[Media]:
        if self.value() == "local":
            return queryset.exclude(upload_method=UploadMethod.REMOTE)
        if self.value() == "remote":
            return queryset.filter(upload_method=UploadMethod.REMOTE)
        return queryset


class UploaderFilter(admin.SimpleListFilter):
    """One uploader: the one chosen (a row's uploader links here) and this week's top
    uploaders from the dashboard's rollup; never a list of every uploader."""

    title = "uploader"
    parameter_name = "uploader"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        chosen = request.GET.get(self.parameter_name)
        uploaders = dashboard.top_uploaders_this_week()
        if chosen and chosen not in uploaders:
            uploaders = [chosen, *uploaders]
        return [(user_id, user_id) for user_id in uploaders]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Media]) -> QuerySet[Media]:
        if self.value():
            return queryset.filter(user_id=self.value())
        return queryset
