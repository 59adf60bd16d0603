"""The cache of other servers' media: when each was last served, eviction of the least
recently served past ``REMOTE_MEDIA_CACHE_MAX_BYTES``, and failed fetches that do not
linger. Other servers are real servers on 127.0.0.1 (the ``remote`` fixture)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from msc3870 import maintenance
from msc3870.models import Media, MediaState
from msc3870.schedule import DEFAULT_SCHEDULE
from msc3870.stores import get_store
from msc3870.thumbnails import thumbnail_keys

from .federation_helpers import Remote
from .helpers import V1_DOWNLOAD, V1_THUMBNAIL, MatrixClient, media_row, msc3870_settings, png_bytes

pytestmark = pytest.mark.usefixtures("fetching_remote_media")
S = MediaState


# --- last served, evicted least recently served first -----------------------------


def test_serving_remote_media_records_the_time_at_most_hourly(
    alice: MatrixClient, remote: Remote
) -> None:
    remote.files["a"] = (b"abc", "text/plain")
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/a").status_code == 200
    fetched = media_row(remote.name, "a").last_accessed_at
    assert fetched is not None and timezone.now() - fetched < timedelta(seconds=30)

    with CaptureQueriesContext(connection) as queries:
        assert alice.get(V1_DOWNLOAD + f"{remote.name}/a").status_code == 200
    assert not [q for q in queries.captured_queries if q["sql"].startswith("UPDATE")]

    two_hours_ago = timezone.now() - timedelta(hours=2)
    Media.objects.filter(pk=media_row(remote.name, "a").pk).update(last_accessed_at=two_hours_ago)
    with CaptureQueriesContext(connection) as queries:
        assert alice.get(V1_DOWNLOAD + f"{remote.name}/a").status_code == 200
    updates = [q for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
    assert len(updates) == 1
    assert media_row(remote.name, "a").last_accessed_at > two_hours_ago + timedelta(hours=1)

    # Local media the same way (deletion by date spares what is still served).
    uploaded = alice.post("/_matrix/media/v3/upload", b"ours", content_type="text/plain")
    local_id = uploaded.json()["content_uri"].rsplit("/", 1)[1]
    assert media_row("localhost", local_id).last_accessed_at is None
    assert alice.get(V1_DOWNLOAD + f"localhost/{local_id}").status_code == 200
    served = media_row("localhost", local_id).last_accessed_at
    assert served is not None and timezone.now() - served < timedelta(seconds=30)
    with CaptureQueriesContext(connection) as queries:
        assert alice.get(V1_DOWNLOAD + f"localhost/{local_id}").status_code == 200
    assert not [q for q in queries.captured_queries if q["sql"].startswith("UPDATE")]


def _fetch_all(alice: MatrixClient, remote: Remote, names: list[str], size: int) -> None:
    for index, name in enumerate(names):
        remote.files[name] = (bytes([65 + index]) * size, "text/plain")
        assert alice.get(V1_DOWNLOAD + f"{remote.name}/{name}").status_code == 200
    # Served in this order, an hour apart.
    start = timezone.now() - timedelta(hours=len(names) + 1)
    for index, name in enumerate(names):
        Media.objects.filter(server_name=remote.name, media_id=name).update(
            last_accessed_at=start + timedelta(hours=index)
        )


def test_eviction_deletes_the_least_recently_served_down_to_the_low_water_mark(
    alice: MatrixClient, remote: Remote
) -> None:
    names = ["a", "b", "c", "d", "e"]
    _fetch_all(alice, remote, names, 1000)
    remote.files["img"] = (png_bytes(64, 64), "image/png")
    assert alice.get(V1_THUMBNAIL + f"{remote.name}/img?width=32&height=32").status_code == 200
    image = media_row(remote.name, "img")
    Media.objects.filter(pk=image.pk).update(last_accessed_at=timezone.now() - timedelta(days=1))
    thumbs = [key for key in thumbnail_keys(image) if get_store().head(key)]
    assert thumbs
    keys = {name: media_row(remote.name, name).storage_key for name in names}
    total = maintenance.remote_cache_bytes()
    assert total == 5000 + image.size

    # Under the bound: nothing goes.
    with msc3870_settings(REMOTE_MEDIA_CACHE_MAX_BYTES=total):
        assert maintenance.evict_remote_media().moved == 0
    # Over it: down to 90 % of 4000 (3600): the image, then a, b (oldest first).
    with msc3870_settings(REMOTE_MEDIA_CACHE_MAX_BYTES=4000):
        result = maintenance.evict_remote_media()
    assert result.moved == 3 and result.rows_deleted == 3
    held = set(Media.objects.filter(server_name=remote.name).values_list("media_id", flat=True))
    assert held == {"c", "d", "e"}
    store = get_store()
    assert not store.head(keys["a"]) and not store.head(keys["b"])
    assert not store.head(image.storage_key)
    assert not any(store.head(key) for key in thumbs)
    assert all(store.head(keys[name]) for name in ("c", "d", "e"))
    assert maintenance.remote_cache_bytes() == 3000

    # Idempotent: run again, nothing more goes.
    with msc3870_settings(REMOTE_MEDIA_CACHE_MAX_BYTES=4000):
        assert maintenance.evict_remote_media().moved == 0
    # An evicted id is fetched again by the next request.
    hits = remote.fed_hits()
    again = alice.get(V1_DOWNLOAD + f"{remote.name}/a")
    assert again.status_code == 200 and b"".join(again.streaming_content) == b"A" * 1000
    assert remote.fed_hits() == hits + 1


def test_eviction_spares_moderated_media_and_bytes_live_media_shares(
    alice: MatrixClient, remote: Remote
) -> None:
    from msc3870 import moderation

    # Our own upload, and the same bytes fetched from the other server: stored once.
    shared = b"S" * 2000
    uploaded = alice.post("/_matrix/media/v3/upload", shared, content_type="text/plain")
    local = media_row("localhost", uploaded.json()["content_uri"].rsplit("/", 1)[1])
    _fetch_all(alice, remote, ["quarantined", "approved", "twin", "plain"], 1000)
    remote.files["twin"] = (shared, "text/plain")
    Media.objects.filter(server_name=remote.name, media_id="twin").delete()
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/twin").status_code == 200
    twin = media_row(remote.name, "twin")
    assert twin.storage_key == local.storage_key
    Media.objects.filter(pk=twin.pk).update(last_accessed_at=timezone.now() - timedelta(days=9))
    moderation.quarantine(media_row(remote.name, "quarantined"), by="mod", reason="look")
    approved = media_row(remote.name, "approved")
    moderation.quarantine(approved, by="mod", reason="look")
    moderation.approve(media_row(remote.name, "approved"), by="mod", reason="fine")

    with msc3870_settings(REMOTE_MEDIA_CACHE_MAX_BYTES=1):
        result = maintenance.evict_remote_media()
    held = set(Media.objects.filter(server_name=remote.name).values_list("media_id", flat=True))
    assert held == {"quarantined", "approved"}
    assert result.moved == 2
    # The twin's row went; the bytes our own upload serves stayed.
    assert get_store().head(local.storage_key)
    assert alice.get(V1_DOWNLOAD + f"localhost/{local.media_id}").status_code == 200


def test_eviction_spares_protected_media(alice: MatrixClient, remote: Remote) -> None:
    from msc3870 import moderation

    _fetch_all(alice, remote, ["protected", "plain"], 1000)
    assert moderation.protect(media_row(remote.name, "protected"), by="mod", reason="keep")
    with msc3870_settings(REMOTE_MEDIA_CACHE_MAX_BYTES=1):
        result = maintenance.evict_remote_media()
    assert result.moved == 1
    held = set(Media.objects.filter(server_name=remote.name).values_list("media_id", flat=True))
    assert held == {"protected"}
    assert get_store().head(media_row(remote.name, "protected").storage_key)


def test_eviction_finishes_what_a_stopped_sweep_left(alice: MatrixClient, remote: Remote) -> None:
    from msc3870 import lifecycle

    _fetch_all(alice, remote, ["half", "gone"], 500)
    half, gone = media_row(remote.name, "half"), media_row(remote.name, "gone")
    # A sweep that moved its rows and died before deleting anything; one object is
    # missing already (a missing object counts as deleted).
    lifecycle.transition_many([half.pk, gone.pk], [S.COMPLETE], S.DELETED)
    get_store().delete(gone.storage_key)

    # Until the sweep finishes, a request does not serve it.
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/half").status_code == 404
    result = maintenance.evict_remote_media()  # no bound needed to finish
    assert result.rows_deleted == 2 and result.objects_deleted == 2
    assert not Media.objects.filter(server_name=remote.name).exists()
    assert not get_store().head(half.storage_key)


def test_a_request_fetches_again_media_whose_eviction_stopped_before_the_row_went(
    alice: MatrixClient, remote: Remote
) -> None:
    from msc3870 import cleanup, lifecycle

    _fetch_all(alice, remote, ["x"], 100)
    media = media_row(remote.name, "x")
    lifecycle.transition_many([media.pk], [S.COMPLETE], S.DELETED)
    cleanup.delete_objects_of([media.pk])  # the objects went, the row did not
    hits = remote.fed_hits()
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/x").status_code == 200
    assert remote.fed_hits() == hits + 1


def test_a_purged_remote_media_is_not_fetched_again(alice: MatrixClient, remote: Remote) -> None:
    from msc3870 import moderation

    _fetch_all(alice, remote, ["purged"], 100)
    moderation.purge(media_row(remote.name, "purged"), by="mod", reason="bad")
    maintenance.delete_dead_objects()
    maintenance.evict_remote_media()
    assert media_row(remote.name, "purged").state == S.DELETED
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/purged").status_code == 404
    assert remote.fed_hits() == 1


def test_the_eviction_sweep_is_scheduled() -> None:
    from mediarepo.celery import app as celery_app

    tasks = {task for task, _ in DEFAULT_SCHEDULE.values()}
    assert "msc3870.evict_remote_media" in tasks
    assert "msc3870.evict_remote_media" in celery_app.tasks


# --- failed fetches do not linger --------------------------------------------------


def test_failed_fetches_are_deleted_by_the_cleanup_sweep(
    alice: MatrixClient, remote: Remote
) -> None:
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/nothing").status_code == 404
    remote.files["page"] = (b"<html><body>hi</body></html>", "text/html")
    with msc3870_settings(DENIED_CONTENT_TYPES=["text/html"]):
        # Refused by the checks: 404 to readers, as any rejected media.
        assert alice.get(V1_DOWNLOAD + f"{remote.name}/page").status_code == 404
    failed = media_row(remote.name, "nothing")
    assert failed.state == S.REJECTED

    # Within REMOTE_MEDIA_FAILURE_SECONDS the row answers requests: it stays.
    maintenance.delete_dead_objects()
    assert Media.objects.filter(pk=failed.pk).exists()
    an_hour_ago = timezone.now() - timedelta(hours=1)
    Media.objects.filter(server_name=remote.name).update(state_changed_at=an_hour_ago)
    result = maintenance.delete_dead_objects()
    assert not Media.objects.filter(pk=failed.pk).exists()
    assert result.rows_deleted == 1
    # Bytes refused by the checks are not a failed fetch: that row stays (never fetched
    # again).
    assert media_row(remote.name, "page").state == S.REJECTED
