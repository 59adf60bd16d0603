"""``manage.py quarantine_user @alice:example.com --reason ...``: quarantine every complete,
unprotected media the user uploaded (``moderation.quarantine_user_media``)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from ...moderation import quarantine_user_media
from ._moderation import ModerationCommand


class Command(ModerationCommand):
    help = "Quarantine every complete, unprotected media a user uploaded."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("user_id", help="Matrix user id, e.g. @alice:localhost")
        super().add_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        count = quarantine_user_media(
            options["user_id"], by=options["actor"], reason=options["reason"]
        )
        self.stdout.write(f"Quarantined {count} media of {options['user_id']}.")
