"""Moderation takes effect at once on every read path: media quarantined, rejected or
purged, one at a time or in bulk, is 404 ``M_NOT_FOUND`` on the client v1 and legacy
downloads and thumbnails and on the federation download and thumbnail, on the next
request, and downloads parked waiting on it are answered 404 when it happens.
(Several web processes on PostgreSQL: ``services/test_moderation_everywhere.py``.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import pytest
from django.utils import timezone

from msc3870 import moderation
from msc3870.asgi import MediaASGIHandler
from msc3870.auth import token_cache
from msc3870.models import Media, ModerationAction

from .asgi_driver import call, parked, request, run, until
from .conftest import MatrixClient, make_token, media_of, mxc_path, png_bytes
from .federation_helpers import FakeRemote
from .test_federation_media import key_servers, remote
from .test_rejected_downloads import assert_not_found, reads

__all__ = ["key_servers", "remote"]  # fixtures of the federation tests, used here

A = ModerationAction
MOD = "@mod:localhost"


def uploaded_image(client: MatrixClient, width: int = 64) -> Media:
    response = client.post("/_matrix/media/v3/upload", png_bytes(width, width), "image/png")
    assert response.status_code == 200, response.content
    return media_of(response.json()["content_uri"])


def assert_served(answers: dict[str, object]) -> None:
    for name, response in answers.items():
        assert response.status_code == 200, (name, response.content)  # type: ignore[attr-defined]


ACTIONS: dict[str, Callable[[Media], object]] = {
    "quarantine": lambda m: moderation.quarantine(m, by=MOD, reason="r"),
    "reject": lambda m: moderation.reject(m, by=MOD, reason="r"),
    "purge": lambda m: moderation.purge(m, by=MOD, reason="r"),
    "bulk quarantine": lambda m: moderation.moderate_many([m.pk], A.QUARANTINE, by=MOD),
    "bulk reject": lambda m: moderation.moderate_many(
        Media.objects.filter(pk=m.pk), A.REJECT, by=MOD
    ),
    "bulk purge": lambda m: moderation.moderate_many([m.pk], A.PURGE, by=MOD),
    "quarantine the uploader": lambda m: moderation.quarantine_user_media(m.user_id, by=MOD),
    "quarantine the content": lambda m: moderation.quarantine_content(m.sha256, by=MOD),
    "delete by date": lambda m: moderation.delete_local_media_before(
        timezone.now() + timedelta(hours=2), by=MOD
    ),
    "re-screen": lambda m: moderation.rescreen(m, by=MOD),
}


@pytest.mark.parametrize("action", list(ACTIONS))
def test_moderated_media_is_404_on_every_path_at_once(
    action: str, alice: MatrixClient, bob: MatrixClient, remote: FakeRemote
) -> None:
    media = uploaded_image(alice)
    assert_served(reads(bob, media.media_id, remote))  # thumbnails made, answers warm
    if action == "re-screen":
        from .conftest import msc3870_settings

        with msc3870_settings(CHECKS=["tests.test_moderation_actions.refuse_everything"]):
            assert ACTIONS[action](media) == "quarantined"
    else:
        ACTIONS[action](media)
    for client in (alice, bob):
        assert_not_found(reads(client, media.media_id, remote))


@pytest.mark.parametrize("bulk", [False, True])
def test_downloads_parked_on_media_are_404_when_it_is_purged(
    app: MediaASGIHandler, bulk: bool
) -> None:
    token_cache.clear()
    bearer = {"Authorization": f"Bearer {make_token('@alice:localhost')}"}
    size = "width=32&height=32"

    async def scenario() -> None:
        created = await call(app, "POST", "/_matrix/media/v1/create", headers=bearer)
        path = mxc_path(created.json()["content_uri"])
        waiting = [
            request(app, "GET", f"{prefix}/{path}?timeout_ms=30000{query}", headers=bearer)
            for prefix, query in (
                ("/_matrix/client/v1/media/download", ""),
                ("/_matrix/media/v3/download", ""),
                ("/_matrix/client/v1/media/thumbnail", f"&{size}"),
                ("/_matrix/media/v3/thumbnail", f"&{size}"),
            )
        ]
        await until(lambda: parked() == 4, "4 parked reads")
        media = await asyncio.to_thread(Media.objects.get, media_id=path.split("/")[1])
        started = asyncio.get_running_loop().time()
        if bulk:
            await asyncio.to_thread(
                moderation.moderate_many, [media.pk], A.PURGE, by=MOD, reason="spam"
            )
        else:
            await asyncio.to_thread(moderation.purge, media, by=MOD, reason="spam")
        for exchange in waiting:
            reply = await exchange.reply()
            assert reply.status == 404, reply.body
            assert reply.json()["errcode"] == "M_NOT_FOUND"
        # Woken by the change, not by their 30 s deadline.
        assert asyncio.get_running_loop().time() - started < 10
        assert parked() == 0

    run(scenario)
