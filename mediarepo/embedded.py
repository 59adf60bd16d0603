"""Periodic work for the embedded default (no broker, so no beat): the beat schedule runs
in-process, in one web worker of the deployment. Every worker starts a thread that waits
for the periodic-work lock; the one holding it runs the sweeps, and if its process dies
the lock is released and another worker takes over. On PostgreSQL the lock is a session
advisory lock of the database, so that web nodes on several hosts (each with its own data
directory) run the sweeps once between them; on SQLite, whose processes share one host,
it is a file lock in the data directory. (The tasks are idempotent, so even two runners
would do no harm: the lock only saves the work.) It writes the scheduler's tick, as celery
beat does, for the health check (msc3870.beat)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import time
from pathlib import Path
from typing import Any

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


# The advisory lock's key: any fixed 64-bit number no other user of the database takes
# (advisory locks are per database, so other deployments on the server do not count).
ADVISORY_LOCK_KEY = 0x6D65_6469_6172_6570  # "mediarep"


class HostLock:
    """An exclusive ``flock`` on a file: held for as long as the file stays open, i.e. the
    process's life. Decides among the processes of one host (one data directory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: Any = None

    def acquire(self) -> None:
        """Block until this process holds the lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a")  # noqa: SIM115 - held for the life of the process
        while True:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                time.sleep(LOCK_RETRY_SECONDS)

    def held(self) -> bool:
        return True

    def __str__(self) -> str:
        return f"lock {self.path}"


class DatabaseLock:
    """A PostgreSQL session advisory lock on a connection of its own: held while that
    connection lives, released by the server when the process dies or the connection
    drops. Decides among every process of every host on the database."""

    def __init__(self) -> None:
        self.connection: Any = None

    def acquire(self) -> None:
        """Block until this process holds the lock (connection failures are retried)."""
        import psycopg

        from msc3870.wakeup import connection_params

        while True:
            try:
                connection = psycopg.connect(**connection_params(), autocommit=True)
                row = connection.execute(
                    "SELECT pg_try_advisory_lock(%s)", [ADVISORY_LOCK_KEY]
                ).fetchone()
                if row is not None and row[0]:
                    self.connection = connection
                    return
                connection.close()
            except psycopg.Error as exc:
                log.warning("Could not ask PostgreSQL for the periodic-work lock: %s", exc)
            time.sleep(LOCK_RETRY_SECONDS)

    def held(self) -> bool:
        """Whether the lock's connection is still alive (its session holds the lock)."""
        import psycopg

        try:
            self.connection.execute("SELECT 1")
            return True
        except psycopg.Error:
            with contextlib.suppress(psycopg.Error):
                self.connection.close()
            return False

    def __str__(self) -> str:
        return f"PostgreSQL advisory lock {ADVISORY_LOCK_KEY}"


def periodic_lock(lock_path: Path) -> HostLock | DatabaseLock:
    """The lock that picks the one process to run the sweeps."""
    from django.db import connection

    if connection.vendor == "postgresql":
        return DatabaseLock()
    return HostLock(lock_path)


def _loop(schedule: dict[str, tuple[str, float]], lock: HostLock | DatabaseLock) -> None:
    next_run: dict[str, float] = {}
    ticker = Ticker()
    while True:
        lock.acquire()
        log.info("This process runs the periodic sweeps (%s)", lock)
        while lock.held():
            ticker.maybe_tick()
            run_due_tasks(schedule, next_run, time.monotonic())
            close_old_connections()  # this thread's connection, as after a request
            time.sleep(1.0)
        # Another process may hold it now: run nothing until this one has it again.
        log.warning("Lost the periodic-work lock (%s); waiting to take it again", lock)


def start_periodic_thread() -> threading.Thread | None:
    if not getattr(settings, "CELERY_TASK_ALWAYS_EAGER", False):
        return None  # a broker is configured: `celery -A mediarepo beat` does this
    lock = periodic_lock(Path(getattr(settings, "DATA_DIR", ".")) / "periodic.lock")
    thread = threading.Thread(
        target=_loop,
        args=(DEFAULT_SCHEDULE, lock),
        daemon=True,
        name="mediarepo-periodic",
    )
    thread.start()
    return thread
