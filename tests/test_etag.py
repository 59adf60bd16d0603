"""A download's ETag says nothing about other users' media.

With ``SHA256_WHEN = "needed"`` only an upload that other media may share (same size and
first 8 KiB) is hashed. An ETag that was the SHA-256 when there was one told anyone who
downloads an upload whether some other upload, perhaps a private file, holds the same
bytes: every answer that carries an ETag carries the media id instead."""

from __future__ import annotations

import hashlib
from typing import Any

from django.test import Client

from msc3870.models import Media

from .federation_helpers import FED_DOWNLOAD, FED_THUMBNAIL, FakeRemote, fed_get, multipart
from .helpers import MatrixClient, animated_gif, media_of, mxc_path

V1 = "/_matrix/client/v1/media/"
LEGACY = "/_matrix/media/v3/"


def every_etag_answer(client: MatrixClient, media: Media, peer: FakeRemote) -> list[Any]:
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
        fed_get(peer, FED_DOWNLOAD + media.media_id),
        fed_get(peer, FED_THUMBNAIL + media.media_id + "?width=32&height=32&animated=true"),
    ]
    return answers


def test_a_twin_and_a_unique_upload_have_etags_of_the_same_form(
    alice: MatrixClient, bob: MatrixClient, peer: FakeRemote
) -> None:
    shared = animated_gif(16, unique=True)
    alice.upload_through_url(shared)
    # Another user's upload of the same bytes: hashed.
    twin = media_of(bob.upload_through_url(shared))
    # No other media like it: not hashed.
    unique = media_of(bob.upload_through_url(animated_gif(16, unique=True)))
    assert twin.sha256 == hashlib.sha256(shared).hexdigest()
    assert unique.sha256 == ""

    for media in (twin, unique):
        answers = every_etag_answer(bob, media, peer)
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
    media = media_of(alice.upload_through_url(animated_gif(16, unique=True)))
    answer = alice.get(V1 + "thumbnail/" + mxc_path(media.mxc_uri) + "?width=32&height=32")
    assert answer.status_code == 200
    assert answer["Content-Type"] == "image/png"
    assert not answer.has_header("ETag")
