"""S3 storage logic with moto's in-process mock (the real S3 server is in tests/services/)."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from django.test import Client, override_settings
from moto import mock_aws

from msc3870.checks import check_settings
from msc3870.errors import BodyTooSlow, InvalidParam, MatrixError, StorageUnavailable
from msc3870.models import MediaState
from msc3870.stores import get_store, s3_parts
from msc3870.stores.s3 import POOL_CONNECTIONS, S3MediaStore, upload_part_size
from msc3870.stores.s3_parts import PUT_BUFFERS, PutBody

from .helpers import (
    BUCKET,
    LyingBody,
    MatrixClient,
    bucket_keys,
    client_put,
    data_queries,
    media_of,
    msc3870_settings,
    mxc_path,
    png_bytes,
    s3_storages,
)


def test_store_is_s3(s3: Any) -> None:
    assert isinstance(get_store(), S3MediaStore)


def test_every_thread_shares_one_client_with_a_pool_for_them(s3: Any) -> None:
    """One client, made once, with a connection for each thread that may use it at once
    (django-storages makes a boto3 resource per thread, costly to make)."""
    store = get_store()
    seen: list[Any] = []
    threads = [threading.Thread(target=lambda: seen.append(store.client)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 4 and all(client is store.client for client in seen)
    assert store.client.meta.config.max_pool_connections == POOL_CONNECTIONS
    assert store.client.meta.endpoint_url == "https://s3.amazonaws.com"  # the storage's own
    store.client.put_object(Bucket=BUCKET, Key="k", Body=b"x")  # and it works
    assert bucket_keys(s3) == ["k"]


@pytest.mark.parametrize(
    "value",
    [
        "Fri, 27 Nov 2026 23:43:04 GMT",
        "Fri, 27 Nov 2026 23:43:04 -0000",
        "2026-11-27T23:43:04.000Z",
        "2026-11-27T23:43:04Z",
        "2026-11-27T23:43:04+01:00",
        "1795822984",
        1795822984,
        "2026-11-27 23:43:04",
    ],
)
def test_s3_timestamps_read_as_botocore_reads_them(value: Any) -> None:
    from botocore.utils import parse_timestamp

    from msc3870.stores.s3 import parse_s3_timestamp

    parsed, expected = parse_s3_timestamp(value), parse_timestamp(value)
    assert parsed == expected
    assert (parsed.tzinfo is None) == (expected.tzinfo is None)  # naive only if botocore's is


def test_an_s3_timestamp_neither_form_reads_is_botocore_s_error() -> None:
    from msc3870.stores.s3 import parse_s3_timestamp

    with pytest.raises(ValueError):
        parse_s3_timestamp("Fri, 27 Nov 2026 25:43:04 GMT")


def test_the_store_client_reads_timestamps_with_the_standard_library(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from msc3870.stores import s3 as s3_module

    parsed: list[Any] = []
    real = s3_module.parse_s3_timestamp

    def spy(value: Any) -> Any:
        parsed.append(value)
        return real(value)

    monkeypatch.setattr(s3_module, "parse_s3_timestamp", spy)
    s3.put_object(Bucket=BUCKET, Key="stamped", Body=b"x")
    shared = get_store()
    assert isinstance(shared, S3MediaStore)
    store = S3MediaStore(shared.storage)  # a client made now, with the spy
    ours = store.client.head_object(Bucket=BUCKET, Key="stamped")["LastModified"]
    listed = store.client.list_objects_v2(Bucket=BUCKET)["Contents"][0]["LastModified"]
    assert ours == s3.head_object(Bucket=BUCKET, Key="stamped")["LastModified"]
    assert listed == s3.list_objects_v2(Bucket=BUCKET)["Contents"][0]["LastModified"]
    assert ours.tzinfo is not None and listed.tzinfo is not None
    assert len(parsed) == 2  # the header's HTTP date, the listing's ISO 8601


def test_upload_url_is_a_sigv4_presigned_put_for_this_id_only(s3: Any, alice: MatrixClient) -> None:
    created = alice.create()
    url = urlsplit(created["upload_url"])
    query = parse_qs(url.query)
    media = media_of(created["content_uri"])
    assert url.path.endswith(f"/{media.incoming_key}")
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-SignedHeaders"] == ["host"]  # nothing a client cannot know
    expires = int(query["X-Amz-Expires"][0])
    assert 86_390 <= expires <= 86_400
    assert created["upload_method"] == "PUT"


def test_id_expiry_is_capped_to_seven_days(s3: Any, alice: MatrixClient) -> None:
    with msc3870_settings(UNUSED_EXPIRATION=30 * 86400):
        created = alice.create()
    assert int(parse_qs(urlsplit(created["upload_url"]).query)["X-Amz-Expires"][0]) <= 604_800
    expected_ms = (time.time() + 7 * 86400) * 1000
    assert abs(created["unused_expires_at"] - expected_ms) < 10_000


def test_public_endpoint_for_urls(alice: MatrixClient) -> None:
    with (
        mock_aws(),
        override_settings(STORAGES=s3_storages(endpoint_url="http://s3.internal:9000")),
        msc3870_settings(S3_PUBLIC_ENDPOINT_URL="https://cdn.example.com"),
    ):
        created = alice.create()
    assert created["upload_url"].startswith("https://cdn.example.com/")


def test_complete_moves_checks_and_serves(s3: Any, alice: MatrixClient) -> None:
    created = alice.create()
    data = png_bytes()
    client_put(s3, created, data, "image/png")
    response = alice.complete(created["content_uri"])
    assert response.status_code == 200
    media = media_of(created["content_uri"])
    assert media.state == MediaState.COMPLETE
    assert media.declared_content_type == "image/png"
    assert media.content_type == "image/png"
    assert media.sha256 == hashlib.sha256(data).hexdigest()
    assert bucket_keys(s3) == [media.storage_key]  # incoming object deleted after the copy
    download = alice.get(f"/_matrix/client/v1/media/download/{mxc_path(media.mxc_uri)}")
    assert download.status_code == 200
    assert b"".join(download.streaming_content) == data


def test_complete_and_its_screening_write_the_row_twice(s3: Any, alice: MatrixClient) -> None:
    """/complete's claim, then one UPDATE that records the verdict with everything the
    screening learnt (the type the PUT declared, the served key, size, hash)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    created = alice.create()
    client_put(s3, created, png_bytes(), "image/png")
    with CaptureQueriesContext(connection) as captured:
        assert alice.complete(created["content_uri"]).status_code == 200
    writes = [q for q in data_queries(captured) if not q.startswith("SELECT")]
    assert [q.split()[0] for q in writes] == ["UPDATE", "UPDATE"], writes
    assert len(data_queries(captured)) <= 4, data_queries(captured)
    media = media_of(created["content_uri"])
    assert media.state == MediaState.COMPLETE
    assert media.declared_content_type == "image/png"
    assert media.storage_key == media.served_key


def test_screening_that_fails_after_the_move_keeps_what_the_move_learnt(
    s3: Any, alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The move deletes the incoming object (and with it the type the PUT declared): a
    screening that fails after it records the served key and that type, so the attempt
    that screens the bytes again decides as the first would have."""
    from msc3870.errors import StorageUnavailable
    from msc3870.verdicts import screen as screen_media

    looked_at = S3MediaStore.head_with_prefix

    def unavailable_once_moved(store: S3MediaStore, key: str, *args: Any) -> Any:
        if key.startswith("incoming/"):
            return looked_at(store, key, *args)  # /complete's look, before the move
        raise StorageUnavailable()

    created = alice.create()
    data = png_bytes()
    client_put(s3, created, data, "image/png")
    with monkeypatch.context() as patched:
        patched.setattr(S3MediaStore, "head_with_prefix", unavailable_once_moved)
        alice.complete(created["content_uri"])
    media = media_of(created["content_uri"])
    assert media.state == MediaState.PROCESSING
    assert bucket_keys(s3) == [media.served_key]  # moved: the incoming object is gone
    assert media.storage_key == media.served_key
    assert media.declared_content_type == "image/png"
    assert screen_media(media.pk) == "complete"
    media.refresh_from_db()
    assert media.content_type == "image/png"
    # These bytes were screened: under 8 KiB, the hash of their first bytes is theirs.
    assert media.prefix_sha256 == hashlib.sha256(data).hexdigest()


def test_a_missing_object_read_whole_is_file_not_found(s3: Any) -> None:
    """As on the local disk: a possible twin deleted since is skipped, not an outage."""
    with pytest.raises(FileNotFoundError):
        list(get_store().read_whole("media/no/such-object"))


def test_sniffing_reads_a_range_not_the_object(
    s3: Any, alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = alice.create()
    client_put(s3, created, png_bytes() + os.urandom(64 * 1024), "image/png")
    store = get_store()
    ranges: list[str | None] = []
    real_get = store.client.get_object

    def spy(**kwargs: Any) -> Any:
        ranges.append(kwargs.get("Range"))
        return real_get(**kwargs)

    monkeypatch.setattr(store.client, "get_object", spy)
    assert alice.complete(created["content_uri"]).status_code == 200
    assert "bytes=0-8191" in ranges
    # Every read is ranged; the one full pass is the SHA-256.
    assert all(r is not None for r in ranges)


def test_reput_after_complete_changes_nothing_served(s3: Any, alice: MatrixClient) -> None:
    from msc3870 import maintenance

    created = alice.create()
    client_put(s3, created, b"checked bytes", "text/plain")
    assert alice.complete(created["content_uri"]).status_code == 200
    client_put(s3, created, b"<html>swapped</html>", "text/html")  # the URL still works
    media = media_of(created["content_uri"])
    download = alice.get(f"/_matrix/client/v1/media/download/{mxc_path(media.mxc_uri)}")
    assert b"".join(download.streaming_content) == b"checked bytes"
    assert maintenance.delete_orphaned_uploads() == 1
    assert bucket_keys(s3) == [media.storage_key]


def test_complete_without_upload(s3: Any, alice: MatrixClient) -> None:
    created = alice.create()
    response = alice.complete(created["content_uri"])
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_NOT_YET_UPLOADED"


def test_oversized_upload_is_413_and_deleted(s3: Any, alice: MatrixClient) -> None:
    created = alice.create()
    client_put(s3, created, b"x" * 2048, "text/plain")
    with msc3870_settings(MAX_UPLOAD_SIZE=1024):
        response = alice.complete(created["content_uri"])
    assert response.status_code == 413
    assert response.json()["errcode"] == "M_TOO_LARGE"
    assert bucket_keys(s3) == []


def test_redirects(s3: Any, alice: MatrixClient) -> None:
    created = alice.create()
    client_put(s3, created, png_bytes(), "image/png")
    alice.complete(created["content_uri"])
    path = mxc_path(created["content_uri"])
    # v1 streams unless redirects are enabled.
    assert alice.get(f"/_matrix/client/v1/media/download/{path}").status_code == 200
    with msc3870_settings(REDIRECT_DOWNLOADS=True):
        redirect = alice.get(f"/_matrix/client/v1/media/download/{path}/cat%20photo.png")
    assert redirect.status_code == 307
    location = urlsplit(redirect["Location"])
    assert location.scheme in ("http", "https") and location.netloc
    query = parse_qs(location.query)
    assert query["response-content-type"] == ["image/png"]
    assert query["response-content-disposition"] == ["inline; filename*=utf-8''cat%20photo.png"]
    assert int(query["X-Amz-Expires"][0]) == 300
    # v3: only with allow_redirect=true; otherwise the bytes.
    assert Client().get(f"/_matrix/media/v3/download/{path}").status_code == 200
    legacy = Client().get(f"/_matrix/media/v3/download/{path}?allow_redirect=true")
    assert legacy.status_code == 307
    assert legacy["Content-Security-Policy"].startswith("sandbox")


def test_put_fallback_streams_multipart_to_s3(s3: Any, alice: MatrixClient) -> None:
    created = alice.create()
    data = os.urandom(20 * 1024 * 1024 + 3)  # past the 8 MiB multipart threshold
    response = alice.put(f"/_matrix/media/v3/upload/{mxc_path(created['content_uri'])}", data)
    assert response.status_code == 200
    media = media_of(created["content_uri"])
    assert media.sha256 == hashlib.sha256(data).hexdigest()
    assert media.size == len(data)
    ranged = alice.get(
        f"/_matrix/client/v1/media/download/{mxc_path(media.mxc_uri)}",
        headers={"Range": "bytes=10000000-10000009"},
    )
    assert ranged.status_code == 206
    assert b"".join(ranged.streaming_content) == data[10_000_000:10_000_010]


def test_oversized_put_fallback_leaves_no_object_or_multipart(s3: Any, alice: MatrixClient) -> None:
    store = get_store()
    with pytest.raises(Exception, match="larger than the limit"):
        store.write_stream("media/xx/big", LyingBody(20 * 1024 * 1024), max_size=12 * 1024 * 1024)
    assert bucket_keys(s3) == []
    assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


class CutBody(io.RawIOBase):
    """A body whose client goes away after ``size`` bytes (the read fails, as a socket's)."""

    def __init__(self, size: int) -> None:
        self.remaining = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.remaining:
            raise ConnectionResetError("the client went away")
        count = min(len(buffer), self.remaining)
        buffer[:count] = b"z" * count
        self.remaining -= count
        return count


def test_a_streamed_write_is_sent_in_parts_of_the_setting(s3: Any) -> None:
    data = os.urandom(12 * 1024 * 1024 + 5)
    with msc3870_settings(S3_UPLOAD_PART_SIZE=5 * 1024 * 1024, S3_UPLOAD_CONCURRENCY=2):
        written = get_store().write_stream(
            "media/xx/parts", io.BytesIO(data), max_size=len(data), expected_size=len(data)
        )
    head = s3.head_object(Bucket=BUCKET, Key="media/xx/parts")
    assert head["ETag"].strip('"').endswith("-3")  # three parts: 5 + 5 + 2 MiB
    assert s3.get_object(Bucket=BUCKET, Key="media/xx/parts")["Body"].read() == data
    assert written.sha256 == hashlib.sha256(data).hexdigest()
    assert written.size == len(data)


def test_a_body_cut_mid_upload_aborts_its_multipart_upload(s3: Any) -> None:
    store = get_store()
    with (
        msc3870_settings(S3_UPLOAD_PART_SIZE=5 * 1024 * 1024),
        pytest.raises(Exception, match="could not be read"),
    ):
        store.write_stream(
            "media/xx/cut", CutBody(11 * 1024 * 1024), max_size=64 * 1024 * 1024, expected_size=None
        )
    assert bucket_keys(s3) == []
    assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


class ReadOnly:
    """A body with ``read`` only (gunicorn's chunked ``wsgi.input``, say)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, size: int = -1, /) -> bytes:
        return self._data.read(size)


@pytest.mark.parametrize("body_type", [io.BytesIO, ReadOnly])
def test_a_streamed_write_sends_each_part_whole_from_buffers_used_again(
    s3: Any, body_type: Any
) -> None:
    """Each part is read into a ``bytearray`` and sent as the request body (one send,
    not botocore's file of 16 KiB reads); the write makes at most one buffer more than
    the parts in flight, whatever the number of parts."""
    data = os.urandom(6 * 5 * 1024 * 1024 + 7)
    bodies: list[Any] = []
    store = get_store()

    def note(params: dict[str, Any], **kwargs: Any) -> None:
        bodies.append(params["Body"])

    store.client.meta.events.register("before-parameter-build.s3.UploadPart", note)
    try:
        with msc3870_settings(S3_UPLOAD_PART_SIZE=5 * 1024 * 1024, S3_UPLOAD_CONCURRENCY=2):
            written = store.write_stream(
                "media/xx/reused", body_type(data), max_size=len(data), expected_size=len(data)
            )
    finally:
        store.client.meta.events.unregister("before-parameter-build.s3.UploadPart", note)
    assert s3.get_object(Bucket=BUCKET, Key="media/xx/reused")["Body"].read() == data
    assert written.sha256 == hashlib.sha256(data).hexdigest() and written.size == len(data)
    assert len(bodies) == 7 and all(type(body) is bytearray for body in bodies)
    assert len({id(body) for body in bodies}) <= 3


def test_a_small_streamed_write_is_one_put(s3: Any) -> None:
    store = get_store()
    for data, expected in [(b"", 0), (b"abc", 3), (b"abc", None)]:
        written = store.write_stream(
            "media/xx/small", io.BytesIO(data), max_size=10, expected_size=expected
        )
        assert written.size == len(data)
        assert s3.get_object(Bucket=BUCKET, Key="media/xx/small")["Body"].read() == data
    assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


def test_a_part_the_store_refuses_stops_the_reading_and_aborts_the_upload(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.exceptions import ClientError

    from msc3870.errors import StorageUnavailable

    store = get_store()
    real = store.client.upload_part

    def refuse_the_second(**params: Any) -> Any:
        if params["PartNumber"] == 2:
            raise ClientError({"Error": {"Code": "InternalError"}}, "UploadPart")
        return real(**params)

    monkeypatch.setattr(store.client, "upload_part", refuse_the_second)
    body = LyingBody(40 * 5 * 1024 * 1024)
    with (
        msc3870_settings(S3_UPLOAD_PART_SIZE=5 * 1024 * 1024, S3_UPLOAD_CONCURRENCY=2),
        pytest.raises(StorageUnavailable),
    ):
        store.write_stream("media/xx/refused", body, max_size=10**9)
    assert body.remaining > 0  # not read to its end
    assert bucket_keys(s3) == []
    assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


@pytest.fixture
def plain_http_s3(s3: Any) -> Iterator[Any]:
    """The S3 mock behind a plain-HTTP endpoint: bodies go as they are (no checksum, no
    payload hash), as to a store on the operator's own network."""
    with override_settings(STORAGES=s3_storages(endpoint_url="http://s3.amazonaws.com")):
        yield s3


def sent_bodies(store: Any, operation: str) -> list[Any]:
    """The ``Body`` of every ``operation`` the store's client makes from now on."""
    bodies: list[Any] = []
    store.client.meta.events.register(
        f"before-parameter-build.s3.{operation}",
        lambda params, **kwargs: bodies.append(params.get("Body")),
    )
    return bodies


def test_a_body_of_known_length_is_one_put_sent_as_it_is_read(plain_http_s3: Any) -> None:
    """Past one buffer and within S3_UPLOAD_SINGLE_PUT_LIMIT, a body whose length is known
    goes as one PUT whose body is read while it is sent: no multipart upload, nothing
    held back until a part is whole."""
    store = get_store()
    puts, parts = sent_bodies(store, "PutObject"), sent_bodies(store, "UploadPart")
    data = os.urandom(12 * 1024 * 1024 + 5)
    with msc3870_settings(S3_UPLOAD_PART_SIZE=5 * 1024 * 1024):
        written = store.write_stream(
            "media/xx/one", io.BytesIO(data), max_size=len(data), expected_size=len(data)
        )
    assert [type(body) for body in puts] == [PutBody] and parts == []
    stored = plain_http_s3.get_object(Bucket=BUCKET, Key="media/xx/one")
    assert "-" not in stored["ETag"] and stored["Body"].read() == data
    assert written.sha256 == hashlib.sha256(data).hexdigest() and written.size == len(data)


@pytest.mark.parametrize(
    ("size", "expected", "limit"),
    [
        (12 * 1024 * 1024, None, 64 * 1024 * 1024),  # length unknown (a chunked body)
        (12 * 1024 * 1024, 12 * 1024 * 1024, 8 * 1024 * 1024),  # over the limit
    ],
)
def test_a_body_of_unknown_length_or_over_the_limit_goes_in_parts(
    plain_http_s3: Any, size: int, expected: int | None, limit: int
) -> None:
    data = os.urandom(size)
    store = get_store()
    parts = sent_bodies(store, "UploadPart")
    # moto, behind a plain-HTTP endpoint, takes no bytearray body (a real store does).
    store.client.meta.events.register_first(
        "before-send.s3.UploadPart",
        lambda request, **kwargs: setattr(request, "body", bytes(request.body)),
    )
    with msc3870_settings(S3_UPLOAD_PART_SIZE=5 * 1024 * 1024, S3_UPLOAD_SINGLE_PUT_LIMIT=limit):
        store.write_stream(
            "media/xx/parts", io.BytesIO(data), max_size=size, expected_size=expected
        )
    assert [type(body) for body in parts] == [bytearray] * 3
    stored = plain_http_s3.get_object(Bucket=BUCKET, Key="media/xx/parts")
    assert stored["ETag"].strip('"').endswith("-3") and stored["Body"].read() == data


def test_over_https_with_checksums_a_body_of_known_length_goes_in_parts(s3: Any) -> None:
    """botocore reads a body it sends a checksum of (HTTPS, "when_supported"): such a
    body is not sent as it is read."""
    store = get_store()
    puts = sent_bodies(store, "PutObject")
    data = os.urandom(6 * 1024 * 1024)
    with msc3870_settings(S3_UPLOAD_PART_SIZE=5 * 1024 * 1024):
        store.write_stream(
            "media/xx/https", io.BytesIO(data), max_size=len(data), expected_size=len(data)
        )
    assert puts == []
    assert s3.get_object(Bucket=BUCKET, Key="media/xx/https")["ETag"].strip('"').endswith("-2")


def test_a_body_cut_short_fails_its_put_and_nothing_is_stored(plain_http_s3: Any) -> None:
    """The client went away mid-body: the PUT fails mid-body (the store keeps nothing) and
    what is raised is the body's error, not botocore's."""
    with pytest.raises(InvalidParam, match="could not be read"):
        get_store().write_stream(
            "media/xx/cut", CutBody(3 * 1024 * 1024), max_size=10**9, expected_size=8 * 1024 * 1024
        )
    assert bucket_keys(plain_http_s3) == []


def test_a_body_longer_than_announced_fails_its_put(plain_http_s3: Any) -> None:
    body = LyingBody(20 * 1024 * 1024)
    with pytest.raises(InvalidParam, match="longer than the 3145728 bytes announced"):
        get_store().write_stream(
            "media/xx/long", body, max_size=10**9, expected_size=3 * 1024 * 1024
        )
    assert bucket_keys(plain_http_s3) == []


def test_a_put_the_store_refuses_stops_the_reading(
    plain_http_s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store answers the PUT with an error before taking its body (as to its
    ``Expect: 100-continue``): the body is read no further than the buffers already
    filled, and the client is told the storage is unavailable."""
    from botocore.exceptions import ClientError

    from msc3870.errors import StorageUnavailable

    store = get_store()

    def refuse(**params: Any) -> Any:
        time.sleep(0.05)  # the reader fills what buffers it has meanwhile
        raise ClientError({"Error": {"Code": "InternalError"}}, "PutObject")

    monkeypatch.setattr(store.client, "put_object", refuse)
    body = LyingBody(40 * 1024 * 1024)
    with pytest.raises(StorageUnavailable):
        store.write_stream("media/xx/refused", body, max_size=10**9, expected_size=40 * 1024 * 1024)
    assert body.remaining >= (40 - PUT_BUFFERS - 1) * 1024 * 1024
    assert bucket_keys(plain_http_s3) == []


def test_a_put_body_can_be_sent_again_only_before_any_of_it_was() -> None:
    """botocore rewinds a body before a retry: a store that refused the request before
    its body was sent gets it again; once some was sent, the retry fails (the rest of it
    is not kept anywhere)."""
    body = PutBody(6, count=2, size=4)
    assert body.seek(0) == 0
    buffer = body.take()
    assert buffer is not None
    buffer[:] = b"abcd"
    body.give(buffer, 4)
    assert bytes(body.read(3)) == b"abc"
    with pytest.raises(io.UnsupportedOperation):
        body.seek(0)
    second = body.take()
    assert second is not None
    second[:2] = b"ef"
    body.give(second, 2)
    assert bytes(body.read(10)) == b"d" and bytes(body.read(10)) == b"ef"
    assert body.read(10) == b""


def test_request_checksums_only_where_they_spare_the_payload_hash() -> None:
    """Over HTTPS botocore's CRC32 is what lets it skip hashing the payload; over plain
    HTTP it hashes the payload anyway, and a CRC32 besides is a pass for nothing."""
    with override_settings(STORAGES=s3_storages(endpoint_url="https://s3.example.org")):
        assert get_store().client.meta.config.request_checksum_calculation == "when_supported"
    with override_settings(STORAGES=s3_storages(endpoint_url="http://127.0.0.1:9")):
        assert get_store().client.meta.config.request_checksum_calculation == "when_required"


class _Sent(Exception):
    """Stops a request once its signed headers are seen (nothing leaves the process)."""


@pytest.mark.parametrize(
    ("sign_payload", "expected"),
    [(False, "UNSIGNED-PAYLOAD"), (True, hashlib.sha256(b"part bytes").hexdigest())],
)
def test_bodies_go_unsigned_over_plain_http_unless_asked(sign_payload: bool, expected: str) -> None:
    """S3_SIGN_PAYLOAD off (the default): a body sent over plain HTTP is not hashed for the
    signature; the request itself is still signed."""
    seen: dict[str, str] = {}

    def capture(request: Any, **kwargs: Any) -> None:
        seen.update(
            {
                name: value.decode() if isinstance(value, bytes) else value
                for name, value in request.headers.items()
            }
        )
        raise _Sent()

    with (
        msc3870_settings(S3_SIGN_PAYLOAD=sign_payload),
        override_settings(STORAGES=s3_storages(endpoint_url="http://127.0.0.1:9")),
    ):
        client = get_store().client
        client.meta.events.register("before-send.s3.UploadPart", capture)
        with pytest.raises(_Sent):
            client.upload_part(
                Bucket=BUCKET, Key="media/xx/part", UploadId="u", PartNumber=1, Body=b"part bytes"
            )
    assert seen["X-Amz-Content-SHA256"] == expected
    assert seen["Authorization"].startswith("AWS4-HMAC-SHA256 ")


def test_upload_parts_grow_so_that_the_largest_upload_fits_in_10000() -> None:
    with msc3870_settings(S3_UPLOAD_PART_SIZE=8 * 1024 * 1024):
        small = upload_part_size(50 * 1024 * 1024)
        huge = upload_part_size(200 * 1024 * 1024 * 1024)
    assert small == 8 * 1024 * 1024
    assert huge * 10_000 >= 200 * 1024 * 1024 * 1024


def test_storage_unreachable_is_503(alice: MatrixClient) -> None:
    unreachable = s3_storages(endpoint_url="http://127.0.0.1:9")
    with override_settings(STORAGES=unreachable):
        created = alice.create()  # presigning needs no network
        response = alice.complete(created["content_uri"])
    assert response.status_code == 503
    assert response.json()["errcode"] == "M_UNKNOWN"
    assert media_of(created["content_uri"]).state == MediaState.PENDING


@pytest.mark.parametrize(
    ("options", "check_id"),
    [
        ({"querystring_auth": False}, "msc3870.E009"),
        ({"default_acl": "public-read"}, "msc3870.E009"),
        ({"signature_version": "s3"}, "msc3870.E011"),
    ],
)
def test_checks_refuse_public_or_sigv2_s3(options: dict[str, Any], check_id: str) -> None:
    with override_settings(STORAGES=s3_storages(**options)):
        assert check_id in {m.id for m in check_settings()}


def test_check_refuses_the_media_bucket_as_the_incoming_bucket() -> None:
    with override_settings(STORAGES=s3_storages()):
        with msc3870_settings(S3_INCOMING_BUCKET=BUCKET):
            assert "msc3870.E033" in {m.id for m in check_settings()}
        with msc3870_settings(S3_INCOMING_BUCKET=BUCKET + "-incoming"):
            assert "msc3870.E033" not in {m.id for m in check_settings()}


def test_check_warns_of_an_incoming_bucket_beside_the_local_disk() -> None:
    with msc3870_settings(S3_INCOMING_BUCKET="media-incoming"):
        assert "msc3870.W004" in {m.id for m in check_settings()}
    assert "msc3870.W004" not in {m.id for m in check_settings()}


def test_check_warns_when_expiry_exceeds_presign_limit() -> None:
    with (
        override_settings(STORAGES=s3_storages()),
        msc3870_settings(UNUSED_EXPIRATION=int(timedelta(days=8).total_seconds())),
    ):
        assert "msc3870.W002" in {m.id for m in check_settings()}


def test_delete_many_and_missing_keys(s3: Any) -> None:
    store = get_store()
    for index in range(3):
        store.write_stream(f"media/aa/{index}", io.BytesIO(b"x"), max_size=10)
    store.delete_many(["media/aa/0", "media/aa/1", "media/aa/2", "media/aa/never-existed"])
    store.delete("media/aa/never-existed")
    assert bucket_keys(s3) == []


def test_delete_many_sends_batches_of_at_most_1000_keys_several_at_once(s3: Any) -> None:
    store = get_store()
    sizes: list[int] = []
    threads: set[str] = set()

    def count(params: dict[str, Any], **kwargs: Any) -> None:
        sizes.append(len(params["Delete"]["Objects"]))
        threads.add(threading.current_thread().name)

    store.delete_client.meta.events.register("before-parameter-build.s3.DeleteObjects", count)
    keys = [f"incoming/k{index:04d}" for index in range(2500)]
    for key in keys[:3]:
        store.write_stream(key, io.BytesIO(b"x"), max_size=10)
    with msc3870_settings(DELETE_CONCURRENCY=3):
        store.delete_many(keys)
    assert sorted(sizes) == [500, 1000, 1000]
    assert all(name.startswith("s3-delete") for name in threads)
    assert bucket_keys(s3) == []


def test_ensure_media_bucket_command() -> None:
    from io import StringIO

    from django.core.management import call_command

    with mock_aws(), override_settings(STORAGES=s3_storages()):
        out = StringIO()
        call_command("ensure_media_bucket", stdout=out)
        assert f"Bucket {BUCKET} is ready" in out.getvalue()
        assert BUCKET in [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]
        call_command("ensure_media_bucket", stdout=StringIO())  # twice is fine


class _IdleDroppingStore(threading.Thread):
    """An S3 endpoint on loopback that takes one PUT and drops it, as a store does, once
    its body has been silent for ``idle`` seconds: AWS's 400 ``RequestTimeout``, then the
    connection closed. With ``fail_after``, it answers 500 once that many bytes came."""

    TIMEOUT = (
        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>RequestTimeout</Code><Message>"
        b"Your socket connection to the server was not read from or written to within the "
        b"timeout period.</Message></Error>"
    )

    def __init__(self, idle: float, fail_after: int | None = None) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.idle, self.fail_after = idle, fail_after

    def run(self) -> None:
        connection, _ = self.listener.accept()
        with connection, self.listener:
            head = b""
            while b"\r\n\r\n" not in head:
                head += connection.recv(65536)
            head, _, body = head.partition(b"\r\n\r\n")
            if b"100-continue" in head.lower():
                connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            received = len(body)
            connection.settimeout(self.idle)
            status, answer = b"500 Internal Server Error", b""
            try:
                while chunk := connection.recv(1024 * 1024):
                    received += len(chunk)
                    if self.fail_after is not None and received >= self.fail_after:
                        break
            except TimeoutError:
                status, answer = b"400 Bad Request", self.TIMEOUT
            connection.sendall(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: application/xml\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(answer) + answer
            )


class _PausingBody:
    """``head`` bytes, then a pause of ``pause`` seconds, then the rest up to ``size``."""

    def __init__(self, size: int, head: int, pause: float) -> None:
        self.data, self.head, self.pause, self.sent = os.urandom(size), head, pause, 0

    def read(self, size: int = -1, /) -> bytes:
        if self.sent == self.head:
            time.sleep(self.pause)
        end = len(self.data) if size < 0 else self.sent + size
        if self.sent < self.head:
            end = min(end, self.head)
        chunk = self.data[self.sent : end]
        self.sent += len(chunk)
        return chunk


@pytest.mark.parametrize(
    ("pause", "fail_after", "expected"),
    [
        (0.6, None, BodyTooSlow),  # the store gave up on the client's pause: 408
        (0.0, 2 * 1024 * 1024, StorageUnavailable),  # the store failed by itself: 503
    ],
    ids=["store-dropped-the-paused-body", "store-failed"],
)
def test_a_put_dropped_by_the_store_while_the_client_paused_is_the_client_s_408(
    monkeypatch: pytest.MonkeyPatch, pause: float, fail_after: int | None, expected: type
) -> None:
    """A PUT sent as it is read holds the store's request open while the client pauses,
    and a store drops a request idle for its own timeout, often shorter than this
    server's: that failure is the client's pause (408, send it again more steadily), not
    the storage's (503, try again later)."""
    monkeypatch.setattr(s3_parts, "PAUSE_BLAMED_SECONDS", 0.4)
    store_endpoint = _IdleDroppingStore(idle=0.2, fail_after=fail_after)
    store_endpoint.start()
    size = 3 * 1024 * 1024
    body = _PausingBody(size, head=PUT_BUFFERS * 1024 * 1024 // 2, pause=pause)
    storages = s3_storages(endpoint_url=store_endpoint.endpoint)
    with override_settings(STORAGES=storages), pytest.raises(expected) as raised:
        get_store().write_stream("media/xx/paused", body, max_size=size, expected_size=size)
    store_endpoint.join(5)
    assert isinstance(raised.value, MatrixError)
    assert raised.value.status == (408 if expected is BodyTooSlow else 503)
