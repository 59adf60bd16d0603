"""The audit trail in the admin: readable by whoever has ``view_moderationrecord``,
changed by no one (superusers included); records are written by ``msc3870.moderation``
only."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from ..models import ModerationRecord


class ModerationRecordInline(admin.TabularInline):
    """A media's whole history, on its page."""

    model = ModerationRecord
    fields = ("at", "action", "actor", "state_before", "state_after", "reason")
    readonly_fields = fields
    ordering = ("-at", "-pk")
    extra = 0
    can_delete = False
    show_change_link = True
    verbose_name_plural = "moderation history"

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ModerationRecord)
class ModerationRecordAdmin(admin.ModelAdmin):
    list_display = ("at", "action", "mxc_uri", "actor", "state_before", "state_after", "reason")
    list_filter = ("action", "actor", "at", "state_before", "state_after")
    search_fields = ("mxc_uri", "actor", "reason")
    date_hierarchy = "at"
    ordering = ("-at", "-pk")
    list_select_related = ("media",)
    show_full_result_count = False
    fields = (
        "at",
        "action",
        "media_link",
        "mxc_uri",
        "actor",
        "state_before",
        "state_after",
        "reason",
    )
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="Media")
    def media_link(self, record: ModerationRecord) -> str:
        if record.media_id is None:
            return "(row deleted)"
        url = reverse("admin:msc3870_media_change", args=[record.media_id])
        return format_html('<a href="{}">{}</a>', url, record.mxc_uri)
