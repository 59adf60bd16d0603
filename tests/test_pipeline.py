"""The screening pipeline: identical content stored once, blocked content, quota, ClamAV,
custom checks, signals, tombstones."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.utils import timezone

from msc3870 import maintenance, moderation, signals, verdicts
from msc3870.models import Media, MediaState

from .helpers import (
    EICAR,
    FakeClamd,
    MatrixClient,
    media_files,
    media_of,
    msc3870_settings,
    mxc_path,
)

S = MediaState


def test_identical_content_is_stored_once(alice: MatrixClient, bob: MatrixClient) -> None:
    first = media_of(alice.uploaded(b"same bytes"))
    second = media_of(bob.uploaded(b"same bytes"))
    assert second.storage_key == first.storage_key
    assert media_files() == [first.storage_key]
    # Purging one keeps the bytes the other still serves.
    assert moderation.purge(first, by="mod")
    assert media_files() == [first.storage_key]
    got = bob.get(f"/_matrix/client/v1/media/download/{mxc_path(second.mxc_uri)}")
    assert b"".join(got.streaming_content) == b"same bytes"
    # Purging the last one deletes them.
    assert moderation.purge(second, by="mod")
    assert media_files() == []


def test_sweep_keeps_shared_objects(alice: MatrixClient, bob: MatrixClient) -> None:
    first = media_of(alice.uploaded(b"shared"))
    second = media_of(bob.uploaded(b"shared"))
    Media.objects.filter(pk=first.pk).update(state=S.DELETED)  # as if purged, not cleaned
    maintenance.delete_dead_objects()
    assert Media.objects.get(pk=first.pk).objects_deleted_at is not None
    assert media_files() == [second.storage_key]


def test_quarantined_content_cannot_be_uploaded_again(
    alice: MatrixClient, bob: MatrixClient
) -> None:
    bad = media_of(alice.uploaded(b"forbidden content"))
    moderation.quarantine(bad, by="mod")
    response = bob.upload(b"forbidden content")
    assert response.status_code == 403
    assert response.json()["errcode"] == "M_FORBIDDEN"
    assert "blocked" in response.json()["error"]
    moderation.reject(media_of(bad.mxc_uri), by="mod")
    assert bob.upload(b"forbidden content").status_code == 403
    assert bob.upload(b"fine content").status_code == 200


def test_user_quota(alice: MatrixClient, bob: MatrixClient) -> None:
    with msc3870_settings(USER_QUOTA_BYTES=10):
        assert alice.upload(b"123456").status_code == 200
        over = alice.upload(b"abcdef")
        assert over.status_code == 413
        assert "quota" in over.json()["error"]
        assert bob.upload(b"abcdef").status_code == 200  # per user


def test_clamav_scan(alice: MatrixClient, clamd: FakeClamd) -> None:
    with msc3870_settings(CLAMAV_URL=clamd.url):
        assert alice.upload(b"clean file").status_code == 200
        infected = alice.upload(EICAR)
    assert infected.status_code == 403
    assert "Eicar-Signature" in infected.json()["error"]
    assert clamd.scanned == [b"clean file", EICAR]
    assert not any(EICAR in (Path(settings.MEDIA_DIR) / f).read_bytes() for f in media_files())


def test_clamav_down_is_a_failure_not_a_pass(alice: MatrixClient) -> None:
    created = alice.create()
    with msc3870_settings(CLAMAV_URL="tcp://127.0.0.1:9", COMPLETE_WAIT_SECONDS=0.2):
        response = alice.put(f"/_matrix/media/v3/upload/{mxc_path(created['content_uri'])}", b"x")
    # The upload is accepted and held, never served unchecked; the failure is on the row.
    assert response.status_code == 200
    media = media_of(created["content_uri"])
    assert media.state == S.PROCESSING
    assert "clamd unreachable" in media.last_error
    assert (
        alice.get(
            f"/_matrix/client/v1/media/download/{mxc_path(media.mxc_uri)}?timeout_ms=0"
        ).status_code
        == 504
    )


def test_host_projects_add_their_own_check(alice: MatrixClient) -> None:
    from msc3870.conf import DEFAULTS

    checks = [*DEFAULTS["CHECKS"], "tests.checks.reject_odd_sizes"]
    with msc3870_settings(CHECKS=checks):
        assert alice.upload(b"even").status_code == 200
        odd = alice.upload(b"odd")
    assert odd.status_code == 400
    assert odd.json()["error"] == "Odd sizes are not welcome here"


def test_signals(alice: MatrixClient) -> None:
    seen: list[tuple[str, list[int]]] = []

    def receiver(name: str) -> Any:
        def handle(sender: Any, media_pks: list[int], **kwargs: Any) -> None:
            seen.append((name, media_pks))

        return handle

    handlers = {
        name: receiver(name)
        for name in ("completed", "rejected", "expired", "quarantined", "deleted")
    }
    for name, handler in handlers.items():
        getattr(signals, f"media_{name}").connect(handler)

    def broken(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("a receiver's bug must not undo the change")

    signals.media_completed.connect(broken)
    try:
        media = media_of(alice.uploaded(b"signalled"))
        moderation.quarantine(media, by="mod")
        moderation.purge(media, by="mod")
        with msc3870_settings(DENIED_CONTENT_TYPES=["text/plain"]):
            assert alice.upload(b"denied").status_code == 403
        pending = alice.create()
        Media.objects.filter(pk=media_of(pending["content_uri"]).pk).update(
            unused_expires_at=timezone.now()
        )
        maintenance.expire_pending()
    finally:
        for name, handler in handlers.items():
            getattr(signals, f"media_{name}").disconnect(handler)
        signals.media_completed.disconnect(broken)
    names = [name for name, _ in seen]
    assert names[:3] == ["completed", "quarantined", "deleted"]
    assert "rejected" in names
    assert names[-1] == "expired"
    assert seen[0][1] == [media.pk]
    assert Media.objects.get(pk=media.pk).state == S.DELETED


def test_old_tombstones_are_deleted_but_moderation_verdicts_stay(alice: MatrixClient) -> None:
    expired = alice.create()
    Media.objects.update(unused_expires_at=timezone.now())
    maintenance.expire_pending()
    verdict = media_of(alice.uploaded(b"moderated"))
    moderation.reject(verdict, by="mod")
    long_ago = timezone.now() - timedelta(days=31)
    Media.objects.update(state_changed_at=long_ago, objects_deleted_at=long_ago)
    assert maintenance.delete_old_tombstones() == 1
    assert not Media.objects.filter(
        media_id=mxc_path(expired["content_uri"]).split("/")[1]
    ).exists()
    assert Media.objects.filter(pk=verdict.pk).exists()
    with msc3870_settings(TOMBSTONE_RETENTION_DAYS=None):
        assert maintenance.delete_old_tombstones() == 0


def test_screening_is_idempotent(alice: MatrixClient) -> None:
    media = media_of(alice.uploaded(b"done once"))
    assert verdicts.screen(media.pk) == "skipped"
    assert verdicts.screen(10**9) == "skipped"
    assert Media.objects.get(pk=media.pk).attempts == 1
