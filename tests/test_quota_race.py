"""The per-user quota cannot be beaten by racing completes.

Every upload's checks may pass against the same total while none of them is complete yet;
the quota is therefore decided again in the transaction that completes, under the user's
lock. Both tests force that interleaving, so that a quota decided only by the checks
fails them every run, never by chance.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection
from django.db.models import Sum
from django.utils import timezone

from msc3870 import lifecycle, verdicts
from msc3870.models import Media, MediaState, UploadMethod
from msc3870.stores import get_store

from .helpers import MatrixClient, bytes_at_upload_url, media_of, msc3870_settings

S = MediaState


def processing(client: MatrixClient, data: bytes) -> Media:
    """Media whose bytes reached its upload URL and whose /complete claimed it: PROCESSING,
    with its screening not yet run."""
    media = media_of(bytes_at_upload_url(client, data)["content_uri"])
    assert lifecycle.transition(
        media,
        [S.PENDING],
        S.PROCESSING,
        upload_method=UploadMethod.URL,
        processing_started_at=timezone.now(),
    )
    return media


def stored_bytes(user_id: str) -> int:
    live = Media.objects.filter(user_id=user_id, state=S.COMPLETE)
    return live.aggregate(total=Sum("size"))["total"] or 0


def test_a_complete_decided_after_a_racing_one_counts_it(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In one thread: A's checks pass while B is still being checked (nothing complete
    yet), then B completes, then A's completion is decided: A must not complete too
    (120 bytes under a quota of 100)."""
    with msc3870_settings(USER_QUOTA_BYTES=100):
        first = processing(alice, b"a" * 60)
        second = processing(alice, b"b" * 60)
        real_complete = verdicts._complete
        outcomes: list[str] = []

        def complete_the_other_first(media: Media, findings: Any, *args: Any, **kwargs: Any) -> str:
            if media.pk == first.pk:  # A's checks have passed; B is decided before A
                outcomes.append(verdicts.screen(second.pk))
            return real_complete(media, findings, *args, **kwargs)

        monkeypatch.setattr(verdicts, "_complete", complete_the_other_first)
        outcomes.insert(0, verdicts.screen(first.pk))

    assert outcomes == ["rejected", "complete"]
    loser = Media.objects.get(pk=first.pk)
    assert loser.rejection_errcode == "M_TOO_LARGE"
    assert "quota" in loser.rejection_reason
    assert get_store().head(loser.served_key) is None  # the rejected bytes are gone
    assert stored_bytes(alice.user_id) == 60


@pytest.mark.django_db(transaction=True)
def test_five_completes_at_once_store_one(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five 60-byte uploads under a quota of 100, screened on five threads (their own
    database connections) that all pass their checks before any of them completes: a
    barrier holds each at the door of the completing transaction until all five are
    there. Exactly one completes."""
    with msc3870_settings(USER_QUOTA_BYTES=100):
        uploads = [processing(alice, bytes([65 + i]) * 60) for i in range(5)]
        at_the_door = threading.Barrier(len(uploads), timeout=60)
        real_complete = verdicts._complete

        def complete_together(media: Media, findings: Any, *args: Any, **kwargs: Any) -> str:
            at_the_door.wait()
            return real_complete(media, findings, *args, **kwargs)

        monkeypatch.setattr(verdicts, "_complete", complete_together)
        outcomes: dict[int, str] = {}
        errors: list[BaseException] = []

        def screen(pk: int) -> None:
            try:
                outcomes[pk] = verdicts.screen(pk)
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)
                at_the_door.abort()
            finally:
                connection.close()

        threads = [threading.Thread(target=screen, args=(m.pk,)) for m in uploads]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

    assert not errors, errors
    assert sorted(outcomes.values()) == ["complete"] + ["rejected"] * 4
    assert stored_bytes(alice.user_id) == 60
    rejected = Media.objects.filter(pk__in=[m.pk for m in uploads], state=S.REJECTED)
    assert {m.rejection_errcode for m in rejected} == {"M_TOO_LARGE"}


def test_without_a_quota_completion_takes_no_lock(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path stays: no quota, no content twin, no transaction."""
    media = processing(alice, b"fresh content, no twin")
    calls: list[Any] = []
    monkeypatch.setattr(verdicts, "enforce_user_quota", lambda *a, **k: calls.append(a))
    opened: list[bool] = []
    real_atomic = verdicts.transaction.atomic
    monkeypatch.setattr(
        verdicts.transaction, "atomic", lambda *a, **k: opened.append(True) or real_atomic(*a, **k)
    )
    assert verdicts.screen(media.pk) == "complete"
    assert calls == [] and opened == []
