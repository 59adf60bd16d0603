"""Local access tokens in the admin: listed and revoked, never shown (only their SHA-256
digests are stored)."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from ..models import AccessToken


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
