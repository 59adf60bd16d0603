"""``manage.py unblock_hash <sha256> --reason ...``: lift a block (``moderation.unblock_hash``);
media quarantined with these bytes stays quarantined."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from ...moderation import unblock_hash
from ._moderation import ModerationCommand


class Command(ModerationCommand):
    help = "Lift the block of a SHA-256 (quarantined media stays quarantined)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("sha256", help="SHA-256 of the bytes, in hex.")
        super().add_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            lifted = unblock_hash(options["sha256"], by=options["actor"], reason=options["reason"])
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write("Unblocked." if lifted else "Not blocked: nothing to do.")
