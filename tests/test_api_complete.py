"""MSC3870: PUT to the upload URL, then /complete."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from msc3870.models import Media, MediaState
from msc3870.upload_tokens import make_upload_token

from .helpers import (
    MatrixClient,
    media_files,
    media_of,
    msc3870_settings,
    mxc_path,
    png_bytes,
    url_path,
)


@pytest.mark.parametrize("unstable", [False, True])
def test_upload_url_flow(alice: MatrixClient, unstable: bool) -> None:
    created = alice.create()
    data = png_bytes()
    response = alice.put_to_url(created["upload_url"], data, "image/png")
    assert response.status_code == 200
    assert response["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    done = alice.complete(created["content_uri"], "?filename=photo.png", unstable=unstable)
    assert done.status_code == 200
    assert done.json() == {"content_uri": created["content_uri"]}
    media = media_of(created["content_uri"])
    assert media.state == MediaState.COMPLETE
    assert media.upload_method == "url"
    assert media.filename == "photo.png"
    assert media.content_type == "image/png"
    # Nothing else could hold these bytes (no media of their size and first 8 KiB): their
    # first bytes are recorded, and they are not read whole (SHA256_WHEN "needed").
    assert len(data) < 8192 and media.prefix_sha256 == hashlib.sha256(data).hexdigest()
    assert media.sha256 == ""
    got = alice.download(created["content_uri"])
    assert got.status_code == 200
    assert b"".join(got.streaming_content) == data
    # The incoming object is gone: only the server-owned copy remains.
    assert media_files() == [media.storage_key]
    assert not media.storage_key.startswith("incoming/")


def test_complete_without_upload_is_a_clear_error(alice: MatrixClient) -> None:
    created = alice.create()
    response = alice.complete(created["content_uri"])
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_NOT_YET_UPLOADED"
    assert media_of(created["content_uri"]).state == MediaState.PENDING


def test_complete_errors_follow_the_put_codes(alice: MatrixClient, bob: MatrixClient) -> None:
    assert alice.complete("mxc://localhost/unknownId").status_code == 404
    created = alice.create()
    alice.put_to_url(created["upload_url"], b"data")
    forbidden = bob.complete(created["content_uri"])
    assert forbidden.status_code == 403
    assert forbidden.json()["errcode"] == "M_FORBIDDEN"
    # Filled by a PUT to the media server: /complete cannot overwrite it.
    other = alice.create()
    assert (
        alice.put(f"/_matrix/media/v3/upload/{mxc_path(other['content_uri'])}", b"x").status_code
        == 200
    )
    conflict = alice.complete(other["content_uri"])
    assert conflict.status_code == 409
    assert conflict.json()["errcode"] == "M_CANNOT_OVERWRITE_MEDIA"


def test_complete_after_expiry_is_404(alice: MatrixClient) -> None:
    created = alice.create()
    alice.put_to_url(created["upload_url"], b"data")
    Media.objects.update(unused_expires_at=timezone.now() - timedelta(seconds=1))
    response = alice.complete(created["content_uri"])
    assert response.status_code == 404
    assert response.json()["errcode"] == "M_NOT_FOUND"


def test_complete_twice_is_idempotent(alice: MatrixClient) -> None:
    created = alice.create()
    alice.put_to_url(created["upload_url"], b"data")
    first = alice.complete(created["content_uri"])
    second = alice.complete(created["content_uri"], unstable=True)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json() == {"content_uri": created["content_uri"]}
    assert media_of(created["content_uri"]).attempts == 1  # screened once


def test_upload_url_is_dead_after_complete(alice: MatrixClient) -> None:
    created = alice.create()
    alice.put_to_url(created["upload_url"], b"the checked bytes", "text/plain")
    assert alice.complete(created["content_uri"]).status_code == 200
    again = alice.put_to_url(created["upload_url"], b"<html>swapped</html>", "text/html")
    assert again.status_code == 409
    assert again.json()["errcode"] == "M_CANNOT_OVERWRITE_MEDIA"
    got = alice.download(created["content_uri"])
    assert b"".join(got.streaming_content) == b"the checked bytes"
    assert media_files() == [media_of(created["content_uri"]).storage_key]


def test_expired_upload_url_is_refused(alice: MatrixClient) -> None:
    created = alice.create()
    media = media_of(created["content_uri"])
    stale = make_upload_token(media.media_id, timezone.now() - timedelta(seconds=1))
    response = Client().generic(
        "PUT", f"/_matrix/media/unstable/com.beeper.msc3870/upload_url/{stale}", b"x"
    )
    assert response.status_code == 403
    assert response.json()["errcode"] == "M_FORBIDDEN"
    # And a live URL whose id has expired is refused too.
    Media.objects.update(unused_expires_at=timezone.now() - timedelta(seconds=1))
    Media.objects.update(state=MediaState.EXPIRED)
    assert alice.put_to_url(created["upload_url"], b"x").status_code == 403
    assert media_files() == []


def test_upload_url_of_one_id_cannot_fill_another(alice: MatrixClient) -> None:
    first = alice.create()
    second = alice.create()
    # Put the bytes through the first id's URL: only the first id gets them.
    assert alice.put_to_url(first["upload_url"], b"for the first").status_code == 200
    nothing = alice.complete(second["content_uri"])
    assert nothing.status_code == 400
    assert nothing.json()["errcode"] == "M_NOT_YET_UPLOADED"
    # A token edited to name the second id fails its signature.
    token = url_path(first["upload_url"]).rsplit("/", 1)[-1]
    _, rest = token.split(":", 1)
    second_token = url_path(second["upload_url"]).rsplit("/", 1)[-1]
    forged = second_token.split(":", 1)[0] + ":" + rest
    response = Client().generic(
        "PUT", f"/_matrix/media/unstable/com.beeper.msc3870/upload_url/{forged}", b"x"
    )
    assert response.status_code == 403
    assert response.json()["errcode"] == "M_FORBIDDEN"
    assert alice.complete(second["content_uri"]).status_code == 400


def test_garbage_upload_token_is_403(db: None) -> None:
    response = Client().generic(
        "PUT", "/_matrix/media/unstable/com.beeper.msc3870/upload_url/not-a-token", b"x"
    )
    assert response.status_code == 403
    assert response.json()["errcode"] == "M_FORBIDDEN"


def test_oversized_put_to_url_is_413_and_leaves_nothing(alice: MatrixClient) -> None:
    created = alice.create()
    with msc3870_settings(MAX_UPLOAD_SIZE=8):
        response = alice.put_to_url(created["upload_url"], b"123456789")
    assert response.status_code == 413
    assert response.json()["errcode"] == "M_TOO_LARGE"
    assert media_files() == []


def test_upload_limit_lowered_after_upload_rejects_at_complete(alice: MatrixClient) -> None:
    created = alice.create()
    alice.put_to_url(created["upload_url"], b"123456789")
    with msc3870_settings(MAX_UPLOAD_SIZE=8):
        response = alice.complete(created["content_uri"])
    assert response.status_code == 413
    assert response.json()["errcode"] == "M_TOO_LARGE"
    assert media_of(created["content_uri"]).state == MediaState.REJECTED
    assert media_files() == []
    # A rejected id stays rejected: completing again repeats the verdict.
    assert alice.complete(created["content_uri"]).status_code == 413


def test_type_mismatch_policy(alice: MatrixClient) -> None:
    html = b"<!DOCTYPE html><html><body>hi</body></html>"
    created = alice.create()
    alice.put_to_url(created["upload_url"], html, "image/png")
    assert alice.complete(created["content_uri"]).status_code == 200
    media = media_of(created["content_uri"])
    assert media.declared_content_type == "image/png"
    assert media.content_type == "text/html"  # the bytes win: served as an attachment
    got = alice.download(created["content_uri"])
    assert got["Content-Type"] == "text/html"
    assert got["Content-Disposition"].startswith("attachment")

    with msc3870_settings(TYPE_MISMATCH="reject"):
        other = alice.create()
        alice.put_to_url(other["upload_url"], html, "image/png")
        response = alice.complete(other["content_uri"])
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_INVALID_PARAM"


@pytest.mark.parametrize(
    "content_type", ["multipart/form-data; boundary=xyz", "application/x-www-form-urlencoded"]
)
def test_upload_url_stores_form_like_bodies_verbatim(
    alice: MatrixClient, content_type: str
) -> None:
    created = alice.create()
    body = b"--xyz\r\nContent-Disposition: form-data; name=a\r\n\r\nb\r\n--xyz--\r\n&a=b"
    assert alice.put_to_url(created["upload_url"], body, content_type).status_code == 200
    assert alice.complete(created["content_uri"]).status_code == 200
    assert b"".join(alice.download(created["content_uri"]).streaming_content) == body
