"""What the moderation commands share: who acts, why, and a time given on the command
line. Every command calls ``msc3870.moderation``, which records what it changes."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from django.utils.dateparse import parse_datetime

DEFAULT_ACTOR = "manage.py"


class ModerationCommand(BaseCommand):
    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--reason", default="", help="Kept in the audit trail.")
        parser.add_argument(
            "--actor",
            default=DEFAULT_ACTOR,
            help=f"Who acts, as the audit trail names them (default: {DEFAULT_ACTOR}).",
        )


def add_before_arguments(parser: CommandParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--before", help="ISO 8601 time with a time zone.")
    group.add_argument("--before-days", type=float, help="This many days ago.")


def before_of(options: dict[str, Any]) -> datetime:
    if options.get("before_days") is not None:
        return timezone.now() - timedelta(days=options["before_days"])
    parsed = parse_datetime(options["before"] or "")
    if parsed is None or timezone.is_naive(parsed):
        raise CommandError("--before must be an ISO 8601 time with a time zone")
    return parsed
