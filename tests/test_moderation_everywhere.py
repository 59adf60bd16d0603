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
from msc3870.models import Media, ModerationAction

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

A = ModerationAction
MOD = "@mod:localhost"


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
        moderation.DeletionFilter(timezone.now() + timedelta(hours=2)), by=MOD
    ),
    "re-screen": lambda m: moderation.rescreen(m, by=MOD),
}


@pytest.mark.parametrize("action", list(ACTIONS))
def test_moderated_media_is_404_on_every_path_at_once(
    action: str, alice: MatrixClient, bob: MatrixClient, peer: FakeRemote
) -> None:
    media = media_of(alice.uploaded(png_bytes(64, 64), "image/png"))
    assert_served(every_read(bob, media.media_id, peer))  # thumbnails made, answers warm
    if action == "re-screen":
        with msc3870_settings(CHECKS=["tests.checks.reject_everything"]):
            assert ACTIONS[action](media) == "quarantined"
    else:
        ACTIONS[action](media)
    for client in (alice, bob):
        assert_all_not_found(every_read(client, media.media_id, peer))


@pytest.mark.parametrize("bulk", [False, True])
def test_downloads_parked_on_media_are_404_when_it_is_purged(
    app: MediaASGIHandler, token: str, bulk: bool
) -> None:
    bearer = {"Authorization": f"Bearer {token}"}
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
