"""A download's ETag says nothing about other users' media.

With ``SHA256_WHEN = "needed"`` only an upload that other media may share (same size and
first 8 KiB) is hashed. An ETag that was the SHA-256 when there was one told anyone who
downloads an upload whether some other upload, perhaps a private file, holds the same
bytes: every answer that carries an ETag carries the media id instead."""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

from django.test import Client
from PIL import Image

from msc3870.models import Media

from .conftest import MatrixClient, mxc_path
from .federation_helpers import FakeRemote
from .test_federation_media import DOWNLOAD, THUMBNAIL, fed_get, key_servers, multipart, remote
from .test_sha256_when_needed import uploaded

__all__ = ["key_servers", "remote"]  # fixtures of the federation tests, used here

V1 = "/_matrix/client/v1/media/"
LEGACY = "/_matrix/media/v3/"


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    frames.append(Image.frombytes("RGB", (16, 16), os.urandom(16 * 16 * 3)))
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def every_etag_answer(client: MatrixClient, media: Media, remote: FakeRemote) -> list[Any]:
    """The answers a download of ``media`` can give that carry headers: client v1 and
    legacy downloads, their 304s, a thumbnail that serves the (animated) original, and
    federation's download and thumbnail."""
    path = mxc_path(media.mxc_uri)
    answers = [
        client.get(V1 + "download/" + path),
        client.get(V1 + "download/" + path + "/named.gif"),
        Client().get(LEGACY + "download/" + path),
        client.get(V1 + "thumbnail/" + path + "?width=32&height=32&animated=true"),
        Client().get(LEGACY + "thumbnail/" + path + "?width=32&height=32&animated=true"),
    ]
    etag = answers[0]["ETag"]
    answers += [
        client.get(V1 + "download/" + path, headers={"If-None-Match": etag}),
        Client().get(LEGACY + "download/" + path, HTTP_IF_NONE_MATCH=etag),
        fed_get(remote, DOWNLOAD + media.media_id),
        fed_get(remote, THUMBNAIL + media.media_id + "?width=32&height=32&animated=true"),
    ]
    return answers


def test_a_twin_and_a_unique_upload_have_etags_of_the_same_form(
    alice: MatrixClient, bob: MatrixClient, remote: FakeRemote
) -> None:
    shared = animated_gif()
    uploaded(alice, shared)
    twin = uploaded(bob, shared)  # another user's upload of the same bytes: hashed
    unique = uploaded(bob, animated_gif())  # no other media like it: not hashed
    assert twin.sha256 == hashlib.sha256(shared).hexdigest()
    assert unique.sha256 == ""

    for media in (twin, unique):
        answers = every_etag_answer(bob, media, remote)
        statuses = [answer.status_code for answer in answers]
        assert statuses == [200, 200, 200, 200, 200, 304, 304, 200, 200]
        # Client answers: the id, whether the bytes were hashed or not.
        assert [answer["ETag"] for answer in answers[:7]] == [f'"{media.media_id}"'] * 7
        # Federation answers carry none, in the response or in its parts.
        for answer in answers[7:]:
            assert not answer.has_header("ETag")
            assert all("etag" not in part.headers for part in multipart(answer))
        for answer in answers:
            assert twin.sha256 not in str(answer.headers)


def test_a_rendered_thumbnail_has_no_etag(alice: MatrixClient) -> None:
    media = uploaded(alice, animated_gif())
    answer = alice.get(V1 + "thumbnail/" + mxc_path(media.mxc_uri) + "?width=32&height=32")
    assert answer.status_code == 200
    assert answer["Content-Type"] == "image/png"
    assert not answer.has_header("ETag")
