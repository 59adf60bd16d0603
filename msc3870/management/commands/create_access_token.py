"""``manage.py create_access_token @alice:example.com``: mint a local access token.

The token is printed once, as the last line; only its SHA-256 digest is stored.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from ...auth import validate_user_id
from ...errors import InvalidParam
from ...models import AccessToken, digest_token


class Command(BaseCommand):
    help = "Create a local access token for a Matrix user and print it (last line)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("user_id", help="Matrix user id, e.g. @alice:localhost")
        parser.add_argument(
            "--days", type=int, default=90, help="Lifetime in days (0 = never expires)."
        )
        parser.add_argument("--label", default="", help="A note to recognise the token by.")
        parser.add_argument(
            "--appservice",
            action="store_true",
            help="Let the token act as other users with ?user_id= (application service).",
        )
        parser.add_argument(
            "--namespace",
            default="",
            help="Regex of the users an application-service token may act as.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            user_id = validate_user_id(options["user_id"])
        except InvalidParam as exc:
            raise CommandError(exc.message) from exc
        token = "mr_" + secrets.token_urlsafe(32)
        days = options["days"]
        AccessToken.objects.create(
            user_id=user_id,
            token_digest=digest_token(token),
            label=options["label"],
            expires_at=timezone.now() + timedelta(days=days) if days > 0 else None,
            is_appservice=options["appservice"],
            masquerade_regex=options["namespace"],
        )
        self.stderr.write(f"Access token for {user_id} (shown once):")
        self.stdout.write(token)
