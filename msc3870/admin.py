"""The moderators' view: who uploaded what, in which state, and the actions on it."""

from __future__ import annotations

from collections.abc import Callable

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from . import moderation
from .models import AccessToken, Media


def _bulk(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    queryset: QuerySet[Media],
    action: Callable[..., bool],
    verb: str,
) -> None:
    # One transition per row, so each row's side effects run (a bulk update() would skip them).
    done = sum(1 for media in queryset if action(media, by=str(request.user)))
    skipped = queryset.count() - done
    modeladmin.message_user(request, f"{verb} {done} media.", messages.SUCCESS)
    if skipped:
        modeladmin.message_user(
            request, f"{skipped} were not in a state that allows it.", messages.WARNING
        )


@admin.register(Media)
class MediaAdmin(admin.ModelAdmin):
    list_display = (
        "media_id",
        "user_id",
        "state",
        "content_type",
        "size",
        "upload_method",
        "created_at",
        "completed_at",
    )
    list_filter = ("state", "upload_method", "created_at")
    search_fields = ("media_id", "user_id", "sha256", "filename")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    show_full_result_count = False  # COUNT(*) over every row on each page is slow at scale
    actions = ("quarantine_media", "approve_media", "reject_media", "purge_media")
    readonly_fields = [field.name for field in Media._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Media | None = None) -> bool:
        return False  # purge instead: the row must stay as a tombstone

    @admin.action(description="Quarantine (stop serving, keep bytes)")
    def quarantine_media(self, request: HttpRequest, queryset: QuerySet[Media]) -> None:
        _bulk(self, request, queryset, moderation.quarantine, "Quarantined")

    @admin.action(description="Approve (serve quarantined media again)")
    def approve_media(self, request: HttpRequest, queryset: QuerySet[Media]) -> None:
        _bulk(self, request, queryset, moderation.approve, "Approved")

    @admin.action(description="Reject (stop serving, delete bytes)")
    def reject_media(self, request: HttpRequest, queryset: QuerySet[Media]) -> None:
        _bulk(self, request, queryset, moderation.reject, "Rejected")

    @admin.action(description="Purge (delete bytes, keep a tombstone)")
    def purge_media(self, request: HttpRequest, queryset: QuerySet[Media]) -> None:
        _bulk(self, request, queryset, moderation.purge, "Purged")


@admin.register(AccessToken)
class AccessTokenAdmin(admin.ModelAdmin):
    list_display = ("user_id", "label", "is_appservice", "created_at", "expires_at", "revoked")
    list_filter = ("is_appservice", "revoked")
    search_fields = ("user_id", "label")
    readonly_fields = ("token_digest", "created_at", "last_used_at")
    fields = (
        "user_id",
        "label",
        "expires_at",
        "revoked",
        "is_appservice",
        "masquerade_regex",
        "token_digest",
        "created_at",
        "last_used_at",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # tokens are minted by `manage.py create_access_token`: shown once
