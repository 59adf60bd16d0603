from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from msc3870 import lifecycle
from msc3870.models import Media, MediaState

S = MediaState


def new_media(state: str = S.PENDING) -> Media:
    return Media.objects.create(
        server_name="localhost",
        media_id=f"id{Media.objects.count()}",
        user_id="@a:localhost",
        state=state,
        unused_expires_at=timezone.now() + timedelta(hours=1),
    )


def test_compare_and_set_wins_once(db: None) -> None:
    media = new_media()
    assert lifecycle.transition(media.pk, [S.PENDING], S.PROCESSING) is True
    assert lifecycle.transition(media.pk, [S.PENDING], S.PROCESSING) is False
    assert Media.objects.get().state == S.PROCESSING


def test_transition_updates_the_instance_only_when_it_wins(db: None) -> None:
    media = new_media()
    stale = Media.objects.get()
    assert lifecycle.transition(media, [S.PENDING], S.EXPIRED)
    assert media.state == S.EXPIRED
    assert not lifecycle.transition(stale, [S.PENDING], S.PROCESSING, filename="x")
    assert stale.state == S.PENDING and stale.filename == ""
    assert Media.objects.get().filename == ""


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (S.DELETED, S.COMPLETE),
        (S.EXPIRED, S.PROCESSING),
        (S.REJECTED, S.COMPLETE),
        (S.PENDING, S.COMPLETE),
    ],
)
def test_illegal_transitions_raise(db: None, source: str, target: str) -> None:
    media = new_media(source)
    with pytest.raises(lifecycle.IllegalTransition):
        lifecycle.transition(media, [source], target)


def test_every_state_can_be_purged_except_deleted() -> None:
    for state in S.values:
        assert (S.DELETED in lifecycle.ALLOWED_TRANSITIONS[state]) is (state != S.DELETED)
