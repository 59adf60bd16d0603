"""MSC3870 straight to S3: real HTTP clients, the real S3 server, gunicorn and a worker."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from django.utils import timezone

from msc3870.models import Media, MediaState
from msc3870.stores import get_store

from ..helpers import bearer, bucket_keys, media_of, mxc_path, wait_until
from .conftest import Stack
from .helpers import keys_of

pytestmark = pytest.mark.services


def decided(content_uri: str) -> Media:
    """The row once screening decided: /complete answers before the full-object checks."""

    def done() -> Media | None:
        media = media_of(content_uri)
        return None if media.state == MediaState.PROCESSING else media

    return wait_until(done, 60, "screening to decide")


def test_full_flow_presigned_put_complete_download(
    live: Stack, user_token: tuple[str, str], s3_client: Any
) -> None:
    _, token = user_token
    created = live.client(token).create()
    url = urlsplit(created["upload_url"])
    assert url.netloc == urlsplit(os.environ["AWS_S3_ENDPOINT_URL"]).netloc  # the bucket
    assert parse_qs(url.query)["X-Amz-SignedHeaders"] == ["host"]
    data = os.urandom(5 * 1024 * 1024 + 11)
    put = requests.put(
        created["com.beeper.msc3870.upload_url"],
        data=data,
        headers={"Content-Type": "video/mp4"},
    )
    assert put.status_code == 200, put.text
    done = live.client(token).complete(created["content_uri"], "?filename=clip.mp4")
    assert done.status_code == 200, done.text
    assert done.json() == {"content_uri": created["content_uri"]}
    media = decided(created["content_uri"])
    assert media.state == MediaState.COMPLETE
    # Nothing else has these bytes' size and first 8 KiB: not read whole (SHA256_WHEN).
    assert media.prefix_sha256 == hashlib.sha256(data[:8192]).hexdigest()
    assert media.sha256 == ""
    assert media.declared_content_type == "video/mp4"
    # Only the server-owned copy is left; the incoming object was deleted after the copy.
    assert keys_of(s3_client, media) == [media.storage_key]
    download = requests.get(
        f"{live.base_url}/_matrix/client/v1/media/download/{mxc_path(media.mxc_uri)}",
        headers=bearer(token),
        allow_redirects=False,
    )
    assert download.status_code == 200
    assert download.content == data
    assert download.headers["Content-Disposition"] == "inline; filename=clip.mp4"
    ranged = requests.get(
        f"{live.base_url}/_matrix/client/v1/media/download/{mxc_path(media.mxc_uri)}",
        headers={**bearer(token), "Range": "bytes=4194304-4194403"},
    )
    assert ranged.status_code == 206
    assert ranged.content == data[4194304:4194404]


def test_redirect_target_serves_the_bytes_with_our_headers(
    live: Stack, user_token: tuple[str, str]
) -> None:
    _, token = user_token
    created = live.client(token).create()
    requests.put(
        created["upload_url"], data=b"redirected bytes", headers={"Content-Type": "text/plain"}
    )
    assert (
        live.client(token).complete(created["content_uri"], "?filename=notes.txt").status_code
        == 200
    )
    path = mxc_path(created["content_uri"])
    redirect = requests.get(
        f"{live.base_url}/_matrix/media/v3/download/{path}?allow_redirect=true",
        allow_redirects=False,
    )
    assert redirect.status_code == 307
    target = redirect.headers["Location"]
    assert target.startswith("http")
    fetched = requests.get(target)
    assert fetched.status_code == 200
    assert fetched.content == b"redirected bytes"
    assert fetched.headers["Content-Type"] == "text/plain"
    assert fetched.headers["Content-Disposition"] == "inline; filename=notes.txt"
    # The bucket is private: the same object without a signature is refused.
    unsigned = target.split("?", 1)[0]
    assert requests.get(unsigned).status_code == 403


def test_store_refuses_tampered_other_id_and_expired_urls(
    live: Stack, user_token: tuple[str, str], s3_client: Any
) -> None:
    _, token = user_token
    first = live.client(token).create()
    second = live.client(token).create()
    url = first["upload_url"]
    signature = parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]
    tampered = url.replace(signature, ("0" if signature[0] != "0" else "1") + signature[1:])
    assert requests.put(tampered, data=b"x").status_code == 403
    second_media = media_of(second["content_uri"])
    first_media = media_of(first["content_uri"])
    other_id = url.replace(first_media.media_id, second_media.media_id)
    assert requests.put(other_id, data=b"x").status_code == 403
    # An id whose expiry has passed: its URL is signed to die with it.
    Media.objects.filter(pk=first_media.pk).update(
        unused_expires_at=timezone.now() + timedelta(seconds=1)
    )
    first_media.refresh_from_db()
    short_lived = get_store().upload_target(first_media).url
    time.sleep(2.2)
    assert requests.put(short_lived, data=b"x").status_code == 403
    assert keys_of(s3_client, first_media) == []
    assert keys_of(s3_client, second_media) == []


def test_reput_after_complete_changes_nothing(
    live: Stack, user_token: tuple[str, str], s3_client: Any
) -> None:
    from msc3870 import maintenance

    _, token = user_token
    created = live.client(token).create()
    requests.put(
        created["upload_url"], data=b"screened bytes", headers={"Content-Type": "text/plain"}
    )
    assert live.client(token).complete(created["content_uri"]).status_code == 200
    decided(created["content_uri"])  # /complete answers before the move
    # The presigned URL still works until it expires; S3 cannot refuse the second PUT...
    again = requests.put(created["upload_url"], data=b"<script>swap</script>")
    assert again.status_code == 200
    media = media_of(created["content_uri"])
    got = requests.get(f"{live.base_url}/_matrix/media/v3/download/{mxc_path(media.mxc_uri)}")
    assert got.content == b"screened bytes"  # ...but it only reaches a key nobody serves
    assert maintenance.delete_orphaned_uploads() >= 1
    assert keys_of(s3_client, media) == [media.storage_key]


def test_an_incoming_bucket_serves_the_version_complete_looked_at(
    live: Stack, user_token: tuple[str, str], s3_client: Any
) -> None:
    """``S3_INCOMING_BUCKET`` on SeaweedFS: a second PUT to the upload URL after
    /complete changes nothing served; the worker's background copy then switches the row
    to the media bucket and deletes every version of the upload URL's object."""
    from io import StringIO

    from django.core.management import call_command

    from msc3870 import maintenance, served_copies

    from ..helpers import msc3870_settings

    _, token = user_token
    bucket = f"{os.environ['AWS_STORAGE_BUCKET_NAME']}-incoming"
    live.stop("server")
    live.stop("worker")
    live.env["MSC3870_S3_INCOMING_BUCKET"] = bucket
    try:
        with msc3870_settings(S3_INCOMING_BUCKET=bucket):
            call_command("ensure_media_bucket", stdout=StringIO())
            live.start_server()
            live.start_worker()
            created = live.client(token).create()
            assert urlsplit(created["upload_url"]).path.startswith(f"/{bucket}/incoming/")
            first = os.urandom(3 * 1024 * 1024)
            put = requests.put(created["upload_url"], data=first)
            assert put.status_code == 200, put.text
            assert live.client(token).complete(created["content_uri"]).status_code == 200
            again = requests.put(created["upload_url"], data=b"<script>swap</script>")
            assert again.status_code == 200  # S3 cannot refuse it: a new version
            media = decided(created["content_uri"])
            assert media.state == MediaState.COMPLETE
            assert media.incoming_version == put.headers["x-amz-version-id"]
            path = mxc_path(media.mxc_uri)
            got = requests.get(f"{live.base_url}/_matrix/media/v3/download/{path}")
            assert got.content == first
            redirect = requests.get(
                f"{live.base_url}/_matrix/media/v3/download/{path}?allow_redirect=true",
                allow_redirects=False,
            )
            assert redirect.status_code == 307
            assert requests.get(redirect.headers["Location"]).content == first

            def copied() -> Media | None:
                row = media_of(media.mxc_uri)
                return row if row.storage_key == row.served_key else None

            media = wait_until(copied, 60, "the copy to the media bucket")
            assert keys_of(s3_client, media) == [media.served_key]
            got = requests.get(f"{live.base_url}/_matrix/media/v3/download/{path}")
            assert got.content == first
            # A redirect handed out before the switch still answers until the cleanup
            # sweep deletes the versions, once no download of them can be running.
            listed = s3_client.list_object_versions(Bucket=bucket, Prefix=media.incoming_key)
            assert len(listed.get("Versions", [])) == 2
            assert requests.get(redirect.headers["Location"]).content == first
            Media.objects.filter(pk=media.pk).update(
                incoming_copied_at=timezone.now() - served_copies.versions_kept()
            )
            maintenance.delete_dead_objects()
            listed = s3_client.list_object_versions(Bucket=bucket, Prefix=media.incoming_key)
            assert listed.get("Versions", []) + listed.get("DeleteMarkers", []) == []
    finally:
        del live.env["MSC3870_S3_INCOMING_BUCKET"]
        live.stop("server")
        live.stop("worker")
        live.start_server()


def test_oversize_upload_is_refused_and_deleted(
    live: Stack, user_token: tuple[str, str], s3_client: Any
) -> None:
    _, token = user_token
    live.stop("server")
    live.env["MSC3870_MAX_UPLOAD_SIZE"] = str(1024 * 1024)
    live.stop("worker")
    try:
        live.start_server()
        live.start_worker()
        created = live.client(token).create()
        requests.put(created["upload_url"], data=os.urandom(1024 * 1024 + 1))
        response = live.client(token).complete(created["content_uri"])
        assert response.status_code == 413
        assert response.json()["errcode"] == "M_TOO_LARGE"
        media = media_of(created["content_uri"])
        assert media.state == MediaState.REJECTED
        assert keys_of(s3_client, media) == []
        # The PUT fallback refuses it while streaming and leaves nothing either.
        other = live.client(token).create()
        put = requests.put(
            f"{live.base_url}/_matrix/media/v3/upload/{mxc_path(other['content_uri'])}",
            data=iter([os.urandom(512 * 1024)] * 3),  # chunked: no Content-Length to trust
            headers=bearer(token),
        )
        assert put.status_code == 413
        assert keys_of(s3_client, media_of(other["content_uri"])) == []
        assert media_of(other["content_uri"]).state == MediaState.PENDING
    finally:
        del live.env["MSC3870_MAX_UPLOAD_SIZE"]
        live.stop("server")
        live.stop("worker")
        live.start_server()


def test_put_fallback_streams_to_s3(
    live: Stack, user_token: tuple[str, str], s3_client: Any
) -> None:
    _, token = user_token
    created = live.client(token).create()
    data = os.urandom(12 * 1024 * 1024 + 5)  # multipart
    put = requests.put(
        f"{live.base_url}/_matrix/media/v3/upload/{mxc_path(created['content_uri'])}",
        data=data,
        headers=bearer(token),
    )
    assert put.status_code == 200, put.text
    media = media_of(created["content_uri"])
    assert media.state == MediaState.COMPLETE
    assert keys_of(s3_client, media) == [media.storage_key]
    got = requests.get(f"{live.base_url}/_matrix/media/v3/download/{mxc_path(media.mxc_uri)}")
    assert hashlib.sha256(got.content).hexdigest() == media.sha256


def test_nothing_left_after_expiry(
    live: Stack, user_token: tuple[str, str], s3_client: Any
) -> None:
    from msc3870 import maintenance

    _, token = user_token
    created = live.client(token).create()
    requests.put(created["upload_url"], data=b"abandoned")
    media = media_of(created["content_uri"])
    assert keys_of(s3_client, media) == [media.incoming_key]
    Media.objects.filter(pk=media.pk).update(unused_expires_at=timezone.now())
    maintenance.expire_pending()
    assert media_of(created["content_uri"]).state == MediaState.EXPIRED
    assert keys_of(s3_client, media) == []


def test_mautrix_async_upload_through_s3(live: Stack, user_token: tuple[str, str]) -> None:
    from mautrix.api import HTTPAPI
    from mautrix.client import ClientAPI
    from mautrix.types import UserID

    user_id, token = user_token
    data = os.urandom(300 * 1024)

    async def scenario() -> tuple[str, bytes]:
        api = HTTPAPI(base_url=live.base_url, token=token, default_retry_count=0)
        client = ClientAPI(UserID(user_id), api=api)
        try:
            mxc = await client.upload_media(
                data, mime_type="application/x-test", filename="s3.bin", async_upload=True
            )
            return mxc, await client.download_media(mxc, timeout_ms=30_000)
        finally:
            await api.session.close()

    mxc, downloaded = asyncio.run(scenario())
    assert downloaded == data
    media = media_of(mxc)
    assert media.upload_method == "url"
    assert media.state == MediaState.COMPLETE


def test_thumbnail_of_s3_media(live: Stack, user_token: tuple[str, str], s3_client: Any) -> None:
    import io

    from PIL import Image

    _, token = user_token
    buffer = io.BytesIO()
    Image.new("RGB", (900, 600), (20, 200, 90)).save(buffer, "JPEG")
    created = live.client(token).create()
    requests.put(
        created["upload_url"], data=buffer.getvalue(), headers={"Content-Type": "image/jpeg"}
    )
    assert live.client(token).complete(created["content_uri"]).status_code == 200
    decided(created["content_uri"])
    path = mxc_path(created["content_uri"])
    response = requests.get(
        f"{live.base_url}/_matrix/client/v1/media/thumbnail/{path}?width=320&height=240",
        headers=bearer(token),
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).size == (320, 213)
    media = media_of(created["content_uri"])
    assert f"thumbnails/{media.media_id}/320x240-scale" in bucket_keys(s3_client, "thumbnails/")


# ------------------------------------- the upload URL: /complete answers on metadata

GATED_CHECKS = ",".join(
    [
        "msc3870.screening.check_size",
        "msc3870.screening.check_content_type",
        "msc3870.screening.check_sha256",
        "tests.services.gate_check.gate",
    ]
)


def _gated_stack(live: Stack, make_stack: Any, gate_dir: Path, **env: str) -> Stack:
    """A stack whose screening waits at tests/services/gate_check.py's gate. /complete may
    wait up to 120 s: answering before the gate opens proves it did not wait. The session
    stack's worker shares the broker: it is stopped (``live`` starts it again)."""
    live.stop("worker")
    gate_dir.mkdir(exist_ok=True)
    stack = make_stack(
        MSC3870_CHECKS=GATED_CHECKS,
        GATE_DIR=str(gate_dir),
        MSC3870_COMPLETE_WAIT_SECONDS="120",
        **env,
    )
    stack.start_server(workers=1)
    stack.start_worker()
    return stack


def _put_and_complete(stack: Stack, token: str, data: bytes) -> tuple[str, requests.Response]:
    created = stack.client(token).create()
    put = requests.put(created["upload_url"], data=data, headers={"Content-Type": "text/plain"})
    assert put.status_code == 200, put.text
    # Well under the 120 s /complete could wait: a timeout here means it waited.
    done = requests.post(
        f"{stack.base_url}/_matrix/media/v1/upload/{mxc_path(created['content_uri'])}/complete",
        json={},
        headers=bearer(token),
        timeout=60,
    )
    return created["content_uri"], done


def test_complete_answers_before_the_full_checks_and_downloads_wait(
    live: Stack, make_stack: Any, user_token: tuple[str, str], s3_client: Any, tmp_path: Path
) -> None:
    _, token = user_token
    gate_dir = tmp_path / "gate"
    stack = _gated_stack(live, make_stack, gate_dir, MSC3870_SHA256_WHEN="always")
    data = os.urandom(3 * 1024 * 1024)
    content_uri, done = _put_and_complete(stack, token, data)
    assert done.status_code == 200, done.text
    assert done.json() == {"content_uri": content_uri}
    media = media_of(content_uri)
    assert media.state == MediaState.PROCESSING  # the gate is closed
    path = mxc_path(content_uri)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            requests.get,
            f"{stack.base_url}/_matrix/client/v1/media/download/{path}?timeout_ms=60000",
            headers=bearer(token),
            timeout=90,
        )
        wait_until(lambda: (gate_dir / f"{media.media_id}.started").exists(), 60, "screening")
        (gate_dir / f"{media.media_id}.release").touch()
        got = waiting.result()
    assert got.status_code == 200
    assert got.content == data
    media.refresh_from_db()
    assert (media.state, media.sha256) == (MediaState.COMPLETE, hashlib.sha256(data).hexdigest())

    # Rejected after /complete answered: a download that waits for the verdict is 404, as
    # for any rejected media; only the uploader hears why, from /complete.
    content_uri, done = _put_and_complete(stack, token, b"fine until the gate says no")
    assert done.status_code == 200, done.text
    rejected = media_of(content_uri)
    (gate_dir / f"{rejected.media_id}.reject").touch()
    got = requests.get(
        f"{stack.base_url}/_matrix/client/v1/media/download/{mxc_path(content_uri)}"
        "?timeout_ms=60000",
        headers=bearer(token),
        timeout=90,
    )
    assert (got.status_code, got.json()["errcode"]) == (404, "M_NOT_FOUND"), got.text
    again = stack.client(token).complete(content_uri)
    assert again.status_code == 403
    assert again.json() == {"errcode": "M_FORBIDDEN", "error": "Refused at the gate"}
    assert keys_of(s3_client, rejected) == []


def test_complete_waits_for_the_verdict_when_configured(
    live: Stack, make_stack: Any, user_token: tuple[str, str], tmp_path: Path
) -> None:
    _, token = user_token
    gate_dir = tmp_path / "gate"
    stack = _gated_stack(live, make_stack, gate_dir, MSC3870_COMPLETE_WAITS_FOR_CHECKS="1")

    def open_gate() -> None:
        started = wait_until(lambda: list(gate_dir.glob("*.started")), 60, "screening")
        started[0].with_suffix(".release").touch()

    with ThreadPoolExecutor(1) as pool:
        opener = pool.submit(open_gate)
        content_uri, done = _put_and_complete(stack, token, b"decided before the answer")
        opener.result()
    assert done.status_code == 200, done.text
    assert media_of(content_uri).state == MediaState.COMPLETE


def test_uploaders_metadata_does_not_survive_into_downloads(
    live: Stack, user_token: tuple[str, str], s3_client: Any
) -> None:
    _, token = user_token
    created = live.client(token).create()
    put = requests.put(
        created["upload_url"],
        data=b"plain bytes, not gzip",
        headers={
            "Content-Type": "text/html",
            "Content-Encoding": "gzip",
            "Cache-Control": "public, max-age=31536000, immutable",
            "Expires": "Wed, 21 Oct 2037 07:28:00 GMT",
            "Content-Disposition": "attachment; filename=evil.html",
        },
    )
    assert put.status_code == 200, put.text
    # SeaweedFS keeps them with the object, as S3 does.
    bucket = os.environ["AWS_STORAGE_BUCKET_NAME"]
    incoming = media_of(created["content_uri"]).incoming_key
    assert s3_client.head_object(Bucket=bucket, Key=incoming)["ContentEncoding"] == "gzip"
    assert live.client(token).complete(created["content_uri"]).status_code == 200
    media = media_of(created["content_uri"])
    wait_until(lambda: media_of(media.mxc_uri).state == MediaState.COMPLETE, 60, "screening")
    stored = s3_client.head_object(Bucket=bucket, Key=media_of(media.mxc_uri).storage_key)
    assert stored["ContentType"] == "application/octet-stream"
    for header in ("ContentEncoding", "CacheControl", "Expires", "ContentDisposition"):
        assert header not in stored, header
    path = mxc_path(media.mxc_uri)
    served = requests.get(
        f"{live.base_url}/_matrix/client/v1/media/download/{path}?timeout_ms=30000",
        headers=bearer(token),
    )
    redirect = requests.get(
        f"{live.base_url}/_matrix/media/v3/download/{path}?allow_redirect=true",
        allow_redirects=False,
    )
    assert redirect.status_code == 307
    from_store = requests.get(redirect.headers["Location"])
    for response in (served, from_store):
        assert response.status_code == 200
        assert response.content == b"plain bytes, not gzip"
        assert "Content-Encoding" not in response.headers
        assert "Expires" not in response.headers
        assert "immutable" not in response.headers["Cache-Control"]
    assert from_store.headers["Cache-Control"].startswith("public, max-age=")
    assert from_store.headers["Content-Type"] == served.headers["Content-Type"]
    assert from_store.headers["Content-Disposition"] == served.headers["Content-Disposition"]


def test_large_copy_in_parallel_parts_on_seaweedfs(s3_client: Any) -> None:
    """Above S3_COPY_PART_THRESHOLD (5 GiB in production, 6 MiB here) the move is a
    multipart copy whose parts are copied in parallel."""
    from ..helpers import msc3870_settings

    bucket = os.environ["AWS_STORAGE_BUCKET_NAME"]
    data = os.urandom(16 * 1024 * 1024 + 5)
    s3_client.put_object(Bucket=bucket, Key="incoming/partcopy", Body=data, ContentEncoding="gzip")
    store = get_store()
    with msc3870_settings(
        S3_COPY_PART_THRESHOLD=6 * 1024 * 1024, S3_COPY_PART_SIZE=5 * 1024 * 1024
    ):
        assert store.move("incoming/partcopy", "media/pa/partcopy", content_type="x/y") is None
    head = s3_client.head_object(Bucket=bucket, Key="media/pa/partcopy")
    assert head["ETag"].strip('"').endswith("-4")  # 5 + 5 + 5 + 1 MiB
    assert head["ContentType"] == "x/y" and "ContentEncoding" not in head
    body = s3_client.get_object(Bucket=bucket, Key="media/pa/partcopy")["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    assert bucket_keys(s3_client, "incoming/partcopy") == []
    store.delete("media/pa/partcopy")


def test_seaweedfs_computes_no_sha256_on_copy_so_screening_reads_once(s3_client: Any) -> None:
    """What docs/benchmarks.md reports for SeaweedFS: CopyObject with
    ChecksumAlgorithm=SHA256 is accepted but answers no checksum (the screening then hashes
    with one streamed read)."""
    bucket = os.environ["AWS_STORAGE_BUCKET_NAME"]
    s3_client.put_object(Bucket=bucket, Key="incoming/probe", Body=b"probe")
    assert get_store().move("incoming/probe", "media/pr/probe") is None
    get_store().delete("media/pr/probe")


def test_seaweedfs_whole_read_goes_beneath_urllib3_and_is_exact(
    s3_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The screening's SHA-256 read of a real store's object: every byte, read straight
    into the buffer (not through urllib3's copying readinto)."""
    from msc3870.stores import s3

    bucket = os.environ["AWS_STORAGE_BUCKET_NAME"]
    data = os.urandom(5 * 1024 * 1024 + 7)
    s3_client.put_object(Bucket=bucket, Key="media/wr/whole", Body=data)
    readables: list[Any] = []
    real = s3._readable

    def spy(body: Any) -> Any:
        readables.append(real(body))
        return readables[-1]

    monkeypatch.setattr(s3, "_readable", spy)
    digest = hashlib.sha256()
    for chunk in get_store().read_whole("media/wr/whole"):
        digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert [type(r).__module__ for r in readables] == ["http.client"]
    get_store().delete("media/wr/whole")


def test_seaweedfs_copies_only_the_version_asked_for(s3_client: Any) -> None:
    """The conditional move the screening makes with what /complete read
    (``CopySourceIfMatch`` on its ETag): the version read is moved; an object written
    over since is refused (``SourceChanged``) and left where it is."""
    from msc3870.stores import SourceChanged

    bucket = os.environ["AWS_STORAGE_BUCKET_NAME"]
    store = get_store()
    s3_client.put_object(Bucket=bucket, Key="incoming/ifmatch", Body=b"first version")
    found = store.head_with_prefix("incoming/ifmatch", 8192)
    assert found is not None
    read, _ = found
    assert read.etag and read.etag == store.head("incoming/ifmatch").etag  # type: ignore[union-attr]
    s3_client.put_object(Bucket=bucket, Key="incoming/ifmatch", Body=b"second version!")
    with pytest.raises(SourceChanged):
        store.move("incoming/ifmatch", "media/if/ifmatch", size=read.size, if_match=read.etag)
    assert bucket_keys(s3_client, "media/if/ifmatch") == []
    now = store.head("incoming/ifmatch")
    assert now is not None and now.etag != read.etag
    store.move("incoming/ifmatch", "media/if/ifmatch", size=now.size, if_match=now.etag)
    moved = s3_client.get_object(Bucket=bucket, Key="media/if/ifmatch")["Body"].read()
    assert moved == b"second version!"
    assert bucket_keys(s3_client, "incoming/ifmatch") == []
    store.delete("media/if/ifmatch")


def test_ensure_media_bucket_installs_the_lifecycle_rule_on_seaweedfs(s3_client: Any) -> None:
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command("ensure_media_bucket", stdout=out)
    assert "incoming/ expire after" in out.getvalue()
    rules = s3_client.get_bucket_lifecycle_configuration(
        Bucket=os.environ["AWS_STORAGE_BUCKET_NAME"]
    )["Rules"]
    assert [r["Filter"]["Prefix"] for r in rules if r["ID"] == "msc3870-expire-incoming"] == [
        "incoming/"
    ]


class SeededBody:
    """``size`` pseudo-random bytes from ``seed``, made as they are sent (the same bytes
    however they are read), with a length: a presigned PUT is not chunked, S3 wants
    Content-Length."""

    def __init__(self, size: int, seed: int) -> None:
        self.left = size
        self.source = random.Random(seed)
        self.pending = b""
        self.digest = hashlib.sha256()

    def __len__(self) -> int:
        return self.left

    def read(self, amount: int = -1) -> bytes:
        amount = min(self.left, amount if amount > 0 else 1024 * 1024)
        while len(self.pending) < amount:
            self.pending += self.source.randbytes(1024 * 1024)
        chunk, self.pending = self.pending[:amount], self.pending[amount:]
        self.digest.update(chunk)
        self.left -= len(chunk)
        return chunk


def test_large_upload_through_the_url_path(
    live: Stack, user_token: tuple[str, str], s3_client: Any
) -> None:
    """The URL path at a size that fits CI, twice with the same bytes: the bytes never
    pass through this server before the copy. The first upload is unique, and not read
    whole; the second may share its bytes (same size and first 8 KiB), so both are read
    once, streamed, hashed, and the second is served from the first's object."""
    _, token = user_token
    size = 48 * 1024 * 1024 + 7  # under the default MAX_UPLOAD_SIZE (50 MiB)
    seed = int.from_bytes(os.urandom(8), "big")
    uploads = []
    for _ in range(2):
        body = SeededBody(size, seed)
        created = live.client(token).create()
        put = requests.put(created["upload_url"], data=body, timeout=300)
        assert put.status_code == 200, put.text
        assert live.client(token).complete(created["content_uri"]).status_code == 200
        media = decided(created["content_uri"])
        assert (media.state, media.size) == (MediaState.COMPLETE, size)
        uploads.append(media)
    digest = body.digest.hexdigest()
    first, second = uploads
    assert first.sha256 == ""  # when it was decided
    first.refresh_from_db()
    assert (first.sha256, second.sha256) == (digest, digest)
    assert second.storage_key == first.storage_key
    got = requests.get(
        f"{live.base_url}/_matrix/client/v1/media/download/{mxc_path(second.mxc_uri)}",
        headers=bearer(token),
        stream=True,
        timeout=300,
    )
    downloaded = hashlib.sha256()
    for chunk in got.iter_content(1024 * 1024):
        downloaded.update(chunk)
    assert downloaded.hexdigest() == digest
    assert keys_of(s3_client, first) == [first.storage_key]
    assert keys_of(s3_client, second) == []  # its copy deleted: it serves the first's
