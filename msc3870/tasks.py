"""Celery tasks: thin wrappers that take primary keys and call the app's functions.

Tasks are acknowledged late and re-queued if the worker dies, so each must be safe to run
twice: they all start from the row's state (compare-and-set) and treat a missing object
as already deleted. Failures are recorded on the row before the retry.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from celery import shared_task

from . import (
    cleanup,
    dashboard,
    logs,
    maintenance,
    metrics,
    retention,
    served_copies,
    synapse_admin,
    verdicts,
)
from .stores import ObjectInfo

log = logging.getLogger(__name__)

TASK_OPTIONS: dict[str, Any] = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "soft_time_limit": 15 * 60,
    "time_limit": 16 * 60,
}


def _retry(task: Any, pk: int, exc: Exception) -> Any:
    """Record the failure on the row, then retry with exponential backoff (2, 4, 8 ... s,
    at most 5 min). In-process (eager) runs do not retry inline, which would hold the
    request: the periodic sweeps pick the row up again."""
    verdicts.record_failure(pk, exc)
    if task.request.is_eager:
        return "failed"
    raise task.retry(exc=exc, countdown=min(2 ** (task.request.retries + 1), 300)) from exc


@shared_task(bind=True, max_retries=8, name="msc3870.screen_media", **TASK_OPTIONS)
def screen_media_task(self: Any, pk: int, incoming: dict[str, Any] | None = None) -> str:
    """``incoming``: the upload URL's object as /complete read it (an ``ObjectInfo``'s
    fields); a retry gets it again and finds it stale at worst (then the object is looked
    at)."""
    try:
        return verdicts.screen(pk, ObjectInfo(**incoming) if incoming else None)
    except Exception as exc:
        return _retry(self, pk, exc)


@shared_task(bind=True, max_retries=8, name="msc3870.copy_to_served_key", **TASK_OPTIONS)
def copy_to_served_key_task(self: Any, pk: int) -> bool | str:
    """Copy a URL upload served from its upload URL's bucket to its media's key
    (``served_copies``); the stuck sweep queues it again if every retry failed."""
    try:
        return served_copies.copy_to_served_key(pk)
    except Exception as exc:
        return _retry(self, pk, exc)


@shared_task(bind=True, max_retries=8, name="msc3870.delete_objects", **TASK_OPTIONS)
def delete_objects_task(self: Any, pk: int) -> bool | str:
    try:
        return cleanup.delete_objects(pk)
    except Exception as exc:
        return _retry(self, pk, exc)


@shared_task(bind=True, max_retries=8, name="msc3870.delete_objects_many", **TASK_OPTIONS)
def delete_objects_many_task(self: Any, pks: list[int]) -> int | str:
    """``delete_objects_task`` of a batch (bulk moderation). A failure is retried; rows
    still not cleaned after that are the cleanup sweep's."""
    try:
        return cleanup.delete_objects_of(pks)
    except Exception as exc:
        if self.request.is_eager:
            log.warning("Could not delete the objects of %s media: %s", len(pks), exc)
            return "failed"
        raise self.retry(exc=exc, countdown=min(2 ** (self.request.retries + 1), 300)) from exc


@shared_task(name="msc3870.fetch_remote_media", **TASK_OPTIONS)
def fetch_remote_media_task(pk: int, requester: str | None = None) -> str:
    """Not retried by Celery: a fetch that fails marks its row, which requests answer from
    and fetch again after ``REMOTE_MEDIA_FAILURE_SECONDS``. ``requester``: the user whose
    request started the fetch, charged the bytes read."""
    from .federation import remote_media

    return remote_media.fetch_remote_media(pk, requester)


@shared_task(name="msc3870.admin_bulk", **TASK_OPTIONS)
def admin_bulk_task(action: str, kwargs: dict[str, Any]) -> None:
    """The rest of an admin API bulk action (``synapse_admin.BULK_ACTIONS``): a bounded
    share of it, queueing the next share while there is more. Safe to run twice: what one
    run did has left the selection the next reads."""
    synapse_admin.run_bulk(action, kwargs)


@shared_task(name="msc3870.fetch_url_preview", **TASK_OPTIONS)
def fetch_url_preview_task(pk: int) -> str:
    """Not retried by Celery: a failed preview marks its row, which requests answer from
    and fetch again after ``URL_PREVIEW_FAILURE_SECONDS``."""
    from .previews.fetch import fetch_url_preview

    return fetch_url_preview(pk)


T = TypeVar("T")


def _sweep(name: str, run: Callable[[], T]) -> T:
    """Run one sweep, timed, and written as one line with what it did."""
    step: logs.Step | None = None
    try:
        with logs.step("sweep", sweep=name) as step:
            result = run()
            if dataclasses.is_dataclass(result):
                step.fields.update(vars(result))
            else:
                step.fields["count"] = result
            step.fields["outcome"] = "done"
            return result
    finally:
        if step is not None:
            metrics.swept(name, step.seconds)


@shared_task(name="msc3870.expire_pending", **TASK_OPTIONS)
def expire_pending_task() -> dict[str, int]:
    return vars(_sweep("expire_pending", maintenance.expire_pending))


@shared_task(name="msc3870.delete_dead_objects", **TASK_OPTIONS)
def delete_dead_objects_task() -> dict[str, int]:
    return vars(_sweep("delete_dead_objects", maintenance.delete_dead_objects))


@shared_task(name="msc3870.redispatch_stuck", **TASK_OPTIONS)
def redispatch_stuck_task() -> int:
    return _sweep("redispatch_stuck", maintenance.redispatch_stuck)


@shared_task(name="msc3870.delete_orphaned_uploads", **TASK_OPTIONS)
def delete_orphaned_uploads_task() -> int:
    return _sweep("delete_orphaned_uploads", maintenance.delete_orphaned_uploads)


@shared_task(name="msc3870.evict_remote_media", **TASK_OPTIONS)
def evict_remote_media_task() -> dict[str, int]:
    return vars(_sweep("evict_remote_media", maintenance.evict_remote_media))


@shared_task(name="msc3870.apply_retention", **TASK_OPTIONS)
def apply_retention_task() -> dict[str, int]:
    return vars(_sweep("apply_retention", retention.apply_retention_run))


@shared_task(name="msc3870.delete_old_tombstones", **TASK_OPTIONS)
def delete_old_tombstones_task() -> int:
    return _sweep("delete_old_tombstones", maintenance.delete_old_tombstones)


@shared_task(name="msc3870.rollup_dashboard", **TASK_OPTIONS)
def rollup_dashboard_task() -> int:
    """The moderation dashboard's whole-table figures (``msc3870.dashboard``); the
    number of media rows it counted."""
    return _sweep("rollup_dashboard", lambda: dashboard.rollup().media_count)


@shared_task(name="msc3870.expire_url_previews", **TASK_OPTIONS)
def expire_url_previews_task() -> dict[str, int]:
    return vars(_sweep("expire_url_previews", maintenance.expire_url_previews))
