"""Downloads of media the checks rejected are 404 ``M_NOT_FOUND`` (protocol.md: expired,
rejected, quarantined or unknown media), on every read endpoint and for a download that
was waiting when the rejection came. Only the uploader hears the rejection's reason."""

from __future__ import annotations

from typing import Any

from msc3870.asgi import MediaASGIHandler
from msc3870.auth import token_cache
from msc3870.models import MediaState
from msc3870.screening import Rejection, ScreeningContext

from .asgi_driver import call, parked, request, run, until
from .conftest import MatrixClient, make_token, media_of, msc3870_settings, mxc_path, png_bytes
from .federation_helpers import FakeRemote
from .test_api_complete import complete, put_to_url
from .test_federation_media import DOWNLOAD, THUMBNAIL, fed_get, key_servers, remote

__all__ = ["key_servers", "remote"]  # fixtures of the federation tests, used here

REJECT_ALL = ["msc3870.screening.check_size", "tests.test_rejected_downloads.reject_everything"]


def reject_everything(ctx: ScreeningContext) -> None:
    raise Rejection("Found something nasty", errcode="M_FORBIDDEN")


def reads(client: MatrixClient, media_id: str, remote: FakeRemote) -> dict[str, Any]:
    path = f"localhost/{media_id}"
    size = "?width=32&height=32&timeout_ms=0"
    return {
        "v1 download": client.get(f"/_matrix/client/v1/media/download/{path}?timeout_ms=0"),
        "v1 thumbnail": client.get(f"/_matrix/client/v1/media/thumbnail/{path}{size}"),
        "legacy download": client.get(f"/_matrix/media/v3/download/{path}?timeout_ms=0"),
        "legacy thumbnail": client.get(f"/_matrix/media/v3/thumbnail/{path}{size}"),
        "federation download": fed_get(remote, DOWNLOAD + media_id + "?timeout_ms=0"),
        "federation thumbnail": fed_get(remote, THUMBNAIL + media_id + size),
    }


def assert_not_found(answers: dict[str, Any]) -> None:
    for name, response in answers.items():
        assert response.status_code == 404, (name, response.content)
        assert response.json()["errcode"] == "M_NOT_FOUND", name
        assert "large" not in response.json()["error"].lower(), name


def test_an_upload_rejected_at_complete_is_404_to_every_download(
    alice: MatrixClient, bob: MatrixClient, remote: FakeRemote
) -> None:
    created = alice.create()
    assert put_to_url(created["upload_url"], b"x" * 2048).status_code == 200
    with msc3870_settings(MAX_UPLOAD_SIZE=1024):
        refused = complete(alice, created["content_uri"])
        assert (refused.status_code, refused.json()["errcode"]) == (413, "M_TOO_LARGE")
        media = media_of(created["content_uri"])
        assert media.state == MediaState.REJECTED
        for client in (alice, bob):  # the uploader's downloads too: a download is a read
            assert_not_found(reads(client, media.media_id, remote))
        # The uploader still learns why, from /complete.
        again = complete(alice, created["content_uri"])
        assert (again.status_code, again.json()["errcode"]) == (413, "M_TOO_LARGE")


def test_an_upload_rejected_by_a_check_is_404_the_put_says_why(
    alice: MatrixClient, bob: MatrixClient, remote: FakeRemote
) -> None:
    created = alice.create()
    path = mxc_path(created["content_uri"])
    with msc3870_settings(CHECKS=REJECT_ALL):
        put = alice.put(f"/_matrix/media/v3/upload/{path}", png_bytes(), "image/png")
    assert put.status_code == 403
    assert put.json() == {"errcode": "M_FORBIDDEN", "error": "Found something nasty"}
    assert_not_found(reads(bob, path.split("/")[1], remote))


def test_a_download_waiting_when_the_rejection_comes_is_404(app: MediaASGIHandler) -> None:
    token_cache.clear()
    bearer = {"Authorization": f"Bearer {make_token('@alice:localhost')}"}

    async def scenario() -> None:
        created = await call(app, "POST", "/_matrix/media/v1/create", headers=bearer)
        path = mxc_path(created.json()["content_uri"])
        waiting = [
            request(app, "GET", f"{prefix}/{path}?timeout_ms=30000", headers=bearer)
            for prefix in ("/_matrix/client/v1/media/download", "/_matrix/media/v3/download")
        ]
        await until(lambda: parked() == 2, "2 parked downloads")
        with msc3870_settings(CHECKS=REJECT_ALL):
            put = await call(
                app,
                "PUT",
                f"/_matrix/media/v3/upload/{path}",
                body=png_bytes(),
                headers={**bearer, "Content-Type": "image/png"},
            )
        assert put.status == 403, put.body
        assert put.json()["error"] == "Found something nasty"
        for exchange in waiting:
            reply = await exchange.reply()
            assert reply.status == 404, reply.body
            assert reply.json()["errcode"] == "M_NOT_FOUND"
            assert "nasty" not in reply.json()["error"]

    run(scenario)
