"""The files of Prometheus' multiprocess mode, kept by the processes that start the others
(gunicorn's master, a celery worker's main process).

Nothing here makes a metric: importing ``msc3870.metrics`` makes every metric, and in
multiprocess mode each one opens a file in the directory, so the master that empties (or
first makes) the directory must not import it.
"""

from __future__ import annotations

import os

from prometheus_client import multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def clean_multiprocess_dir(directory: str) -> None:
    """Empty (or make) the directory before any process of a new start writes to it:
    files of an earlier run would be added to this one's values."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))


def process_exited(pid: int) -> None:
    """A process that wrote metrics is gone: its live gauges stop counting (its counters
    stay in the totals, as they should)."""
    directory = multiprocess_dir()
    if directory is not None:
        multiprocess.mark_process_dead(pid, directory)
