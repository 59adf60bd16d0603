"""Moderation actions as the console offers them, on one media or many: on the list (a
selection, or every row a filter shows) and as buttons on a media's page.

Every action needs ``msc3870.moderate_media``, checked again when it runs (a hand-made
POST does not rely on the page having hidden it), and asks for a reason on a confirmation
page first. It then calls ``msc3870.moderation``, which changes each media with a
compare-and-set and records each change it won: the console changes no media itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponseBase, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse

from .. import moderation
from ..models import Media, MediaState, ModerationAction
from .listing import preview_cell

S = MediaState
A = ModerationAction

MODERATE_PERMISSION = "msc3870.moderate_media"
CONFIRMATION_TEMPLATE = "admin/msc3870/media/moderation_confirmation.html"
# Media listed by name on a confirmation page; a larger selection is given as a count.
CONFIRMATION_PREVIEW_LIMIT = 100
# Media rows loaded at once while acting on a large selection.
ACTION_BATCHES = moderation.Batches(size=500)
# Actions that read each selected item's bytes in the request (re-screening, hashing
# content) take at most this many items; the management commands take any number.
READING_LIMIT = 100
# Uploaders whose media one action quarantines at most.
UPLOADER_LIMIT = 100
# Hidden field of a media page's buttons: come back to that page afterwards.
RETURN_TO_ITEM = "_return_to_item"

Messages = list[tuple[int, str]]
Run = Callable[[QuerySet[Media], Any, str], Messages]


@dataclass(frozen=True)
class Scope:
    """What an action will reach beyond the selection itself, for the confirmation page;
    ``refusal``: why it will not run on this selection."""

    lines: list[str] = field(default_factory=list)
    refusal: str = ""


@dataclass(frozen=True)
class Operation:
    """One moderation action as the console offers it."""

    name: str  # the admin action's name
    label: str  # imperative: the confirmation page's title and button
    description: str  # the list's action menu
    verb: str  # past tense
    consequence: str  # what the confirmation page warns of
    applies: Callable[[Media], bool]  # whether a media's page offers it
    run: Run
    scope: Callable[[QuerySet[Media]], Scope] = lambda queryset: Scope()
    #: Undoes nothing and deletes bytes: the button says so.
    destructive: bool = False


class ModerationReasonForm(forms.Form):
    reason = forms.CharField(
        max_length=1000,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Kept in the audit trail; not shown to the uploader.",
    )


def _bulk(kind: ModerationAction, verb: str) -> Run:
    def run(queryset: QuerySet[Media], user: Any, reason: str) -> Messages:
        # One compare-and-set and one record per row (a bulk update() would skip them), a
        # batch of rows at a time read by primary key: rows leaving a filtered list as
        # they are acted on are neither skipped nor repeated, and no list of the whole
        # selection is held.
        result = moderation.moderate_many(
            queryset, kind, by=user, reason=reason, batches=ACTION_BATCHES
        )
        said: Messages = [(messages.SUCCESS, f"{verb} {result.done} media.")]
        if result.skipped:
            said.append((messages.WARNING, f"{result.skipped} were not in a state that allows it."))
        return said

    return run


def _in_states(kind: ModerationAction) -> Callable[[Media], bool]:
    return lambda media: media.state in moderation.SOURCE_STATES[kind]


def _rescreen(queryset: QuerySet[Media], user: Any, reason: str) -> Messages:
    result = moderation.rescreen_many(queryset, by=user, reason=reason)
    said = ", ".join(f"{count} {outcome}" for outcome, count in sorted(result.counts.items()))
    level = messages.WARNING if result["failed"] or result["missing"] else messages.SUCCESS
    return [(level, f"Re-screened: {said or 'nothing to re-screen'}.")]


def _at_most(what: str) -> Callable[[QuerySet[Media]], Scope]:
    def scope(queryset: QuerySet[Media]) -> Scope:
        limit = READING_LIMIT
        if queryset.order_by()[: limit + 1].count() > limit:
            return Scope(
                refusal=f"{what} reads each item's bytes here: select at most {limit} "
                "(the management commands take any number)."
            )
        return Scope()

    return scope


def selected_uploaders(queryset: QuerySet[Media]) -> list[str]:
    """The uploaders of the selection, ``UPLOADER_LIMIT + 1`` at most (other servers'
    media has none)."""
    uploaders = queryset.exclude(user_id="").order_by().values_list("user_id", flat=True)
    return sorted(uploaders.distinct()[: UPLOADER_LIMIT + 1])


def _uploaders_scope(queryset: QuerySet[Media]) -> Scope:
    uploaders = selected_uploaders(queryset)
    if not uploaders:
        return Scope(refusal="The selection has no uploader of this server.")
    if len(uploaders) > UPLOADER_LIMIT:
        return Scope(refusal=f"The selection has more than {UPLOADER_LIMIT} uploaders.")
    lines = []
    for user_id in uploaders:
        served = Media.objects.filter(user_id=user_id, state=S.COMPLETE, protected=False)
        count = served[:10001].count()
        shown = "more than 10000" if count > 10000 else str(count)
        lines.append(f"{user_id}: {shown} media served now, not protected")
    return Scope(lines=lines)


def _quarantine_uploaders(queryset: QuerySet[Media], user: Any, reason: str) -> Messages:
    uploaders = selected_uploaders(queryset)[:UPLOADER_LIMIT]
    done = sum(
        moderation.quarantine_user_media(user_id, by=user, reason=reason, batches=ACTION_BATCHES)
        for user_id in uploaders
    )
    return [(messages.SUCCESS, f"Quarantined {done} media of {len(uploaders)} uploader(s).")]


def _content_scope(queryset: QuerySet[Media]) -> Scope:
    limited = _at_most("Blocking content")(queryset)
    if limited.refusal:
        return limited
    hashes = sorted(
        set(queryset.exclude(sha256="").order_by().values_list("sha256", flat=True)[:READING_LIMIT])
    )
    lines = [f"SHA-256 {sha256}" for sha256 in hashes]
    unhashed = queryset.filter(sha256="").order_by()[:READING_LIMIT].count()
    if unhashed:
        lines.append(f"{unhashed} item(s) whose bytes are hashed first")
    return Scope(lines=lines)


def _quarantine_content(queryset: QuerySet[Media], user: Any, reason: str) -> Messages:
    hashes: set[str] = set()
    quarantined = gone = 0
    for media in queryset.order_by("pk")[:READING_LIMIT]:
        sha256 = moderation.content_sha256(media)
        if sha256 is None:
            gone += 1
        elif sha256 not in hashes:
            hashes.add(sha256)
            quarantined += moderation.quarantine_content(
                sha256, by=user, reason=reason, batches=ACTION_BATCHES
            )
    said: Messages = [
        (
            messages.SUCCESS,
            f"{len(hashes)} content hash(es) on the block list; quarantined {quarantined} "
            "media with these bytes.",
        )
    ]
    if gone:
        said.append(
            (messages.WARNING, f"{gone} had no bytes left and no recorded hash: not blocked.")
        )
    return said


def _has_bytes(media: Media) -> bool:
    return bool(media.sha256) or (bool(media.storage_key) and media.objects_deleted_at is None)


QUARANTINE = Operation(
    "quarantine_media",
    "Quarantine",
    "Quarantine (stop serving, keep bytes)",
    "Quarantined",
    "They stop being served on every path at once; their bytes are kept so they can be "
    "approved again.",
    _in_states(A.QUARANTINE),
    _bulk(A.QUARANTINE, "Quarantined"),
)
APPROVE = Operation(
    "approve_media",
    "Approve",
    "Approve (serve quarantined media again)",
    "Approved",
    "Quarantined media is served again.",
    _in_states(A.APPROVE),
    _bulk(A.APPROVE, "Approved"),
)
REJECT = Operation(
    "reject_media",
    "Reject",
    "Reject (stop serving, delete bytes)",
    "Rejected",
    "They stop being served for good and their bytes are deleted. Uploads of the same "
    "content are refused from now on.",
    _in_states(A.REJECT),
    _bulk(A.REJECT, "Rejected"),
    destructive=True,
)
PURGE = Operation(
    "purge_media",
    "Purge",
    "Purge (delete bytes, keep a tombstone)",
    "Purged",
    "Their bytes are deleted, in any state; only a tombstone row stays, so the ids are "
    "never reused. This cannot be undone.",
    _in_states(A.PURGE),
    _bulk(A.PURGE, "Purged"),
    destructive=True,
)
PROTECT = Operation(
    "protect_media",
    "Protect",
    "Protect (safe from quarantine by uploader or content)",
    "Protected",
    "Quarantine by uploader, by content and deletion by date skip them; a moderator can "
    "still act on each by itself.",
    lambda media: not media.protected and _in_states(A.PROTECT)(media),
    _bulk(A.PROTECT, "Protected"),
)
UNPROTECT = Operation(
    "unprotect_media",
    "Unprotect",
    "Unprotect",
    "Unprotected",
    "Quarantine by uploader, by content and deletion by date reach them again.",
    lambda media: media.protected and _in_states(A.UNPROTECT)(media),
    _bulk(A.UNPROTECT, "Unprotected"),
)
RESCREEN = Operation(
    "rescreen_media",
    "Re-screen",
    "Re-screen (run the checks again)",
    "Re-screened",
    "The checks run again on the stored bytes of complete media: a refusal quarantines "
    "it (protected or not), a pass is recorded.",
    _in_states(A.RESCREEN),
    _rescreen,
    _at_most("Re-screening"),
)
QUARANTINE_UPLOADERS = Operation(
    "quarantine_uploaders_media",
    "Quarantine everything of the uploader",
    "Quarantine everything of these uploaders",
    "Quarantined",
    "Every media these users uploaded that is served now is quarantined, not only the "
    "selection; protected media is skipped.",
    lambda media: bool(media.user_id),
    _quarantine_uploaders,
    _uploaders_scope,
)
QUARANTINE_CONTENT = Operation(
    "quarantine_content",
    "Quarantine these bytes and block them",
    "Quarantine every item with these bytes and block the hash",
    "Quarantined",
    "Their SHA-256 goes on the block list (uploads and fetches of these bytes are refused "
    "from now on, kept or not), and every served item with these bytes, local or remote, "
    "is quarantined; protected media is skipped.",
    _has_bytes,
    _quarantine_content,
    _content_scope,
)
OPERATIONS = (
    QUARANTINE,
    APPROVE,
    REJECT,
    PURGE,
    PROTECT,
    UNPROTECT,
    RESCREEN,
    QUARANTINE_UPLOADERS,
    QUARANTINE_CONTENT,
)


def confirm_then_run(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    queryset: QuerySet[Media],
    operation: Operation,
) -> HttpResponseBase | None:
    """Show the confirmation page; act once it comes back with a reason. None: back to
    the list."""
    if not request.user.has_perm(MODERATE_PERMISSION):
        raise PermissionDenied
    scope = operation.scope(queryset)
    if scope.refusal:
        modeladmin.message_user(request, scope.refusal, messages.ERROR)
        return None
    if "confirmed" not in request.POST:
        form = ModerationReasonForm()
    else:
        form = ModerationReasonForm(request.POST)
        if form.is_valid():
            return _run(modeladmin, request, queryset, operation, form.cleaned_data["reason"])
    context = _confirmation_context(modeladmin, request, queryset, operation, scope, form)
    request.current_app = modeladmin.admin_site.name
    return TemplateResponse(request, CONFIRMATION_TEMPLATE, context)


def _run(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    queryset: QuerySet[Media],
    operation: Operation,
    reason: str,
) -> HttpResponseBase | None:
    """Act, say what was done, and go back: to the media's page if the action was one of
    its buttons, else (None) to the list."""
    for level, text in operation.run(queryset, request.user, reason):
        modeladmin.message_user(request, text, level)
    selected = request.POST.getlist(helpers.ACTION_CHECKBOX_NAME)
    if request.POST.get(RETURN_TO_ITEM) and len(selected) == 1 and selected[0].isdigit():
        # Back to the page the button was on (a fixed admin URL: no open redirect).
        return HttpResponseRedirect(reverse("admin:msc3870_media_change", args=[selected[0]]))
    return None


def _confirmation_context(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    queryset: QuerySet[Media],
    operation: Operation,
    scope: Scope,
    form: ModerationReasonForm,
) -> dict[str, Any]:
    """What the confirmation page shows, and the selection it posts back."""
    select_across = request.POST.get("select_across", "0")
    selected = request.POST.getlist(helpers.ACTION_CHECKBOX_NAME)
    return {
        **modeladmin.admin_site.each_context(request),
        "title": f"{operation.label}: are you sure?",
        "opts": modeladmin.model._meta,
        "operation": operation,
        "scope": scope,
        "form": form,
        "preview": [
            (media, preview_cell(media)) for media in queryset[:CONFIRMATION_PREVIEW_LIMIT]
        ],
        # The exact number a moderator is about to act on, counted once here.
        "selected_count": queryset.count(),
        "select_across": select_across,
        # Without select_across, every selected id travels back (at most a page of
        # them), not only those listed.
        "selected_ids": [] if select_across == "1" else selected,
        "return_to_item": request.POST.get(RETURN_TO_ITEM, ""),
        "return_to_item_name": RETURN_TO_ITEM,
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "media": modeladmin.media + form.media,
    }


def admin_action(operation: Operation) -> Callable[..., HttpResponseBase | None]:
    """The ModelAdmin action for ``operation``, shown to moderators only."""

    def action(
        modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Media]
    ) -> HttpResponseBase | None:
        return confirm_then_run(modeladmin, request, queryset, operation)

    action.__name__ = operation.name
    return admin.action(description=operation.description, permissions=["moderate"])(action)
