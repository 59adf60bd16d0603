"""Upload to a URL on S3: /complete answers on metadata, one read of the bytes, the
copy replaces the uploader's metadata, multipart copies, the incoming/ lifecycle rule.
S3 with moto's in-process mock (the real S3 server: tests/services/test_s3_flow.py)."""

from __future__ import annotations

import hashlib
import os
from io import StringIO
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from botocore.exceptions import ClientError
from django.core.management import call_command

from msc3870 import queue, verdicts
from msc3870.models import Media, MediaState
from msc3870.stores import ObjectInfo, get_store
from msc3870.stores.s3 import S3MediaStore, sha256_of_copy

from .helpers import (
    BUCKET,
    FakeClamd,
    MatrixClient,
    bucket_keys,
    client_put,
    media_of,
    msc3870_settings,
    mxc_path,
    png_bytes,
)

S = MediaState
MiB = 1024 * 1024


@pytest.fixture
def deferred(monkeypatch: pytest.MonkeyPatch) -> list[Media]:
    """Screening that /complete leaves for after its answer is held here, not run."""
    held: list[Media] = []

    def hold(work: verdicts.InProcessScreening) -> None:
        held.append(work.media)
        held_incoming.append(work.incoming)

    monkeypatch.setattr(queue, "run_in_background", hold)
    return held


def keys_passed_to(monkeypatch: pytest.MonkeyPatch, method: str) -> list[str]:
    """The keys ``S3MediaStore.<method>(key)`` is called with from now on (it still runs)."""
    keys: list[str] = []
    real = getattr(S3MediaStore, method)

    def spy(self: S3MediaStore, key: str) -> Any:
        keys.append(key)
        return real(self, key)

    monkeypatch.setattr(S3MediaStore, method, spy)
    return keys


#: What /complete read of the incoming object, beside each screening ``deferred`` holds.
held_incoming: list[ObjectInfo | None] = []


@pytest.fixture(autouse=True)
def _no_held_incoming() -> None:
    held_incoming.clear()


def test_complete_answers_before_the_full_object_checks(
    s3: Any, alice: MatrixClient, deferred: list[Media]
) -> None:
    created = alice.create()
    data = png_bytes(16, 16)
    client_put(s3, created, data, "image/png")
    response = alice.complete(created["content_uri"])
    assert response.status_code == 200, response.content
    assert response.json() == {"content_uri": created["content_uri"]}
    media = media_of(created["content_uri"])
    # Answered on the HEAD and the ranged read: not moved, not hashed yet.
    assert media.state == S.PROCESSING
    assert [m.pk for m in deferred] == [media.pk]
    assert bucket_keys(s3) == [media.incoming_key]
    # A recipient waits meanwhile (MSC2246), as for any pending media.
    path = mxc_path(created["content_uri"])
    assert alice.get(f"/_matrix/client/v1/media/download/{path}?timeout_ms=0").status_code == 504
    # A retried /complete answers at once too.
    assert alice.complete(created["content_uri"]).status_code == 200
    verdicts.screen_here(deferred[0])
    media.refresh_from_db()
    assert media.state == S.COMPLETE
    assert media.sha256 == hashlib.sha256(data).hexdigest()
    assert bucket_keys(s3) == [media.served_key]


def test_the_object_complete_read_spares_the_screening_a_head(
    s3: Any, alice: MatrixClient, deferred: list[Media], monkeypatch: pytest.MonkeyPatch
) -> None:
    """/complete's ranged read gave the incoming object's size, type and ETag: the
    screening after the answer copies that version (``CopySourceIfMatch``) without a HEAD
    of its own."""
    created = alice.create()
    data = png_bytes(16, 16)
    client_put(s3, created, data, "image/png")
    assert alice.complete(created["content_uri"]).status_code == 200
    (incoming,) = held_incoming
    assert incoming is not None and incoming.size == len(data) and incoming.etag
    heads = keys_passed_to(monkeypatch, "head")
    copies: list[dict[str, Any]] = []
    real_copy = S3MediaStore._copy_object

    def copy(self: Any, source: str, destination: str, metadata: Any, condition: Any) -> Any:
        copies.append(condition)
        return real_copy(self, source, destination, metadata, condition)

    monkeypatch.setattr(S3MediaStore, "_copy_object", copy)
    verdicts.screen_here(deferred[0], incoming=incoming)
    media = media_of(created["content_uri"])
    assert media.state == S.COMPLETE
    assert media.incoming_key not in heads
    assert copies == [{"CopySourceIfMatch": incoming.etag}]


def test_an_incoming_object_written_over_after_complete_is_looked_at_again(
    s3: Any, alice: MatrixClient, deferred: list[Media], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store refuses the conditional copy (412: the client wrote over the object since
    /complete read it): the screening looks at the object again and decides on what is
    there now."""
    created = alice.create()
    client_put(s3, created, png_bytes(16, 16), "image/png")
    assert alice.complete(created["content_uri"]).status_code == 200
    (incoming,) = held_incoming
    bigger = png_bytes(32, 32)
    client_put(s3, created, bigger, "image/png")  # moto ignores CopySourceIfMatch: say 412
    real_copy = S3MediaStore._copy_object
    refused: list[str] = []

    def copy(self: Any, source: str, destination: str, metadata: Any, condition: Any) -> Any:
        if condition.get("CopySourceIfMatch") == incoming.etag:
            refused.append(source)
            raise ClientError({"Error": {"Code": "PreconditionFailed"}}, "CopyObject")
        return real_copy(self, source, destination, metadata, condition)

    monkeypatch.setattr(S3MediaStore, "_copy_object", copy)
    verdicts.screen_here(deferred[0], incoming=incoming)
    media = media_of(created["content_uri"])
    assert refused and media.state == S.COMPLETE
    assert (media.size, media.sha256) == (len(bigger), hashlib.sha256(bigger).hexdigest())


def test_the_checks_read_the_copy_not_the_object_complete_read(
    s3: Any, alice: MatrixClient, deferred: list[Media], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What keeps swapped bytes from being served is that the checks read the copy, at a
    key no URL can write, not the ETag the copy is pinned to (an MD5 for a single PUT:
    two objects can share one). Here the swap lands as the copy starts and the copy takes
    it, as it would for a colliding ETag: the checks see the swapped bytes and refuse them."""
    created = alice.create()
    client_put(s3, created, png_bytes(16, 16), "image/png")
    with msc3870_settings(DENIED_CONTENT_TYPES=["text/html"]):
        assert alice.complete(created["content_uri"]).status_code == 200
        (incoming,) = held_incoming
        real_copy = S3MediaStore._copy_object

        def copy(self: Any, source: str, destination: str, metadata: Any, condition: Any) -> Any:
            client_put(s3, created, b"<html><script>swapped</script></html>", "image/png")
            return real_copy(self, source, destination, metadata, {})

        monkeypatch.setattr(S3MediaStore, "_copy_object", copy)
        assert verdicts.screen_here(deferred[0], incoming=incoming) == "rejected"
    media = media_of(created["content_uri"])
    assert (media.state, media.rejection_errcode) == (S.REJECTED, "M_FORBIDDEN")
    assert bucket_keys(s3) == []


def test_a_retry_after_the_move_finds_the_bytes_moved(
    s3: Any, alice: MatrixClient, deferred: list[Media]
) -> None:
    """A screening that moved the bytes and died before recording it is retried with
    the same /complete read (a task's arguments): the conditional copy finds no source,
    the object is looked at again, and the moved bytes are screened."""
    created = alice.create()
    data = png_bytes(16, 16)
    client_put(s3, created, data, "image/png")
    assert alice.complete(created["content_uri"]).status_code == 200
    (incoming,) = held_incoming
    media = deferred[0]
    get_store().move(media.incoming_key, media.served_key, size=len(data))  # the first attempt
    verdicts.screen_here(media, incoming=incoming)
    media = media_of(created["content_uri"])
    # These bytes were screened: under 8 KiB, the hash of their first bytes is theirs.
    assert (media.state, media.prefix_sha256) == (S.COMPLETE, hashlib.sha256(data).hexdigest())
    assert bucket_keys(s3) == [media.served_key]


def test_with_a_broker_the_task_is_given_what_complete_read(
    s3: Any,
    alice: MatrixClient,
    broker_sends: list[tuple[str, tuple[Any, ...], Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The screening task's arguments carry /complete's read of the incoming object (JSON:
    size, type, ETag, version), and the task copies that version without a HEAD."""
    from msc3870 import tasks

    created = alice.create()
    data = png_bytes(16, 16)
    client_put(s3, created, data, "image/png")
    assert alice.complete(created["content_uri"]).status_code == 200
    ((name, args, kwargs),) = broker_sends
    media = media_of(created["content_uri"])
    assert (name, args) == ("msc3870.screen_media", (media.pk,))
    assert set(kwargs["incoming"]) == {"size", "content_type", "etag", "version_id"}
    assert kwargs["incoming"]["size"] == len(data) and kwargs["incoming"]["etag"]
    heads = keys_passed_to(monkeypatch, "head")
    assert tasks.screen_media_task(media.pk, incoming=kwargs["incoming"]) == "complete"
    assert media.incoming_key not in heads
    assert media_of(created["content_uri"]).state == S.COMPLETE


def test_setting_makes_complete_wait_for_the_verdict(
    s3: Any, alice: MatrixClient, deferred: list[Media]
) -> None:
    created = alice.create()
    client_put(s3, created, b"wait for me", "text/plain")
    with msc3870_settings(COMPLETE_WAITS_FOR_CHECKS=True):
        assert alice.complete(created["content_uri"]).status_code == 200
    assert deferred == []
    assert media_of(created["content_uri"]).state == S.COMPLETE


def test_oversized_upload_is_refused_from_its_head_and_never_copied(
    s3: Any, alice: MatrixClient, deferred: list[Media], monkeypatch: pytest.MonkeyPatch
) -> None:
    copies: list[tuple[str, str]] = []
    monkeypatch.setattr(S3MediaStore, "move", lambda self, a, b, **kw: copies.append((a, b)))
    created = alice.create()
    client_put(s3, created, b"x" * 2048, "text/plain")
    with msc3870_settings(MAX_UPLOAD_SIZE=1024):
        response = alice.complete(created["content_uri"])
    assert response.status_code == 413
    assert response.json()["errcode"] == "M_TOO_LARGE"
    assert media_of(created["content_uri"]).state == S.REJECTED
    assert copies == [] and deferred == []
    assert bucket_keys(s3) == []


def test_screening_refuses_an_object_grown_past_the_limit_without_copying(
    s3: Any, alice: MatrixClient, deferred: list[Media], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client can overwrite the incoming object after /complete answered: the size is
    looked at again before the copy."""
    created = alice.create()
    client_put(s3, created, b"small", "text/plain")
    with msc3870_settings(MAX_UPLOAD_SIZE=1024):
        assert alice.complete(created["content_uri"]).status_code == 200
        client_put(s3, created, b"y" * 4096, "text/plain")
        monkeypatch.setattr(S3MediaStore, "move", lambda *a, **kw: pytest.fail("copied"))
        assert verdicts.screen_row(deferred[0]) == "rejected"
    media = media_of(created["content_uri"])
    assert (media.state, media.rejection_errcode) == (S.REJECTED, "M_TOO_LARGE")
    assert bucket_keys(s3) == []


def test_denied_type_is_refused_before_the_answer(
    s3: Any, alice: MatrixClient, deferred: list[Media]
) -> None:
    created = alice.create()
    client_put(s3, created, png_bytes(), "image/png")
    with msc3870_settings(DENIED_CONTENT_TYPES=["image/*"]):
        response = alice.complete(created["content_uri"])
    assert response.status_code == 403
    assert "image/png" in response.json()["error"]
    assert deferred == [] and bucket_keys(s3) == []


def test_download_of_media_rejected_after_complete_is_not_found(
    s3: Any, alice: MatrixClient, bob: MatrixClient, deferred: list[Media]
) -> None:
    """Recipients may hold the id already; they get 404, as for any rejected media. The
    uploader hears the rejection from /complete."""
    created = alice.create()
    client_put(s3, created, b"looks fine at first", "text/plain")
    assert alice.complete(created["content_uri"]).status_code == 200
    with msc3870_settings(
        CHECKS=["msc3870.screening.check_size", "tests.checks.reject_everything"]
    ):
        assert verdicts.screen_row(deferred[0]) == "rejected"
    path = mxc_path(created["content_uri"])
    for url in (
        f"/_matrix/client/v1/media/download/{path}",
        f"/_matrix/media/v3/download/{path}",
    ):
        response = bob.get(url)
        assert response.status_code == 404, url
        assert response.json()["errcode"] == "M_NOT_FOUND"
    # The uploader's retried /complete says the same.
    again = alice.complete(created["content_uri"])
    assert (again.status_code, again.json()["errcode"]) == (403, "M_FORBIDDEN")
    assert bucket_keys(s3) == []


def test_copy_replaces_the_uploaders_metadata(s3: Any, alice: MatrixClient) -> None:
    created = alice.create()
    key = urlsplit(created["upload_url"]).path.lstrip("/")
    s3.put_object(
        Bucket=BUCKET,
        Key=key,
        Body=b"<html>gzip bomb?</html>",
        ContentType="text/html",
        ContentEncoding="gzip",
        CacheControl="public, max-age=31536000",
        ContentDisposition="attachment; filename=evil.html",
        Expires="Wed, 21 Oct 2037 07:28:00 GMT",
        Metadata={"owner": "attacker"},
    )
    assert alice.complete(created["content_uri"]).status_code == 200
    media = media_of(created["content_uri"])
    head = s3.head_object(Bucket=BUCKET, Key=media.storage_key)
    assert head["ContentType"] == "application/octet-stream"
    for header in ("ContentEncoding", "CacheControl", "ContentDisposition", "Expires"):
        assert header not in head, header
    assert head["Metadata"] == {}


def test_redirect_carries_type_disposition_and_cache_overrides(
    s3: Any, alice: MatrixClient
) -> None:
    created = alice.create()
    client_put(s3, created, b"plain words", "text/plain")
    path = mxc_path(created["content_uri"])
    done = alice.post(f"/_matrix/media/v1/upload/{path}/complete?filename=w.txt", b"{}")
    assert done.status_code == 200
    path = mxc_path(created["content_uri"])
    with msc3870_settings(REDIRECT_DOWNLOADS=True):
        private = alice.get(f"/_matrix/client/v1/media/download/{path}")
    public = alice.get(f"/_matrix/media/v3/download/{path}?allow_redirect=true")
    for response, cache in ((private, "private"), (public, "public")):
        assert response.status_code == 307
        query = parse_qs(urlsplit(response["Location"]).query)
        assert query["response-content-type"] == ["text/plain"]
        assert query["response-content-disposition"][0].startswith("inline")
        assert query["response-cache-control"][0].startswith(cache + ", max-age=")


def test_store_sha256_of_the_copy_spares_the_read(
    s3: Any, alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"hashed by the store"
    digest = hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(S3MediaStore, "_copy_object", lambda *a: _copy_returning(digest, *a))
    monkeypatch.setattr(S3MediaStore, "read_whole", lambda *a, **kw: pytest.fail("read back"))
    created = alice.create()
    client_put(s3, created, data, "text/plain")
    assert alice.complete(created["content_uri"]).status_code == 200
    media = media_of(created["content_uri"])
    assert (media.state, media.sha256) == (S.COMPLETE, digest)


def _copy_returning(
    digest: str, store: S3MediaStore, source: str, dest: str, meta: Any, condition: Any
) -> str:
    store.client.copy_object(
        Bucket=store.bucket,
        Key=dest,
        CopySource={"Bucket": store.bucket, "Key": source},
        **meta,
        **condition,
    )
    return digest


def test_copy_asks_for_sha256_and_falls_back_where_refused(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = get_store()
    calls: list[dict[str, Any]] = []
    real = store.client.copy_object  # type: ignore[attr-defined]

    def copy_object(**params: Any) -> Any:
        calls.append(params)
        if "ChecksumAlgorithm" in params:  # as R2 answers
            raise ClientError({"Error": {"Code": "NotImplemented"}}, "CopyObject")
        return real(**params)

    monkeypatch.setattr(store.client, "copy_object", copy_object)  # type: ignore[attr-defined]
    monkeypatch.setattr(S3MediaStore, "copy_checksum_refused", False)
    s3.put_object(Bucket=BUCKET, Key="incoming/a", Body=b"abc")
    assert store.move("incoming/a", "media/aa/a") is None
    assert [c.get("ChecksumAlgorithm") for c in calls] == ["SHA256", None]
    assert all(c["MetadataDirective"] == "REPLACE" for c in calls)
    s3.put_object(Bucket=BUCKET, Key="incoming/b", Body=b"abc")
    store.move("incoming/b", "media/bb/b")
    assert calls[-1].get("ChecksumAlgorithm") is None  # not asked again
    assert len(calls) == 3


def test_sha256_of_copy_takes_only_whole_object_digests() -> None:
    digest = hashlib.sha256(b"x").digest()
    import base64

    value = base64.b64encode(digest).decode()
    assert sha256_of_copy({"ChecksumSHA256": value}) == digest.hex()
    assert sha256_of_copy({"ChecksumSHA256": value, "ChecksumType": "FULL_OBJECT"}) == digest.hex()
    assert sha256_of_copy({"ChecksumSHA256": value + "-3"}) is None
    assert sha256_of_copy({"ChecksumSHA256": value, "ChecksumType": "COMPOSITE"}) is None
    assert sha256_of_copy({"ChecksumCRC32": "vU8OIg=="}) is None
    assert sha256_of_copy({"ChecksumSHA256": "c2hvcnQ="}) is None


def test_large_copies_go_in_parallel_parts(s3: Any) -> None:
    store = get_store()
    data = os.urandom(12 * MiB + 3)
    s3.put_object(Bucket=BUCKET, Key="incoming/big", Body=data, ContentEncoding="gzip")
    with msc3870_settings(S3_COPY_PART_THRESHOLD=6 * MiB, S3_COPY_PART_SIZE=5 * MiB):
        assert store.move("incoming/big", "media/bi/big", content_type="x/y") is None
    head = s3.head_object(Bucket=BUCKET, Key="media/bi/big")
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 2 MiB
    assert head["ContentType"] == "x/y" and "ContentEncoding" not in head
    assert s3.get_object(Bucket=BUCKET, Key="media/bi/big")["Body"].read() == data
    assert bucket_keys(s3, "incoming/") == []
    assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


def test_failed_part_copy_aborts_the_upload(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = get_store()
    s3.put_object(Bucket=BUCKET, Key="incoming/big", Body=os.urandom(11 * MiB))
    real = store.client.upload_part_copy  # type: ignore[attr-defined]

    def flaky(**params: Any) -> Any:
        if params["PartNumber"] == 2:
            raise ClientError({"Error": {"Code": "InternalError"}}, "UploadPartCopy")
        return real(**params)

    monkeypatch.setattr(store.client, "upload_part_copy", flaky)  # type: ignore[attr-defined]
    with (
        msc3870_settings(S3_COPY_PART_THRESHOLD=6 * MiB, S3_COPY_PART_SIZE=5 * MiB),
        pytest.raises(Exception, match="InternalError"),
    ):
        store.move("incoming/big", "media/bi/big")
    assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
    assert bucket_keys(s3) == ["incoming/big"]  # nothing lost: the move can be retried


def test_hash_and_scan_share_one_read(
    s3: Any,
    alice: MatrixClient,
    deferred: list[Media],
    clamd: FakeClamd,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads = keys_passed_to(monkeypatch, "read_whole")
    monkeypatch.setattr(S3MediaStore, "iter_bytes", lambda *a, **kw: pytest.fail("2nd read"))
    monkeypatch.setattr(S3MediaStore, "copy_checksum_refused", True)  # as SeaweedFS: no hash
    data = os.urandom(3 * MiB)
    created = alice.create()
    client_put(s3, created, data, "application/octet-stream")
    with msc3870_settings(CLAMAV_URL=clamd.url):
        assert alice.complete(created["content_uri"]).status_code == 200
        verdicts.screen_here(deferred[0])
    media = media_of(created["content_uri"])
    assert (media.state, media.sha256) == (S.COMPLETE, hashlib.sha256(data).hexdigest())
    assert reads == [media.storage_key]  # one read fed both
    assert clamd.scanned == [data]


def test_ensure_media_bucket_installs_the_incoming_lifecycle_rule(s3: Any) -> None:
    out = StringIO()
    s3.put_bucket_lifecycle_configuration(
        Bucket=BUCKET,
        LifecycleConfiguration={
            "Rules": [
                {
                    "ID": "operators-own",
                    "Filter": {"Prefix": "logs/"},
                    "Status": "Enabled",
                    "Expiration": {"Days": 30},
                }
            ]
        },
    )
    with msc3870_settings(UNUSED_EXPIRATION=86400):
        call_command("ensure_media_bucket", stdout=out)
        call_command("ensure_media_bucket", stdout=StringIO())  # twice: one rule
    assert "incoming/ expire after 2 days" in out.getvalue()
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"]}
    assert set(rules) == {"operators-own", "msc3870-expire-incoming"}
    rule = rules["msc3870-expire-incoming"]
    assert rule["Filter"]["Prefix"] == "incoming/" and rule["Expiration"]["Days"] == 2


def test_ensure_media_bucket_says_when_the_store_has_no_lifecycle(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = get_store()

    def unsupported(**params: Any) -> Any:
        raise ClientError({"Error": {"Code": "NotImplemented"}}, "PutBucketLifecycleConfiguration")

    monkeypatch.setattr(  # type: ignore[attr-defined]
        store.client, "put_bucket_lifecycle_configuration", unsupported
    )
    out = StringIO()
    call_command("ensure_media_bucket", stdout=out)
    assert "does not support lifecycle rules" in out.getvalue()


def test_complete_asks_the_store_once_before_answering(
    s3: Any, alice: MatrixClient, deferred: list[Media]
) -> None:
    """Existence, size and the first bytes from one ranged GET (Content-Range has the size):
    /complete waits for one round trip to the store, not a HEAD and then a GET."""
    calls: list[str] = []
    client = get_store().client  # type: ignore[attr-defined]
    client.meta.events.register("before-call.s3", lambda model, **kw: calls.append(model.name))
    created = alice.create()
    data = png_bytes(32, 32)
    client_put(s3, created, data, "image/png")
    calls.clear()
    assert alice.complete(created["content_uri"]).status_code == 200
    assert calls == ["GetObject"]
    verdicts.screen_here(deferred[0])
    media = media_of(created["content_uri"])
    assert (media.state, media.size, media.content_type) == (S.COMPLETE, len(data), "image/png")


def test_empty_upload_completes(s3: Any, alice: MatrixClient, deferred: list[Media]) -> None:
    created = alice.create()
    client_put(s3, created, b"", "text/plain")
    assert alice.complete(created["content_uri"]).status_code == 200
    verdicts.screen_here(deferred[0])
    assert (media_of(created["content_uri"]).state, media_of(created["content_uri"]).size) == (
        S.COMPLETE,
        0,
    )


def test_without_a_broker_screening_runs_on_a_background_thread(
    s3: Any, transactional_db: None, alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No atomic block around the request (as in production): /complete answers, and a
    thread of this process screens after it."""
    import threading
    import time

    created = alice.create()
    data = b"screened elsewhere"
    client_put(s3, created, data, "text/plain")
    seen: list[str] = []
    real = verdicts.screen_here

    def screen(media: Media, **options: Any) -> None:
        seen.append(threading.current_thread().name)
        real(media, **options)

    monkeypatch.setattr(verdicts, "screen_here", screen)
    assert alice.complete(created["content_uri"]).status_code == 200
    deadline = time.monotonic() + 30
    while media_of(created["content_uri"]).state == S.PROCESSING:
        assert time.monotonic() < deadline, "screening never decided"
        time.sleep(0.02)
    media = media_of(created["content_uri"])
    assert (media.state, media.sha256) == (S.COMPLETE, hashlib.sha256(data).hexdigest())
    assert len(seen) == 1 and seen[0].startswith("msc3870-bg")
