"""The block list in the admin: content blocked by its SHA-256, active and lifted blocks.

Seeing it needs ``view_blockedhash`` (the Moderators group holds it); blocking a hash and
lifting a block need ``moderate_media``, with a reason, and go through
``msc3870.moderation`` (``block_hash``, ``unblock_hash``), which writes the rows: a block
is never edited or deleted here, and a lifted one stays as history.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponseBase
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import urlencode

from .. import moderation
from ..models import BlockedHash
from .actions import MODERATE_PERMISSION, ModerationReasonForm

UNBLOCK_TEMPLATE = "admin/msc3870/blockedhash/unblock_confirmation.html"


class BlockHashForm(forms.ModelForm):
    """Block a SHA-256 (bytes this server may never have held: a hash list from
    elsewhere)."""

    reason = forms.CharField(
        max_length=1000,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Kept with the block; not shown to uploaders.",
    )

    class Meta:
        model = BlockedHash
        fields = ("sha256", "reason")
        help_texts = {"sha256": "The SHA-256 of the bytes, 64 hexadecimal digits."}

    def clean_sha256(self) -> str:
        try:
            sha256 = moderation.valid_sha256(self.cleaned_data["sha256"])
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from exc
        if moderation.is_hash_blocked(sha256):
            raise forms.ValidationError("This hash is blocked already.")
        return sha256


class ActiveFilter(admin.SimpleListFilter):
    title = "block"
    parameter_name = "active"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "In force"), ("no", "Lifted")]

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[BlockedHash]
    ) -> QuerySet[BlockedHash]:
        if self.value() == "yes":
            return queryset.filter(unblocked_at__isnull=True)
        if self.value() == "no":
            return queryset.filter(unblocked_at__isnull=False)
        return queryset


@admin.register(BlockedHash)
class BlockedHashAdmin(admin.ModelAdmin):
    list_display = ("sha256", "in_force", "size", "reason", "actor", "blocked_at", "unblocked_at")
    list_filter = (ActiveFilter, ("blocked_at", admin.DateFieldListFilter))
    search_fields = ("sha256",)
    search_help_text = "A SHA-256 (exact)."
    ordering = ("-blocked_at", "-pk")
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    actions = ("unblock_hashes",)
    form = BlockHashForm
    readonly_fields = (
        "sha256",
        "size",
        "prefix_sha256",
        "reason",
        "actor",
        "blocked_at",
        "unblocked_at",
        "unblocked_by",
        "unblock_reason",
        "media_with_these_bytes",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(MODERATE_PERMISSION)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # a block is lifted (the unblock action), never edited

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # lifted blocks stay as history

    def has_moderate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(MODERATE_PERMISSION)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:  # the add form: the hash and the reason
            return ()
        return self.readonly_fields

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ("sha256", "reason")
        return self.readonly_fields

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[BlockedHash], search_term: str
    ) -> tuple[QuerySet[BlockedHash], bool]:
        term = search_term.strip().lower()
        if not term:
            return queryset, False
        return queryset.filter(sha256=term), False

    @admin.display(description="In force", boolean=True)
    def in_force(self, blocked: BlockedHash) -> bool:
        return blocked.unblocked_at is None

    @admin.display(description="Media with these bytes")
    def media_with_these_bytes(self, blocked: BlockedHash) -> str:
        url = reverse("admin:msc3870_media_changelist")
        return format_html(
            '<a href="{}?{}">Media with this SHA-256</a>', url, urlencode({"q": blocked.sha256})
        )

    def save_model(self, request: HttpRequest, obj: BlockedHash, form: Any, change: bool) -> None:
        if change or not self.has_add_permission(request):
            raise PermissionDenied
        # The block list's rows are written by moderation (with its admin log entry).
        moderation.block_hash(obj.sha256, by=request.user, reason=form.cleaned_data["reason"])
        made = BlockedHash.objects.active().filter(sha256=obj.sha256).first()
        if made is not None:
            obj.pk = made.pk

    def log_addition(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        return None  # moderation.block_hash logged it

    @admin.action(description="Lift these blocks", permissions=["moderate"])
    def unblock_hashes(
        self, request: HttpRequest, queryset: QuerySet[BlockedHash]
    ) -> HttpResponseBase | None:
        if not self.has_moderate_permission(request):
            raise PermissionDenied
        active = queryset.filter(unblocked_at__isnull=True)
        if "confirmed" in request.POST:
            form = ModerationReasonForm(request.POST)
            if form.is_valid():
                lifted = sum(
                    moderation.unblock_hash(
                        sha256, by=request.user, reason=form.cleaned_data["reason"]
                    )
                    for sha256 in active.values_list("sha256", flat=True)
                )
                self.message_user(request, f"Lifted {lifted} block(s).", messages.SUCCESS)
                return None
        else:
            form = ModerationReasonForm()
        context = {
            **self.admin_site.each_context(request),
            "title": "Lift blocks: are you sure?",
            "opts": self.opts,
            "form": form,
            "hashes": list(active.values_list("sha256", flat=True)[:100]),
            "selected_count": active.count(),
            "selected_ids": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
            "select_across": request.POST.get("select_across", "0"),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "media": self.media + form.media,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, UNBLOCK_TEMPLATE, context)
