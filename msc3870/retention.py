"""The retention sweep: media deleted by age and by last access (``RETENTION_*``), as
Synapse's ``media_retention`` (``local_media_lifetime``, ``remote_media_lifetime``) and
matrix-media-repo's purge options.

It is the admin API's deletion by date run by the clock, through the same functions
(``moderation.delete_local_media_before``, ``moderation.purge_remote_cache_before``), so
the rules are those of every other deletion: this server's media is purged (recorded,
a tombstone kept, the id never reused), other servers' media leaves the cache as the
eviction sweep evicts it (objects and thumbnails, then the row: the next request fetches
it again); objects other live media shares stay (``cleanup``). Spared: quarantined and
protected media, media no larger than ``RETENTION_MIN_BYTES``, media without bytes, and
what ``RETENTION_KEEP`` keeps.

Profile pictures: which media are avatars only the homeserver knows (Synapse spares them
through its user directory). ``RETENTION_KEEP`` is the hook for it: an import string of
a callable given a batch's ``mxc://`` URIs that returns those to keep (one that asks the
homeserver's database, say). Protected media (``media/protect``) is always kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.utils import timezone

from . import moderation
from .conf import app_settings

ACTOR = "retention"
# Items each rule looks at in one run of the sweep (every 10 minutes): a backlog is
# worked off over several runs, each well within a task's time limit.
RUN_LIMIT = 10_000


@dataclass
class RetentionResult:
    local_purged: int = 0
    remote_deleted: int = 0


def keep_hook() -> moderation.KeepHook | None:
    keep: moderation.KeepHook | None = app_settings.RETENTION_KEEP
    return keep


def apply_retention(*, limit: int | None = None) -> RetentionResult:
    """Apply every ``RETENTION_*`` rule that is set; ``limit`` bounds the items each rule
    looks at in one run (the next run goes on)."""
    local, remote = moderation.delete_local_media_before, moderation.purge_remote_cache_before
    rules = (
        (app_settings.RETENTION_LOCAL_MAX_AGE_SECONDS, True, local, "local_purged"),
        (app_settings.RETENTION_LOCAL_UNUSED_SECONDS, False, local, "local_purged"),
        (app_settings.RETENTION_REMOTE_MAX_AGE_SECONDS, True, remote, "remote_deleted"),
        (app_settings.RETENTION_REMOTE_UNUSED_SECONDS, False, remote, "remote_deleted"),
    )
    result = RetentionResult()
    now = timezone.now()
    keep = keep_hook()
    for seconds, by_age, delete_before, counted_in in rules:
        if seconds is None:
            continue
        which = moderation.DeletionFilter(
            now - timedelta(seconds=seconds),
            size_gt=app_settings.RETENTION_MIN_BYTES,
            by_age=by_age,
            keep=keep,
        )
        deleted = delete_before(
            which,
            by=ACTOR,
            reason=_reason(seconds, by_age),
            batches=moderation.Batches(limit=limit),
        )
        setattr(result, counted_in, getattr(result, counted_in) + deleted)
    return result


def apply_retention_run() -> RetentionResult:
    """One run of the periodic sweep."""
    return apply_retention(limit=RUN_LIMIT)


def _reason(seconds: int, by_age: bool) -> str:
    return f"Retention: {'older than' if by_age else 'unused for'} {seconds} s"
