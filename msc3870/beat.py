"""celery beat with the scheduler's heartbeat (``msc3870.heartbeat``), for the health check:
``CELERY_BEAT_SCHEDULER = "msc3870.beat.TickingDatabaseScheduler"``."""

from __future__ import annotations

from typing import Any

from django_celery_beat.schedulers import DatabaseScheduler

from .heartbeat import Ticker


class TickingDatabaseScheduler(DatabaseScheduler):  # type: ignore[misc]
    """django-celery-beat's scheduler (the schedule an operator edits in the admin),
    writing beat's tick as it goes."""

    _ticker: Ticker | None = None

    def tick(self, *args: Any, **kwargs: Any) -> float:
        interval: float = super().tick(*args, **kwargs)
        if self._ticker is None:
            self._ticker = Ticker()
        self._ticker.maybe_tick()
        # Wake up in time for the next tick even when no task is due for long.
        return min(interval, self._ticker.interval())
