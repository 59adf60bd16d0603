"""``manage.py quarantine_content <sha256> --reason ...``: block the hash and quarantine
every complete, unprotected media with these bytes (``moderation.quarantine_content``)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from ...moderation import quarantine_content
from ._moderation import ModerationCommand


class Command(ModerationCommand):
    help = "Block a SHA-256 and quarantine every complete, unprotected media with it."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("sha256", help="SHA-256 of the bytes, in hex.")
        parser.add_argument(
            "--no-block", action="store_true", help="Quarantine only; do not block the hash."
        )
        super().add_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            count = quarantine_content(
                options["sha256"],
                by=options["actor"],
                reason=options["reason"],
                block=not options["no_block"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        blocked = "" if options["no_block"] else "; the hash is blocked"
        self.stdout.write(f"Quarantined {count} media{blocked}.")
