"""The legacy unauthenticated endpoints freeze (MSC3916) and cache briefly.

Media created after ``LEGACY_MEDIA_FREEZE_AFTER`` exists only for authenticated requests:
``/_matrix/media/v3/download`` and ``/thumbnail`` answer 404 M_NOT_FOUND, as Synapse does
(``NotFoundError`` for media marked ``authenticated``). Legacy answers are cached by
shared caches for minutes only, so quarantined media leaves them quickly.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from msc3870 import downloads
from msc3870.errors import NotFound
from msc3870.models import Media, MediaState
from msc3870.waiting import MediaWait

from .helpers import MatrixClient, media_of, msc3870_settings, mxc_path, png_bytes

LEGACY = ("/_matrix/media/v3/download/{}", "/_matrix/media/v3/thumbnail/{}?width=32&height=32")
AUTHENTICATED = (
    "/_matrix/client/v1/media/download/{}",
    "/_matrix/client/v1/media/thumbnail/{}?width=32&height=32",
)


def test_media_created_after_the_freeze_is_not_served_unauthenticated(
    alice: MatrixClient,
) -> None:
    path = mxc_path(alice.uploaded(png_bytes(64, 64), "image/png"))
    with msc3870_settings(LEGACY_MEDIA_FREEZE_AFTER=timezone.now() - timedelta(minutes=1)):
        for template in LEGACY:
            response = Client().get(template.format(path))
            assert response.status_code == 404, template
            assert response.json()["errcode"] == "M_NOT_FOUND"
        for template in AUTHENTICATED:
            assert alice.get(template.format(path)).status_code == 200, template


def test_media_created_before_the_freeze_is_still_served(alice: MatrixClient) -> None:
    path = mxc_path(alice.uploaded(png_bytes(64, 64), "image/png"))
    frozen_at = (timezone.now() + timedelta(minutes=1)).isoformat()  # a string works too
    with msc3870_settings(LEGACY_MEDIA_FREEZE_AFTER=frozen_at):
        for template in LEGACY:
            assert Client().get(template.format(path)).status_code == 200, template


def test_no_freeze_by_default(alice: MatrixClient) -> None:
    """Off until the federation media endpoints serve: other servers (Synapse) reach our
    media only through the legacy endpoints today."""
    path = mxc_path(alice.uploaded(png_bytes(64, 64), "image/png"))
    for template in LEGACY:
        assert Client().get(template.format(path)).status_code == 200, template


def test_pending_media_after_the_freeze_is_not_found_without_waiting(
    alice: MatrixClient,
) -> None:
    """Not a 504 after the wait (which would say the id exists): 404 at once."""
    server_name, media_id = mxc_path(alice.create()["content_uri"]).split("/")
    with msc3870_settings(LEGACY_MEDIA_FREEZE_AFTER=timezone.now() - timedelta(minutes=1)):
        response = Client().get(f"/_matrix/media/v3/download/{server_name}/{media_id}")
    assert response.status_code == 404
    assert response.json()["errcode"] == "M_NOT_FOUND"
    with pytest.raises(MediaWait):  # authenticated: waits as before
        downloads.media_for_download(server_name, media_id, timeout_ms=1000)


def test_the_freeze_applies_to_the_answer_after_a_wait(alice: MatrixClient) -> None:
    """The wait's continuation carries the freeze: the answer given once the media is
    complete is decided with it too."""
    server_name, media_id = mxc_path(alice.create()["content_uri"]).split("/")
    freeze = timezone.now() + timedelta(minutes=1)
    with pytest.raises(MediaWait) as waiting:
        downloads.media_for_download(server_name, media_id, timeout_ms=10_000, frozen_after=freeze)
    # Meanwhile the row turns out to be newer than the freeze, and completes.
    Media.objects.filter(media_id=media_id).update(
        created_at=freeze + timedelta(seconds=1),
        state=MediaState.COMPLETE,
        storage_key="media/x",
    )
    with pytest.raises(NotFound):
        waiting.value.resume(Media.objects.get(media_id=media_id))


def test_legacy_answers_are_cached_briefly_authenticated_ones_privately(
    alice: MatrixClient,
) -> None:
    path = mxc_path(alice.uploaded(png_bytes(64, 64), "image/png"))
    for template in LEGACY:
        response = Client().get(template.format(path))
        assert response["Cache-Control"] == "public, max-age=300", template
    for template in AUTHENTICATED:
        response = alice.get(template.format(path))
        assert response["Cache-Control"].startswith("private"), template


def test_quarantine_is_effective_for_legacy_downloads(alice: MatrixClient) -> None:
    path = mxc_path(alice.uploaded(png_bytes(64, 64), "image/png"))
    media = media_of("mxc://" + path)
    Media.objects.filter(pk=media.pk).update(state=MediaState.QUARANTINED)
    assert Client().get(LEGACY[0].format(path)).status_code == 404
