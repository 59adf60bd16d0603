"""``manage.py purge_remote_cache --before-days 30``: delete other servers' media not
served since then from the cache (``moderation.purge_remote_cache_before``)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from ...moderation import DeletionFilter, purge_remote_cache_before
from ._moderation import ModerationCommand, add_before_arguments, before_of


class Command(ModerationCommand):
    help = "Delete cached remote media last served before a time (quarantined media stays)."

    def add_arguments(self, parser: CommandParser) -> None:
        add_before_arguments(parser)
        super().add_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        count = purge_remote_cache_before(
            DeletionFilter(before_of(options)), by=options["actor"], reason=options["reason"]
        )
        self.stdout.write(f"Deleted {count} remote media from the cache.")
