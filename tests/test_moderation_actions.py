"""The moderation service layer beyond one item's state: protection, bulk actions by
selection, by uploader and by content (with the durable block list), deletion by date and
size, the remote cache purge, and re-screening. Every change is recorded once."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from msc3870 import maintenance, moderation
from msc3870.models import BlockedHash, Media, MediaState, ModerationAction, ModerationRecord
from msc3870.moderation import Batches, DeletionFilter
from msc3870.stores import get_store

from .federation_helpers import Remote
from .helpers import (
    V1_DOWNLOAD,
    MatrixClient,
    media_files,
    media_of,
    media_row,
    msc3870_settings,
    mxc_path,
)

pytestmark = pytest.mark.usefixtures("fetching_remote_media")

S = MediaState
A = ModerationAction
MOD = "@mod:localhost"


def records_of(media: Media) -> list[tuple[str, str, str, str]]:
    return [
        (r.action, r.state_before, r.state_after, r.actor)
        for r in ModerationRecord.objects.filter(media_id=media.pk).order_by("pk")
    ]


def state(media: Media) -> str:
    return Media.objects.get(pk=media.pk).state


def downloads(client: MatrixClient, media: Media) -> int:
    return client.get(f"/_matrix/client/v1/media/download/{mxc_path(media.mxc_uri)}").status_code


# ---------------------------------------------------------------------- protection


def test_protect_and_unprotect_are_recorded_and_change_no_state(alice: MatrixClient) -> None:
    media = media_of(alice.uploaded())
    assert moderation.protect(media, by=MOD, reason="sticker pack")
    assert not moderation.protect(media, by=MOD)  # already
    assert Media.objects.get(pk=media.pk).protected
    assert state(media) == S.COMPLETE
    assert moderation.unprotect(media, by=MOD, reason="no longer")
    assert not moderation.unprotect(media, by=MOD)
    assert not Media.objects.get(pk=media.pk).protected
    assert records_of(media) == [
        (A.PROTECT, S.COMPLETE, S.COMPLETE, MOD),
        (A.UNPROTECT, S.COMPLETE, S.COMPLETE, MOD),
    ]
    assert [r.reason for r in ModerationRecord.objects.filter(media=media).order_by("pk")] == [
        "sticker pack",
        "no longer",
    ]
    # Purged media cannot be protected.
    assert moderation.purge(media, by=MOD)
    assert not moderation.protect(media, by=MOD)


def test_protected_media_is_quarantined_by_itself_unless_asked_as_synapse_does(
    alice: MatrixClient,
) -> None:
    media = media_of(alice.uploaded())
    moderation.protect(media, by=MOD)
    # Synapse's quarantine API skips protected media.
    assert not moderation.quarantine(media, by=MOD, skip_protected=True)
    assert state(media) == S.COMPLETE
    # A moderator acting on the item itself is not stopped.
    assert moderation.quarantine(media, by=MOD)
    assert state(media) == S.QUARANTINED


def test_protected_media_is_skipped_by_every_bulk_rule(alice: MatrixClient) -> None:
    kept = media_of(alice.uploaded(b"same bytes"))
    other = media_of(alice.uploaded(b"other bytes"))
    moderation.protect(kept, by=MOD)
    assert moderation.quarantine_user_media(alice.user_id, by=MOD) == 1
    assert (state(kept), state(other)) == (S.COMPLETE, S.QUARANTINED)
    assert moderation.quarantine_content(kept.sha256, by=MOD) == 0
    assert state(kept) == S.COMPLETE
    later = timezone.now() + timedelta(days=1)
    assert moderation.delete_local_media_before(DeletionFilter(later), by=MOD) == 0
    assert state(kept) == S.COMPLETE
    with_protected = DeletionFilter(later, include_protected=True)
    assert moderation.delete_local_media_before(with_protected, by=MOD) == 1
    assert state(kept) == S.DELETED


# ---------------------------------------------------------------------- by uploader


def test_quarantine_user_media_counts_batches_and_records_each(
    alice: MatrixClient, bob: MatrixClient
) -> None:
    mine = [media_of(alice.uploaded(f"alice {n}".encode())) for n in range(5)]
    theirs = media_of(bob.uploaded(b"bob's"))
    moderation.quarantine(mine[0], by=MOD)  # already quarantined: not counted again
    pending = alice.create()

    with CaptureQueriesContext(connection) as queries:
        count = moderation.quarantine_user_media(
            alice.user_id, by=MOD, reason="spam wave", batches=Batches(size=2)
        )
    # Read a batch at a time: every read of the selection is bounded. (Taken before any
    # request: a request clears the query log.)
    selects = [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].startswith("SELECT") and "msc3870_media" in q["sql"] and "IN (" not in q["sql"]
    ]
    assert len(selects) == 3  # 2 + 2 + the empty read that ends it
    assert all("LIMIT 2" in sql for sql in selects)
    assert count == 4
    assert {state(m) for m in mine} == {S.QUARANTINED}
    assert state(theirs) == S.COMPLETE
    assert media_of(pending["content_uri"]).state == S.PENDING
    for media in mine[1:]:
        assert records_of(media) == [(A.QUARANTINE, S.COMPLETE, S.QUARANTINED, MOD)]
        assert downloads(alice, media) == 404
    assert len(records_of(mine[0])) == 1
    assert moderation.quarantine_user_media(alice.user_id, by=MOD) == 0


def test_quarantine_user_media_needs_a_user() -> None:
    with pytest.raises(ValueError):
        moderation.quarantine_user_media("", by=MOD)


# ---------------------------------------------------------------------- by content


def url_upload(client: MatrixClient, data: bytes) -> Any:
    """An upload through the upload URL, its /complete waiting for the verdict: hashed
    only if other content may share it (SHA256_WHEN "needed")."""
    created = client.create()
    assert client.put_to_url(created["upload_url"], data).status_code == 200
    with msc3870_settings(COMPLETE_WAITS_FOR_CHECKS=True):
        return client.complete(created["content_uri"]), created["content_uri"]


def test_quarantine_content_blocks_the_hash_beyond_the_items(
    alice: MatrixClient, bob: MatrixClient
) -> None:
    data = b"\x89PNG not really, but the same bytes twice" * 10
    first = media_of(alice.uploaded(data))
    second = media_of(bob.uploaded(data))
    unrelated = media_of(bob.uploaded(b"something else"))
    assert moderation.quarantine_content_of(first, by=MOD, reason="csam hash match") == 2
    assert (state(first), state(second), state(unrelated)) == (
        S.QUARANTINED,
        S.QUARANTINED,
        S.COMPLETE,
    )
    block = BlockedHash.objects.get(sha256=first.sha256)
    assert (block.actor, block.reason, block.size) == (MOD, "csam hash match", len(data))
    assert block.prefix_sha256 == first.prefix_sha256
    assert moderation.is_hash_blocked(first.sha256)

    # The items go for good, rows and all: the block stays.
    for media in (first, second):
        moderation.purge(media, by=MOD)
    Media.objects.filter(pk__in=[first.pk, second.pk]).delete()
    refused = alice.post("/_matrix/media/v3/upload", data, "text/plain")
    assert refused.status_code == 403, refused.content
    assert "blocked" in refused.json()["error"]
    # Through the upload URL too, where unique-looking content is not hashed unless it
    # may share its bytes with something: blocked bytes do, with no row left to share.
    Media.objects.filter(sha256=first.sha256).delete()
    answer, content_uri = url_upload(bob, data)
    assert answer.status_code == 403, answer.content
    assert media_of(content_uri).state == S.REJECTED

    assert moderation.unblock_hash(first.sha256, by=MOD, reason="false positive")
    assert not moderation.unblock_hash(first.sha256, by=MOD)
    assert alice.post("/_matrix/media/v3/upload", data, "text/plain").status_code == 200
    lifted = BlockedHash.objects.get(pk=block.pk)
    assert (lifted.unblocked_by, lifted.unblock_reason) == (MOD, "false positive")
    assert lifted.unblocked_at is not None
    # Blocked again: a new row, the history kept.
    assert moderation.block_hash(first.sha256, by=MOD, reason="again")
    assert not moderation.block_hash(first.sha256, by=MOD)
    assert BlockedHash.objects.filter(sha256=first.sha256).count() == 2


def test_a_bare_hash_can_be_blocked_and_is_matched_when_hashed(alice: MatrixClient) -> None:
    import hashlib

    data = b"known bad content from a shared list"
    digest = hashlib.sha256(data).hexdigest()
    assert moderation.quarantine_content(digest.upper(), by=MOD, reason="list") == 0
    assert BlockedHash.objects.get(sha256=digest).size is None
    # Uploads through this server are always hashed.
    assert alice.post("/_matrix/media/v3/upload", data, "text/plain").status_code == 403
    with msc3870_settings(SHA256_WHEN="always"):
        answer, _ = url_upload(alice, data)
    assert answer.status_code == 403
    with pytest.raises(ValueError):
        moderation.block_hash("not a hash", by=MOD)


# ---------------------------------------------------------------------- by selection


def test_bulk_actions_look_at_no_more_than_a_limit_and_say_what_moved(
    alice: MatrixClient,
) -> None:
    """A caller bounding its work (the admin API's share per request) runs it again for
    the rest: what was acted on has left the selection."""
    items = [media_of(alice.uploaded(f"bounded {n}".encode())) for n in range(5)]
    moved: list[list[int]] = []
    result = moderation.moderate_many(
        Media.objects.filter(state=S.COMPLETE),
        A.QUARANTINE,
        by=MOD,
        batches=Batches(size=2, limit=3),
        on_moved=moved.append,
    )
    assert (result.done, result.looked_at) == (3, 3)
    assert moved == [[items[0].pk, items[1].pk], [items[2].pk]]
    one, two = Batches(limit=1), Batches(limit=2)
    assert moderation.quarantine_user_media(alice.user_id, by=MOD, batches=one) == 1
    assert moderation.moderate_many([m.pk for m in items], A.APPROVE, by=MOD, batches=two).done == 2
    flagged: list[list[int]] = []
    moderation.moderate_many([items[4].pk], A.PROTECT, by=MOD, on_moved=flagged.append)
    assert flagged == [[items[4].pk]]
    old = DeletionFilter(timezone.now() + timedelta(days=1))
    assert moderation.delete_local_media_before(old, by=MOD, batches=one) == 1
    assert moderation.delete_local_media_before(old, by=MOD, batches=Batches(limit=10)) == 1
    assert moderation.purge_remote_cache_before(old, by=MOD, batches=one) == 0


def test_moderate_many_takes_ids_or_a_queryset_one_record_each(alice: MatrixClient) -> None:
    items = [media_of(alice.uploaded(f"item {n}".encode())) for n in range(5)]
    user = User.objects.create_superuser("mod", "mod@example.com", "pw")
    result = moderation.moderate_many(
        (m.pk for m in items[:3]), A.QUARANTINE, by=user, reason="reported", batches=Batches(size=2)
    )
    assert (result.done, result.looked_at, result.skipped) == (3, 3, 0)
    # A queryset that its own action empties: read by key, nothing skipped or repeated.
    result = moderation.moderate_many(
        Media.objects.filter(state=S.COMPLETE), A.QUARANTINE, by=user, batches=Batches(size=1)
    )
    assert (result.done, result.looked_at) == (2, 2)
    result = moderation.moderate_many(
        Media.objects.all(), A.REJECT, by=user, reason="illegal", batches=Batches(size=2)
    )
    assert result.done == 5
    for media in items:
        assert records_of(media) == [
            (A.QUARANTINE, S.COMPLETE, S.QUARANTINED, "mod"),
            (A.REJECT, S.QUARANTINED, S.REJECTED, "mod"),
        ]
        fresh = Media.objects.get(pk=media.pk)
        assert fresh.rejection_reason == moderation.PUBLIC_REJECTION_REASON
        assert fresh.moderated_by == "mod"
    assert media_files() == []  # bytes deleted, in batches
    entries = LogEntry.objects.filter(user=user)
    assert entries.count() == 10
    assert all("illegal" in e.change_message for e in entries if "Reject" in e.change_message)
    # Bulk protection, and purge from any state.
    assert moderation.moderate_many([items[0].pk], A.PROTECT, by=MOD).done == 1
    result = moderation.moderate_many([m.pk for m in items], A.PURGE, by=MOD)
    assert (result.done, result.skipped) == (5, 0)
    assert records_of(items[0])[-2:] == [
        (A.PROTECT, S.REJECTED, S.REJECTED, MOD),
        (A.PURGE, S.REJECTED, S.DELETED, MOD),
    ]
    with pytest.raises(ValueError):
        moderation.moderate_many([items[0].pk], A.RESCREEN, by=MOD)


def test_bulk_transitions_are_compare_and_set(alice: MatrixClient) -> None:
    """A row moved by someone else between the read and the update is left alone and
    not recorded."""
    items = [media_of(alice.uploaded(f"x{n}".encode())) for n in range(3)]
    real = moderation.lifecycle.transition_many

    def racing(pks: list[int], *args: Any, **kwargs: Any) -> list[int]:
        Media.objects.filter(pk=items[1].pk).update(state=S.QUARANTINED)  # another moderator
        return real(pks, *args, **kwargs)

    moderation.lifecycle.transition_many = racing  # type: ignore[assignment]
    try:
        result = moderation.moderate_many([m.pk for m in items], A.QUARANTINE, by=MOD)
    finally:
        moderation.lifecycle.transition_many = real  # type: ignore[assignment]
    assert (result.done, result.skipped) == (2, 1)
    assert records_of(items[1]) == []


# ---------------------------------------------------------------------- by date and size


def aged(media: Media, *, created_days: int, accessed_days: int | None) -> None:
    now = timezone.now()
    accessed = None if accessed_days is None else now - timedelta(days=accessed_days)
    Media.objects.filter(pk=media.pk).update(
        created_at=now - timedelta(days=created_days), last_accessed_at=accessed
    )


def test_delete_local_media_before_follows_synapse(alice: MatrixClient) -> None:
    old_unread = media_of(alice.uploaded(b"a" * 100))
    aged(old_unread, created_days=40, accessed_days=None)
    old_but_read = media_of(alice.uploaded(b"b" * 100))
    aged(old_but_read, created_days=40, accessed_days=1)
    read_long_ago = media_of(alice.uploaded(b"c" * 100))
    aged(read_long_ago, created_days=90, accessed_days=35)
    small = media_of(alice.uploaded(b"d" * 10))
    aged(small, created_days=40, accessed_days=None)
    quarantined = media_of(alice.uploaded(b"e" * 100))
    aged(quarantined, created_days=40, accessed_days=None)
    moderation.quarantine(quarantined, by=MOD)
    avatar = media_of(alice.uploaded(b"f" * 100))
    aged(avatar, created_days=40, accessed_days=None)
    new = media_of(alice.uploaded(b"g" * 100))
    pending = media_of(alice.create()["content_uri"])
    Media.objects.filter(pk=pending.pk).update(created_at=timezone.now() - timedelta(days=40))

    deleted_ids: list[str] = []
    cutoff = timezone.now() - timedelta(days=30)
    which = DeletionFilter(
        cutoff, size_gt=50, keep=lambda uris: [uri for uri in uris if uri == avatar.mxc_uri]
    )
    count = moderation.delete_local_media_before(
        which, by=MOD, reason="retention", on_deleted=deleted_ids.extend, batches=Batches(size=1)
    )
    assert count == 2
    assert sorted(deleted_ids) == sorted([old_unread.media_id, read_long_ago.media_id])
    for media in (old_unread, read_long_ago):
        assert state(media) == S.DELETED
        assert records_of(media)[-1] == (A.PURGE, S.COMPLETE, S.DELETED, MOD)
        assert not get_store().head(media.storage_key)
    assert {state(m) for m in (old_but_read, small, avatar, new)} == {S.COMPLETE}
    assert state(quarantined) == S.QUARANTINED
    assert state(pending) == S.PENDING
    assert (
        moderation.delete_local_media_before(
            DeletionFilter(cutoff, size_gt=50, include_quarantined=True), by=MOD
        )
        == 2
    )
    assert state(quarantined) == S.DELETED
    assert state(avatar) == S.DELETED


def test_a_download_spares_media_from_deletion_by_date(alice: MatrixClient) -> None:
    media = media_of(alice.uploaded(b"still read" * 20))
    aged(media, created_days=40, accessed_days=None)
    assert downloads(alice, media) == 200  # records the access
    served = Media.objects.get(pk=media.pk).last_accessed_at
    assert served is not None and timezone.now() - served < timedelta(minutes=1)
    cutoff = timezone.now() - timedelta(days=30)
    assert moderation.delete_local_media_before(DeletionFilter(cutoff), by=MOD) == 0
    assert state(media) == S.COMPLETE


# ---------------------------------------------------------------------- remote cache


def test_purge_remote_cache_before(alice: MatrixClient, remote: Remote) -> None:
    for name in ("old", "recent", "held"):
        remote.files[name] = (name.encode() * 100, "text/plain")
        assert alice.get(V1_DOWNLOAD + f"{remote.name}/{name}").status_code == 200
    long_ago = timezone.now() - timedelta(days=10)
    Media.objects.filter(server_name=remote.name, media_id__in=["old", "held"]).update(
        last_accessed_at=long_ago
    )
    held = media_row(remote.name, "held")
    moderation.quarantine(held, by=MOD, reason="look at it")
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/held").status_code == 404
    old = media_row(remote.name, "old")
    local = media_of(alice.uploaded(b"ours" * 100))
    aged(local, created_days=20, accessed_days=None)

    cutoff = timezone.now() - timedelta(days=1)
    assert moderation.purge_remote_cache_before(DeletionFilter(cutoff), by=MOD, reason="disk") == 1
    # The row is gone, as the eviction sweep leaves it: the record keeps the mxc URI.
    assert not Media.objects.filter(pk=old.pk).exists()
    record = ModerationRecord.objects.get(mxc_uri=old.mxc_uri)
    assert (record.action, record.state_before, record.state_after, record.actor) == (
        A.PURGE,
        S.COMPLETE,
        S.DELETED,
        MOD,
    )
    assert record.media_id is None
    assert not get_store().head(old.storage_key)
    assert media_row(remote.name, "held").state == S.QUARANTINED
    assert media_row(remote.name, "recent").state == S.COMPLETE
    assert state(local) == S.COMPLETE
    # Fetched again on the next request.
    hits = remote.fed_hits()
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/old").status_code == 200
    assert remote.fed_hits() == hits + 1


@pytest.mark.parametrize("flag", ["include_quarantined", "include_protected"])
def test_the_remote_cache_purge_refuses_the_local_only_filters(db: None, flag: str) -> None:
    """Other servers' quarantined and protected media stays cached: a filter asking for
    it is refused rather than silently narrowed."""
    which = DeletionFilter(timezone.now(), **{flag: True})
    with pytest.raises(ValueError):
        moderation.purge_remote_cache_before(which, by=MOD)
    assert not ModerationRecord.objects.exists()


def test_purged_remote_media_left_by_a_storage_outage_is_finished_by_the_sweep(
    alice: MatrixClient, remote: Remote, monkeypatch: pytest.MonkeyPatch
) -> None:
    from msc3870.errors import StorageUnavailable

    remote.files["a"] = (b"a" * 100, "text/plain")
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/a").status_code == 200
    media = media_row(remote.name, "a")

    def down(pks: list[int]) -> Any:
        raise StorageUnavailable("storage is down")

    monkeypatch.setattr(maintenance, "delete_evicted", down)
    later = timezone.now() + timedelta(hours=2)
    assert moderation.purge_remote_cache_before(DeletionFilter(later), by=MOD) == 1
    assert media_row(remote.name, "a").state == S.DELETED
    monkeypatch.undo()
    maintenance.evict_remote_media()
    assert not Media.objects.filter(pk=media.pk).exists()


# ---------------------------------------------------------------------- re-screening


def test_rescreen_quarantines_on_a_refusal_and_records_a_pass(alice: MatrixClient) -> None:
    good = media_of(alice.uploaded(b"GOOD content"))
    evil = media_of(alice.uploaded(b"EVIL content"))
    moderation.protect(evil, by=MOD)
    checks = [
        "msc3870.screening.check_size",
        "msc3870.screening.check_sha256",
        "tests.checks.refuse_evil_signature",
    ]
    with msc3870_settings(CHECKS=checks):
        assert moderation.rescreen(good, by=MOD, reason="signature update") == "passed"
        assert moderation.rescreen(evil, by=MOD, reason="signature update") == "quarantined"
        assert moderation.rescreen(evil, by=MOD) == "skipped"  # not complete
    assert state(good) == S.COMPLETE
    assert state(evil) == S.QUARANTINED  # protection does not spare it
    assert records_of(good) == [(A.RESCREEN, S.COMPLETE, S.COMPLETE, MOD)]
    assert records_of(evil)[-1] == (A.RESCREEN, S.COMPLETE, S.QUARANTINED, MOD)
    refused = ModerationRecord.objects.filter(media=evil, action=A.RESCREEN).get()
    assert "Test.Evil" in refused.reason and "signature update" in refused.reason
    assert downloads(alice, evil) == 404


def test_rescreen_ignores_the_quota_and_reports_missing_bytes(alice: MatrixClient) -> None:
    media = media_of(alice.uploaded(b"x" * 100))
    with msc3870_settings(USER_QUOTA_BYTES=10):
        assert moderation.rescreen(media, by=MOD) == "passed"
    get_store().delete(media.storage_key)
    assert moderation.rescreen(media, by=MOD) == "missing"
    assert state(media) == S.COMPLETE


def test_rescreen_many_counts_outcomes(alice: MatrixClient) -> None:
    items = [media_of(alice.uploaded(f"item {n}".encode())) for n in range(3)]
    moderation.quarantine(items[2], by=MOD)
    with msc3870_settings(CHECKS=["tests.checks.reject_everything"]):
        result = moderation.rescreen_many(Media.objects.all(), by=MOD, batches=Batches(size=2))
    assert (result["quarantined"], result["skipped"], result["passed"]) == (2, 1, 0)


def test_a_failing_check_leaves_the_item_and_records_nothing(alice: MatrixClient) -> None:
    media = media_of(alice.uploaded())
    with msc3870_settings(CHECKS=["tests.checks.fail_to_run"]):
        with pytest.raises(ConnectionError):
            moderation.rescreen(media, by=MOD)
        assert moderation.rescreen_many([media.pk], by=MOD)["failed"] == 1
    assert state(media) == S.COMPLETE
    assert records_of(media) == []


# ---------------------------------------------------------------------- commands


def test_management_commands(alice: MatrixClient, bob: MatrixClient) -> None:
    mine = media_of(alice.uploaded(b"alice's"))
    twin = media_of(bob.uploaded(b"alice's"))
    out = StringIO()
    call_command("quarantine_user", alice.user_id, "--reason", "spam", "--actor", MOD, stdout=out)
    assert "Quarantined 1" in out.getvalue()
    assert records_of(mine) == [(A.QUARANTINE, S.COMPLETE, S.QUARANTINED, MOD)]
    call_command("quarantine_content", mine.sha256, "--reason", "bad", stdout=out)
    assert state(twin) == S.QUARANTINED
    assert records_of(twin)[0][3] == "manage.py"
    assert moderation.is_hash_blocked(mine.sha256)
    call_command("unblock_hash", mine.sha256, "--reason", "ok", stdout=out)
    assert not moderation.is_hash_blocked(mine.sha256)
    # Approved, with the other copy still quarantined: refused again (a quarantined twin
    # blocks its bytes), then passed once both are approved.
    moderation.approve(twin, by=MOD)
    call_command("rescreen_media", "--user", bob.user_id, stdout=out)
    assert "quarantined: 1" in out.getvalue()
    moderation.approve(twin, by=MOD)
    moderation.approve(mine, by=MOD)
    call_command("rescreen_media", "--user", bob.user_id, stdout=out)
    assert "passed: 1" in out.getvalue()
    aged(twin, created_days=40, accessed_days=None)
    call_command("delete_local_media", "--before-days", "30", stdout=out)
    assert state(twin) == S.DELETED
    call_command("purge_remote_cache", "--before-days", "30", stdout=out)
    assert "Deleted 0" in out.getvalue()
