"""Moderator actions, through the services and through the admin."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client

from msc3870 import moderation
from msc3870.models import Media, MediaState

from .conftest import MatrixClient, files_under, media_of, mxc_path

S = MediaState


def upload(client: MatrixClient, data: bytes = b"content") -> Media:
    response = client.post("/_matrix/media/v3/upload", data, "text/plain")
    return media_of(response.json()["content_uri"])


def test_quarantine_approve_reject_purge(alice: MatrixClient) -> None:
    media = upload(alice)
    assert moderation.quarantine(media, by="@mod:localhost")
    assert not moderation.quarantine(media, by="@mod:localhost")  # already
    assert files_under(Path(settings.MEDIA_DIR)) == [media.storage_key]  # bytes kept
    assert moderation.approve(media, by="@mod:localhost")
    assert moderation.reject(media, by="@mod:localhost", reason="spam")
    assert files_under(Path(settings.MEDIA_DIR)) == []
    assert media_of(media.mxc_uri).rejection_reason == "spam"
    assert moderation.purge(media, by="@mod:localhost")
    assert not moderation.purge(media, by="@mod:localhost")
    assert Media.objects.get(pk=media.pk).state == S.DELETED


def test_admin_actions_and_listing(alice: MatrixClient) -> None:
    first = upload(alice, b"one")
    second = upload(alice, b"two")
    User.objects.create_superuser("mod", "mod@example.com", "pw")
    admin = Client()
    admin.login(username="mod", password="pw")
    listing = admin.get("/admin/msc3870/media/")
    assert listing.status_code == 200
    assert first.media_id.encode() in listing.content
    response = admin.post(
        "/admin/msc3870/media/",
        {"action": "quarantine_media", "_selected_action": [first.pk, second.pk]},
        follow=True,
    )
    assert response.status_code == 200
    assert set(Media.objects.values_list("state", flat=True)) == {S.QUARANTINED}
    assert (
        alice.get(f"/_matrix/client/v1/media/download/{mxc_path(first.mxc_uri)}").status_code == 404
    )
    admin.post("/admin/msc3870/media/", {"action": "purge_media", "_selected_action": [first.pk]})
    assert Media.objects.get(pk=first.pk).state == S.DELETED
    assert Media.objects.get(pk=first.pk).moderated_by == "mod"
    assert files_under(Path(settings.MEDIA_DIR)) == [second.storage_key]
