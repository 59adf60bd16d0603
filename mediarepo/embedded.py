"""Periodic work for the embedded default (no broker, so no beat): a thread in each
gunicorn worker runs the beat schedule in-process. The tasks are idempotent, so running
them in several workers at once does no harm."""

from __future__ import annotations

import logging
import threading
import time

from celery import current_app
from django.conf import settings
from django.db import close_old_connections

import msc3870.tasks  # noqa: F401 - registers the tasks the schedule names
from msc3870.schedule import DEFAULT_SCHEDULE

log = logging.getLogger(__name__)
FIRST_RUN_DELAY = 5.0


def run_due_tasks(
    schedule: dict[str, tuple[str, float]], next_run: dict[str, float], now: float
) -> list[str]:
    """Run every entry whose time has come; return their names."""
    ran = []
    for name, (task, seconds) in schedule.items():
        if now < next_run.setdefault(name, now + FIRST_RUN_DELAY):
            continue
        next_run[name] = now + seconds
        try:
            current_app.tasks[task].apply()
            ran.append(name)
        except Exception:
            log.exception("Periodic task %s failed", name)
    return ran


def _loop(schedule: dict[str, tuple[str, float]]) -> None:
    next_run: dict[str, float] = {}
    while True:
        run_due_tasks(schedule, next_run, time.monotonic())
        close_old_connections()  # this thread's connection, as after a request
        time.sleep(1.0)


def start_periodic_thread() -> threading.Thread | None:
    if not getattr(settings, "CELERY_TASK_ALWAYS_EAGER", False):
        return None  # a broker is configured: `celery -A mediarepo beat` does this
    thread = threading.Thread(
        target=_loop,
        args=(DEFAULT_SCHEDULE,),
        daemon=True,
        name="mediarepo-periodic",
    )
    thread.start()
    return thread
