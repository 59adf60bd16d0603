"""The periodic scheduler's heartbeat: proof, in the database, that it keeps running.

The sweeps (``msc3870.schedule``) only happen while a scheduler runs: celery beat with a
broker (``msc3870.beat.TickingDatabaseScheduler``), or the in-process runner without one
(``mediarepo.embedded``). Either writes a tick to the ``Heartbeat`` row ``beat`` every
``TICK_SECONDS`` (less when the health check's ``HEALTH_BEAT_MAX_AGE_SECONDS`` is short),
and the health check of every web process reads it (``msc3870.health``): one small write
and one read by primary key, on the database every process already shares.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.db import close_old_connections
from django.utils import timezone

from .conf import app_settings
from .models import Heartbeat

log = logging.getLogger(__name__)

BEAT = "beat"
#: Seconds between two ticks written (at most: a scheduler busy longer writes later).
TICK_SECONDS = 10.0


def record_tick(name: str = BEAT) -> None:
    """Write the tick: one statement, whether the row exists or not."""
    Heartbeat.objects.bulk_create(
        [Heartbeat(name=name, at=timezone.now())],
        update_conflicts=True,
        unique_fields=["name"],
        update_fields=["at"],
    )


class Ticker:
    """Writes a tick when the last one is ``TICK_SECONDS`` old; a database outage is
    logged and retried at the next call, never raised into the scheduler."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._last = float("-inf")

    def interval(self) -> float:
        return min(TICK_SECONDS, app_settings.HEALTH_BEAT_MAX_AGE_SECONDS / 3)

    def maybe_tick(self) -> bool:
        now = self._clock()
        if now - self._last < self.interval():
            return False
        try:
            record_tick()
        except Exception as exc:
            log.warning("Could not record the scheduler's tick: %s", exc)
            close_old_connections()  # a broken connection is replaced next time
            return False
        self._last = now
        return True
