"""Upload to a URL with ``S3_INCOMING_BUCKET``: upload URLs write to a versioned bucket of
their own, ``/complete`` records the version it looked at, the checks read that version
and the verdict serves it; the copy to the media bucket, the switch of the row and the
deletion of every version follow in the background (``msc3870.served_copies``). S3 with
moto's in-process mock (the real S3 server: ``services/test_s3_flow.py``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from io import StringIO
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from botocore.exceptions import ClientError
from django.core.management import call_command
from django.utils import timezone

from msc3870 import maintenance, moderation, queue, served_copies, storage_keys
from msc3870.models import Media, MediaState
from msc3870.stores import get_store
from msc3870.stores.s3 import VERSIONS_LISTED_TOGETHER_MIN, S3MediaStore

from .federation_helpers import FakeRemote, multipart
from .helpers import (
    BUCKET,
    INCOMING_BUCKET,
    MatrixClient,
    body_of,
    bucket_keys,
    every_read,
    media_of,
    msc3870_settings,
    png_bytes,
)

S = MediaState
MOD = "@mod:localhost"
SWAP = b"<html><script>swapped after /complete</script></html>"


@pytest.fixture
def versioned(s3: Any) -> Iterator[Any]:
    """The S3 store with an incoming bucket, made (versioning on) as ensure_media_bucket
    makes it; the boto3 client."""
    with msc3870_settings(S3_INCOMING_BUCKET=INCOMING_BUCKET):
        get_store().ensure_bucket()  # type: ignore[attr-defined]
        yield s3


@pytest.fixture
def background(monkeypatch: pytest.MonkeyPatch) -> list[Callable[[], Any]]:
    """Work sent to this process's background pool (the screening after /complete's
    answer, the copy after the verdict) is held here, to be run by the test."""
    held: list[Callable[[], Any]] = []
    monkeypatch.setattr(queue, "run_in_background", held.append)
    return held


def put(s3: Any, created: dict[str, Any], data: bytes, content_type: str) -> str:
    """A client's PUT to its upload URL, in the incoming bucket: the version it made."""
    url = urlsplit(created["upload_url"])
    assert url.netloc.startswith(INCOMING_BUCKET + ".")  # virtual-hosted: the bucket
    key = url.path.lstrip("/")
    assert key == media_of(created["content_uri"]).incoming_key
    done = s3.put_object(Bucket=INCOMING_BUCKET, Key=key, Body=data, ContentType=content_type)
    return str(done["VersionId"])


def versions(s3: Any) -> list[tuple[str, str]]:
    """Every version and delete marker in the incoming bucket, as (key, version id)."""
    listed = s3.list_object_versions(Bucket=INCOMING_BUCKET)
    items = listed.get("Versions", []) + listed.get("DeleteMarkers", [])
    return sorted((item["Key"], item["VersionId"]) for item in items)


def run(held: list[Callable[[], Any]]) -> None:
    """Run the background work held so far, in order (and what it sends meanwhile)."""
    while held:
        held.pop(0)()


def once_downloads_of_copied_versions_are_over() -> None:
    """The cleanup sweep, run once no download of a copied version can still be running."""
    long_ago = timezone.now() - served_copies.versions_kept() - timedelta(seconds=1)
    Media.objects.exclude(incoming_copied_at=None).update(incoming_copied_at=long_ago)
    maintenance.delete_dead_objects()


def completed_with_a_swap(
    s3: Any, alice: MatrixClient, background: list[Callable[[], Any]], data: bytes
) -> tuple[Media, str]:
    """An image uploaded to its URL and completed, then written over through the URL
    before the screening ran: the row as /complete left it, and the first version."""
    created = alice.create()
    first = put(s3, created, data, "image/png")
    assert alice.complete(created["content_uri"]).status_code == 200
    put(s3, created, SWAP, "text/html")
    media = media_of(created["content_uri"])
    assert (media.state, media.incoming_version) == (S.PROCESSING, first)
    return media, first


def test_a_put_after_complete_is_never_served(
    versioned: Any,
    alice: MatrixClient,
    bob: MatrixClient,
    peer: FakeRemote,
    background: list[Callable[[], Any]],
) -> None:
    data = png_bytes(64, 64)
    media, first = completed_with_a_swap(versioned, alice, background, data)
    background.pop(0)()  # the screening: reads the version /complete looked at
    media = media_of(media.mxc_uri)
    assert media.state == S.COMPLETE
    assert media.storage_key == storage_keys.pinned(media.incoming_key, first)
    assert (media.size, media.content_type) == (len(data), "image/png")
    assert media.prefix_sha256 == hashlib.sha256(data[:8192]).hexdigest()
    assert bucket_keys(versioned) == []  # served before any copy
    # Every read path serves the first version, never the swap (thumbnails are made
    # from it too: the swap is no image).
    answers = every_read(bob, media.media_id, peer)
    assert body_of(answers["v1 download"]) == data
    assert body_of(answers["legacy download"]) == data
    assert multipart(answers["federation download"])[1].data == data
    for name in ("v1 thumbnail", "legacy thumbnail"):
        assert answers[name].status_code == 200, name
    assert multipart(answers["federation thumbnail"])[1].data.startswith(b"\x89PNG")
    # A redirect names the version, and the store answers it.
    with msc3870_settings(REDIRECT_DOWNLOADS=True):
        redirect = bob.download(media.mxc_uri)
    assert redirect.status_code == 307
    location = urlsplit(redirect["Location"])
    assert location.netloc.startswith(INCOMING_BUCKET + ".")
    assert parse_qs(location.query)["versionId"] == [first]
    assert parse_qs(location.query)["response-content-encoding"] == ["identity"]
    got = versioned.get_object(Bucket=INCOMING_BUCKET, Key=media.incoming_key, VersionId=first)
    assert got["Body"].read() == data

    run(background)  # the copy to the media bucket
    media = media_of(media.mxc_uri)
    assert media.storage_key == media.served_key
    assert bucket_keys(versioned) == [media.served_key] + [
        key for key in bucket_keys(versioned) if key.startswith("thumbnails/")
    ]
    assert body_of(bob.download(media.mxc_uri)) == data
    # The redirect handed out before the switch still answers: the versions stay while
    # downloads of them may run, then the cleanup sweep deletes them all.
    maintenance.delete_dead_objects()
    assert len(versions(versioned)) == 2
    assert requests.get(redirect["Location"], timeout=10).content == data
    once_downloads_of_copied_versions_are_over()
    assert versions(versioned) == []  # the version served, and the swap, are gone
    assert media_of(media.mxc_uri).incoming_copied_at is None
    with msc3870_settings(REDIRECT_DOWNLOADS=True):
        copied = bob.download(media.mxc_uri)
    assert urlsplit(copied["Location"]).netloc.startswith(BUCKET + ".")
    assert "versionId" not in parse_qs(urlsplit(copied["Location"]).query)


def test_the_checks_read_the_version_complete_looked_at(
    versioned: Any, alice: MatrixClient, background: list[Callable[[], Any]]
) -> None:
    """Blocked bytes written over with harmless ones after /complete are still refused:
    the checks read the version /complete looked at, not what the URL holds now."""
    blocked = png_bytes(16, 16)
    digest = hashlib.sha256(blocked).hexdigest()
    prefix = hashlib.sha256(blocked[:8192]).hexdigest()
    assert moderation.block_hash(digest, by=MOD, size=len(blocked), prefix_sha256=prefix)
    created = alice.create()
    put(versioned, created, blocked, "image/png")
    assert alice.complete(created["content_uri"]).status_code == 200
    put(versioned, created, png_bytes(17, 17), "image/png")
    run(background)
    media = media_of(created["content_uri"])
    assert media.state == S.REJECTED
    assert "blocked" in media.rejection_reason
    assert versions(versioned) == []  # both versions deleted with the rejection
    assert bucket_keys(versioned) == []


def test_the_copy_is_safe_to_run_again(
    versioned: Any, alice: MatrixClient, background: list[Callable[[], Any]]
) -> None:
    data = png_bytes(16, 16)
    media, _ = completed_with_a_swap(versioned, alice, background, data)
    background.pop(0)()
    assert served_copies.copy_to_served_key(media.pk) is True
    assert served_copies.copy_to_served_key(media.pk) is False  # redelivered: nothing to do
    run(background)  # the copy the verdict queued, after the one above
    media = media_of(media.mxc_uri)
    assert media.storage_key == media.served_key
    assert bucket_keys(versioned) == [media.served_key]
    once_downloads_of_copied_versions_are_over()
    once_downloads_of_copied_versions_are_over()  # again: nothing left to do
    assert versions(versioned) == []


def test_a_row_purged_while_its_version_is_copied_is_not_switched(
    versioned: Any,
    alice: MatrixClient,
    background: list[Callable[[], Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The switch is a compare-and-set on the version copied, live rows only: a purge
    during the copy wins, and the copy is deleted with the versions."""
    data = png_bytes(16, 16)
    media, _ = completed_with_a_swap(versioned, alice, background, data)
    background.pop(0)()
    real_copy = S3MediaStore.copy

    def copy_then_purge(self: S3MediaStore, *args: Any, **kwargs: Any) -> None:
        real_copy(self, *args, **kwargs)
        assert moderation.purge(media_of(media.mxc_uri), by=MOD, reason="r")

    monkeypatch.setattr(S3MediaStore, "copy", copy_then_purge)
    run(background)  # the copy, and the purge's cleanup
    media = media_of(media.mxc_uri)
    assert media.state == S.DELETED
    assert storage_keys.is_pinned_incoming(media.storage_key)  # never switched
    assert media.objects_deleted_at is not None
    assert bucket_keys(versioned) == []
    assert versions(versioned) == []


def test_a_served_version_is_not_an_orphan_until_it_is_copied(
    versioned: Any, alice: MatrixClient, background: list[Callable[[], Any]]
) -> None:
    data = png_bytes(16, 16)
    media, _ = completed_with_a_swap(versioned, alice, background, data)
    background.pop(0)()
    assert maintenance.delete_orphaned_uploads() == 0
    assert len(versions(versioned)) == 2
    assert body_of(alice.download(media.mxc_uri)) == data
    run(background)
    assert maintenance.delete_orphaned_uploads() == 0  # downloads of it may still run
    once_downloads_of_copied_versions_are_over()
    assert versions(versioned) == []
    key = urlsplit(get_store().upload_target(media).url).path.lstrip("/")
    versioned.put_object(Bucket=INCOMING_BUCKET, Key=key, Body=SWAP)  # the URL still works
    assert maintenance.delete_orphaned_uploads() == 1
    assert versions(versioned) == []


def test_the_stuck_sweep_queues_a_copy_that_never_ran(
    versioned: Any, alice: MatrixClient, background: list[Callable[[], Any]]
) -> None:
    data = png_bytes(16, 16)
    media, _ = completed_with_a_swap(versioned, alice, background, data)
    background.pop(0)()
    background.clear()  # the copy is lost (a worker died with it)
    assert maintenance.redispatch_stuck() == 0  # too recent
    Media.objects.filter(pk=media.pk).update(completed_at=timezone.now() - timedelta(hours=1))
    assert maintenance.redispatch_stuck() == 1
    media = media_of(media.mxc_uri)
    assert media.storage_key == media.served_key
    assert maintenance.redispatch_stuck() == 0


def test_expiry_deletes_every_version_of_an_unused_upload_url(
    versioned: Any, alice: MatrixClient
) -> None:
    created = alice.create()
    put(versioned, created, b"one", "text/plain")
    put(versioned, created, b"two", "text/plain")
    media = media_of(created["content_uri"])
    Media.objects.filter(pk=media.pk).update(unused_expires_at=timezone.now())
    result = maintenance.expire_pending()
    assert (result.moved, result.objects_deleted) == (1, 1)
    assert versions(versioned) == []


def requests_sent(store: Any) -> dict[str, int]:
    """How many ListObjectVersions and DeleteObjects requests ``store`` sends from now on."""
    sent = {"ListObjectVersions": 0, "DeleteObjects": 0, "keys": 0}

    def count(model: Any, params: dict[str, Any], **kwargs: Any) -> None:
        sent[model.name] += 1
        if model.name == "DeleteObjects":
            sent["keys"] += len(params["Delete"]["Objects"])

    store.client.meta.events.register("before-parameter-build.s3.ListObjectVersions", count)
    store.delete_client.meta.events.register("before-parameter-build.s3.DeleteObjects", count)
    return sent


def make_versions(s3: Any, keys: list[str], count: int = 2, deleted: bool = False) -> None:
    for key in keys:
        for _ in range(count):
            s3.put_object(Bucket=INCOMING_BUCKET, Key=key, Body=b"version")
        if deleted:  # a delete marker in front of its two versions
            s3.delete_object(Bucket=INCOMING_BUCKET, Key=key)


def test_many_upload_urls_objects_are_listed_together(versioned: Any) -> None:
    """A batch of upload URLs' objects: their versions listed in one request under their
    common prefix, not one per key; every version and delete marker of those keys goes,
    and nothing else (not a key that only starts with a wanted one)."""
    wanted = [f"incoming/w{index:02d}" for index in range(40)]
    kept = ["incoming/w05x", "incoming/kept", "media/w00"]
    make_versions(versioned, wanted[:20])
    make_versions(versioned, wanted[20:30], deleted=True)  # wanted[30:] have no object
    make_versions(versioned, kept[:2])
    versioned.put_object(Bucket=INCOMING_BUCKET, Key=kept[2], Body=b"not an upload URL's")
    store = get_store()
    sent = requests_sent(store)
    store.delete_many(wanted)
    assert sent == {"ListObjectVersions": 1, "DeleteObjects": 1, "keys": 20 * 2 + 10 * 3}
    left = {key for key, _ in versions(versioned)}
    assert left == set(kept)
    assert len(versions(versioned)) == 5  # the kept keys' versions all stay


def test_a_long_listing_stops_and_the_rest_is_listed_key_by_key(versioned: Any) -> None:
    """An incoming bucket holding far more versions than a batch wants: the walk under
    the common prefix stops after a page per ``VERSIONS_LISTED_TOGETHER_MIN`` keys, and
    the keys from there on are listed one by one, the key whose versions the page cut
    included; every version of each goes, each once."""
    store = get_store()
    others = [f"incoming/a{index:04d}" for index in range(333)]
    make_versions(versioned, others, count=3)  # 999 versions, then the page's end
    cut = "incoming/a0333"  # its first version ends the page, two more start the next
    make_versions(versioned, [cut], count=3)
    wanted = [f"incoming/b{index:02d}" for index in range(VERSIONS_LISTED_TOGETHER_MIN)]
    make_versions(versioned, wanted)
    sent = requests_sent(store)
    store.delete_many([others[0], cut, *wanted])
    # One page of the walk (under "incoming/"), then the names from where it stopped.
    assert sent["ListObjectVersions"] == 1 + 1 + len(wanted)
    assert sent["DeleteObjects"] == 1
    assert sent["keys"] == 3 + 3 + 2 * len(wanted)  # each version once
    pages = versioned.get_paginator("list_object_versions").paginate(Bucket=INCOMING_BUCKET)
    left = [item["Key"] for page in pages for item in page.get("Versions", [])]
    assert sorted(left) == sorted(others[1:] * 3)


def test_a_few_upload_urls_objects_are_listed_key_by_key(versioned: Any) -> None:
    wanted = ["incoming/x1", "incoming/x2"]
    make_versions(versioned, [*wanted, "incoming/x10"])
    store = get_store()
    sent = requests_sent(store)
    store.delete_many(wanted)
    assert sent == {"ListObjectVersions": 2, "DeleteObjects": 1, "keys": 4}
    assert {key for key, _ in versions(versioned)} == {"incoming/x10"}


def test_a_pinned_version_is_never_shared(
    versioned: Any, alice: MatrixClient, background: list[Callable[[], Any]]
) -> None:
    """Identical content completed while the first upload is still served from its
    upload URL's bucket gets a version of its own: the first one's is deleted once
    copied."""
    data = png_bytes(16, 16)
    with msc3870_settings(SHA256_WHEN="always"):
        first, _ = completed_with_a_swap(versioned, alice, background, data)
        background.pop(0)()
        (first_copy,) = background
        background.clear()
        second, _ = completed_with_a_swap(versioned, alice, background, data)
        background.pop(0)()
        background.append(first_copy)
    first, second = media_of(first.mxc_uri), media_of(second.mxc_uri)
    assert storage_keys.is_pinned_incoming(second.storage_key)
    assert second.storage_key != first.storage_key
    run(background)
    for media in (media_of(first.mxc_uri), media_of(second.mxc_uri)):
        assert media.storage_key == media.served_key
        assert body_of(alice.download(media.mxc_uri)) == data
    once_downloads_of_copied_versions_are_over()
    assert versions(versioned) == []


def test_without_versioning_the_bytes_are_moved_first(
    s3: Any, alice: MatrixClient, background: list[Callable[[], Any]]
) -> None:
    """An incoming bucket without versioning answers the version "null", which the next
    PUT replaces: nothing is pinned to it, and the bytes are moved before the checks."""
    s3.create_bucket(Bucket=INCOMING_BUCKET)
    with msc3870_settings(S3_INCOMING_BUCKET=INCOMING_BUCKET):
        created = alice.create()
        key = urlsplit(created["upload_url"]).path.lstrip("/")
        s3.put_object(Bucket=INCOMING_BUCKET, Key=key, Body=png_bytes(16, 16))
        assert alice.complete(created["content_uri"]).status_code == 200
        assert media_of(created["content_uri"]).incoming_version == ""
        run(background)
        media = media_of(created["content_uri"])
    assert (media.state, media.storage_key) == (S.COMPLETE, media.served_key)
    assert bucket_keys(s3) == [media.served_key]
    assert bucket_keys(s3, bucket=INCOMING_BUCKET) == []


def test_a_pinned_version_shares_content_already_copied(
    versioned: Any, alice: MatrixClient, background: list[Callable[[], Any]]
) -> None:
    """Identical content already served from the media bucket is stored once: the second
    upload points at it, and its own versions are deleted at once (nothing to copy)."""
    data = png_bytes(16, 16)
    with msc3870_settings(SHA256_WHEN="always"):
        first, _ = completed_with_a_swap(versioned, alice, background, data)
        run(background)  # screened, copied
        second, _ = completed_with_a_swap(versioned, alice, background, data)
        run(background)
    first, second = media_of(first.mxc_uri), media_of(second.mxc_uri)
    assert first.storage_key == first.served_key
    assert (second.state, second.storage_key) == (S.COMPLETE, first.served_key)
    assert bucket_keys(versioned) == [first.served_key]
    # Never served, the second's versions go at once; the first's once downloads are over.
    assert {key for key, _ in versions(versioned)} == {first.incoming_key}
    once_downloads_of_copied_versions_are_over()
    assert versions(versioned) == []
    assert body_of(alice.download(second.mxc_uri)) == data


def test_ensure_media_bucket_makes_the_incoming_bucket_versioned_and_expiring(s3: Any) -> None:
    out = StringIO()
    with msc3870_settings(S3_INCOMING_BUCKET=INCOMING_BUCKET, UNUSED_EXPIRATION=86400):
        call_command("ensure_media_bucket", stdout=out)
        call_command("ensure_media_bucket", stdout=StringIO())  # twice is fine
    assert "incoming/ expire after 2 days" in out.getvalue()
    versioning = s3.get_bucket_versioning(Bucket=INCOMING_BUCKET)
    assert versioning["Status"] == "Enabled"
    (rule,) = s3.get_bucket_lifecycle_configuration(Bucket=INCOMING_BUCKET)["Rules"]
    assert rule["Filter"]["Prefix"] == "incoming/" and rule["Expiration"]["Days"] == 2
    assert rule["NoncurrentVersionExpiration"]["NoncurrentDays"] == 2
    with pytest.raises(ClientError):  # the media bucket keeps no rule for incoming/
        s3.get_bucket_lifecycle_configuration(Bucket=BUCKET)
