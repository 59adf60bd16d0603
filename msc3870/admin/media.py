"""The moderation console's media: the list, a media's page, the actions and the
dashboard, on the admin's own extension points (ModelAdmin methods, ``get_urls``,
templates that extend the admin's).

Viewing needs ``view_media``; every action ``moderate_media`` (the "Moderators" group
holds both). Nothing on a media's page is edited by hand: it has no Save button, and its
state changes only through the actions (``msc3870.moderation``).
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponseBase,
    HttpResponseNotAllowed,
)
from django.template.defaultfilters import filesizeformat
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.safestring import SafeString

from .. import dashboard, queue
from ..conf import app_settings
from ..models import Media, MediaState, UploadMethod
from .actions import MODERATE_PERMISSION, OPERATIONS, RETURN_TO_ITEM, admin_action
from .listing import (
    CappedPaginator,
    OriginFilter,
    TypeFamilyFilter,
    UploaderFilter,
    count_limit,
    has_thumbnail,
    has_viewable_bytes,
    icon_kind,
    preview_cell,
)
from .listing import search as search_listing
from .records import ModerationRecordInline
from .views import content as content_response
from .views import dashboard_context, icon_response, showing
from .views import preview as preview_response

S = MediaState
# Items sharing the bytes listed on a media's page at most.
TWINS_LIMIT = 50
SAFE_METHODS = ("GET", "HEAD")

# The facts a moderator judges by, first; the rest of the row folded under them.
FACTS = (
    "mxc",
    "uploader",
    "origin",
    "state_and_why",
    "times",
    "types",
    "size_display",
    "filename",
    "sha256",
    "protected",
)
RAW_FIELDS = tuple(
    field.name
    for field in Media._meta.fields
    if field.name not in ("id", "filename", "sha256", "protected")
)


@admin.register(Media)
class MediaAdmin(admin.ModelAdmin):
    list_display = (
        "preview",
        "mxc",
        "uploader",
        "state_badge",
        "content_type",
        "size_display",
        "created_at",
    )
    list_display_links = ("mxc",)
    list_filter = (
        "state",
        TypeFamilyFilter,
        OriginFilter,
        UploaderFilter,
        ("created_at", admin.DateFieldListFilter),
        "protected",
    )
    search_fields = ("media_id",)  # shows the box; get_search_results does the lookups
    search_help_text = (
        "An mxc:// URI or download URL, a media id, a Matrix user id (@user:server), a "
        "SHA-256, or part of a filename (3 characters or more)."
    )
    ordering = ("-created_at",)
    sortable_by = ("created_at",)  # the other columns would sort the whole table
    list_per_page = 50
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # facet counts would count the table per filter
    actions = tuple(admin_action(operation) for operation in OPERATIONS)
    fieldsets = (
        (None, {"fields": FACTS}),
        ("Everything else", {"classes": ("collapse",), "fields": RAW_FIELDS}),
    )
    readonly_fields = (*FACTS, *RAW_FIELDS)
    inlines = (ModerationRecordInline,)

    # -- permissions: look, and act through the actions only

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Media | None = None) -> bool:
        return False  # nothing is edited by hand: no Save button, no form to post

    def has_delete_permission(self, request: HttpRequest, obj: Media | None = None) -> bool:
        return False  # purge instead: the row must stay as a tombstone

    def has_moderate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(MODERATE_PERMISSION)

    # -- the list

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Media], search_term: str
    ) -> tuple[QuerySet[Media], bool]:
        return search_listing(queryset, search_term), False

    def get_paginator(
        self,
        request: HttpRequest,
        queryset: QuerySet[Media],
        per_page: int,
        orphans: int = 0,
        allow_empty_first_page: bool = True,
    ) -> CappedPaginator:
        return CappedPaginator(
            queryset,
            per_page,
            orphans,
            allow_empty_first_page,
            count_limit=count_limit(request, per_page),
        )

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponseBase:
        response = super().changelist_view(request, extra_context)
        context = getattr(response, "context_data", None)
        cl = context.get("cl") if context else None
        if cl is not None and getattr(cl.paginator, "capped", False):
            context["selection_note_all"] = "All matching media selected"
        return response

    @admin.display(description="")
    def preview(self, media: Media) -> SafeString:
        return preview_cell(media)

    @admin.display(description="mxc URI")
    def mxc(self, media: Media) -> str:
        return media.mxc_uri

    @admin.display(description="State")
    def state_badge(self, media: Media) -> str:
        protected = " protected" if media.protected else ""
        return format_html(
            '<span class="msc3870-state msc3870-state-{}" title="{}">{}</span>{}',
            media.state,
            media.get_state_display(),
            media.state,
            protected,
        )

    @admin.display(description="Uploader")
    def uploader(self, media: Media) -> str:
        if not media.user_id:
            return "—"
        url = reverse("admin:msc3870_media_changelist")
        return format_html(
            '<a href="{}?{}" title="Media of this uploader">{}</a>',
            url,
            urlencode({"uploader": media.user_id}),
            media.user_id,
        )

    @admin.display(description="Size", ordering="size")
    def size_display(self, media: Media) -> str:
        return "—" if media.size is None else filesizeformat(media.size)

    # -- a media's page

    @admin.display(description="Origin")
    def origin(self, media: Media) -> str:
        if media.upload_method == UploadMethod.REMOTE:
            return f"Another server: {media.server_name} (fetched here)"
        method = UploadMethod(media.upload_method).label if media.upload_method else "—"
        return f"This server ({app_settings.SERVER_NAME}), uploaded by {method}"

    @admin.display(description="State")
    def state_and_why(self, media: Media) -> str:
        parts = [media.get_state_display()]
        if media.moderated_by:
            parts.append(f"by {media.moderated_by}")
        if media.rejection_reason:
            code = f" ({media.rejection_errcode})" if media.rejection_errcode else ""
            parts.append(f"reason told to the uploader: {media.rejection_reason}{code}")
        latest = media.moderation_records.order_by("-at", "-pk").first()
        if latest is not None and latest.reason:
            parts.append(f"last moderation: {latest.get_action_display()}, “{latest.reason}”")
        if media.last_error:
            parts.append(f"last error: {media.last_error}")
        return "; ".join(parts)

    @admin.display(description="When")
    def times(self, media: Media) -> str:
        parts = [f"created {media.created_at:%Y-%m-%d %H:%M:%S %Z}"]
        if media.completed_at:
            parts.append(f"complete {media.completed_at:%Y-%m-%d %H:%M:%S %Z}")
        if media.state_changed_at and media.state_changed_at != media.created_at:
            parts.append(f"state changed {media.state_changed_at:%Y-%m-%d %H:%M:%S %Z}")
        if media.last_accessed_at:
            parts.append(f"last served {media.last_accessed_at:%Y-%m-%d %H:00 %Z}")
        return "; ".join(parts)

    @admin.display(description="Type")
    def types(self, media: Media) -> str:
        served = media.content_type or "—"
        declared = media.declared_content_type or "none"
        sniffed = media.sniffed_content_type or "unknown"
        agree = "" if declared == sniffed else " (they differ)"
        return f"served as {served}; declared {declared}, sniffed {sniffed}{agree}"

    def get_urls(self) -> list[Any]:
        wrap = self.admin_site.admin_view
        return [
            path("dashboard/", wrap(self.dashboard_view), name="msc3870_media_dashboard"),
            # Cacheable: the admin's never_cache would fetch every preview on every view.
            path(
                "<int:object_id>/preview/",
                wrap(self.preview_view, cacheable=True),
                name="msc3870_media_preview",
            ),
            path(
                "<int:object_id>/content/",
                wrap(self.content_view, cacheable=True),
                name="msc3870_media_content",
            ),
            *super().get_urls(),
        ]

    def _viewable(self, request: HttpRequest, object_id: int) -> Media:
        if request.method not in SAFE_METHODS:
            raise PermissionDenied
        if not self.has_view_permission(request):
            raise PermissionDenied
        media = Media.objects.filter(pk=object_id).first()
        if media is None:
            raise Http404
        return media

    def preview_view(self, request: HttpRequest, object_id: int) -> HttpResponseBase:
        media = self._viewable(request, object_id)
        if not has_thumbnail(media):
            return icon_response(icon_kind(media))
        return preview_response(media, large=request.GET.get("size") == "large")

    def content_view(self, request: HttpRequest, object_id: int) -> HttpResponseBase:
        if request.method not in SAFE_METHODS:
            return HttpResponseNotAllowed(SAFE_METHODS)
        media = self._viewable(request, object_id)
        if not has_viewable_bytes(media):
            raise Http404
        return content_response(media, request)

    def dashboard_view(self, request: HttpRequest) -> TemplateResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        if dashboard.snapshot() is None:
            # Figures before the first periodic rollup: one now (a worker's, with a
            # broker; else here, once).
            queue.send("msc3870.rollup_dashboard")
        context = {
            **self.admin_site.each_context(request),
            "title": "Media dashboard",
            "opts": self.opts,
            **dashboard_context(),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/msc3870/media/dashboard.html", context)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> Any:
        media = self.get_object(request, object_id)
        context: dict[str, Any] = {"moderation_operations": []}
        if media is not None:
            viewable = has_viewable_bytes(media)
            thumbnailable = has_thumbnail(media)
            twins, more_twins = same_bytes(media)
            context.update(
                showing=showing(media, viewable, thumbnailable),
                thumbnailable=thumbnailable,
                twins=twins,
                more_twins=more_twins,
                return_to_item_name=RETURN_TO_ITEM,
            )
            if self.has_moderate_permission(request):
                # Buttons for the actions that apply; each posts to the change list as
                # the action there does, so it goes through the same confirmation.
                context["moderation_operations"] = [
                    operation for operation in OPERATIONS if operation.applies(media)
                ]
        context.update(extra_context or {})
        return super().change_view(request, object_id, form_url, context)


def same_bytes(media: Media) -> tuple[list[Media], bool]:
    """Other media with the same bytes: the same SHA-256, or the same stored object
    (identical uploads share one), by index; and whether there are more than listed."""
    condition = Q()
    if media.sha256:
        condition |= Q(sha256=media.sha256)
    if media.storage_key:
        # The storage key's index leaves out empty keys: say so, for the planner.
        condition |= Q(storage_key=media.storage_key) & ~Q(storage_key="")
    if not condition:
        return [], False
    rows = list(
        Media.objects.filter(condition)
        .exclude(pk=media.pk)
        .order_by("-created_at", "-id")[: TWINS_LIMIT + 1]
    )
    return rows[:TWINS_LIMIT], len(rows) > TWINS_LIMIT
