"""Other servers' media, fetched when a client asks for it.

The other server is a real HTTPS server on 127.0.0.1 (server name ``127.0.0.1:<port>``, an
IP literal with a port: no discovery), serving the federation media endpoint as the spec
and Synapse do; 127.0.0.1 is opened in the outbound allowlist for these tests only."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone
from signedjson.sign import verify_signed_json

from msc3870.conf import app_settings
from msc3870.federation import keys
from msc3870.federation.multipart import MultipartMedia
from msc3870.federation.xmatrix import parse_x_matrix, request_json
from msc3870.models import Media, MediaState, UploadMethod
from msc3870.stores import get_store

from .asgi_driver import parked, request, run, until
from .federation_helpers import (
    FED_DOWNLOAD,
    Remote,
    local_server,
    multipart_file,
    send,
)
from .helpers import (
    LEGACY_DOWNLOAD,
    V1_DOWNLOAD,
    V1_THUMBNAIL,
    MatrixClient,
    make_token,
    media_row,
    msc3870_settings,
    png_bytes,
)

pytestmark = pytest.mark.usefixtures("fetching_remote_media")


def verified(path: str, authorization: str, destination: str) -> bool:
    """The X-Matrix header verifies with our own published key, over this exact URI."""
    (credential,) = parse_x_matrix([authorization])
    assert credential.origin == app_settings.SERVER_NAME
    assert credential.destination == destination
    signed = request_json("GET", path, credential.origin, destination)
    signed["signatures"] = {credential.origin: {credential.key: credential.sig}}
    verify_signed_json(signed, credential.origin, keys.verify_keys()[credential.key])
    return True


# --- fetched, stored, screened, served -----------------------------------------------


def test_remote_media_is_fetched_signed_and_kept(alice: MatrixClient, remote: Remote) -> None:
    image = png_bytes(64, 48)
    remote.files["abc"] = (image, "image/png")

    response = alice.get(V1_DOWNLOAD + f"{remote.name}/abc")

    assert response.status_code == 200
    assert b"".join(response.streaming_content) == image
    assert response["Content-Type"] == "image/png"
    media = media_row(remote.name, "abc")
    assert media.state == MediaState.COMPLETE and media.upload_method == UploadMethod.REMOTE
    assert media.size == len(image) and media.filename == "f"
    assert media.storage_key.startswith("remote/127.0.0.1_")
    ((path, authorization),) = remote.authorizations
    assert path == FED_DOWNLOAD + "abc"
    assert verified(path, authorization, remote.name)
    # Held now: served without asking again, thumbnails made here from the original.
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/abc").status_code == 200
    thumb = alice.get(V1_THUMBNAIL + f"{remote.name}/abc?width=32&height=32&method=crop")
    assert thumb.status_code == 200
    assert remote.fed_hits() == 1
    assert any(
        key.startswith("remote-thumbnails/") for key in get_store().list_keys("remote-thumbnails/")
    )


def test_remote_id_equal_to_a_local_id_touches_nothing_local(
    alice: MatrixClient, remote: Remote
) -> None:
    uploaded = alice.post("/_matrix/media/v3/upload", b"ours", content_type="text/plain")
    local_id = uploaded.json()["content_uri"].rsplit("/", 1)[1]
    remote.files[local_id] = (b"theirs", "text/plain")

    theirs = alice.get(V1_DOWNLOAD + f"{remote.name}/{local_id}")
    ours = alice.get(V1_DOWNLOAD + f"{app_settings.SERVER_NAME}/{local_id}")

    assert b"".join(theirs.streaming_content) == b"theirs"
    assert b"".join(ours.streaming_content) == b"ours"


def test_fetched_bytes_are_screened(alice: MatrixClient, remote: Remote) -> None:
    remote.files["page"] = (b"<html><body>hi</body></html>", "text/html")
    with msc3870_settings(DENIED_CONTENT_TYPES=["text/html"]):
        response = alice.get(V1_DOWNLOAD + f"{remote.name}/page")
    # Rejected media is not found, whoever uploaded it.
    assert (response.status_code, response.json()["errcode"]) == (404, "M_NOT_FOUND")
    media = media_row(remote.name, "page")
    assert media.state == MediaState.REJECTED
    assert not get_store().head(media.served_key)
    # Refused content is not a failed fetch: never fetched again.
    Media.objects.filter(pk=media.pk).update(state_changed_at=timezone.now() - timedelta(hours=1))
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/page").status_code == 404
    assert remote.fed_hits() == 1


# --- the legacy endpoint, allow_remote -------------------------------------------------


def test_falls_back_to_legacy_download_on_unrecognized(alice: MatrixClient, remote: Remote) -> None:
    del remote.routes["federation"]
    legacy_path = LEGACY_DOWNLOAD + f"{remote.name}/old"

    def legacy(handler: Any) -> None:
        remote.authorizations.append((handler.path, handler.headers.get("Authorization", "")))
        send(handler, 200, b"legacy bytes", {"Content-Type": "text/plain"})

    remote.routes[legacy_path] = legacy

    response = alice.get(V1_DOWNLOAD + f"{remote.name}/old")

    assert response.status_code == 200
    assert b"".join(response.streaming_content) == b"legacy bytes"
    assert remote.server is not None
    assert remote.server.hits == [
        FED_DOWNLOAD + "old",
        legacy_path + "?allow_remote=false&allow_redirect=true",
    ]
    path, authorization = remote.authorizations[0]
    assert verified(path, authorization, remote.name)


def test_legacy_endpoints_never_fetch(alice: MatrixClient, remote: Remote) -> None:
    """Unauthenticated requests serve other servers' media only if held, whatever
    allow_remote says (a token sent to them changes nothing)."""
    remote.files["x"] = (png_bytes(40, 40), "image/png")
    client = Client()
    for query in ("", "?allow_remote=true", "?allow_remote=false"):
        response = client.get(LEGACY_DOWNLOAD + f"{remote.name}/x{query}")
        assert response.status_code == 404
        assert response.json()["errcode"] == "M_NOT_FOUND"
    thumb = f"/_matrix/media/v3/thumbnail/{remote.name}/x?width=32&height=32"
    assert client.get(thumb).status_code == 404
    assert alice.get(LEGACY_DOWNLOAD + f"{remote.name}/x").status_code == 404
    assert remote.fed_hits() == 0
    assert not Media.objects.filter(server_name=remote.name).exists()

    # An authenticated request fetches it; held now, the legacy endpoints serve it.
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/x").status_code == 200
    for query in ("", "?allow_remote=false"):
        assert client.get(LEGACY_DOWNLOAD + f"{remote.name}/x{query}").status_code == 200
    assert client.get(thumb).status_code == 200
    assert remote.fed_hits() == 1


# --- Location parts and the address guard ----------------------------------------------


def _location_route(remote: Remote, url: str) -> None:
    def federation(handler: Any) -> None:
        remote.authorizations.append((handler.path, handler.headers.get("Authorization", "")))
        framing = MultipartMedia()
        send(handler, 200, framing.location(url), {"Content-Type": framing.content_type})

    remote.routes["federation"] = federation


def test_location_part_is_followed_without_credentials(alice: MatrixClient, remote: Remote) -> None:
    seen: list[str | None] = []

    def cdn(handler: Any) -> None:
        seen.append(handler.headers.get("Authorization"))
        send(
            handler,
            200,
            b"from the cdn",
            {"Content-Type": "text/plain", "Content-Disposition": "inline; filename=a.txt"},
        )

    with local_server({"/object": cdn}) as storage:
        _location_route(remote, f"{storage.url}/object?sig=1")
        response = alice.get(V1_DOWNLOAD + f"{remote.name}/loc")

    assert response.status_code == 200
    assert b"".join(response.streaming_content) == b"from the cdn"
    assert seen == [None]
    assert media_row(remote.name, "loc").filename == "a.txt"


def test_location_to_a_private_address_is_refused(alice: MatrixClient, remote: Remote) -> None:
    _location_route(remote, "http://169.254.169.254/latest/meta-data/")
    response = alice.get(V1_DOWNLOAD + f"{remote.name}/meta")
    assert response.status_code == 502
    assert response.json() == {"errcode": "M_UNKNOWN", "error": "Could not fetch remote media"}
    media = media_row(remote.name, "meta")
    assert media.state == MediaState.REJECTED
    # The detail is for moderators (the admin shows last_error), never for clients.
    assert "may not reach" in media.last_error and "169.254" in media.last_error
    assert "169.254" not in media.rejection_reason


def test_remote_server_on_a_denied_address_is_refused(alice: MatrixClient, remote: Remote) -> None:
    remote.files["x"] = (b"bytes", "text/plain")
    with msc3870_settings(FEDERATION_IP_RANGE_ALLOWLIST=[]):  # the default: loopback denied
        response = alice.get(V1_DOWNLOAD + f"{remote.name}/x")
    assert response.status_code == 502
    assert remote.fed_hits() == 0


# --- size limits -----------------------------------------------------------------------


def test_too_large_from_content_length(alice: MatrixClient, remote: Remote) -> None:
    def federation(handler: Any) -> None:
        remote.authorizations.append((handler.path, ""))
        # Announces far more than the limit allows, sends almost nothing: refused unread.
        send(
            handler,
            200,
            b"--b\r\n",
            {
                "Content-Type": "multipart/mixed; boundary=b",
                "Content-Length": str(10 * 1024 * 1024),
            },
        )

    remote.routes["federation"] = federation
    with msc3870_settings(MAX_UPLOAD_SIZE=1000):
        response = alice.get(V1_DOWNLOAD + f"{remote.name}/big")
    assert response.status_code == 502
    assert response.json() == {"errcode": "M_TOO_LARGE", "error": "Remote media is too large"}


def test_too_large_while_streaming(alice: MatrixClient, remote: Remote) -> None:
    body, content_type = multipart_file(b"x" * 5000, "application/octet-stream")

    def federation(handler: Any) -> None:
        # Chunked, no Content-Length: the limit can only be found while reading.
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for start in range(0, len(body), 1000):
            piece = body[start : start + 1000]
            handler.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        handler.wfile.write(b"0\r\n\r\n")

    remote.routes["federation"] = federation
    with msc3870_settings(MAX_UPLOAD_SIZE=1000):
        response = alice.get(V1_DOWNLOAD + f"{remote.name}/stream")
    assert response.status_code == 502
    assert response.json()["errcode"] == "M_TOO_LARGE"
    media = media_row(remote.name, "stream")
    assert media.state == MediaState.REJECTED and not get_store().head(media.served_key)


# --- failures are remembered briefly ----------------------------------------------------


def test_failure_is_remembered_then_retried(alice: MatrixClient, remote: Remote) -> None:
    first = alice.get(V1_DOWNLOAD + f"{remote.name}/later")
    assert first.status_code == 404
    assert first.json() == {"errcode": "M_NOT_FOUND", "error": "Remote media not found"}
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/later").status_code == 404
    assert remote.fed_hits() == 1  # answered from the row

    remote.files["later"] = (b"now it exists", "text/plain")
    Media.objects.filter(server_name=remote.name, media_id="later").update(
        state_changed_at=timezone.now() - timedelta(seconds=61)
    )
    retried = alice.get(V1_DOWNLOAD + f"{remote.name}/later")
    assert retried.status_code == 200
    assert b"".join(retried.streaming_content) == b"now it exists"
    assert remote.fed_hits() == 2


def test_unreachable_server_is_502(alice: MatrixClient, remote: Remote) -> None:
    assert remote.server is not None
    with local_server({}) as closed:
        name = closed.server_name
    response = alice.get(V1_DOWNLOAD + f"{name}/gone")
    assert response.status_code == 502
    assert media_row(name, "gone").state == MediaState.REJECTED


# --- one fetch for many requests, waiting on the request plane --------------------------


def test_concurrent_requests_cause_one_fetch(app: Any, remote: Remote) -> None:
    remote.files["shared"] = (b"one fetch", "text/plain")
    remote.gate = threading.Event()
    token = make_token("@alice:localhost")
    headers = {"Authorization": f"Bearer {token}"}

    async def scenario() -> None:
        exchanges = [
            request(app, "GET", V1_DOWNLOAD + f"{remote.name}/shared", headers=headers)
            for _ in range(6)
        ]
        # All six wait on the hub (no thread each) while the one fetch is held at the gate.
        await until(lambda: parked() == 6, "six parked requests")
        await until(lambda: remote.fed_hits() > 0, "the fetch")
        assert remote.fed_hits() == 1
        assert remote.gate is not None
        remote.gate.set()
        replies = await asyncio.gather(*(e.reply() for e in exchanges))
        assert [r.status for r in replies] == [200] * 6
        assert {r.body for r in replies} == {b"one fetch"}

    run(scenario)
    assert remote.fed_hits() == 1
