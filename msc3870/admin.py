"""The moderators' view: who uploaded what, in which state, the actions on it, and the
audit trail of those actions.

Every action needs the ``msc3870.moderate_media`` permission (the "Moderators" group made
by migration 0005 holds it); viewing or even changing media does not let staff moderate
it. Quarantine, reject and purge show a confirmation page that asks for a reason. The
actions call ``msc3870.moderation``, which records each transition that wins: the admin
writes no records of its own, so the trail is the same whatever calls moderation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import urlencode

from . import moderation
from .models import AccessToken, Media, ModerationAction, ModerationRecord, URLPreview

MODERATE_PERMISSION = "msc3870.moderate_media"
CONFIRMATION_TEMPLATE = "admin/msc3870/media/moderation_confirmation.html"
# Media listed by name on a confirmation page; a larger selection is given as a count.
CONFIRMATION_PREVIEW_LIMIT = 100
# Media rows loaded at once while acting on a large selection.
ACTION_BATCH_SIZE = 500


@dataclass(frozen=True)
class Operation:
    """One moderation action as the admin offers it."""

    name: str  # the admin action's name
    label: str  # imperative, for the confirmation page's title and buttons
    kind: ModerationAction
    perform: Callable[..., bool]  # msc3870.moderation's function
    verb: str  # past tense, for messages
    consequence: str  # what the confirmation page warns of


QUARANTINE = Operation(
    "quarantine_media",
    "Quarantine",
    ModerationAction.QUARANTINE,
    moderation.quarantine,
    "Quarantined",
    "They stop being served; their bytes are kept so they can be approved again.",
)
APPROVE = Operation(
    "approve_media",
    "Approve",
    ModerationAction.APPROVE,
    moderation.approve,
    "Approved",
    "They are served again.",
)
REJECT = Operation(
    "reject_media",
    "Reject",
    ModerationAction.REJECT,
    moderation.reject,
    "Rejected",
    "They stop being served for good and their bytes are deleted. "
    "Uploads of the same content are refused from now on.",
)
PURGE = Operation(
    "purge_media",
    "Purge",
    ModerationAction.PURGE,
    moderation.purge,
    "Purged",
    "Their bytes are deleted, in any state; only a tombstone row stays, so the ids are "
    "never reused. This cannot be undone.",
)
OPERATIONS = (QUARANTINE, APPROVE, REJECT, PURGE)


class ModerationReasonForm(forms.Form):
    reason = forms.CharField(
        max_length=1000,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Kept in the audit trail; not shown to the uploader.",
    )


def _moderate_each(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    queryset: QuerySet[Media],
    operation: Operation,
    reason: str,
) -> None:
    # Permissions are checked again here: an action reached by a hand-made POST must not
    # rely on the changelist having hidden it.
    if not request.user.has_perm(MODERATE_PERMISSION):
        raise PermissionDenied
    # One transition and one record per row (a bulk update() would skip them), a batch
    # of rows at a time, read by primary key: rows leaving a filtered list as they are
    # acted on are neither skipped nor repeated, and no list of the whole selection is
    # held.
    result = moderation.moderate_many(
        queryset, operation.kind, by=request.user, reason=reason, batch_size=ACTION_BATCH_SIZE
    )
    done, skipped = result.done, result.skipped
    modeladmin.message_user(request, f"{operation.verb} {done} media.", messages.SUCCESS)
    if skipped:
        modeladmin.message_user(
            request, f"{skipped} were not in a state that allows it.", messages.WARNING
        )


def _confirm_then_moderate(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    queryset: QuerySet[Media],
    operation: Operation,
) -> TemplateResponse | None:
    """Show the confirmation page; act once it comes back with a reason."""
    if not request.user.has_perm(MODERATE_PERMISSION):
        raise PermissionDenied
    if "confirmed" in request.POST:
        form = ModerationReasonForm(request.POST)
        if form.is_valid():
            _moderate_each(modeladmin, request, queryset, operation, form.cleaned_data["reason"])
            return None  # back to the change list
    else:
        form = ModerationReasonForm()
    preview = list(queryset[:CONFIRMATION_PREVIEW_LIMIT])
    opts = modeladmin.model._meta
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": f"{operation.label} media: are you sure?",
        "opts": opts,
        "operation": operation,
        "form": form,
        "preview": preview,
        "selected_count": queryset.count(),
        "select_across": request.POST.get("select_across", "0"),
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "media": modeladmin.media + form.media,
    }
    request.current_app = modeladmin.admin_site.name
    return TemplateResponse(request, CONFIRMATION_TEMPLATE, context)


class ModerationRecordInline(admin.TabularInline):
    model = ModerationRecord
    fields = ("at", "action", "actor", "state_before", "state_after", "reason")
    readonly_fields = fields
    ordering = ("-at", "-pk")
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


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
    readonly_fields = [field.name for field in Media._meta.fields] + ["moderation_history"]
    inlines = (ModerationRecordInline,)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Media | None = None) -> bool:
        return False  # purge instead: the row must stay as a tombstone

    def has_moderate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(MODERATE_PERMISSION)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> Any:
        # Buttons on the media's page for the actions its state allows; each posts to the
        # change list as the action would, so it goes through the same confirmation.
        media = self.get_object(request, object_id)
        operations = []
        if media is not None and self.has_moderate_permission(request):
            operations = [
                operation
                for operation in OPERATIONS
                if media.state in moderation.SOURCE_STATES[operation.kind]
            ]
        context = {**(extra_context or {}), "moderation_operations": operations}
        return super().change_view(request, object_id, form_url, context)

    @admin.display(description="Moderation history")
    def moderation_history(self, media: Media) -> str:
        url = reverse("admin:msc3870_moderationrecord_changelist")
        return format_html(
            '<a href="{}?{}">All moderation records of this media</a>',
            url,
            urlencode({"media__id__exact": media.pk}),
        )

    @admin.action(description="Quarantine (stop serving, keep bytes)", permissions=["moderate"])
    def quarantine_media(
        self, request: HttpRequest, queryset: QuerySet[Media]
    ) -> TemplateResponse | None:
        return _confirm_then_moderate(self, request, queryset, QUARANTINE)

    @admin.action(description="Approve (serve quarantined media again)", permissions=["moderate"])
    def approve_media(self, request: HttpRequest, queryset: QuerySet[Media]) -> None:
        # Undoes a quarantine and destroys nothing: no confirmation page.
        _moderate_each(self, request, queryset, APPROVE, reason="")

    @admin.action(description="Reject (stop serving, delete bytes)", permissions=["moderate"])
    def reject_media(
        self, request: HttpRequest, queryset: QuerySet[Media]
    ) -> TemplateResponse | None:
        return _confirm_then_moderate(self, request, queryset, REJECT)

    @admin.action(description="Purge (delete bytes, keep a tombstone)", permissions=["moderate"])
    def purge_media(
        self, request: HttpRequest, queryset: QuerySet[Media]
    ) -> TemplateResponse | None:
        return _confirm_then_moderate(self, request, queryset, PURGE)


@admin.register(ModerationRecord)
class ModerationRecordAdmin(admin.ModelAdmin):
    """The audit trail: readable by whoever has ``view_moderationrecord``, changed by no
    one (superusers included); records are written by ``msc3870.moderation`` only."""

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


@admin.register(URLPreview)
class URLPreviewAdmin(admin.ModelAdmin):
    """The URL previews cached now, and why a failed one failed (``last_error``: the
    addresses and errors clients are never told). Written by the previews alone."""

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
