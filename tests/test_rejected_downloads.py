"""Downloads of media the checks rejected are 404 ``M_NOT_FOUND`` (protocol.md: expired,
rejected, quarantined or unknown media), on every read endpoint and for a download that
was waiting when the rejection came. Only the uploader hears the rejection's reason."""

from __future__ import annotations

from msc3870.asgi import MediaASGIHandler
from msc3870.models import MediaState

from .asgi_driver import call, parked, request, run, until
from .federation_helpers import FakeRemote
from .helpers import (
    MatrixClient,
    assert_all_not_found,
    every_read,
    media_of,
    msc3870_settings,
    mxc_path,
    png_bytes,
)

REJECT_ALL = ["msc3870.screening.check_size", "tests.checks.reject_everything"]


def test_an_upload_rejected_at_complete_is_404_to_every_download(
    alice: MatrixClient, bob: MatrixClient, peer: FakeRemote
) -> None:
    created = alice.create()
    assert alice.put_to_url(created["upload_url"], b"x" * 2048).status_code == 200
    with msc3870_settings(MAX_UPLOAD_SIZE=1024):
        refused = alice.complete(created["content_uri"])
        assert (refused.status_code, refused.json()["errcode"]) == (413, "M_TOO_LARGE")
        media = media_of(created["content_uri"])
        assert media.state == MediaState.REJECTED
        for client in (alice, bob):  # the uploader's downloads too: a download is a read
            assert_all_not_found(every_read(client, media.media_id, peer))
        # The uploader still learns why, from /complete.
        again = alice.complete(created["content_uri"])
        assert (again.status_code, again.json()["errcode"]) == (413, "M_TOO_LARGE")


def test_an_upload_rejected_by_a_check_is_404_the_put_says_why(
    alice: MatrixClient, bob: MatrixClient, peer: FakeRemote
) -> None:
    created = alice.create()
    path = mxc_path(created["content_uri"])
    with msc3870_settings(CHECKS=REJECT_ALL):
        put = alice.put(f"/_matrix/media/v3/upload/{path}", png_bytes(), "image/png")
    assert put.status_code == 403
    assert put.json() == {"errcode": "M_FORBIDDEN", "error": "Found something nasty"}
    assert_all_not_found(every_read(bob, path.split("/")[1], peer))


def test_a_download_waiting_when_the_rejection_comes_is_404(
    app: MediaASGIHandler, token: str
) -> None:
    bearer = {"Authorization": f"Bearer {token}"}

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
