"""``manage.py create_access_token @alice:example.com``: mint a local access token.

The token is printed once, as the last line; only its SHA-256 digest is stored. An
application-service token (``--appservice``) always has a namespace: by default this
server's users only (``@[^:]+:<SERVER_NAME>``), else the ``--namespace`` regex given.
"""

from __future__ import annotations

import re
import secrets
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from ...auth import local_namespace, validate_user_id
from ...conf import app_settings
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
            default=None,
            help=(
                "Regex (full match on the user id) of the users an application-service "
                "token may act as. Default: this server's users. Users of another server "
                "only if the regex names that server."
            ),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            user_id = validate_user_id(options["user_id"])
        except InvalidParam as exc:
            raise CommandError(exc.message) from exc
        namespace = self._namespace(options["appservice"], options["namespace"])
        token = "mr_" + secrets.token_urlsafe(32)
        days = options["days"]
        AccessToken.objects.create(
            user_id=user_id,
            token_digest=digest_token(token),
            label=options["label"],
            expires_at=timezone.now() + timedelta(days=days) if days > 0 else None,
            is_appservice=options["appservice"],
            masquerade_regex=namespace,
        )
        if namespace:
            self.stderr.write(f"May act as users matching: {namespace}")
        self.stderr.write(f"Access token for {user_id} (shown once):")
        self.stdout.write(token)

    @staticmethod
    def _namespace(appservice: bool, given: str | None) -> str:
        """The masquerading namespace to store. Without one, an application-service token
        would act as anyone on any server, so there is always one."""
        if not appservice:
            if given is not None:
                raise CommandError("--namespace only applies to --appservice tokens")
            return ""
        if given is None:
            return local_namespace(app_settings.SERVER_NAME)
        if not given.strip():
            raise CommandError("--namespace must not be empty (omit it for local users only)")
        try:
            re.compile(given)
        except re.error as exc:
            raise CommandError(f"--namespace is not a valid regex: {exc}") from exc
        if len(given) > AccessToken._meta.get_field("masquerade_regex").max_length:
            raise CommandError("--namespace is too long")
        return given
