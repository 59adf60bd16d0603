"""Moderation through the admin: who may act, the confirmation page, the audit trail."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth.models import Group, Permission, User
from django.test import Client
from django.utils import timezone
from django.utils.http import urlencode

import msc3870.admin.actions
from msc3870 import moderation
from msc3870.models import Media, MediaState, ModerationAction, ModerationRecord

from .helpers import MatrixClient, media_of

S = MediaState
CHANGELIST = "/admin/msc3870/media/"
RECORDS = "/admin/msc3870/moderationrecord/"
CONFIRMATION_TEMPLATE = "admin/msc3870/media/moderation_confirmation.html"
ALL_ACTIONS = ("quarantine_media", "approve_media", "reject_media", "purge_media")
DESTRUCTIVE_ACTIONS = ("quarantine_media", "reject_media", "purge_media")


def staff_client(username: str, *, permissions: tuple[str, ...] = (), group: str = "") -> Client:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    for codename in permissions:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    if group:
        user.groups.add(Group.objects.get(name=group))
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def viewer(db: None) -> Client:
    return staff_client("viewer", permissions=("view_media",))


@pytest.fixture
def moderator(db: None) -> Client:
    return staff_client("mod", group="Moderators")


@pytest.fixture
def superuser(db: None) -> Client:
    user = User.objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


def run_action(client: Client, action: str, media: list[Media], **fields: str) -> object:
    return client.post(
        CHANGELIST, {"action": action, "_selected_action": [m.pk for m in media], **fields}
    )


def offered_actions(changelist: Any) -> set[str]:
    action_form = changelist.context["action_form"]  # None when no action is offered at all
    if action_form is None:
        return set()
    return {name for name, _label in action_form.fields["action"].choices if name}


def confirm(client: Client, action: str, media: list[Media], reason: str) -> object:
    return run_action(client, action, media, confirmed="yes", reason=reason)


# Who may moderate


def test_moderators_group_holds_view_and_moderate_permissions_only(db: None) -> None:
    group = Group.objects.get(name="Moderators")
    assert set(group.permissions.values_list("content_type__app_label", "codename")) == {
        ("msc3870", "view_media"),
        ("msc3870", "moderate_media"),
        ("msc3870", "view_moderationrecord"),
        ("msc3870", "view_blockedhash"),
    }


def test_view_only_staff_is_not_offered_any_action(viewer: Client, alice: MatrixClient) -> None:
    media_of(alice.uploaded())
    listing = viewer.get(CHANGELIST)
    assert listing.status_code == 200
    assert offered_actions(listing).isdisjoint(ALL_ACTIONS)


@pytest.mark.parametrize("action", ALL_ACTIONS)
def test_view_only_staff_cannot_run_any_action(
    viewer: Client, alice: MatrixClient, action: str
) -> None:
    served = media_of(alice.uploaded(b"served"))
    held = media_of(alice.uploaded(b"held"))
    assert moderation.quarantine(held, by="setup")
    before = {m.pk: m.state for m in Media.objects.all()}

    # Straight to the confirmed form, as a hand-made POST would.
    response = confirm(viewer, action, [served, held], reason="because")

    assert response.status_code in (200, 302, 403)
    assert {m.pk: m.state for m in Media.objects.all()} == before
    assert not ModerationRecord.objects.filter(actor="viewer").exists()


def test_staff_with_change_but_not_moderate_permission_cannot_purge(
    db: None, alice: MatrixClient
) -> None:
    editor = staff_client("editor", permissions=("view_media", "change_media"))
    media = media_of(alice.uploaded())
    confirm(editor, "purge_media", [media], reason="because")
    assert Media.objects.get(pk=media.pk).state == S.COMPLETE


def test_moderator_is_offered_every_action(moderator: Client, alice: MatrixClient) -> None:
    media_of(alice.uploaded())
    listing = moderator.get(CHANGELIST)
    offered = offered_actions(listing)
    assert set(ALL_ACTIONS) <= offered
    assert "delete_selected" not in offered  # rows are tombstones, never deleted


def test_moderator_approves_with_a_reason(moderator: Client, alice: MatrixClient) -> None:
    media = media_of(alice.uploaded())
    assert moderation.quarantine(media, by="setup", reason="looked odd")
    # Every action, approving too, asks for a reason first.
    response = run_action(moderator, "approve_media", [media])
    assert CONFIRMATION_TEMPLATE in [t.name for t in response.templates]
    assert Media.objects.get(pk=media.pk).state == S.QUARANTINED
    response = confirm(moderator, "approve_media", [media], reason="a meme, not abuse")
    assert response.status_code == 302
    assert Media.objects.get(pk=media.pk).state == S.COMPLETE
    record = ModerationRecord.objects.get(media=media, action=ModerationAction.APPROVE)
    assert (record.actor, record.state_before, record.state_after, record.reason) == (
        "mod",
        S.QUARANTINED,
        S.COMPLETE,
        "a meme, not abuse",
    )


# Destructive actions: a confirmation page and a reason


@pytest.mark.parametrize("action", DESTRUCTIVE_ACTIONS)
def test_destructive_action_shows_a_confirmation_page_first(
    moderator: Client, alice: MatrixClient, action: str
) -> None:
    media = media_of(alice.uploaded())
    response = run_action(moderator, action, [media])
    assert response.status_code == 200
    assert CONFIRMATION_TEMPLATE in [t.name for t in response.templates]
    page = response.content.decode()
    assert media.mxc_uri in page
    assert 'name="reason"' in page
    assert f'value="{action}"' in page
    assert Media.objects.get(pk=media.pk).state == S.COMPLETE
    assert not ModerationRecord.objects.exists()


@pytest.mark.parametrize("reason", ["", "   "])
def test_confirmation_without_a_reason_is_refused(
    moderator: Client, alice: MatrixClient, reason: str
) -> None:
    media = media_of(alice.uploaded())
    response = confirm(moderator, "purge_media", [media], reason=reason)
    assert response.status_code == 200
    assert CONFIRMATION_TEMPLATE in [t.name for t in response.templates]
    assert response.context["form"].errors["reason"]
    assert Media.objects.get(pk=media.pk).state == S.COMPLETE
    assert not ModerationRecord.objects.exists()


def test_confirmed_purge_records_who_what_why_and_the_states(
    moderator: Client, alice: MatrixClient
) -> None:
    first = media_of(alice.uploaded(b"one"))
    second = media_of(alice.uploaded(b"two"))
    assert moderation.quarantine(second, by="setup", reason="reported")
    started = timezone.now()

    response = confirm(moderator, "purge_media", [first, second], reason="illegal content")

    assert response.status_code == 302
    assert set(Media.objects.values_list("state", flat=True)) == {S.DELETED}
    records = ModerationRecord.objects.filter(action=ModerationAction.PURGE)
    assert {(r.media_id, r.state_before, r.state_after) for r in records} == {
        (first.pk, S.COMPLETE, S.DELETED),
        (second.pk, S.QUARANTINED, S.DELETED),
    }
    for record in records:
        assert record.actor == "mod"
        assert record.reason == "illegal content"
        assert record.at >= started
        assert record.mxc_uri == Media.objects.get(pk=record.media_id).mxc_uri
    entries = LogEntry.objects.filter(user__username="mod", action_flag=CHANGE)
    assert {int(e.object_id) for e in entries} == {first.pk, second.pk}
    assert all("illegal content" in e.change_message for e in entries)


def test_confirmation_across_all_selected_media(
    moderator: Client, alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three rows, two batches.
    monkeypatch.setattr(msc3870.admin.actions, "ACTION_BATCHES", moderation.Batches(size=2))
    media = [media_of(alice.uploaded(bytes([n]))) for n in range(4)]
    assert moderation.quarantine(media[3], by="setup")
    # "Select all" on a filtered list: the page posts one checkbox and select_across; the
    # action takes every row the filter shows, and the confirmation posts back to the
    # same filtered URL.
    filtered = f"{CHANGELIST}?state__exact=complete"
    selection = {"action": "quarantine_media", "_selected_action": [media[0].pk]}
    response = moderator.post(filtered, {**selection, "select_across": "1"})
    assert response.status_code == 200
    assert response.context["selected_count"] == 3
    response = moderator.post(
        filtered,
        {**selection, "select_across": "1", "confirmed": "yes", "reason": "raid"},
        follow=True,
    )
    assert set(Media.objects.values_list("state", flat=True)) == {S.QUARANTINED}
    assert ModerationRecord.objects.filter(reason="raid").count() == 3
    # Counted before acting: the rows acted on have left the filter by then.
    assert [str(m) for m in response.context["messages"]] == ["Quarantined 3 media."]


def test_uploader_is_not_told_the_moderators_reason(moderator: Client, alice: MatrixClient) -> None:
    media = media_of(alice.uploaded())
    confirm(moderator, "reject_media", [media], reason="reported by @bob in #room")
    rejected = Media.objects.get(pk=media.pk)
    assert rejected.state == S.REJECTED
    assert "@bob" not in rejected.rejection_reason
    assert ModerationRecord.objects.get(media=media).reason == "reported by @bob in #room"


# The audit trail in the admin


def test_records_are_shown_on_the_media_page(moderator: Client, alice: MatrixClient) -> None:
    media = media_of(alice.uploaded())
    confirm(moderator, "quarantine_media", [media], reason="first look")
    confirm(moderator, "approve_media", [media], reason="second look")
    page = moderator.get(f"{CHANGELIST}{media.pk}/change/")
    assert page.status_code == 200
    text = page.content.decode()
    assert "first look" in text
    # Both actions are there: an earlier record is not overwritten by the next.
    assert ModerationRecord.objects.filter(media=media).count() == 2
    assert f"{RECORDS}?media__id__exact={media.pk}" in text


def test_records_list_filters_by_action_actor_and_date(
    superuser: Client, alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    quarantined = media_of(alice.uploaded(b"one"))
    purged = media_of(alice.uploaded(b"two"))
    # Records cannot be backdated: the first action is taken a month ago.
    a_month_ago = timezone.now() - timedelta(days=30)
    with monkeypatch.context() as patched:
        patched.setattr(timezone, "now", lambda: a_month_ago)
        assert moderation.quarantine(quarantined, by="alice-mod", reason="r1")
    assert moderation.purge(purged, by="bob-mod", reason="r2")
    assert ModerationRecord.objects.get(actor="alice-mod").at == a_month_ago

    def listed(query: str) -> set[str]:
        response = superuser.get(f"{RECORDS}?{query}")
        assert response.status_code == 200, response  # an unknown filter redirects to ?e=1
        return {record.reason for record in response.context["cl"].result_list}

    assert listed("") == {"r1", "r2"}
    assert listed("action__exact=purge") == {"r2"}
    assert listed("actor=alice-mod") == {"r1"}
    # What the "Today" link of the date filter asks for.
    midnight = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    assert listed(urlencode({"at__gte": str(midnight)})) == {"r2"}
    assert listed("q=" + quarantined.media_id) == {"r1"}


def test_records_cannot_be_added_changed_or_deleted_through_the_admin(
    superuser: Client, moderator: Client, alice: MatrixClient
) -> None:
    media = media_of(alice.uploaded())
    assert moderation.quarantine(media, by="mod", reason="original")
    record = ModerationRecord.objects.get()
    for client in (superuser, moderator):
        assert client.get(f"{RECORDS}add/").status_code == 403
        assert client.post(f"{RECORDS}add/", {"reason": "forged"}).status_code == 403
        client.post(f"{RECORDS}{record.pk}/change/", {"reason": "edited", "actor": "x"})
        assert client.get(f"{RECORDS}{record.pk}/delete/").status_code == 403
        assert client.post(f"{RECORDS}{record.pk}/delete/", {"post": "yes"}).status_code == 403
        client.post(RECORDS, {"action": "delete_selected", "_selected_action": [record.pk]})
        client.post(
            RECORDS,
            {"action": "delete_selected", "_selected_action": [record.pk], "post": "yes"},
        )
        listing = client.get(RECORDS)
        assert listing.status_code == 200
        assert "delete_selected" not in offered_actions(listing)
        change_page = client.get(f"{RECORDS}{record.pk}/change/")
        assert change_page.status_code == 200  # view only
        assert change_page.context["has_change_permission"] is False
    assert list(ModerationRecord.objects.values_list("pk", "reason", "actor")) == [
        (record.pk, "original", "mod")
    ]


def test_records_inline_on_the_media_page_is_read_only(
    superuser: Client, alice: MatrixClient
) -> None:
    media = media_of(alice.uploaded())
    assert moderation.quarantine(media, by="mod", reason="original")
    page = superuser.get(f"{CHANGELIST}{media.pk}/change/")
    (inline,) = [
        formset
        for formset in page.context["inline_admin_formsets"]
        if formset.opts.model is ModerationRecord
    ]
    assert not inline.has_add_permission
    assert not inline.has_change_permission
    assert not inline.has_delete_permission


# Acting from a media's own page


def test_media_page_offers_the_actions_its_state_allows_to_moderators_only(
    moderator: Client, viewer: Client, alice: MatrixClient
) -> None:
    media = media_of(alice.uploaded())
    page = moderator.get(f"{CHANGELIST}{media.pk}/change/")
    offered = {operation.name for operation in page.context["moderation_operations"]}
    # Acting on the uploader or on the bytes is offered whatever the state.
    everywhere = {"quarantine_uploaders_media", "quarantine_content"}
    assert offered == {
        "quarantine_media",
        "reject_media",
        "purge_media",
        "protect_media",
        "rescreen_media",
        *everywhere,
    }
    assert f'value="{media.pk}"' in page.content.decode()

    assert moderation.quarantine(media, by="setup")
    assert moderation.protect(media, by="setup")
    page = moderator.get(f"{CHANGELIST}{media.pk}/change/")
    offered = {operation.name for operation in page.context["moderation_operations"]}
    assert offered == {
        "approve_media",
        "reject_media",
        "purge_media",
        "unprotect_media",
        *everywhere,
    }

    page = viewer.get(f"{CHANGELIST}{media.pk}/change/")
    assert page.status_code == 200
    assert page.context["moderation_operations"] == []
    assert 'value="purge_media"' not in page.content.decode()


def test_a_button_on_the_media_page_leads_to_the_confirmation_page(
    moderator: Client, alice: MatrixClient
) -> None:
    media = media_of(alice.uploaded())
    # What the page's "Purge" button posts.
    response = moderator.post(CHANGELIST, {"action": "purge_media", "_selected_action": media.pk})
    assert CONFIRMATION_TEMPLATE in [t.name for t in response.templates]
    assert Media.objects.get(pk=media.pk).state == S.COMPLETE
