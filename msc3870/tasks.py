"""Celery tasks: thin wrappers that take primary keys and call the pipeline.

Tasks are acknowledged late and re-queued if the worker dies, so each must be safe to run
twice: they all start from the row's state (compare-and-set) and treat a missing object
as already deleted. Failures are recorded on the row before the retry.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from . import maintenance, pipeline

TASK_OPTIONS: dict[str, Any] = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "soft_time_limit": 15 * 60,
    "time_limit": 16 * 60,
}


@shared_task(bind=True, max_retries=8, name="msc3870.screen_media", **TASK_OPTIONS)
def screen_media_task(self: Any, pk: int) -> str:
    try:
        return pipeline.screen_media(pk)
    except Exception as exc:
        pipeline.record_failure(pk, exc)
        # Exponential backoff: 2, 4, 8 ... seconds, capped at 5 minutes.
        raise self.retry(exc=exc, countdown=min(2 ** (self.request.retries + 1), 300)) from exc


@shared_task(bind=True, max_retries=8, name="msc3870.delete_objects", **TASK_OPTIONS)
def delete_objects_task(self: Any, pk: int) -> bool:
    try:
        return pipeline.delete_objects(pk)
    except Exception as exc:
        pipeline.record_failure(pk, exc)
        raise self.retry(exc=exc, countdown=min(2 ** (self.request.retries + 1), 300)) from exc


@shared_task(name="msc3870.expire_pending", **TASK_OPTIONS)
def expire_pending_task() -> dict[str, int]:
    return vars(maintenance.expire_pending())


@shared_task(name="msc3870.delete_dead_objects", **TASK_OPTIONS)
def delete_dead_objects_task() -> dict[str, int]:
    return vars(maintenance.delete_dead_objects())


@shared_task(name="msc3870.redispatch_stuck", **TASK_OPTIONS)
def redispatch_stuck_task() -> int:
    return maintenance.redispatch_stuck()


@shared_task(name="msc3870.delete_orphaned_uploads", **TASK_OPTIONS)
def delete_orphaned_uploads_task() -> int:
    return maintenance.delete_orphaned_uploads()
