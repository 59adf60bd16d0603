"""The moderation dashboard's figures: what is stored, what arrives, what waits, what failed.

Figures over the whole table (media and bytes per state, local and remote; uploads and
rejections per day over 30 days; top uploaders this week) are computed by ``rollup``, a
periodic task (``msc3870/schedule.py``), into one ``DashboardSnapshot`` row: a view of the
dashboard reads that row and never counts the table. What must be current and is small
(the screening backlog and what fails in it, the latest rejections and moderations) is
read live by ``live``, each an indexed query with a limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from .models import (
    DashboardSnapshot,
    Media,
    MediaState,
    ModerationAction,
    ModerationRecord,
    UploadMethod,
)

S = MediaState
SNAPSHOT = "dashboard"
DAYS = 30
TOP_UPLOADERS = 10
#: Rows the live parts count or list at most.
BACKLOG_CAP = 1000
RECENT = 10
#: States whose bytes are stored (pending media has none yet; dead media's go).
STORED_STATES = (S.PROCESSING, S.COMPLETE, S.QUARANTINED)

_REMOTE = Q(upload_method=UploadMethod.REMOTE)


def compute(now: datetime | None = None) -> dict[str, Any]:
    """The whole-table figures (a few aggregate queries over the table: the rollup's
    work, never a page view's)."""
    now = now or timezone.now()
    states = _by_state_and_origin()
    stored = {
        origin: sum(states[state][origin]["bytes"] for state in STORED_STATES)
        for origin in ("local", "remote")
    }
    return {
        "states": states,
        "stored_bytes": stored,
        "per_day": _uploads_per_day(timezone.localdate(now)),
        "top_uploaders_week": _top_uploaders(now - timedelta(days=7)),
    }


def _by_state_and_origin() -> dict[str, dict[str, dict[str, int]]]:
    """Media and bytes of each state, local and remote, in one pass over the table."""
    states: dict[str, dict[str, dict[str, int]]] = {
        state: {"local": {"count": 0, "bytes": 0}, "remote": {"count": 0, "bytes": 0}}
        for state in S.values
    }
    grouped = (
        Media.objects.order_by()
        .values("state", "upload_method")
        .annotate(count=Count("id"), bytes=Sum("size"))
    )
    for row in grouped:
        if row["state"] not in states:
            continue
        origin = "remote" if row["upload_method"] == UploadMethod.REMOTE else "local"
        totals = states[row["state"]][origin]
        totals["count"] += row["count"]
        totals["bytes"] += row["bytes"] or 0
    return states


def _uploads_per_day(today: date) -> list[dict[str, Any]]:
    """Local uploads, their bytes and those the checks refused, on each of the ``DAYS``
    days up to ``today`` (days without any included)."""
    first_day = today - timedelta(days=DAYS - 1)
    per_day: dict[date, dict[str, int]] = {
        first_day + timedelta(days=n): {"uploads": 0, "bytes": 0, "rejected": 0}
        for n in range(DAYS)
    }
    start = timezone.make_aware(datetime.combine(first_day, datetime.min.time()))
    rows = (
        Media.objects.filter(created_at__gte=start)
        .exclude(_REMOTE)
        .annotate(day=TruncDate("created_at"))
        .order_by()
        .values("day")
        .annotate(
            uploads=Count("id"),
            bytes=Sum("size"),
            # Refused by the checks (a moderator's rejection names the moderator).
            rejected=Count("id", filter=Q(state=S.REJECTED, moderated_by="")),
        )
    )
    for row in rows:
        if row["day"] in per_day:
            per_day[row["day"]] = {
                "uploads": row["uploads"],
                "bytes": row["bytes"] or 0,
                "rejected": row["rejected"],
            }
    return [{"day": day.isoformat(), **values} for day, values in per_day.items()]


def _top_uploaders(since: datetime) -> list[dict[str, Any]]:
    """The ``TOP_UPLOADERS`` local users who uploaded the most media since ``since``."""
    rows = (
        Media.objects.filter(created_at__gte=since)
        .exclude(_REMOTE)
        .exclude(user_id="")
        .order_by()
        .values("user_id")
        .annotate(count=Count("id"), bytes=Sum("size"))
        .order_by("-count", "user_id")[:TOP_UPLOADERS]
    )
    return [
        {"user_id": row["user_id"], "count": row["count"], "bytes": row["bytes"] or 0}
        for row in rows
    ]


def rollup() -> DashboardSnapshot:
    """Compute the figures and keep them (the periodic task)."""
    started = time.monotonic()
    now = timezone.now()
    figures = compute(now)
    snapshot, _ = DashboardSnapshot.objects.update_or_create(
        name=SNAPSHOT,
        defaults={
            "computed_at": now,
            "seconds": time.monotonic() - started,
            "figures": figures,
        },
    )
    return snapshot


def snapshot() -> DashboardSnapshot | None:
    return DashboardSnapshot.objects.filter(name=SNAPSHOT).first()


def top_uploaders_this_week() -> list[str]:
    """The rollup's top uploaders of the week (none before its first run)."""
    found = snapshot()
    if found is None:
        return []
    return [row["user_id"] for row in found.figures.get("top_uploaders_week", [])]


@dataclass(frozen=True)
class Live:
    """What the dashboard reads at each view: bounded, indexed queries."""

    #: Media being checked now, counted up to ``BACKLOG_CAP`` (``backlog_capped`` past it).
    backlog: int
    backlog_capped: bool
    oldest_processing: datetime | None
    #: Media being checked whose checks failed at least once (retried), most tried first.
    failing: list[Media]
    #: Refused by the checks, latest uploads first.
    check_rejections: list[Media]
    #: Rejected by a moderator, latest first.
    moderator_rejections: list[ModerationRecord]
    recent_moderations: list[ModerationRecord]


def live() -> Live:
    processing: QuerySet[Media] = Media.objects.filter(state=S.PROCESSING)
    backlog = processing.order_by()[: BACKLOG_CAP + 1].count()
    oldest = (
        processing.exclude(processing_started_at__isnull=True)
        .order_by("processing_started_at")
        .values_list("processing_started_at", flat=True)
        .first()
        if backlog
        else None
    )
    failing = list(
        processing.exclude(last_error="").order_by("-attempts", "-pk")[:RECENT] if backlog else []
    )
    check_rejections = list(
        Media.objects.filter(state=S.REJECTED, moderated_by="").order_by("-created_at", "-id")[
            :RECENT
        ]
    )
    records = ModerationRecord.objects.order_by("-at", "-pk")
    return Live(
        backlog=min(backlog, BACKLOG_CAP),
        backlog_capped=backlog > BACKLOG_CAP,
        oldest_processing=oldest,
        failing=failing,
        check_rejections=check_rejections,
        moderator_rejections=list(records.filter(action=ModerationAction.REJECT)[:RECENT]),
        recent_moderations=list(records[: RECENT * 2]),
    )
