"""Cached URL previews in the admin, read-only: what is cached now, and why a failed one
failed (``last_error``: the addresses and errors clients are never told). Written by the
previews alone."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from ..models import URLPreview


@admin.register(URLPreview)
class URLPreviewAdmin(admin.ModelAdmin):
    list_display = ("created_at", "url", "requester", "error_status", "expires_at")
    list_filter = ("error_status", "created_at")
    search_fields = ("url", "requester")
    ordering = ("-created_at", "-pk")
    list_select_related = ("media",)
    show_full_result_count = False
    fields = (
        "url",
        "requester",
        "created_at",
        "expires_at",
        "og",
        "error_status",
        "error_errcode",
        "error_message",
        "last_error",
        "media",
    )
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
