"""Retention and users' own deletions on the deployed stack: gunicorn, a celery worker,
beat, PostgreSQL and SeaweedFS. Beat runs the retention sweep (its interval set to a
second, as an operator would in the admin); the worker deletes the objects."""

from __future__ import annotations

import io
import secrets
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from msc3870 import moderation
from msc3870.models import Media, MediaState, UploadMethod
from msc3870.stores import get_store
from msc3870.thumbnails import thumbnail_keys

from ..helpers import media_of, mxc_path, png_bytes, wait_until
from .conftest import Stack, make_user_token

pytestmark = pytest.mark.services
S = MediaState
DAY = 86400


def retention_every_second() -> None:
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    from msc3870.schedule import install_default_schedule

    install_default_schedule()
    every, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
    assert PeriodicTask.objects.filter(task="msc3870.apply_retention").update(interval=every)


def aged(media: Media, *, created_days: float, served_days: float | None = None) -> None:
    now = timezone.now()
    Media.objects.filter(pk=media.pk).update(
        created_at=now - timedelta(days=created_days),
        last_accessed_at=None if served_days is None else now - timedelta(days=served_days),
    )


def cached_remote(name: str, data: bytes) -> Media:
    """Another server's media as a fetch leaves it: a COMPLETE remote row, its bytes under
    ``remote/``."""
    media = Media(
        server_name="remote.example",
        media_id=name,
        user_id="@someone:localhost",
        state=S.COMPLETE,
        upload_method=UploadMethod.REMOTE,
        size=len(data),
        content_type="application/octet-stream",
        unused_expires_at=timezone.now(),
        completed_at=timezone.now(),
    )
    media.storage_key = media.served_key
    get_store().write_stream(media.storage_key, io.BytesIO(data), max_size=len(data))
    media.save()
    return media


def test_beat_applies_every_retention_rule_on_seaweedfs(make_stack: Any) -> None:
    stack: Stack = make_stack(
        MSC3870_RETENTION_LOCAL_MAX_AGE_SECONDS=str(30 * DAY),
        MSC3870_RETENTION_LOCAL_UNUSED_SECONDS=str(7 * DAY),
        MSC3870_RETENTION_REMOTE_MAX_AGE_SECONDS=str(10 * DAY),
        MSC3870_RETENTION_REMOTE_UNUSED_SECONDS=str(DAY),
        MSC3870_RETENTION_MIN_BYTES="64",
    )
    stack.start_server(workers=1)
    stack.start_worker()
    alice = stack.client(make_user_token("@alice:localhost"))
    store = get_store()

    def upload(data: bytes, content_type: str = "application/octet-stream") -> Media:
        return media_of(alice.uploaded(data, content_type))

    old = upload(png_bytes(64, 64), "image/png")
    assert alice.thumbnail(old.mxc_uri, "?width=32&height=32").status_code == 200
    thumbnails = [key for key in thumbnail_keys(old) if store.head(key)]
    assert thumbnails
    unused = upload(secrets.token_bytes(500))
    served = upload(secrets.token_bytes(500))
    small = upload(b"small")
    protected = upload(secrets.token_bytes(500))
    moderation.protect(protected, by="mod", reason="keep")
    aged(old, created_days=40, served_days=0)  # by age, however recently served
    aged(unused, created_days=20, served_days=8)
    aged(served, created_days=20, served_days=1)
    aged(small, created_days=40)
    aged(protected, created_days=40)
    remote_old = cached_remote("old", secrets.token_bytes(300))
    remote_unused = cached_remote("unused", secrets.token_bytes(300))
    remote_served = cached_remote("served", secrets.token_bytes(300))
    aged(remote_old, created_days=11, served_days=0)
    aged(remote_unused, created_days=3, served_days=2)
    aged(remote_served, created_days=3, served_days=0)

    retention_every_second()
    stack.start_beat()

    def swept() -> bool:
        return (
            media_of(old.mxc_uri).state == S.DELETED
            and media_of(unused.mxc_uri).state == S.DELETED
            and set(
                Media.objects.filter(server_name="remote.example").values_list(
                    "media_id", flat=True
                )
            )
            == {"served"}
        )

    wait_until(swept, 60, "the retention sweep")
    for media in (old, unused):
        wait_until(
            lambda media=media: store.head(media.storage_key) is None, 30, "the objects' deletion"
        )
        assert alice.download(media.mxc_uri, "?timeout_ms=0").status_code == 404
    assert [key for key in thumbnails if store.head(key)] == []
    assert store.head(remote_old.storage_key) is None
    assert store.head(remote_unused.storage_key) is None
    for media in (served, small, protected):
        assert media_of(media.mxc_uri).state == S.COMPLETE
        assert store.head(media.storage_key) is not None
        assert alice.download(media.mxc_uri).status_code == 200
    assert store.head(remote_served.storage_key) is not None
    assert "apply_retention" in stack.tail("worker", 400)


def test_the_uploader_redacts_and_downloads_are_404_with_objects_gone(live: Stack) -> None:
    alice = live.client(make_user_token())
    bob = live.client(make_user_token())
    content_uri = alice.uploaded(png_bytes(64, 64), "image/png")
    media = media_of(content_uri)
    size = "?width=32&height=32"
    assert bob.thumbnail(content_uri, size).status_code == 200
    store = get_store()
    made = [key for key in thumbnail_keys(media) if store.head(key)]
    assert made and store.head(media.storage_key)

    refused = bob.post(f"/_matrix/client/v1/media/redact/{mxc_path(content_uri)}")
    assert refused.status_code == 403 and refused.json()["errcode"] == "M_FORBIDDEN"
    response = alice.post(f"/_matrix/client/v1/media/redact/{mxc_path(content_uri)}")
    assert response.status_code == 200 and response.json() == {}
    reads = {
        "v1 download": bob.download(content_uri, "?timeout_ms=0"),
        "legacy download": bob.download(content_uri, "?timeout_ms=0", legacy=True),
        "v1 thumbnail": bob.thumbnail(content_uri, size),
        "legacy thumbnail": bob.thumbnail(content_uri, size, legacy=True),
    }
    for name, answer in reads.items():
        assert answer.status_code == 404, name
        assert answer.json()["errcode"] == "M_NOT_FOUND", name
    # The worker deletes the bytes and the thumbnails.
    wait_until(
        lambda: store.head(media.storage_key) is None and not any(store.head(k) for k in made),
        30,
        "the objects' deletion",
    )
    assert media_of(content_uri).state == S.DELETED
