"""Issue 8, item 15 leftovers: a PUT abandoned by the stuck sweep and finishing late.

Every race here is forced by calling the steps in order (no sleeps, no threads).
"""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from msc3870 import lifecycle, maintenance, uploads
from msc3870.auth import MatrixUser
from msc3870.errors import InvalidParam
from msc3870.models import Media, MediaState, UploadMethod

from .conftest import MatrixClient, media_of, url_path

S = MediaState


def _reset_and_reclaim(media: Media) -> object:
    """The stuck sweep resets an abandoned PUT, then a new PUT claims the id."""
    Media.objects.filter(pk=media.pk).update(
        processing_started_at=timezone.now() - timedelta(hours=2)
    )
    assert maintenance.redispatch_stuck() == 1
    newer = timezone.now() + timedelta(seconds=1)  # distinct from the first claim
    assert lifecycle.transition(
        media.pk,
        [S.PENDING],
        S.PROCESSING,
        upload_method=UploadMethod.PUT,
        processing_started_at=newer,
    )
    return newer


@pytest.mark.usefixtures("puts_claim_first")
def test_late_finisher_does_not_write_over_a_newer_claim(alice: MatrixClient) -> None:
    created = alice.create()
    media = media_of(created["content_uri"])
    state: dict[str, object] = {}

    class FinishesLate(io.BytesIO):
        def read(self, size: int = -1) -> bytes:
            chunk = super().read(size)
            if not chunk and "newer" not in state:  # the body ends after both happened
                state["newer"] = _reset_and_reclaim(media)
            return chunk

    with pytest.raises(uploads.UploadAbandoned):
        uploads.upload_to_media(
            MatrixUser(alice.user_id),
            "localhost",
            media.media_id,
            FinishesLate(b"late bytes"),
            content_length=10,
            content_type="text/plain",
            filename=None,
        )
    row = media_of(created["content_uri"])
    assert row.state == S.PROCESSING
    assert row.processing_started_at == state["newer"]
    # The newer claim's row was not given the late body's size and hash.
    assert row.storage_key == ""
    assert row.size is None or row.size != 10


@pytest.mark.usefixtures("puts_claim_first")
def test_late_failure_does_not_roll_back_a_newer_claim(alice: MatrixClient) -> None:
    created = alice.create()
    media = media_of(created["content_uri"])
    state: dict[str, object] = {}

    class DiesLate(io.BytesIO):
        def read(self, size: int = -1) -> bytes:
            state["newer"] = _reset_and_reclaim(media)
            raise ConnectionResetError("client went away")

    with pytest.raises(InvalidParam):  # how an unreadable body reaches the client
        uploads.upload_to_media(
            MatrixUser(alice.user_id),
            "localhost",
            media.media_id,
            DiesLate(b"late bytes"),
            content_length=10,
            content_type="text/plain",
            filename=None,
        )
    row = media_of(created["content_uri"])
    assert row.state == S.PROCESSING
    assert row.processing_started_at == state["newer"]
    assert row.upload_method == UploadMethod.PUT


@pytest.mark.usefixtures("puts_claim_first")
def test_own_failure_still_releases_the_id(alice: MatrixClient) -> None:
    """The claim condition must not stop the ordinary rollback of this PUT's own claim."""
    created = alice.create()
    media = media_of(created["content_uri"])

    class Dies(io.BytesIO):
        def read(self, size: int = -1) -> bytes:
            raise ConnectionResetError("client went away")

    with pytest.raises(InvalidParam):  # how an unreadable body reaches the client
        uploads.upload_to_media(
            MatrixUser(alice.user_id),
            "localhost",
            media.media_id,
            Dies(b""),
            content_length=10,
            content_type="text/plain",
            filename=None,
        )
    assert media_of(created["content_uri"]).state == S.PENDING
    # And the id can be uploaded to again.
    response = Client().generic("PUT", url_path(created["upload_url"]), b"second try")
    assert response.status_code == 200
