"""Background work, sent by task name: to the broker where there is one, else done in
this process.

Callers name a Celery task (``"msc3870.screen_media"``) and never import ``tasks``, the
module on top that calls everything else, as django-celery-beat's admin sends tasks by
name. Without a broker (``CELERY_TASK_ALWAYS_EAGER``, the embedded default) the work runs
here: in the caller's thread, or with ``background`` on this process's one pool of
threads for background work (screening the caller does not wait for, fetches of other
servers' media).

Work is sent once the caller's transaction commits: a task must find the row it is given.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import current_app
from django.db import close_old_connections, connection, transaction

log = logging.getLogger(__name__)

#: Threads of the in-process pool: background work mostly waits on storage and other
#: servers, and few threads leave the process's CPU to its requests.
BACKGROUND_THREADS = 4

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def has_broker() -> bool:
    """Whether tasks go to a broker (else they run in the process that sends them)."""
    return not current_app.conf.task_always_eager


def send(
    name: str,
    *args: Any,
    kwargs: dict[str, Any] | None = None,
    here: Callable[[], Any] | None = None,
    background: bool = False,
    refused: Callable[[Exception], Any] | None = None,
) -> None:
    """Once the current transaction commits, send task ``name`` with ``args`` and
    ``kwargs`` to the broker; ``refused`` hears of a broker that would not take it.
    Without a broker, run ``here`` (by default the task itself, as Celery runs a task in
    eager mode) in this thread, or with ``background`` on the pool."""

    def go() -> None:
        if has_broker():
            try:
                current_app.send_task(name, args=args, kwargs=kwargs)
            except Exception as exc:  # broker down, connection refused, ...
                log.warning("Could not queue %s%r: %s", name, args, exc)
                if refused is not None:
                    refused(exc)
            return
        work = here or (lambda: current_app.tasks[name].apply(args=args, kwargs=kwargs))
        if background:
            run_in_background(work)
        else:
            work()

    transaction.on_commit(go)


def run_in_background(work: Callable[[], Any]) -> None:
    """Run ``work`` on this process's pool. Each thread keeps its database connection
    between jobs, as a request thread does (``CONN_MAX_AGE``); one that is broken or too
    old is replaced. A process that dies mid-job leaves its rows to the sweeps."""
    global _pool
    if connection.in_atomic_block:
        # A pool thread's own connection could not see this transaction's rows (a
        # caller's transaction, or a test's): run here.
        work()
        return
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(BACKGROUND_THREADS, thread_name_prefix="msc3870-bg")

    def run() -> None:
        close_old_connections()
        try:
            work()
        except Exception:
            log.exception("Background work failed")
        finally:
            close_old_connections()

    _pool.submit(run)
