"""Ids unused past their expiry: /complete does not claim an id whose expiry passed after
its checks, and the sweep expires only ids past their time (the interleaving forced, not
hoped for)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from msc3870 import maintenance, uploads
from msc3870.models import Media, MediaState
from msc3870.stores import get_store

from .helpers import MatrixClient, bytes_at_upload_url, media_of, mxc_path

S = MediaState


def test_complete_does_not_claim_an_id_that_expired_after_its_checks(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The expiry instant passes between /complete's checks and its claim of the row: the
    claim (compare-and-set with the expiry condition) must lose, and the answer is 404."""
    media = media_of(bytes_at_upload_url(alice, b"uploaded to the URL")["content_uri"])
    real_check = uploads._check_can_upload

    def check_then_expire(user: object, row: Media) -> None:
        real_check(user, row)  # type: ignore[arg-type]
        Media.objects.filter(pk=row.pk).update(
            unused_expires_at=timezone.now() - timedelta(milliseconds=1)
        )

    monkeypatch.setattr(uploads, "_check_can_upload", check_then_expire)
    response = alice.post(f"/_matrix/media/v1/upload/{mxc_path(media.mxc_uri)}/complete")
    assert response.status_code == 404, response.content
    assert response.json()["errcode"] == "M_NOT_FOUND"
    assert Media.objects.get(pk=media.pk).state == S.PENDING  # left for the sweep


def test_the_sweep_expires_only_ids_past_their_expiry(alice: MatrixClient) -> None:
    due = media_of(bytes_at_upload_url(alice, b"due")["content_uri"])
    waiting = media_of(bytes_at_upload_url(alice, b"still within its time")["content_uri"])
    Media.objects.filter(pk=due.pk).update(unused_expires_at=timezone.now() - timedelta(seconds=1))
    Media.objects.filter(pk=waiting.pk).update(
        unused_expires_at=timezone.now() + timedelta(minutes=5)
    )
    assert maintenance.expire_pending().moved == 1
    assert Media.objects.get(pk=due.pk).state == S.EXPIRED
    assert get_store().head(due.incoming_key) is None
    assert Media.objects.get(pk=waiting.pk).state == S.PENDING
    assert get_store().head(waiting.incoming_key) is not None  # its bytes stay too
