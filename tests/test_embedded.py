"""The embedded default's in-process periodic runner."""

from __future__ import annotations

from django.conf import settings
from django.utils import timezone

from mediarepo.embedded import run_due_tasks
from msc3870.models import Media, MediaState

from .conftest import MatrixClient, media_of


def test_periodic_tasks_run_in_process_when_due(alice: MatrixClient) -> None:
    created = alice.create()
    Media.objects.update(unused_expires_at=timezone.now())
    schedule = settings.CELERY_BEAT_SCHEDULE
    next_run: dict[str, float] = {}
    assert run_due_tasks(schedule, next_run, now=1000.0) == []  # first run after a delay
    ran = run_due_tasks(schedule, next_run, now=1010.0)
    assert "msc3870-expire-pending" in ran
    assert media_of(created["content_uri"]).state == MediaState.EXPIRED
    assert run_due_tasks(schedule, next_run, now=1011.0) == []  # not due again yet
