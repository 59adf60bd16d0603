"""Uploads through this server to the real S3 server (SeaweedFS), stored as they arrive:
one PUT sent as it is read (a body of known length up to the single-PUT limit) or
multipart (past it, forced by a small limit and part size), byte-exact, and nothing left
behind by a body cut short or over the limit (no object, no multipart upload)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from django.conf import settings

from msc3870.models import Media, MediaState

from ..helpers import bearer, media_of, mxc_path, wait_until
from .conftest import Stack, base_env
from .helpers import keys_of

pytestmark = pytest.mark.services

MiB = 1024 * 1024
PART = 5 * MiB
SINGLE_PUT = 8 * MiB
LIMIT = 16 * MiB


@pytest.fixture(scope="module")
def streaming(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A stack of the module's own (one web worker, a celery worker) writing one PUT up
    to 8 MiB and parts of 5 MiB past it, with a 16 MiB limit."""
    tmp = tmp_path_factory.mktemp("streaming")
    env = base_env(
        tmp,
        MSC3870_S3_UPLOAD_PART_SIZE=str(PART),
        MSC3870_S3_UPLOAD_SINGLE_PUT_LIMIT=str(SINGLE_PUT),
        MSC3870_MAX_UPLOAD_SIZE=str(LIMIT),
    )
    stack = Stack(env=env, logs=tmp)
    try:
        stack.start_server(workers=1)
        stack.start_worker()
        yield stack
    finally:
        stack.stop_all()


def uploads_in_progress(s3_client: Any, media_id: str) -> list[str]:
    bucket = settings.STORAGES["msc3870"]["OPTIONS"]["bucket_name"]
    found = s3_client.list_multipart_uploads(Bucket=bucket, Prefix=f"media/{media_id[:2]}/")
    return [u["Key"] for u in found.get("Uploads", []) if media_id in u["Key"]]


def stored_etag_of_a_put(stack: Stack, token: str, s3_client: Any, data: bytes) -> str:
    """PUT ``data`` through the server to a new id; once decided, downloaded byte-exact
    and its only object: the stored object's ETag (a multipart upload's ends in -N)."""
    created = stack.client(token).create()
    path = mxc_path(created["content_uri"])
    put = requests.put(
        f"{stack.base_url}/_matrix/media/v3/upload/{path}",
        data=data,
        headers={**bearer(token), "Content-Type": "application/octet-stream"},
        timeout=60,
    )
    assert put.status_code == 200, put.text
    media = wait_until(
        lambda: (m := media_of(created["content_uri"])).state == MediaState.COMPLETE and m,
        30,
        "the upload to be decided",
    )
    bucket = settings.STORAGES["msc3870"]["OPTIONS"]["bucket_name"]
    head = s3_client.head_object(Bucket=bucket, Key=media.storage_key)
    assert head["ContentLength"] == len(data)
    download = requests.get(
        f"{stack.base_url}/_matrix/client/v1/media/download/{path}",
        headers=bearer(token),
        timeout=60,
    )
    assert download.status_code == 200
    assert download.content == data
    assert keys_of(s3_client, media) == [media.storage_key]
    return str(head["ETag"]).strip('"')


def test_a_put_through_the_server_is_stored_in_parts_byte_exact(
    streaming: Stack, user_token: tuple[str, str], s3_client: Any
) -> None:
    data = os.urandom(2 * PART + 12345)  # over the single-PUT limit: three parts
    etag = stored_etag_of_a_put(streaming, user_token[1], s3_client, data)
    assert etag.endswith("-3")  # multipart: 5 + 5 MiB + the rest


def test_a_put_up_to_the_limit_is_one_put_sent_as_it_arrives_byte_exact(
    streaming: Stack, user_token: tuple[str, str], s3_client: Any
) -> None:
    etag = stored_etag_of_a_put(streaming, user_token[1], s3_client, os.urandom(SINGLE_PUT - 321))
    assert "-" not in etag  # one PUT, not a multipart upload


def new_id(stack: Stack, token: str) -> tuple[dict[str, Any], str]:
    created = stack.client(token).create()
    return created, mxc_path(created["content_uri"]).split("/")[1]


def put_started(stack: Stack, token: str, created: dict[str, Any], length: int) -> socket.socket:
    """A connection that has sent the head of a PUT of ``length`` bytes to ``created``."""
    port = urlsplit(stack.base_url).port
    assert port is not None
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        f"PUT /_matrix/media/v3/upload/{mxc_path(created['content_uri'])} HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: {length}\r\n\r\n".encode()
    )
    return sock


def test_a_body_cut_short_in_its_one_put_leaves_nothing(
    streaming: Stack, user_token: tuple[str, str], s3_client: Any
) -> None:
    """The client goes away with 3 of 7 MiB sent, while the PUT to the store is under
    way: the store keeps no object, and the id may be uploaded to again."""
    created, media_id = new_id(streaming, user_token[1])
    with put_started(streaming, user_token[1], created, 7 * MiB) as sock:
        for _ in range(3):
            sock.sendall(os.urandom(MiB))
        wait_until(
            lambda: media_of(created["content_uri"]).state == MediaState.PROCESSING,
            30,
            "the upload to be under way",
        )
    wait_until(lambda: media_of(created["content_uri"]).state == MediaState.PENDING, 30, "PENDING")
    media = Media.objects.get(media_id=media_id)
    assert keys_of(s3_client, media) == []
    assert uploads_in_progress(s3_client, media_id) == []


def test_a_body_cut_short_aborts_its_multipart_upload(
    streaming: Stack, user_token: tuple[str, str], s3_client: Any
) -> None:
    created, media_id = new_id(streaming, user_token[1])
    with put_started(streaming, user_token[1], created, 3 * PART) as sock:
        sent = 0
        while sent < 2 * PART + MiB:  # two parts written, the third under way
            sock.sendall(os.urandom(MiB))
            sent += MiB
        wait_until(lambda: uploads_in_progress(s3_client, media_id), 30, "a multipart upload")
    # The client is gone: the upload is aborted, no part is kept, the id is free again.
    wait_until(lambda: not uploads_in_progress(s3_client, media_id), 30, "the abort")
    wait_until(lambda: media_of(created["content_uri"]).state == MediaState.PENDING, 30, "PENDING")
    media = Media.objects.get(media_id=media_id)
    assert keys_of(s3_client, media) == []


def test_a_chunked_body_over_the_limit_is_413_and_leaves_nothing(
    streaming: Stack, user_token: tuple[str, str], s3_client: Any
) -> None:
    _, token = user_token
    created = streaming.client(token).create()
    path = mxc_path(created["content_uri"])

    def body() -> Iterator[bytes]:
        for _ in range(LIMIT // MiB + 2):
            yield os.urandom(MiB)

    put = requests.put(
        f"{streaming.base_url}/_matrix/media/v3/upload/{path}",
        data=body(),  # no Content-Length: chunked
        headers=bearer(token),
        timeout=60,
    )
    assert put.status_code == 413
    assert put.json()["errcode"] == "M_TOO_LARGE"
    media_id = path.split("/")[1]
    wait_until(lambda: not uploads_in_progress(s3_client, media_id), 30, "the abort")
    media = media_of(created["content_uri"])
    assert media.state == MediaState.PENDING
    assert keys_of(s3_client, media) == []
