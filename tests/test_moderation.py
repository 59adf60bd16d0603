"""Moderator actions, through the services and through the admin."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import User
from django.test import Client

from msc3870 import lifecycle, moderation
from msc3870.models import (
    AppendOnlyError,
    Media,
    MediaState,
    ModerationAction,
    ModerationRecord,
)

from .helpers import MatrixClient, media_files, media_of, mxc_path

S = MediaState


def test_quarantine_approve_reject_purge(alice: MatrixClient) -> None:
    media = media_of(alice.uploaded())
    assert moderation.quarantine(media, by="@mod:localhost")
    assert not moderation.quarantine(media, by="@mod:localhost")  # already
    assert media_files() == [media.storage_key]  # bytes kept
    assert moderation.approve(media, by="@mod:localhost")
    assert moderation.reject(media, by="@mod:localhost", reason="spam")
    assert media_files() == []
    # The uploader is told it was a moderator, not the moderator's notes.
    assert media_of(media.mxc_uri).rejection_reason == "Rejected by a moderator"
    assert moderation.purge(media, by="@mod:localhost")
    assert not moderation.purge(media, by="@mod:localhost")
    assert Media.objects.get(pk=media.pk).state == S.DELETED


def test_admin_actions_and_listing(alice: MatrixClient) -> None:
    first = media_of(alice.uploaded(b"one"))
    second = media_of(alice.uploaded(b"two"))
    User.objects.create_superuser("mod", "mod@example.com", "pw")
    admin = Client()
    admin.login(username="mod", password="pw")
    listing = admin.get("/admin/msc3870/media/")
    assert listing.status_code == 200
    assert first.media_id.encode() in listing.content
    response = admin.post(
        "/admin/msc3870/media/",
        {
            "action": "quarantine_media",
            "_selected_action": [first.pk, second.pk],
            "confirmed": "yes",
            "reason": "reported",
        },
        follow=True,
    )
    assert response.status_code == 200
    assert set(Media.objects.values_list("state", flat=True)) == {S.QUARANTINED}
    assert (
        alice.get(f"/_matrix/client/v1/media/download/{mxc_path(first.mxc_uri)}").status_code == 404
    )
    admin.post(
        "/admin/msc3870/media/",
        {
            "action": "purge_media",
            "_selected_action": [first.pk],
            "confirmed": "yes",
            "reason": "spam",
        },
    )
    assert Media.objects.get(pk=first.pk).state == S.DELETED
    assert Media.objects.get(pk=first.pk).moderated_by == "mod"
    assert media_files() == [second.storage_key]


# The audit trail, written by the domain layer whatever calls it


def states_of(records: Any) -> list[tuple[str, str, str]]:
    return [(r.action, r.state_before, r.state_after) for r in records.order_by("pk")]


def test_every_won_transition_is_recorded_once(alice: MatrixClient) -> None:
    media = media_of(alice.uploaded())
    assert moderation.quarantine(media, by="@mod:localhost", reason="reported")
    assert not moderation.quarantine(media, by="@other:localhost", reason="late")  # lost
    assert moderation.approve(media, by="@mod:localhost")
    assert moderation.reject(media, by="@mod:localhost", reason="spam")
    assert not moderation.approve(media, by="@mod:localhost")  # not quarantined: lost
    assert moderation.purge(media, by="@admin:localhost", reason="tidy")
    assert not moderation.purge(media, by="@admin:localhost", reason="again")

    records = ModerationRecord.objects.filter(media=media)
    assert states_of(records) == [
        (ModerationAction.QUARANTINE, S.COMPLETE, S.QUARANTINED),
        (ModerationAction.APPROVE, S.QUARANTINED, S.COMPLETE),
        (ModerationAction.REJECT, S.COMPLETE, S.REJECTED),
        (ModerationAction.PURGE, S.REJECTED, S.DELETED),
    ]
    assert [(r.actor, r.reason) for r in records.order_by("pk")] == [
        ("@mod:localhost", "reported"),
        ("@mod:localhost", ""),
        ("@mod:localhost", "spam"),
        ("@admin:localhost", "tidy"),
    ]
    final = Media.objects.get(pk=media.pk)
    assert records.order_by("pk").last().at == final.state_changed_at
    assert all(r.mxc_uri == media.mxc_uri for r in records)


def test_purge_records_the_state_it_actually_left(alice: MatrixClient) -> None:
    pending = Media.objects.get(pk=media_of(alice.create()["content_uri"]).pk)
    assert moderation.purge(pending, by="mod", reason="unused")
    record = ModerationRecord.objects.get(media=pending)
    assert (record.state_before, record.state_after) == (S.PENDING, S.DELETED)


def test_a_transition_lost_to_a_concurrent_change_is_not_recorded(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    media = media_of(alice.uploaded())
    assert moderation.quarantine(media, by="first-mod")
    real_transition = lifecycle.transition

    def another_moderator_approves_first(*args: Any, **kwargs: Any) -> bool:
        # Forces the interleaving: the row changes between our read and our update.
        monkeypatch.setattr(lifecycle, "transition", real_transition)
        assert moderation.approve(Media.objects.get(pk=media.pk), by="second-mod")
        return real_transition(*args, **kwargs)

    monkeypatch.setattr(lifecycle, "transition", another_moderator_approves_first)
    assert not moderation.approve(media, by="third-mod")
    assert Media.objects.get(pk=media.pk).state == S.COMPLETE
    assert list(ModerationRecord.objects.order_by("pk").values_list("actor", "state_before")) == [
        ("first-mod", S.COMPLETE),
        ("second-mod", S.QUARANTINED),
    ]


def test_purge_racing_a_state_change_records_the_state_it_won_from(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    media = media_of(alice.uploaded())
    real_transition = lifecycle.transition

    def quarantined_meanwhile(*args: Any, **kwargs: Any) -> bool:
        monkeypatch.setattr(lifecycle, "transition", real_transition)
        assert moderation.quarantine(Media.objects.get(pk=media.pk), by="quick-mod")
        return real_transition(*args, **kwargs)

    monkeypatch.setattr(lifecycle, "transition", quarantined_meanwhile)
    assert moderation.purge(media, by="slow-mod", reason="gone")
    record = ModerationRecord.objects.get(actor="slow-mod")
    assert (record.state_before, record.state_after) == (S.QUARANTINED, S.DELETED)


def test_records_are_append_only(alice: MatrixClient) -> None:
    media = media_of(alice.uploaded())
    assert moderation.quarantine(media, by="mod", reason="original")
    record = ModerationRecord.objects.get()
    record.reason = "rewritten"
    with pytest.raises(AppendOnlyError):
        record.save()
    with pytest.raises(AppendOnlyError):
        record.delete()
    with pytest.raises(AppendOnlyError):
        ModerationRecord.objects.all().delete()
    assert ModerationRecord.objects.get().reason == "original"


def test_records_outlive_the_tombstone(alice: MatrixClient) -> None:
    media = media_of(alice.uploaded())
    assert moderation.purge(media, by="mod", reason="gone")
    Media.objects.filter(pk=media.pk).delete()  # what the old-tombstone sweep does
    record = ModerationRecord.objects.get()
    assert record.media is None
    assert (record.mxc_uri, record.actor, record.reason) == (media.mxc_uri, "mod", "gone")


def test_a_django_user_gets_an_admin_log_entry(alice: MatrixClient) -> None:
    media = media_of(alice.uploaded())
    user = User.objects.create_user("staff-mod", is_staff=True)
    assert moderation.quarantine(media, by=user, reason="reported")
    record = ModerationRecord.objects.get()
    assert record.actor == "staff-mod"
    entry = LogEntry.objects.get(user=user)
    assert entry.get_edited_object() == Media.objects.get(pk=media.pk)
    assert "reported" in entry.change_message
    assert "quarantined" in entry.change_message

    assert moderation.approve(media, by="@matrix-admin:localhost")
    assert LogEntry.objects.count() == 1  # no Django user to log against


def test_a_failed_record_undoes_the_transition(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    media = media_of(alice.uploaded())

    def broken_create(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("database went away")

    monkeypatch.setattr(ModerationRecord.objects, "create", broken_create)
    with pytest.raises(RuntimeError):
        moderation.purge(media, by="mod", reason="gone")
    # A change nobody can account for is worse than no change.
    assert Media.objects.get(pk=media.pk).state == S.COMPLETE
