"""The retention sweep (``msc3870.retention``): this server's media purged, other servers'
media deleted from the cache, by age and by last access, above a size floor; quarantined,
protected and kept (profile) media spared; objects shared by identical bytes kept.
(With SeaweedFS, PostgreSQL and celery: ``services/test_retention.py``.)"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from msc3870 import moderation, retention
from msc3870.models import Media, MediaState, ModerationRecord
from msc3870.schedule import DEFAULT_SCHEDULE
from msc3870.stores import get_store
from msc3870.thumbnails import thumbnail_keys

from .federation_helpers import Remote
from .helpers import V1_DOWNLOAD, MatrixClient, media_of, media_row, msc3870_settings, png_bytes

S = MediaState
DAY = 86400


def kept_list(uris: list[str]) -> list[str]:
    """A ``RETENTION_KEEP`` hook: media ids starting with "avatar" are profile pictures."""
    return [uri for uri in uris if uri.rsplit("/", 1)[1].startswith("avatar")]


def aged(media: Media, *, created_days: float = 0, served_days: float | None = None) -> None:
    now = timezone.now()
    Media.objects.filter(pk=media.pk).update(
        created_at=now - timedelta(days=created_days),
        last_accessed_at=None if served_days is None else now - timedelta(days=served_days),
    )


def upload(client: MatrixClient, data: bytes) -> Media:
    return media_of(client.uploaded(data, "application/octet-stream"))


def test_no_rule_set_deletes_nothing(alice: MatrixClient) -> None:
    media = upload(alice, b"old")
    aged(media, created_days=3650)
    assert retention.apply_retention() == retention.RetentionResult()
    assert media_of(media.mxc_uri).state == S.COMPLETE


def test_local_media_by_age(alice: MatrixClient) -> None:
    old, young = upload(alice, b"old one"), upload(alice, b"young one")
    aged(old, created_days=10, served_days=0)  # served today: by age it goes anyway
    aged(young, created_days=1)
    with msc3870_settings(RETENTION_LOCAL_MAX_AGE_SECONDS=5 * DAY):
        result = retention.apply_retention()
    assert result.local_purged == 1
    assert media_of(old.mxc_uri).state == S.DELETED
    assert media_of(young.mxc_uri).state == S.COMPLETE
    assert alice.download(old.mxc_uri, "?timeout_ms=0").status_code == 404
    # A purge: the bytes are gone, the tombstone and the record stay.
    assert get_store().head(old.storage_key) is None
    record = ModerationRecord.objects.get(media=old)
    assert record.actor == "retention" and "older than" in record.reason


def test_local_media_by_last_access(alice: MatrixClient) -> None:
    unused, served, never_served_old, never_served_new = (
        upload(alice, data) for data in (b"unused", b"served", b"never old", b"never new")
    )
    aged(unused, created_days=100, served_days=40)
    aged(served, created_days=100, served_days=1)
    aged(never_served_old, created_days=40)
    aged(never_served_new, created_days=1)
    with msc3870_settings(RETENTION_LOCAL_UNUSED_SECONDS=30 * DAY):
        assert retention.apply_retention().local_purged == 2
    states = {m.media_id: media_of(m.mxc_uri).state for m in (unused, served, never_served_old)}
    assert states == {
        unused.media_id: S.DELETED,
        served.media_id: S.COMPLETE,
        never_served_old.media_id: S.DELETED,
    }
    assert media_of(never_served_new.mxc_uri).state == S.COMPLETE


def test_spared_small_quarantined_protected_and_kept_media(alice: MatrixClient) -> None:
    small = upload(alice, b"tiny")
    big = upload(alice, b"x" * 500)
    held = upload(alice, b"y" * 500)
    protected = upload(alice, b"z" * 500)
    moderation.quarantine(held, by="mod", reason="look")
    moderation.protect(protected, by="mod", reason="keep")
    avatar = Media.objects.create(
        server_name="localhost",
        media_id="avatar-of-alice",
        user_id="@alice:localhost",
        state=S.COMPLETE,
        upload_method="post",
        size=600,
        storage_key=big.storage_key + ".avatar",
        unused_expires_at=timezone.now(),
    )
    for media in (small, big, held, protected, avatar):
        aged(media, created_days=100)
    with msc3870_settings(
        RETENTION_LOCAL_MAX_AGE_SECONDS=DAY,
        RETENTION_MIN_BYTES=100,
        RETENTION_KEEP="tests.test_retention.kept_list",
    ):
        assert retention.apply_retention().local_purged == 1
    assert media_of(big.mxc_uri).state == S.DELETED
    assert media_of(small.mxc_uri).state == S.COMPLETE
    assert media_of(held.mxc_uri).state == S.QUARANTINED
    assert media_of(protected.mxc_uri).state == S.COMPLETE
    assert media_of(avatar.mxc_uri).state == S.COMPLETE


def test_bytes_other_media_shares_and_thumbnails(alice: MatrixClient, bob: MatrixClient) -> None:
    image = png_bytes(64, 64)
    old = media_of(alice.uploaded(image, "image/png"))
    twin = media_of(bob.uploaded(image, "image/png"))
    assert old.storage_key == twin.storage_key
    assert alice.thumbnail(old.mxc_uri, "?width=32&height=32").status_code == 200
    made = [key for key in thumbnail_keys(old) if get_store().head(key)]
    assert made
    aged(old, created_days=10)
    with msc3870_settings(RETENTION_LOCAL_MAX_AGE_SECONDS=DAY):
        assert retention.apply_retention().local_purged == 1
    assert [key for key in made if get_store().head(key)] == []
    assert get_store().head(twin.storage_key) is not None  # the twin still serves it
    assert bob.download(twin.mxc_uri).status_code == 200


@pytest.mark.usefixtures("fetching_remote_media")
def test_remote_media_by_age_and_by_last_access(alice: MatrixClient, remote: Remote) -> None:
    for name in ("old", "unused", "served", "small", "protected"):
        remote.files[name] = ((b"s" if name == "small" else name.encode()) * 100, "text/plain")
        assert alice.get(V1_DOWNLOAD + f"{remote.name}/{name}").status_code == 200
    rows = {name: media_row(remote.name, name) for name in remote.files}
    moderation.protect(rows["protected"], by="mod", reason="keep")
    aged(rows["old"], created_days=20, served_days=0)
    aged(rows["unused"], created_days=5, served_days=4)
    aged(rows["served"], created_days=5, served_days=0)
    aged(rows["small"], created_days=20, served_days=10)
    aged(rows["protected"], created_days=20, served_days=10)
    with msc3870_settings(
        RETENTION_REMOTE_MAX_AGE_SECONDS=10 * DAY,
        RETENTION_REMOTE_UNUSED_SECONDS=2 * DAY,
        RETENTION_MIN_BYTES=150,
    ):
        result = retention.apply_retention()
    assert result.remote_deleted == 2 and result.local_purged == 0
    held = set(Media.objects.filter(server_name=remote.name).values_list("media_id", flat=True))
    assert held == {"served", "small", "protected"}
    assert get_store().head(rows["old"].storage_key) is None
    # Deleted from the cache, not refused: the next request fetches it again.
    hits = remote.fed_hits()
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/old").status_code == 200
    assert remote.fed_hits() == hits + 1


def test_each_run_is_bounded(alice: MatrixClient, monkeypatch: pytest.MonkeyPatch) -> None:
    for index in range(5):
        aged(upload(alice, b"old %d" % index), created_days=10)
    monkeypatch.setattr(retention, "RUN_LIMIT", 2)
    with msc3870_settings(RETENTION_LOCAL_MAX_AGE_SECONDS=DAY):
        assert retention.apply_retention_run().local_purged == 2
        assert retention.apply_retention_run().local_purged == 2
        assert retention.apply_retention_run().local_purged == 1


def test_the_retention_sweep_is_scheduled() -> None:
    from mediarepo.celery import app as celery_app

    assert ("msc3870.apply_retention", 600.0) in DEFAULT_SCHEDULE.values()
    assert "msc3870.apply_retention" in celery_app.tasks
