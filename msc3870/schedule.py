"""The periodic sweeps and their default intervals.

With a broker, beat runs them: ``install_default_schedule`` (run after ``migrate``) creates
each as a django-celery-beat periodic task if it does not exist yet, so an operator's
changes in the admin are kept. Without a broker, the embedded runner uses the defaults.
"""

from __future__ import annotations

from typing import Any

# name -> (task, seconds between runs)
DEFAULT_SCHEDULE: dict[str, tuple[str, float]] = {
    "msc3870: expire pending media": ("msc3870.expire_pending", 60.0),
    "msc3870: delete objects of dead media": ("msc3870.delete_dead_objects", 300.0),
    "msc3870: re-queue stuck screening": ("msc3870.redispatch_stuck", 120.0),
    "msc3870: delete orphaned uploads": ("msc3870.delete_orphaned_uploads", 3600.0),
    "msc3870: evict remote media": ("msc3870.evict_remote_media", 600.0),
    "msc3870: apply retention": ("msc3870.apply_retention", 600.0),
    "msc3870: delete old tombstones": ("msc3870.delete_old_tombstones", 86400.0),
    "msc3870: dashboard rollup": ("msc3870.rollup_dashboard", 300.0),
    "msc3870: expire URL previews": ("msc3870.expire_url_previews", 60.0),
}


def install_default_schedule(**kwargs: Any) -> int:
    """Create the default periodic tasks that are missing; returns how many were created."""
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    created = 0
    for name, (task, seconds) in DEFAULT_SCHEDULE.items():
        if PeriodicTask.objects.filter(name=name).exists():
            continue
        interval, _ = IntervalSchedule.objects.get_or_create(
            every=int(seconds), period=IntervalSchedule.SECONDS
        )
        PeriodicTask.objects.create(name=name, task=task, interval=interval)
        created += 1
    return created
