"""Without a broker a PUT is decided in one write
(``uploads._upload_decided_in_one_write``).

The id is not claimed before the body is read: the bytes go to a key of the request's own,
and one compare-and-set on the still PENDING row records them with their verdict. The
races a claim would guard are tested here, each forced by running the other party inside
the body's last read (no sleeps, no threads).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone

from msc3870 import lifecycle
from msc3870.errors import CannotOverwrite, NotFound, StorageUnavailable
from msc3870.models import Media, MediaState, UploadMethod
from msc3870.stores.local import LocalMediaStore

from .helpers import (
    MatrixClient,
    ThenAtTheEnd,
    media_files,
    media_of,
    msc3870_settings,
    mxc_path,
    put_body,
)

S = MediaState


def test_the_row_goes_from_pending_to_complete_with_its_bytes_in_one_update(
    alice: MatrixClient,
) -> None:
    created = alice.create()
    moves: list[tuple[list[str], str]] = []
    real = lifecycle.transition

    def transition(media: object, sources: list[str], target: str, **kwargs: object) -> bool:
        moves.append((list(sources), target))
        return real(media, sources, target, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lifecycle, "transition", transition)
        response = alice.put(f"/_matrix/media/v3/upload/{mxc_path(created['content_uri'])}", b"hi")
    assert response.status_code == 200, response.content
    assert moves == [([S.PENDING], S.COMPLETE)]
    media = media_of(created["content_uri"])
    assert media.upload_method == UploadMethod.PUT
    assert media.processing_started_at is not None and media.completed_at is not None
    assert media.storage_key.startswith(media.served_key + ".")
    assert media_files() == [media.storage_key]
    assert (Path(settings.MEDIA_DIR) / media.storage_key).read_bytes() == b"hi"


def test_a_put_that_loses_the_id_while_streaming_keeps_nothing(alice: MatrixClient) -> None:
    """A /complete claims the id while the PUT's body arrives: the PUT changes nothing and
    deletes what it stored."""
    media = media_of(alice.create()["content_uri"])

    def claimed_by_complete() -> None:
        assert lifecycle.transition(
            media.pk,
            [S.PENDING],
            S.PROCESSING,
            upload_method=UploadMethod.URL,
            processing_started_at=timezone.now(),
        )

    with pytest.raises(CannotOverwrite):
        put_body(alice, media, ThenAtTheEnd(b"late bytes", claimed_by_complete), 10)
    row = Media.objects.get(pk=media.pk)
    assert (row.state, row.upload_method, row.storage_key, row.size) == (
        S.PROCESSING,
        UploadMethod.URL,
        "",
        None,
    )
    assert media_files() == []


def test_racing_puts_one_wins_and_the_served_bytes_are_its_own(alice: MatrixClient) -> None:
    media = media_of(alice.create()["content_uri"])

    def the_other_put() -> None:
        put_body(alice, media, io.BytesIO(b"the winner"), 10)

    with pytest.raises(CannotOverwrite):
        put_body(alice, media, ThenAtTheEnd(b"the loser!", the_other_put), 10)
    row = Media.objects.get(pk=media.pk)
    assert row.state == S.COMPLETE
    assert row.sha256 == hashlib.sha256(b"the winner").hexdigest()
    assert media_files() == [row.storage_key]
    assert (Path(settings.MEDIA_DIR) / row.storage_key).read_bytes() == b"the winner"


def test_a_put_to_an_id_that_expires_while_streaming_is_not_found(alice: MatrixClient) -> None:
    media = media_of(alice.create()["content_uri"])

    def expired() -> None:
        assert lifecycle.transition(media.pk, [S.PENDING], S.EXPIRED)

    with pytest.raises(NotFound):
        put_body(alice, media, ThenAtTheEnd(b"late bytes", expired), 10)
    assert Media.objects.get(pk=media.pk).state == S.EXPIRED
    assert media_files() == []


def put_denied_html(client: MatrixClient, created: dict[str, str]) -> Any:
    """A PUT of HTML where the checks deny HTML."""
    with msc3870_settings(DENIED_CONTENT_TYPES=["text/html"]):
        return client.put(
            f"/_matrix/media/v3/upload/{mxc_path(created['content_uri'])}",
            b"<!DOCTYPE html><html></html>",
            "text/html",
        )


def test_a_rejected_put_is_rejected_from_pending_and_leaves_no_bytes(alice: MatrixClient) -> None:
    created = alice.create()
    response = put_denied_html(alice, created)
    assert response.status_code == 403, response.content
    assert response.json()["errcode"] == "M_FORBIDDEN"
    media = media_of(created["content_uri"])
    assert media.state == S.REJECTED
    assert media.objects_deleted_at is not None  # every key of the id was deleted
    assert media_files() == []


def test_a_rejection_stands_when_only_the_ids_other_keys_cannot_be_deleted(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PUT's own bytes are deleted, then the row is rejected; if the id's other keys
    (an upload URL's object) cannot be deleted now, the answer is still the rejection and
    the row is left for the cleanup sweep (``objects_deleted_at`` unset)."""

    def failing(self: LocalMediaStore, keys: list[str]) -> None:
        raise StorageUnavailable("disk gone")

    monkeypatch.setattr(LocalMediaStore, "delete_many", failing)
    created = alice.create()
    response = put_denied_html(alice, created)
    assert response.status_code == 403, response.content
    media = media_of(created["content_uri"])
    assert (media.state, media.objects_deleted_at) == (S.REJECTED, None)
    assert media_files() == []
