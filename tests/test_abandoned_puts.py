"""A PUT abandoned by the stuck sweep and finishing late leaves a newer claim alone.

Every race here is forced by calling the steps in order (no sleeps, no threads).
"""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.utils import timezone

from msc3870 import lifecycle, maintenance, storage_keys, uploads
from msc3870.errors import InvalidParam
from msc3870.models import Media, MediaState, UploadMethod
from msc3870.stores import get_store

from .helpers import MatrixClient, ThenAtTheEnd, body_of, media_of, put_body

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


def _dead_claim(media: Media, leftover: bytes | None) -> Media:
    """A PUT claimed ``media`` and died before recording its bytes (its process killed,
    or the database gone at the recording write), having stored ``leftover`` if given."""
    assert lifecycle.transition(
        media.pk,
        [S.PENDING],
        S.PROCESSING,
        upload_method=UploadMethod.PUT,
        processing_started_at=timezone.now() - timedelta(seconds=5),
    )
    if leftover is not None:
        get_store().write_stream(media.upload_key(), io.BytesIO(leftover), max_size=1024)
    return Media.objects.get(pk=media.pk)


def _upload_keys(media: Media) -> list[str]:
    prefix = storage_keys.upload_prefix(media.served_key)
    directory = prefix.rsplit("/", 1)[0] + "/"
    return [key for key in get_store().list_keys(directory) if key.startswith(prefix)]


@pytest.mark.usefixtures("puts_claim_first")
def test_a_retry_takes_over_a_dead_claim(alice: MatrixClient) -> None:
    """The first try answered 503 (or was cut) after claiming the id: its uploader's retry
    succeeds at once instead of 409 until the stuck sweep gives up, and what the first
    try stored is deleted."""
    created = alice.create()
    media = _dead_claim(media_of(created["content_uri"]), leftover=b"first try")
    assert len(_upload_keys(media)) == 1

    response = alice.put_upload(created["content_uri"], b"second try")

    assert response.status_code == 200, response.content
    row = media_of(created["content_uri"])
    assert row.state == S.COMPLETE
    assert row.size == len(b"second try")
    assert _upload_keys(row) == [row.storage_key]  # the first try's object is gone
    assert body_of(alice.download(created["content_uri"])) == b"second try"


@pytest.mark.usefixtures("puts_claim_first")
def test_a_first_try_still_running_is_superseded_by_the_retry(alice: MatrixClient) -> None:
    """A retry sent while the first try still streams wins; the first try, finishing
    later, records nothing and deletes its own bytes."""
    created = alice.create()
    media = media_of(created["content_uri"])
    retried: dict[str, object] = {}

    def retry() -> None:
        retried["response"] = alice.put_upload(created["content_uri"], b"the retry")

    with pytest.raises(uploads.UploadAbandoned):
        put_body(alice, media, ThenAtTheEnd(b"first try!", retry), 10)

    assert retried["response"].status_code == 200  # type: ignore[attr-defined]
    row = media_of(created["content_uri"])
    assert row.state == S.COMPLETE
    assert row.size == len(b"the retry")
    assert _upload_keys(row) == [row.storage_key]
    assert body_of(alice.download(created["content_uri"])) == b"the retry"


@pytest.mark.usefixtures("puts_claim_first")
def test_another_user_cannot_take_over_a_claim(alice: MatrixClient, bob: MatrixClient) -> None:
    created = alice.create()
    media = _dead_claim(media_of(created["content_uri"]), leftover=b"first try")

    response = bob.put_upload(created["content_uri"], b"not yours")

    assert response.status_code == 403
    assert response.json()["errcode"] == "M_FORBIDDEN"
    row = media_of(created["content_uri"])
    assert (row.state, row.processing_started_at) == (S.PROCESSING, media.processing_started_at)
    assert len(_upload_keys(row)) == 1


@pytest.mark.usefixtures("puts_claim_first")
def test_recorded_bytes_are_not_taken_over(alice: MatrixClient) -> None:
    """Once a PUT has recorded its bytes, the id is uploaded to: a retry is a 409."""
    created = alice.create()
    media = _dead_claim(media_of(created["content_uri"]), leftover=None)
    Media.objects.filter(pk=media.pk).update(storage_key=media.upload_key(), size=9)

    response = alice.put_upload(created["content_uri"], b"too late")

    assert response.status_code == 409
    assert response.json()["errcode"] == "M_CANNOT_OVERWRITE_MEDIA"
    row = media_of(created["content_uri"])
    assert (row.state, row.processing_started_at) == (S.PROCESSING, media.processing_started_at)
