"""Racing ``/complete`` calls, the interleaving forced, not hoped for.

``test_live_server.py::test_racing_completes_screen_once_and_agree`` starts six threads at
a barrier and catches a broken claim only when the scheduler happens to interleave them
badly. Here the second call is run *inside* the first, at the point where a claim without
its condition breaks: after the first has read the row and checked what arrived, before
its claim (the compare-and-set ``UPDATE ... WHERE state IN ('pending')``). Exactly one
claim may win; the loser must get the same answer as the winner (``/complete`` is
idempotent for the uploader), and the bytes are screened once.

Without the ``states`` condition of the claim (``lifecycle.transition`` /
``sql.update_media``), the first call's claim wins as well, the row is screened twice,
and these tests fail every run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from msc3870 import lifecycle, sql, verdicts
from msc3870.models import Media, MediaState
from msc3870.stores import get_store

from .helpers import (
    MatrixClient,
    bytes_at_upload_url,
    media_of,
    msc3870_settings,
    mxc_path,
    png_bytes,
)

S = MediaState


def complete_path(content_uri: str) -> str:
    return f"/_matrix/media/v1/upload/{mxc_path(content_uri)}/complete?filename=cat.png"


class Claims:
    """Records every PENDING -> PROCESSING claim attempt and whether it won; runs
    ``before_first_claim`` once, just before the first attempt's UPDATE."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.results: list[bool] = []
        self.before_first_claim: Callable[[], None] | None = None
        real = lifecycle.transition

        def transition(media: Any, from_states: Any, to_state: str, **kwargs: Any) -> bool:
            sources = list(from_states)
            claiming = to_state == S.PROCESSING and sources == [S.PENDING]
            if claiming and self.before_first_claim is not None:
                run, self.before_first_claim = self.before_first_claim, None
                run()
            won = real(media, sources, to_state, **kwargs)
            if claiming:
                self.results.append(won)
            return won

        monkeypatch.setattr(lifecycle, "transition", transition)


@pytest.fixture
def screenings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The primary keys handed to screening, one entry per dispatch."""
    dispatched: list[int] = []
    real = verdicts.dispatch

    def dispatch(media: Media, **kwargs: Any) -> None:
        dispatched.append(media.pk)
        real(media, **kwargs)

    monkeypatch.setattr(verdicts, "dispatch", dispatch)
    return dispatched


@pytest.mark.parametrize("waits", [False, True], ids=["answers-early", "waits-for-checks"])
def test_a_complete_that_loses_the_claim_gets_the_winners_answer(
    alice: MatrixClient,
    monkeypatch: pytest.MonkeyPatch,
    screenings: list[int],
    waits: bool,
) -> None:
    """Both calls read PENDING and find the bytes; the second claims first (forced): the
    first's claim must lose, and it answers as the winner did."""
    created = bytes_at_upload_url(alice, png_bytes())
    path = complete_path(created["content_uri"])
    claims = Claims(monkeypatch)
    inner: list[Any] = []
    claims.before_first_claim = lambda: inner.append(alice.post(path, b"{}"))
    with msc3870_settings(COMPLETE_WAITS_FOR_CHECKS=waits):
        outer = alice.post(path, b"{}")

    assert len(inner) == 1
    assert inner[0].status_code == 200, inner[0].content
    assert outer.status_code == 200, outer.content
    assert inner[0].json() == outer.json() == {"content_uri": created["content_uri"]}
    # The inner call claimed first; the outer call's compare-and-set lost, every time.
    assert claims.results == [True, False]
    media = media_of(created["content_uri"])
    assert screenings == [media.pk]
    assert media.state == S.COMPLETE
    assert media.filename == "cat.png"
    got = alice.get(f"/_matrix/client/v1/media/download/{mxc_path(created['content_uri'])}")
    assert got.status_code == 200
    assert b"".join(got.streaming_content) == png_bytes()


def test_a_complete_that_read_a_stale_row_does_not_claim_it_again(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch, screenings: list[int]
) -> None:
    """The second call's read of the row happened before the first call's claim (a stale
    PENDING copy), and its own claim comes after the first finished: it must not claim a
    row that is no longer PENDING, and still answers 200 (idempotent)."""
    created = bytes_at_upload_url(alice, png_bytes())
    path = complete_path(created["content_uri"])
    media = media_of(created["content_uri"])
    stale = Media.objects.get(pk=media.pk)
    assert stale.state == S.PENDING
    assert alice.post(path, b"{}").status_code == 200  # the first call, start to finish
    assert media_of(created["content_uri"]).state == S.COMPLETE

    # The second call: its first read returns the copy taken before the first call's claim.
    real_read = sql.media_by_mxc
    reads: list[str] = []

    def read(server_name: str, media_id: str) -> Media | None:
        reads.append(media_id)
        return stale if len(reads) == 1 else real_read(server_name, media_id)

    monkeypatch.setattr(sql, "media_by_mxc", read)
    # Its check of the bytes is answered as it was before the first call moved them.
    store = type(get_store())
    real_head, real_head_with_prefix = store.head, store.head_with_prefix
    before = real_head(get_store(), media.storage_key)
    assert before is not None
    data = png_bytes()

    def head(self: Any, key: str) -> Any:
        return before if key == media.incoming_key else real_head(self, key)

    def head_with_prefix(self: Any, key: str, length: int) -> Any:
        if key == media.incoming_key:
            return before, data[:length]
        return real_head_with_prefix(self, key, length)

    monkeypatch.setattr(store, "head", head)
    monkeypatch.setattr(store, "head_with_prefix", head_with_prefix)
    claims = Claims(monkeypatch)
    second = alice.post(path, b"{}")

    assert claims.results == [False]  # the stale row's claim lost
    assert second.status_code == 200, second.content
    assert second.json() == {"content_uri": created["content_uri"]}
    assert len(reads) == 2  # it looked again after losing
    assert screenings == [media.pk]  # screened once, by the first call
    assert media_of(created["content_uri"]).state == S.COMPLETE


def test_a_complete_that_looks_for_the_bytes_after_the_winner_moved_them_answers_200(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch, screenings: list[int]
) -> None:
    """The second call runs start to finish between the first call's read of the row and
    its look at the incoming object (its checks), so the first finds no bytes."""
    from msc3870 import uploads

    created = bytes_at_upload_url(alice, png_bytes())
    path = complete_path(created["content_uri"])
    real_check = uploads._check_can_upload
    inner: list[Any] = []

    def check_then_race(user: Any, media: Media) -> None:
        real_check(user, media)
        if not inner:
            inner.append(None)
            inner[0] = alice.post(path, b"{}")

    monkeypatch.setattr(uploads, "_check_can_upload", check_then_race)
    outer = alice.post(path, b"{}")
    assert inner[0].status_code == 200, inner[0].content
    assert outer.status_code == 200, outer.content
    assert outer.json() == {"content_uri": created["content_uri"]}
    assert screenings == [media_of(created["content_uri"]).pk]
