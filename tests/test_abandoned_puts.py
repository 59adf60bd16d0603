"""A PUT abandoned by the stuck sweep and finishing late leaves a newer claim alone.

Every race here is forced by calling the steps in order (no sleeps, no threads).
"""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.utils import timezone

from msc3870 import lifecycle, maintenance, uploads
from msc3870.errors import InvalidParam
from msc3870.models import Media, MediaState, UploadMethod

from .helpers import MatrixClient, ThenAtTheEnd, media_of, put_body

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

    # The body ends after the sweep reset the claim and a new PUT claimed the id.
    finishes_late = ThenAtTheEnd(
        b"late bytes", lambda: state.update(newer=_reset_and_reclaim(media))
    )
    with pytest.raises(uploads.UploadAbandoned):
        put_body(alice, media, finishes_late, 10)
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
        put_body(alice, media, DiesLate(b"late bytes"), 10)
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
        put_body(alice, media, Dies(b""), 10)
    assert media_of(created["content_uri"]).state == S.PENDING
    # And the id can be uploaded to again.
    response = alice.put_to_url(created["upload_url"], b"second try")
    assert response.status_code == 200
