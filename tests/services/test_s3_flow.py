"""MSC3870 straight to S3: real HTTP clients, the real S3 server, gunicorn and a worker."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from django.utils import timezone

from msc3870.models import Media, MediaState
from msc3870.storage import get_store

from .conftest import Stack, bucket_keys
from .helpers import auth, complete, create, keys_of, media_of, mxc_path

pytestmark = pytest.mark.services


def test_full_flow_presigned_put_complete_download(
    live: Stack, user_token: tuple[str, str], s3_client: Any
) -> None:
    _, token = user_token
    created = create(live, token)
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
    done = complete(live, token, created["content_uri"], "?filename=clip.mp4")
    assert done.status_code == 200, done.text
    assert done.json() == {"content_uri": created["content_uri"]}
    media = media_of(created["content_uri"])
    assert media.state == MediaState.COMPLETE
    assert media.sha256 == hashlib.sha256(data).hexdigest()
    assert media.declared_content_type == "video/mp4"
    # Only the server-owned copy is left; the incoming object was deleted after the copy.
    assert keys_of(s3_client, media) == [media.storage_key]
    download = requests.get(
        f"{live.base_url}/_matrix/client/v1/media/download/{mxc_path(media.mxc_uri)}",
        headers=auth(token),
        allow_redirects=False,
    )
    assert download.status_code == 200
    assert download.content == data
    assert download.headers["Content-Disposition"] == "inline; filename=clip.mp4"
    ranged = requests.get(
        f"{live.base_url}/_matrix/client/v1/media/download/{mxc_path(media.mxc_uri)}",
        headers={**auth(token), "Range": "bytes=4194304-4194403"},
    )
    assert ranged.status_code == 206
    assert ranged.content == data[4194304:4194404]


def test_redirect_target_serves_the_bytes_with_our_headers(
    live: Stack, user_token: tuple[str, str]
) -> None:
    _, token = user_token
    created = create(live, token)
    requests.put(
        created["upload_url"], data=b"redirected bytes", headers={"Content-Type": "text/plain"}
    )
    assert complete(live, token, created["content_uri"], "?filename=notes.txt").status_code == 200
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
    first = create(live, token)
    second = create(live, token)
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
    created = create(live, token)
    requests.put(
        created["upload_url"], data=b"screened bytes", headers={"Content-Type": "text/plain"}
    )
    assert complete(live, token, created["content_uri"]).status_code == 200
    # The presigned URL still works until it expires; S3 cannot refuse the second PUT...
    again = requests.put(created["upload_url"], data=b"<script>swap</script>")
    assert again.status_code == 200
    media = media_of(created["content_uri"])
    got = requests.get(f"{live.base_url}/_matrix/media/v3/download/{mxc_path(media.mxc_uri)}")
    assert got.content == b"screened bytes"  # ...but it only reaches a key nobody serves
    assert maintenance.delete_orphaned_uploads() >= 1
    assert keys_of(s3_client, media) == [media.storage_key]


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
        created = create(live, token)
        requests.put(created["upload_url"], data=os.urandom(1024 * 1024 + 1))
        response = complete(live, token, created["content_uri"])
        assert response.status_code == 413
        assert response.json()["errcode"] == "M_TOO_LARGE"
        media = media_of(created["content_uri"])
        assert media.state == MediaState.REJECTED
        assert keys_of(s3_client, media) == []
        # The PUT fallback refuses it while streaming and leaves nothing either.
        other = create(live, token)
        put = requests.put(
            f"{live.base_url}/_matrix/media/v3/upload/{mxc_path(other['content_uri'])}",
            data=iter([os.urandom(512 * 1024)] * 3),  # chunked: no Content-Length to trust
            headers=auth(token),
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
    created = create(live, token)
    data = os.urandom(12 * 1024 * 1024 + 5)  # multipart
    put = requests.put(
        f"{live.base_url}/_matrix/media/v3/upload/{mxc_path(created['content_uri'])}",
        data=data,
        headers=auth(token),
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
    created = create(live, token)
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
    created = create(live, token)
    requests.put(
        created["upload_url"], data=buffer.getvalue(), headers={"Content-Type": "image/jpeg"}
    )
    assert complete(live, token, created["content_uri"]).status_code == 200
    path = mxc_path(created["content_uri"])
    response = requests.get(
        f"{live.base_url}/_matrix/client/v1/media/thumbnail/{path}?width=320&height=240",
        headers=auth(token),
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).size == (320, 213)
    media = media_of(created["content_uri"])
    assert f"thumbnails/{media.media_id}/320x240-scale" in bucket_keys(s3_client, "thumbnails/")
