"""Periodic work for the embedded default (no broker, so no beat): the beat schedule runs
in-process, in one web worker per host. Every worker starts a thread that waits for an
exclusive lock on a file in the data directory; the one holding it runs the sweeps, and
if its process dies the lock is released and another worker takes over. (The tasks are
idempotent, so even two runners would do no harm: the lock only saves the work.) It
writes the scheduler's tick, as celery beat does, for the health check (msc3870.beat)."""

from __future__ import annotations

import fcntl
import logging
import threading
import time
from pathlib import Path

from celery import current_app
from django.conf import settings
from django.db import close_old_connections

import msc3870.tasks  # noqa: F401 - registers the tasks the schedule names
from msc3870.heartbeat import Ticker
from msc3870.schedule import DEFAULT_SCHEDULE

log = logging.getLogger(__name__)
FIRST_RUN_DELAY = 5.0
# How often a worker without the lock tries to take it (its holder may have died).
LOCK_RETRY_SECONDS = 5.0


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


def hold_host_lock(path: Path) -> object:
    """Block until this process holds the host's periodic-work lock; return the open file
    (the lock lasts as long as it stays open, i.e. the process's life)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")  # noqa: SIM115 - held for the life of the process
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            time.sleep(LOCK_RETRY_SECONDS)


def _loop(schedule: dict[str, tuple[str, float]], lock_path: Path) -> None:
    lock = hold_host_lock(lock_path)  # noqa: F841 - the lock lives while this is open
    log.info("This process runs the periodic sweeps (lock %s)", lock_path)
    next_run: dict[str, float] = {}
    ticker = Ticker()
    while True:
        ticker.maybe_tick()
        run_due_tasks(schedule, next_run, time.monotonic())
        close_old_connections()  # this thread's connection, as after a request
        time.sleep(1.0)


def start_periodic_thread() -> threading.Thread | None:
    if not getattr(settings, "CELERY_TASK_ALWAYS_EAGER", False):
        return None  # a broker is configured: `celery -A mediarepo beat` does this
    lock_path = Path(getattr(settings, "DATA_DIR", ".")) / "periodic.lock"
    thread = threading.Thread(
        target=_loop,
        args=(DEFAULT_SCHEDULE, lock_path),
        daemon=True,
        name="mediarepo-periodic",
    )
    thread.start()
    return thread
