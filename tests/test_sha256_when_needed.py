"""SHA256_WHEN "needed": bytes are read whole and hashed only when other media may hold
them (the same size and first 8 KiB), and deduplication and the block list still find
every twin. Uploads go through the upload URL (local disk), whose bytes this server does
not hash as they arrive."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from msc3870 import moderation
from msc3870.models import Media, MediaState
from msc3870.stores.local import LocalMediaStore

from .helpers import MatrixClient, media_files, media_of, msc3870_settings, mxc_path

S = MediaState
PREFIX = 8192


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def whole_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The keys read whole (to hash or scan), in order."""
    read: list[str] = []
    real = LocalMediaStore.read_whole

    def spy(store: LocalMediaStore, key: str) -> Iterator[bytes | memoryview]:
        read.append(key)
        return real(store, key)

    monkeypatch.setattr(LocalMediaStore, "read_whole", spy)
    yield read


def test_unique_content_is_not_read_whole(alice: MatrixClient, whole_reads: list[str]) -> None:
    data = os.urandom(3 * PREFIX)
    media = media_of(alice.upload_through_url(data))
    assert media.state == S.COMPLETE
    assert whole_reads == []
    assert media.sha256 == ""
    assert media.prefix_sha256 == sha256(data[:PREFIX])
    # Its id names its bytes for caches.
    got = alice.get(f"/_matrix/client/v1/media/download/{mxc_path(media.mxc_uri)}")
    assert got["ETag"] == f'"{media.media_id}"'
    assert b"".join(got.streaming_content) == data


def test_identical_content_hashes_both_and_is_stored_once(
    alice: MatrixClient, bob: MatrixClient, whole_reads: list[str]
) -> None:
    data = os.urandom(3 * PREFIX)
    first = media_of(alice.upload_through_url(data))
    second = media_of(bob.upload_through_url(data))
    # The first was hashed when the second could share its bytes; then the second.
    assert whole_reads == [first.storage_key, second.served_key]
    first.refresh_from_db()
    assert (first.sha256, second.sha256) == (sha256(data), sha256(data))
    assert second.state == S.COMPLETE
    assert second.storage_key == first.storage_key
    assert media_files() == [first.storage_key]
    # The first is hashed already: only the new bytes are read.
    third = media_of(bob.upload_through_url(data))
    assert whole_reads[2:] == [third.served_key]
    assert third.storage_key == first.storage_key


def test_same_size_and_first_bytes_but_other_bytes_are_not_shared(
    alice: MatrixClient, bob: MatrixClient, whole_reads: list[str]
) -> None:
    head = os.urandom(PREFIX)
    first = media_of(alice.upload_through_url(head + b"a" * 100))
    second = media_of(bob.upload_through_url(head + b"b" * 100))
    assert whole_reads == [first.storage_key, second.served_key]
    first.refresh_from_db()
    assert first.sha256 == sha256(head + b"a" * 100)
    assert second.sha256 == sha256(head + b"b" * 100)
    assert second.storage_key != first.storage_key
    assert len(media_files()) == 2


def test_the_same_first_bytes_at_another_size_are_not_hashed(
    alice: MatrixClient, bob: MatrixClient, whole_reads: list[str]
) -> None:
    head = os.urandom(PREFIX)
    media_of(alice.upload_through_url(head + b"a" * 100))
    second = media_of(bob.upload_through_url(head + b"a" * 101))
    assert whole_reads == []
    assert second.sha256 == ""


def test_media_hashed_before_first_bytes_were_recorded_is_a_possible_twin(
    alice: MatrixClient, bob: MatrixClient, whole_reads: list[str]
) -> None:
    """Rows from before the migration have a SHA-256 and no first bytes."""
    data = os.urandom(2 * PREFIX)
    with msc3870_settings(SHA256_WHEN="always"):
        old = media_of(alice.upload_through_url(data))
    Media.objects.filter(pk=old.pk).update(prefix_sha256="")
    new = media_of(bob.upload_through_url(data))
    assert whole_reads == [old.storage_key, new.served_key]  # "always", then the new bytes
    assert new.storage_key == old.storage_key


def test_quarantined_content_never_hashed_is_still_blocked(
    alice: MatrixClient, bob: MatrixClient, whole_reads: list[str]
) -> None:
    data = os.urandom(2 * PREFIX)
    bad = media_of(alice.upload_through_url(data))
    assert bad.sha256 == ""
    assert moderation.quarantine(bad, by="mod")
    again = media_of(bob.upload_through_url(data))
    assert again.state == S.REJECTED
    assert "blocked" in again.rejection_reason
    assert media_of(bad.mxc_uri).sha256 == sha256(data)


def test_content_rejected_by_a_moderator_is_hashed_before_its_bytes_go(
    alice: MatrixClient, bob: MatrixClient, whole_reads: list[str]
) -> None:
    data = os.urandom(2 * PREFIX)
    bad = media_of(alice.upload_through_url(data))
    assert moderation.reject(bad, by="mod")
    bad = media_of(bad.mxc_uri)
    assert bad.objects_deleted_at is not None  # deleted at once here (no broker)
    assert media_files() == []
    assert bad.sha256 == sha256(data)
    assert whole_reads == [bad.storage_key]
    again = media_of(bob.upload_through_url(data))
    assert again.state == S.REJECTED
    assert "blocked" in again.rejection_reason


def test_always_hashes_every_upload(alice: MatrixClient, whole_reads: list[str]) -> None:
    data = os.urandom(PREFIX + 1)
    with msc3870_settings(SHA256_WHEN="always"):
        media = media_of(alice.upload_through_url(data))
    assert media.sha256 == sha256(data)
    assert whole_reads == [media.served_key]


def test_an_unknown_choice_fails_the_system_checks() -> None:
    with msc3870_settings(SHA256_WHEN="sometimes"), pytest.raises(SystemCheckError) as raised:
        call_command("check")
    assert "SHA256_WHEN" in str(raised.value)


def test_a_possible_twin_whose_bytes_are_gone_is_skipped(
    alice: MatrixClient, bob: MatrixClient, whole_reads: list[str]
) -> None:
    data = os.urandom(2 * PREFIX)
    first = media_of(alice.upload_through_url(data))
    (Path(settings.MEDIA_DIR) / first.storage_key).unlink()  # lost by the store
    second = media_of(bob.upload_through_url(data))
    assert second.state == S.COMPLETE
    assert second.storage_key == second.served_key  # nothing to share
    assert second.sha256 == sha256(data)
    assert media_of(first.mxc_uri).sha256 == ""
