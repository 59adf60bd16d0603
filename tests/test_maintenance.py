"""Sweeps: expiry, dead objects, stuck screening, orphaned uploads and what killed uploads
leave."""

from __future__ import annotations

import io
import os
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from msc3870 import cleanup, lifecycle, maintenance, moderation
from msc3870.models import Media, MediaState
from msc3870.stores import get_store

from .helpers import (
    MatrixClient,
    ThenAtTheEnd,
    media_files,
    media_of,
    msc3870_settings,
    put_body,
)

S = MediaState


def test_expiry_moves_pending_past_expiry_and_deletes_incoming(alice: MatrixClient) -> None:
    expiring = alice.create()
    fresh = alice.create()
    assert alice.put_to_url(expiring["upload_url"], b"never completed").status_code == 200
    Media.objects.filter(pk=media_of(expiring["content_uri"]).pk).update(
        unused_expires_at=timezone.now() - timedelta(seconds=1)
    )
    result = maintenance.expire_pending()
    assert result.moved == 1
    assert result.objects_deleted == 1
    assert media_of(expiring["content_uri"]).state == S.EXPIRED
    assert media_of(fresh["content_uri"]).state == S.PENDING
    assert media_files() == []
    # Running again finds nothing to do.
    again = maintenance.expire_pending()
    assert (again.moved, again.objects_deleted) == (0, 0)


def due_pending(count: int, prefix: str) -> None:
    """``count`` pending ids whose expiry has passed."""
    past = timezone.now() - timedelta(seconds=1)
    Media.objects.bulk_create(
        Media(
            server_name="localhost",
            media_id=f"{prefix}{i}",
            user_id="@a:localhost",
            unused_expires_at=past,
        )
        for i in range(count)
    )


def test_expiry_is_batched(alice: MatrixClient) -> None:
    due_pending(25, "m")
    first = maintenance.expire_pending(batch_size=10, max_batches=2)
    assert first.moved == 20
    assert maintenance.expire_pending(batch_size=10, max_batches=2).moved == 5
    assert Media.objects.filter(state=S.EXPIRED).count() == 25


def test_expiry_is_one_statement_per_batch_and_one_update_per_delete(alice: MatrixClient) -> None:
    """Moving a batch is one UPDATE ... RETURNING (pick and compare-and-set together);
    an expired id's only object is its upload URL's, which no other media can share, so
    marking it deleted is the batch's only other statement."""
    due_pending(30, "q")
    with CaptureQueriesContext(connection) as queries:
        result = maintenance.expire_pending(batch_size=10)
    assert result.moved == 30 and result.objects_deleted == 30
    # 3 batches of 2 statements, and the empty pick that ends the sweep.
    assert len(queries.captured_queries) == 7, [q["sql"][:60] for q in queries.captured_queries]
    assert Media.objects.filter(state=S.EXPIRED, objects_deleted_at__isnull=False).count() == 30


def test_an_expiry_batch_marks_cleaned_only_rows_still_dead_and_uncleaned(
    alice: MatrixClient,
) -> None:
    """The mark after a batch's delete (on PostgreSQL one statement with the batch's keys
    as one array): a row made live meanwhile, or cleaned by another sweep, keeps what it
    has; the others are marked, and counted."""
    due_pending(4, "m")
    rows = lifecycle.expire_due(timezone.now(), 10)
    pks = sorted(row[0] for row in rows)
    earlier = timezone.now() - timedelta(hours=1)
    Media.objects.filter(pk=pks[0]).update(state=S.COMPLETE)  # live (by hand)
    Media.objects.filter(pk=pks[1]).update(objects_deleted_at=earlier)
    Media.objects.filter(pk=pks[2]).update(state=S.DELETED)
    with cleanup.ObjectDeleter() as deleter:
        deleter._mark_cleaned([*pks, 10**9])  # and a key no row has
    assert deleter.cleaned == 2
    marked = dict(Media.objects.filter(pk__in=pks).values_list("pk", "objects_deleted_at"))
    assert marked[pks[0]] is None
    assert marked[pks[1]] == earlier
    assert marked[pks[2]] is not None and marked[pks[2]] > earlier
    assert marked[pks[3]] is not None and marked[pks[3]] > earlier


def test_expiry_has_several_deletes_in_flight(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next batch is moved while the last one's objects are deleted, and up to
    DELETE_CONCURRENCY batched deletes run at once: each delete below waits until another
    is running beside it, which a sweep deleting one batch at a time never gets to."""
    from msc3870.stores import get_store

    due_pending(40, "p")
    store = get_store()
    together = threading.Barrier(2, timeout=10)
    sent: list[list[str]] = []

    def delete_many(keys: list[str]) -> None:
        sent.append(keys)
        together.wait()

    monkeypatch.setattr(store, "delete_many", delete_many)
    with msc3870_settings(DELETE_CONCURRENCY=2):
        result = maintenance.expire_pending(batch_size=10)
    assert result.moved == 40 and result.objects_deleted == 40
    assert sorted(len(keys) for keys in sent) == [10, 10, 10, 10]
    # Only the upload URL's key of each id: nothing else can exist for an id never used.
    assert all(key.startswith("incoming/p") for keys in sent for key in keys)


def deletes_sent(store: Any) -> list[list[str]]:
    """The keys of each DeleteObjects request ``store``'s delete client sends from now on."""
    sent: list[list[str]] = []

    def count(params: dict[str, Any], **kwargs: Any) -> None:
        sent.append([item["Key"] for item in params["Delete"]["Objects"]])

    store.delete_client.meta.events.register("before-parameter-build.s3.DeleteObjects", count)
    return sent


def test_on_s3_expiry_deletes_only_upload_url_objects_that_exist(
    alice: MatrixClient, s3: Any
) -> None:
    """Most ids expire without a byte: with few objects under incoming/, one listing
    tells which exist, and only those are deleted."""
    due_pending(30, "e")
    store = get_store()
    for name in ("e3", "e17"):
        store.write_stream(f"incoming/{name}", io.BytesIO(b"abandoned"), max_size=100)
    sent = deletes_sent(store)
    result = maintenance.expire_pending(batch_size=10)
    assert result.moved == 30 and result.objects_deleted == 30
    assert sorted(key for keys in sent for key in keys) == ["incoming/e17", "incoming/e3"]
    assert list(store.list_keys("incoming/")) == []
    assert Media.objects.filter(objects_deleted_at__isnull=True).count() == 0


def test_on_s3_with_many_upload_url_objects_every_key_is_sent(
    alice: MatrixClient, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past one listing's worth of objects under incoming/, listing stops for the run and
    every expired id's key is sent, existing or not (a missing key counts as deleted)."""
    from msc3870 import cleanup

    monkeypatch.setattr(cleanup, "LISTED_INCOMING_MAX", 2)
    due_pending(30, "f")
    store = get_store()
    for name in ("f1", "f2", "f3"):
        store.write_stream(f"incoming/{name}", io.BytesIO(b"abandoned"), max_size=100)
    sent = deletes_sent(store)
    result = maintenance.expire_pending(batch_size=10)
    assert result.moved == 30 and result.objects_deleted == 30
    assert sorted(len(keys) for keys in sent) == [10, 10, 10]
    assert list(store.list_keys("incoming/")) == []


def test_complete_and_expiry_race_has_one_winner(alice: MatrixClient) -> None:
    created = alice.create()
    assert alice.put_to_url(created["upload_url"], b"bytes").status_code == 200
    media = media_of(created["content_uri"])
    # Expiry swept first: /complete must lose.
    Media.objects.filter(pk=media.pk).update(unused_expires_at=timezone.now())
    maintenance.expire_pending()
    assert alice.complete(created["content_uri"]).status_code == 404
    assert media_of(created["content_uri"]).state == S.EXPIRED


def test_dead_objects_are_deleted_once(alice: MatrixClient) -> None:
    response = alice.post("/_matrix/media/v3/upload", b"bytes", "text/plain")
    media = media_of(response.json()["content_uri"])
    assert media_files() == [media.storage_key]
    # A purge whose deletion failed (simulated by clearing the record) is finished by the sweep.
    assert moderation.purge(media, by="mod")
    assert media_files() == []
    Media.objects.filter(pk=media.pk).update(objects_deleted_at=None)
    assert maintenance.delete_dead_objects().objects_deleted == 1
    assert maintenance.delete_dead_objects().objects_deleted == 0
    assert Media.objects.get(pk=media.pk).state == S.DELETED  # the tombstone stays


def test_stuck_url_upload_is_screened_again(alice: MatrixClient) -> None:
    created = alice.create()
    assert alice.put_to_url(created["upload_url"], b"bytes").status_code == 200
    media = media_of(created["content_uri"])
    # As if /complete claimed the row and the task was lost with its worker.
    Media.objects.filter(pk=media.pk).update(
        state=S.PROCESSING,
        upload_method="url",
        processing_started_at=timezone.now() - timedelta(hours=1),
    )
    assert maintenance.redispatch_stuck() == 1
    assert media_of(created["content_uri"]).state == S.COMPLETE


def test_stuck_put_without_bytes_returns_to_pending(alice: MatrixClient) -> None:
    created = alice.create()
    media = media_of(created["content_uri"])
    # Ten minutes into its body: a slow client, not a dead one.
    Media.objects.filter(pk=media.pk).update(
        state=S.PROCESSING,
        upload_method="put",
        processing_started_at=timezone.now() - timedelta(minutes=10),
    )
    assert maintenance.redispatch_stuck() == 0
    assert media_of(created["content_uri"]).state == S.PROCESSING
    Media.objects.filter(pk=media.pk).update(
        processing_started_at=timezone.now() - timedelta(hours=2)
    )
    assert maintenance.redispatch_stuck() == 1
    assert media_of(created["content_uri"]).state == S.PENDING


def _dead_request(media: Media, method: str, started_ago: timedelta) -> str:
    """What a request receiving a body leaves when its process dies (or loses the
    database) between storing the bytes and recording them: the row claimed, no key on
    it, and an object under a key of the request's own. Returns that key."""
    Media.objects.filter(pk=media.pk).update(
        state=S.PROCESSING,
        upload_method=method,
        processing_started_at=timezone.now() - started_ago,
    )
    key = media.upload_key()
    get_store().write_stream(key, io.BytesIO(b"bytes nobody recorded"), max_size=1024)
    return key


@pytest.mark.parametrize(("method", "then"), [("put", S.PENDING), ("post", S.REJECTED)])
def test_what_a_dead_upload_stored_unrecorded_is_deleted_when_the_sweep_gives_up(
    alice: MatrixClient, method: str, then: str
) -> None:
    served = alice.uploaded(b"another upload's bytes")
    created = alice.create()
    media = media_of(created["content_uri"])
    leftover = _dead_request(media, method, timedelta(hours=2))
    assert maintenance.redispatch_stuck() == 1
    assert media_of(created["content_uri"]).state == then
    assert get_store().head(leftover) is None
    assert get_store().head(media_of(served).storage_key) is not None


def test_a_dead_upload_is_given_up_on_later_while_the_storage_is_down(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Freed without looking at the storage, its id would keep what it stored forever."""
    from msc3870.errors import StorageUnavailable

    created = alice.create()
    media = media_of(created["content_uri"])
    leftover = _dead_request(media, "put", timedelta(hours=2))

    def down(*args: object) -> object:
        raise StorageUnavailable()

    with monkeypatch.context() as patched:
        patched.setattr(type(get_store()), "list_keys", down)
        assert maintenance.redispatch_stuck() == 0
    assert media_of(created["content_uri"]).state == S.PROCESSING
    assert maintenance.redispatch_stuck() == 1
    assert get_store().head(leftover) is None


def test_what_a_live_upload_stored_is_left_while_its_body_may_still_arrive(
    alice: MatrixClient,
) -> None:
    media = media_of(alice.create()["content_uri"])
    stored = _dead_request(media, "put", timedelta(minutes=10))
    assert maintenance.redispatch_stuck() == 0
    assert get_store().head(stored) is not None


def test_how_long_a_body_may_take_is_a_setting(alice: MatrixClient) -> None:
    media = media_of(alice.create()["content_uri"])
    leftover = _dead_request(media, "put", timedelta(minutes=3))
    with msc3870_settings(IN_FLIGHT_UPLOAD_SECONDS=600):
        assert maintenance.redispatch_stuck() == 0
    with msc3870_settings(IN_FLIGHT_UPLOAD_SECONDS=120, STUCK_AFTER_SECONDS=60):
        assert maintenance.redispatch_stuck() == 1
    assert get_store().head(leftover) is None


@pytest.mark.usefixtures("puts_claim_first")
def test_upload_abandoned_by_the_sweep_while_streaming(alice: MatrixClient) -> None:
    """The sweep gave up on a PUT whose body was still arriving: the client is told, and
    the bytes it sent are not left behind."""
    from msc3870 import uploads

    created = alice.create()
    media = media_of(created["content_uri"])

    def swept() -> None:  # the sweep ran while the last bytes arrived
        Media.objects.filter(pk=media.pk).update(state=S.PENDING)

    with pytest.raises(uploads.UploadAbandoned):
        put_body(alice, media, ThenAtTheEnd(b"late bytes", swept), 10)
    assert media_files() == []
    assert media_of(created["content_uri"]).state == S.PENDING


def test_orphaned_incoming_objects_are_deleted(alice: MatrixClient) -> None:
    waiting = alice.create()
    assert alice.put_to_url(waiting["upload_url"], b"still waiting").status_code == 200
    done = alice.create()
    assert alice.put_to_url(done["upload_url"], b"done").status_code == 200
    assert alice.complete(done["content_uri"]).status_code == 200
    # Re-create the incoming object of completed media, as a re-PUT to S3 would.
    from msc3870.stores import get_store

    store = get_store()
    done_media = media_of(done["content_uri"])

    store.write_stream(done_media.incoming_key, io.BytesIO(b"late"), max_size=100)
    assert maintenance.delete_orphaned_uploads() == 1
    assert store.head(done_media.incoming_key) is None
    assert store.head(media_of(waiting["content_uri"]).incoming_key) is not None


def test_expiry_goes_on_when_storage_fails(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from msc3870.errors import StorageUnavailable
    from msc3870.stores import get_store

    due_pending(30, "s")
    store = get_store()

    def down(keys: list[str]) -> None:
        raise StorageUnavailable("storage is down")

    monkeypatch.setattr(store, "delete_many", down)
    result = maintenance.expire_pending(batch_size=10)
    assert result.moved == 30  # every row expired
    assert result.objects_deleted == 0
    assert result.storage_error == "storage is down"
    assert Media.objects.filter(objects_deleted_at__isnull=True).count() == 30
    monkeypatch.undo()
    assert maintenance.delete_dead_objects().objects_deleted == 30


# --- what killed uploads leave, and orphans past the sweep's window ----------------


def _age(path: Path, seconds: float) -> None:
    """Set a file's modification time ``seconds`` in the past."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_partial_files_of_killed_uploads_are_swept_after_an_hour() -> None:
    root = Path(settings.MEDIA_DIR)
    (root / "media" / "ab").mkdir(parents=True)
    (root / "incoming").mkdir(parents=True)
    # What a process killed with SIGKILL inside LocalMediaStore.write_stream leaves.
    stale = root / "media" / "ab" / ".abcdef.0123456789abcdef.part"
    stale_incoming = root / "incoming" / ".xyz.0123456789abcdef.part"
    young = root / "media" / "ab" / ".abghij.fedcba9876543210.part"
    for path in (stale, stale_incoming, young):
        path.write_bytes(b"half a body")
    _age(stale, 2 * 3600)
    _age(stale_incoming, 2 * 3600)
    _age(young, 60)  # may still be streaming in a live process

    maintenance.delete_orphaned_uploads()

    assert not stale.exists()
    assert not stale_incoming.exists()
    assert young.exists()


def test_orphan_sweep_resumes_past_its_window(alice: MatrixClient) -> None:
    """Waiting uploads filling the first ``limit`` keys must not hide later orphans."""
    created = [alice.create() for _ in range(3)]
    medias = sorted((media_of(c["content_uri"]) for c in created), key=lambda m: m.incoming_key)
    store = get_store()
    for media in medias:
        store.write_stream(media.incoming_key, io.BytesIO(b"bytes"), max_size=100)
    # The last key in listing order belongs to media no longer waiting for it.
    orphan = medias[-1]
    Media.objects.filter(pk=orphan.pk).update(state=S.EXPIRED)

    assert maintenance.delete_orphaned_uploads(limit=2) == 0  # two waiting keys fill it
    assert maintenance.delete_orphaned_uploads(limit=2) == 1  # resumes after them
    assert store.head(orphan.incoming_key) is None
    for waiting in medias[:-1]:
        assert store.head(waiting.incoming_key) is not None
    # The walk starts again from the beginning once it reached the end.
    assert maintenance.delete_orphaned_uploads(limit=2) == 0
    for waiting in medias[:-1]:
        assert store.head(waiting.incoming_key) is not None
