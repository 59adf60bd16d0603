"""The embedded default's in-process periodic runner."""

from __future__ import annotations

from django.utils import timezone

from mediarepo.embedded import run_due_tasks
from msc3870.models import Media, MediaState
from msc3870.schedule import DEFAULT_SCHEDULE

from .helpers import MatrixClient, media_of


def test_periodic_tasks_run_in_process_when_due(alice: MatrixClient) -> None:
    created = alice.create()
    Media.objects.update(unused_expires_at=timezone.now())
    schedule = DEFAULT_SCHEDULE
    next_run: dict[str, float] = {}
    assert run_due_tasks(schedule, next_run, now=1000.0) == []  # first run after a delay
    ran = run_due_tasks(schedule, next_run, now=1010.0)
    assert "msc3870: expire pending media" in ran
    assert media_of(created["content_uri"]).state == MediaState.EXPIRED
    assert run_due_tasks(schedule, next_run, now=1011.0) == []  # not due again yet


def test_default_schedule_is_installed_once_and_operator_changes_stay(db: None) -> None:
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    from msc3870.schedule import install_default_schedule

    # The test database was migrated, so post_migrate installed the defaults already.
    assert set(PeriodicTask.objects.values_list("name", flat=True)) >= set(DEFAULT_SCHEDULE)
    task = PeriodicTask.objects.get(name="msc3870: expire pending media")
    task.interval, _ = IntervalSchedule.objects.get_or_create(every=7, period="seconds")
    task.save()
    assert install_default_schedule() == 0
    assert PeriodicTask.objects.get(pk=task.pk).interval.every == 7
