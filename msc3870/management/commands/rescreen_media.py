"""``manage.py rescreen_media --all | --user @u:s | --sha256 H | --since ISO``: run the
checks again on complete media (``moderation.rescreen_many``); refused media is
quarantined with the check's reason."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.utils.dateparse import parse_datetime

from ...models import Media, MediaState
from ...moderation import rescreen_many, valid_sha256
from ._moderation import ModerationCommand


class Command(ModerationCommand):
    help = "Run the checks again on complete media; refusals are quarantined."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--all", action="store_true", help="Every complete media.")
        parser.add_argument("--user", help="Media uploaded by this Matrix user.")
        parser.add_argument("--sha256", help="Media with these bytes.")
        parser.add_argument("--since", help="Media completed since (ISO 8601, with time zone).")
        super().add_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        selection = Media.objects.filter(state=MediaState.COMPLETE)
        if not any(options[name] for name in ("all", "user", "sha256", "since")):
            raise CommandError("Say which media: --all, --user, --sha256 or --since")
        if options["user"]:
            selection = selection.filter(user_id=options["user"])
        if options["sha256"]:
            try:
                selection = selection.filter(sha256=valid_sha256(options["sha256"]))
            except ValueError as exc:
                raise CommandError(str(exc)) from exc
        if options["since"]:
            since = parse_datetime(options["since"])
            if since is None or since.tzinfo is None:
                raise CommandError("--since must be an ISO 8601 time with a time zone")
            selection = selection.filter(completed_at__gte=since)
        result = rescreen_many(selection, by=options["actor"], reason=options["reason"])
        counts = ", ".join(f"{outcome}: {n}" for outcome, n in sorted(result.counts.items()))
        self.stdout.write(f"Re-screened: {counts or 'nothing'}.")
