"""Serving media to other servers: ``/_matrix/federation/v1/media/download|thumbnail``.

Requests are signed with a fake remote server's own Ed25519 key (its key server answer is
stubbed at the HTTP layer of the keyring); answers are parsed back with python-multipart,
the parser Synapse reads them with, driven the way Synapse drives it."""

from __future__ import annotations

import io
import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from django.core.cache import cache
from django.test import Client
from django.utils import timezone
from PIL import Image
from signedjson.key import generate_signing_key

from msc3870 import moderation
from msc3870.asgi import MediaASGIHandler
from msc3870.conf import app_settings
from msc3870.models import Media, MediaState

from .asgi_driver import call, parked, request, run, until
from .federation_helpers import (
    FED_DOWNLOAD,
    FED_THUMBNAIL,
    FakeRemote,
    KeyServers,
    fed_get,
    multipart,
    parse_multipart,
    signed,
)
from .helpers import (
    MatrixClient,
    animated_gif,
    body_of,
    media_of,
    msc3870_settings,
    mxc_path,
    png_bytes,
)


def media_id_of(path: str) -> str:
    return path.split("/")[1]


# --- downloads -----------------------------------------------------------------------


def test_download_is_multipart_with_the_bytes_and_the_client_headers(
    alice: MatrixClient, peer: FakeRemote
) -> None:
    data = png_bytes(20, 20)
    path = mxc_path(alice.uploaded(data, "image/png", filename="cat.png"))
    response = fed_get(peer, FED_DOWNLOAD + media_id_of(path))
    assert response.streaming  # streamed from storage, never gathered in the view
    _, file = multipart(response)
    assert file.data == data
    client = alice.get(f"/_matrix/client/v1/media/download/{path}/cat.png")
    assert file.headers == {
        "content-type": client["Content-Type"],
        "content-disposition": client["Content-Disposition"],
    }
    assert file.headers["content-disposition"] == "inline; filename=cat.png"
    assert response["Content-Security-Policy"].startswith("sandbox")
    assert response["Cache-Control"].startswith("private")


def test_attachments_and_names_that_need_encoding(alice: MatrixClient, peer: FakeRemote) -> None:
    data = b"<html><script>alert(1)</script></html>"
    path = mxc_path(alice.uploaded(data, "text/html", filename="r%C3%A9sum%C3%A9%20final.html"))
    _, file = multipart(fed_get(peer, FED_DOWNLOAD + media_id_of(path)))
    assert file.data == data
    # Not a type a browser may render in place: an attachment, the name RFC 5987-encoded.
    assert file.headers["content-disposition"] == (
        "attachment; filename*=utf-8''r%C3%A9sum%C3%A9%20final.html"
    )


def test_a_large_file_is_streamed_in_chunks(alice: MatrixClient, peer: FakeRemote) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = mxc_path(alice.uploaded(data, "application/octet-stream"))
    response = fed_get(peer, FED_DOWNLOAD + media_id_of(path))
    chunks = list(response.streaming_content)
    assert len(chunks) > 3
    assert max(map(len, chunks)) <= 1024 * 1024  # the store's chunk, not the whole file
    body = b"".join(chunks)
    assert int(response["Content-Length"]) == len(body)
    _, file = parse_multipart(response["Content-Type"], body)
    assert file.data == data


def test_an_empty_file(alice: MatrixClient, peer: FakeRemote) -> None:
    path = mxc_path(alice.uploaded(b"", "text/plain"))
    _, file = multipart(fed_get(peer, FED_DOWNLOAD + media_id_of(path)))
    assert file.data == b""
    client = alice.get(f"/_matrix/client/v1/media/download/{path}")
    assert file.headers["content-type"] == client["Content-Type"]


def test_each_answer_has_its_own_boundary(alice: MatrixClient, peer: FakeRemote) -> None:
    path = mxc_path(alice.uploaded(b"hello", "text/plain"))
    first = fed_get(peer, FED_DOWNLOAD + media_id_of(path))
    second = fed_get(peer, FED_DOWNLOAD + media_id_of(path))
    assert first["Content-Type"] != second["Content-Type"]


def assert_not_found(response: Any) -> None:
    assert response.status_code == 404, body_of(response)
    assert response.json()["errcode"] == "M_NOT_FOUND"


def test_unknown_quarantined_and_remote_media_are_404(
    alice: MatrixClient, peer: FakeRemote
) -> None:
    assert_not_found(fed_get(peer, FED_DOWNLOAD + "NoSuchMediaHere"))

    path = mxc_path(alice.uploaded(png_bytes(), "image/png"))
    assert moderation.quarantine(media_of(f"mxc://{path}"), by="test")
    assert_not_found(fed_get(peer, FED_DOWNLOAD + media_id_of(path)))
    assert_not_found(fed_get(peer, FED_THUMBNAIL + media_id_of(path) + "?width=32&height=32"))

    # Media of another server held here (a copy of remote media) is not ours to serve,
    # even under an id that would be free here.
    served = media_of(alice.uploaded(b"theirs", "text/plain"))
    Media.objects.create(
        server_name="other.example.net",
        media_id="TheirMediaId",
        user_id="@someone:other.example.net",
        state=MediaState.COMPLETE,
        unused_expires_at=timezone.now(),
        content_type="text/plain",
        size=served.size,
        sha256=served.sha256,
        storage_key=served.storage_key,
    )
    assert_not_found(fed_get(peer, FED_DOWNLOAD + "TheirMediaId"))


def test_pending_media_not_uploaded_in_time_is_504(alice: MatrixClient, peer: FakeRemote) -> None:
    created = alice.create()
    media_id = media_id_of(mxc_path(created["content_uri"]))
    response = fed_get(peer, FED_DOWNLOAD + media_id + "?timeout_ms=0")
    assert response.status_code == 504
    assert response.json()["errcode"] == "M_NOT_YET_UPLOADED"
    bad = fed_get(peer, FED_DOWNLOAD + media_id + "?timeout_ms=soon")
    assert bad.status_code == 400
    assert bad.json()["errcode"] == "M_INVALID_PARAM"


def test_an_invalid_media_id_is_a_matrix_error(peer: FakeRemote, db: None) -> None:
    response = fed_get(peer, FED_DOWNLOAD + "not%20an%20id")
    assert response.status_code in (400, 404)
    assert response.json()["errcode"] in ("M_INVALID_PARAM", "M_NOT_FOUND")


def test_other_methods_are_refused_as_json(peer: FakeRemote, db: None) -> None:
    uri = FED_DOWNLOAD + "abc"
    response = Client().post(uri, headers=signed(peer, uri, method="POST"))
    assert response.status_code == 405
    assert response.json()["errcode"] == "M_UNRECOGNIZED"


# --- redirects: a Location part ------------------------------------------------------


def test_with_redirects_the_second_part_is_only_a_location(
    s3: Any, alice: MatrixClient, peer: FakeRemote
) -> None:
    data = png_bytes(16, 16)
    path = mxc_path(alice.uploaded(data, "image/png", filename="cat.png"))
    media = media_of(f"mxc://{path}")

    # Without redirects, S3 media is streamed inline like any other.
    _, inline = multipart(fed_get(peer, FED_DOWNLOAD + media_id_of(path)))
    assert inline.data == data

    with msc3870_settings(REDIRECT_DOWNLOADS=True):
        response = fed_get(peer, FED_DOWNLOAD + media_id_of(path))
    assert response.status_code == 200  # never a top-level redirect
    assert not response.has_header("Location")
    _, part = multipart(response)
    assert list(part.headers) == ["location"]  # Synapse reads any later value as the URL
    assert part.data == b""
    location = urlsplit(part.headers["location"])
    assert location.path.endswith("/" + media.storage_key)
    query = parse_qs(location.query)
    assert query["response-content-type"] == ["image/png"]
    assert query["response-content-disposition"] == ["inline; filename=cat.png"]
    assert int(query["X-Amz-Expires"][0]) == app_settings.DOWNLOAD_URL_LIFETIME
    assert response["Cache-Control"] == "private, max-age=60"
    # The requester follows it without authentication and gets the bytes.
    followed = requests.get(part.headers["location"], timeout=10)
    assert followed.status_code == 200
    assert followed.content == data
    assert followed.headers["Content-Type"] == "image/png"


def test_thumbnails_redirect_too(s3: Any, alice: MatrixClient, peer: FakeRemote) -> None:
    path = mxc_path(alice.uploaded(png_bytes(200, 200), "image/png"))
    with msc3870_settings(REDIRECT_DOWNLOADS=True):
        response = fed_get(peer, FED_THUMBNAIL + media_id_of(path) + "?width=32&height=32")
    _, part = multipart(response)
    assert list(part.headers) == ["location"]
    thumbnail = requests.get(part.headers["location"], timeout=10).content
    assert Image.open(io.BytesIO(thumbnail)).size[0] <= 200


# --- thumbnails ----------------------------------------------------------------------


def test_thumbnail_is_multipart_with_the_image(alice: MatrixClient, peer: FakeRemote) -> None:
    path = mxc_path(alice.uploaded(png_bytes(400, 300), "image/png"))
    uri = FED_THUMBNAIL + media_id_of(path) + "?width=32&height=32&method=crop&animated=false"
    _, file = multipart(fed_get(peer, uri))
    assert file.headers == {"content-type": "image/png", "content-disposition": "inline"}
    image = Image.open(io.BytesIO(file.data))
    assert image.format == "PNG"
    assert image.size == (32, 32)  # Synapse's smallest crop size
    client = alice.get(f"/_matrix/client/v1/media/thumbnail/{path}?width=32&height=32&method=crop")
    assert body_of(client) == file.data


def test_thumbnail_parameters_and_sources_are_checked(
    alice: MatrixClient, peer: FakeRemote
) -> None:
    path = mxc_path(alice.uploaded(png_bytes(), "image/png"))
    missing = fed_get(peer, FED_THUMBNAIL + media_id_of(path) + "?height=32")
    assert missing.status_code == 400
    assert missing.json()["errcode"] == "M_INVALID_PARAM"
    method = fed_get(peer, FED_THUMBNAIL + media_id_of(path) + "?width=32&height=32&method=melt")
    assert method.status_code == 400
    text = mxc_path(alice.uploaded(b"not an image", "text/plain"))
    refused = fed_get(peer, FED_THUMBNAIL + media_id_of(text) + "?width=32&height=32")
    assert refused.status_code == 400
    assert "errcode" in refused.json()


def test_an_animated_original_asked_for_as_animated(alice: MatrixClient, peer: FakeRemote) -> None:
    gif = animated_gif(40)
    path = mxc_path(alice.uploaded(gif, "image/gif", filename="spin.gif"))
    uri = FED_THUMBNAIL + media_id_of(path) + "?width=32&height=32&animated=true"
    _, file = multipart(fed_get(peer, uri))
    assert file.data == gif
    assert file.headers["content-type"] == "image/gif"


# --- authentication ------------------------------------------------------------------


def assert_unauthorized(response: Any) -> None:
    assert response.status_code == 401, body_of(response)
    assert response.json()["errcode"] == "M_UNAUTHORIZED"


@pytest.fixture
def served(alice: MatrixClient) -> str:
    """The download URI of a small local file."""
    return FED_DOWNLOAD + media_id_of(mxc_path(alice.uploaded(b"secret", "text/plain")))


def test_unsigned_requests_are_401(served: str, alice: MatrixClient) -> None:
    assert_unauthorized(Client().get(served))
    # A user's access token is not a server's signature.
    assert_unauthorized(alice.get(served))
    assert_unauthorized(Client().get(served, headers={"Authorization": "X-Matrix nonsense"}))


def test_a_tampered_signature_is_401(served: str, peer: FakeRemote) -> None:
    header = signed(peer, served)["Authorization"]
    sig = header.rsplit('sig="', 1)[1].rstrip('"')
    flipped = ("B" if sig[0] == "A" else "A") + sig[1:]
    assert_unauthorized(
        Client().get(served, headers={"Authorization": header.replace(sig, flipped)})
    )


def test_a_signature_covers_the_exact_uri(served: str, peer: FakeRemote) -> None:
    # Signed for one request, replayed on another path or with another query.
    headers = signed(peer, served)
    assert_unauthorized(Client().get(served + "?timeout_ms=1", headers=headers))
    other = served.replace(FED_DOWNLOAD, FED_THUMBNAIL) + "?width=32&height=32"
    assert_unauthorized(Client().get(other, headers=headers))
    assert Client().get(served, headers=headers).status_code == 200


def test_another_destination_is_401(served: str, peer: FakeRemote) -> None:
    assert_unauthorized(fed_get(peer, served, destination="someone-else.example.org"))


def test_an_unknown_key_or_server_is_401(
    served: str, peer: FakeRemote, key_servers: KeyServers
) -> None:
    # Signed with a key the origin does not publish.
    impostor = FakeRemote(peer.server_name, generate_signing_key("new1"))
    assert_unauthorized(fed_get(impostor, served))
    # A server whose keys cannot be fetched at all.
    assert_unauthorized(fed_get(FakeRemote("unreachable.example.com"), served))


def test_a_signed_request_is_accepted(served: str, peer: FakeRemote) -> None:
    _, file = multipart(fed_get(peer, served))
    assert file.data == b"secret"


# --- per-origin rate -----------------------------------------------------------------


def test_each_origin_has_its_own_rate(
    served: str, peer: FakeRemote, key_servers: KeyServers
) -> None:
    other = key_servers.publish(FakeRemote("other.example.com"))
    with msc3870_settings(FEDERATION_MEDIA_RATE="3/min"):
        for _ in range(3):
            assert fed_get(peer, served).status_code == 200
        # Unsigned requests do not spend (or even reach) a server's budget.
        assert_unauthorized(Client().get(served))
        limited = fed_get(peer, served)
        assert limited.status_code == 429
        assert limited.json()["errcode"] == "M_LIMIT_EXCEEDED"
        assert 0 < limited.json()["retry_after_ms"] <= 20_000
        assert int(limited["Retry-After"]) >= 1
        # Thumbnails share the bucket; another origin has its own.
        assert fed_get(peer, served.replace(FED_DOWNLOAD, FED_THUMBNAIL)).status_code == 429
        assert fed_get(other, served).status_code == 200
    with msc3870_settings(FEDERATION_MEDIA_RATE=None):
        assert fed_get(peer, served).status_code == 200


def test_a_bad_rate_setting_names_itself(served: str, peer: FakeRemote) -> None:
    from django.core.exceptions import ImproperlyConfigured

    from msc3870.api.throttling import leaky_bucket

    with pytest.raises(ImproperlyConfigured, match="FEDERATION_MEDIA_RATE"):
        leaky_bucket("k", "lots", "FEDERATION_MEDIA_RATE")
    cache.clear()


# --- waiting for pending media, through the ASGI handler ------------------------------


def test_a_pending_id_is_answered_once_uploaded_without_holding_a_thread(
    app: MediaASGIHandler, peer: FakeRemote, token: str
) -> None:
    bearer = {"Authorization": f"Bearer {token}"}

    async def scenario() -> None:
        created = await call(app, "POST", "/_matrix/media/v1/create", headers=bearer)
        assert created.status == 200, created.body
        path = mxc_path(created.json()["content_uri"])
        uri = FED_DOWNLOAD + media_id_of(path) + "?timeout_ms=30000"
        thumb = (
            FED_THUMBNAIL + media_id_of(path) + "?width=32&height=32&method=crop&timeout_ms=30000"
        )
        # More waiters than the handler has threads: waiting holds none.
        waiters = [request(app, "GET", uri, headers=signed(peer, uri)) for _ in range(3)]
        waiters.append(request(app, "GET", thumb, headers=signed(peer, thumb)))
        await until(lambda: parked() == 4, "4 parked federation requests")
        data = png_bytes(64, 64)
        put = await call(
            app,
            "PUT",
            f"/_matrix/media/v3/upload/{path}?filename=late.png",
            body=data,
            headers={**bearer, "Content-Type": "image/png"},
        )
        assert put.status == 200, put.body
        replies = [await w.reply() for w in waiters]
        for reply in replies[:3]:
            assert reply.status == 200, reply.body
            assert int(reply.headers["content-length"]) == len(reply.body)
            metadata, file = parse_multipart(reply.headers["content-type"], reply.body)
            assert metadata.data == b"{}"
            assert file.data == data
            assert file.headers["content-disposition"] == "inline; filename=late.png"
        _, thumbnail = parse_multipart(replies[3].headers["content-type"], replies[3].body)
        assert Image.open(io.BytesIO(thumbnail.data)).size == (32, 32)
        assert parked() == 0

    run(scenario)


def test_the_raw_uri_is_what_is_verified_under_asgi(
    app: MediaASGIHandler, peer: FakeRemote
) -> None:
    """Signed over the path and query as sent (percent-encoded), not as decoded."""

    async def scenario() -> None:
        uri = FED_DOWNLOAD + "AbcDef?timeout_ms=0&x=%2F%7E"
        reply = await call(app, "GET", uri, headers=signed(peer, uri))
        assert reply.status == 404, reply.body  # authenticated; no such media
        assert reply.json()["errcode"] == "M_NOT_FOUND"
        decoded = FED_DOWNLOAD + "AbcDef?timeout_ms=0&x=/~"
        reply = await call(app, "GET", uri, headers=signed(peer, decoded))
        assert reply.status == 401
        assert reply.json()["errcode"] == "M_UNAUTHORIZED"

    run(scenario)
