"""``manage.py ensure_media_bucket``: create the S3 bucket media lives in, if missing, and
install a lifecycle rule expiring ``incoming/`` (where the store supports it).

For development and fresh deployments; production buckets are usually made by the
operator with their own policies. Does nothing for the local disk.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from ...conf import app_settings
from ...stores import get_store


class Command(BaseCommand):
    help = "Create the media bucket if missing and expire incoming/ objects (S3 storage only)."

    def handle(self, *args: Any, **options: Any) -> None:
        store = get_store()
        ensure = getattr(store, "ensure_bucket", None)
        if ensure is None:
            self.stdout.write("Media are on the local disk: no bucket to create.")
            return
        ensure()
        self.stdout.write(f"Bucket {store.bucket} is ready.")  # type: ignore[attr-defined]
        # Second line of defence behind the expiry sweeps: abandoned incoming/ objects
        # expire even if no sweep ever runs.
        days = app_settings.S3_INCOMING_EXPIRATION_DAYS
        if store.ensure_incoming_expiry(days):  # type: ignore[attr-defined]
            self.stdout.write(f"Lifecycle rule: objects under incoming/ expire after {days} days.")
        else:
            self.stdout.write(
                "This store does not support lifecycle rules: objects under incoming/ are "
                "deleted by the expiry and orphan sweeps only."
            )
