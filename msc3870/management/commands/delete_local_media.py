"""``manage.py delete_local_media --before-days 365 [--size-gt N]``: purge this server's
media not served since then (``moderation.delete_local_media_before``). This server cannot
tell profile pictures or room avatars: they go too unless served since."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from ...moderation import DeletionFilter, delete_local_media_before
from ._moderation import ModerationCommand, add_before_arguments, before_of


class Command(ModerationCommand):
    help = "Purge local media last served (or, never served, created) before a time."

    def add_arguments(self, parser: CommandParser) -> None:
        add_before_arguments(parser)
        parser.add_argument("--size-gt", type=int, default=0, help="Only larger than this.")
        parser.add_argument("--include-quarantined", action="store_true")
        parser.add_argument("--include-protected", action="store_true")
        super().add_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        which = DeletionFilter(
            before_of(options),
            size_gt=options["size_gt"],
            include_quarantined=options["include_quarantined"],
            include_protected=options["include_protected"],
        )
        count = delete_local_media_before(which, by=options["actor"], reason=options["reason"])
        self.stdout.write(f"Purged {count} local media.")
