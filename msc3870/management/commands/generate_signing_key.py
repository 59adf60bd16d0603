"""``manage.py generate_signing_key``: make this server's Ed25519 signing key, once.

Writes Synapse's signing key file format (``ed25519 <version> <base64 seed>``), mode 0600,
to ``MSC3870["SIGNING_KEY_PATH"]`` or ``--path``; refuses to overwrite an existing file (a
replaced key would invalidate every signature other servers hold). Prints the key id and
the public key, the two things a homeserver that publishes our keys needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from signedjson.key import encode_verify_key_base64, get_verify_key

from ...federation.keys import (
    SigningKeyExists,
    key_id,
    new_key_version,
    signing_key_path,
    write_new_signing_key,
)


class Command(BaseCommand):
    help = "Generate this server's Ed25519 signing key file (never overwrites one)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--path", help="Where to write it (default: MSC3870['SIGNING_KEY_PATH'])."
        )
        parser.add_argument(
            "--key-version",
            help="Key version, [A-Za-z0-9_] (default: a_ and four random characters).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        path = Path(options["path"]) if options["path"] else signing_key_path()
        version = options["key_version"] or new_key_version()
        if not version.replace("_", "").isalnum() or not version.isascii():
            raise CommandError(f"Key version {version!r} is not [A-Za-z0-9_]+")
        try:
            key = write_new_signing_key(path, version)
        except SigningKeyExists as exc:
            raise CommandError(str(exc)) from exc
        self.stderr.write(f"Signing key written to {path} (keep it secret; mode 0600).")
        self.stdout.write(f"{key_id(key)} {encode_verify_key_base64(get_verify_key(key))}")
