"""``manage.py ensure_media_bucket``: create the S3 bucket media lives in, if missing.

For development and fresh deployments; production buckets are usually made by the
operator with their own policies. Does nothing for the local disk.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from ...storage import get_store


class Command(BaseCommand):
    help = "Create the media bucket if it does not exist (S3 storage only)."

    def handle(self, *args: Any, **options: Any) -> None:
        store = get_store()
        ensure = getattr(store, "ensure_bucket", None)
        if ensure is None:
            self.stdout.write("Media are on the local disk: no bucket to create.")
            return
        ensure()
        self.stdout.write(f"Bucket {store.bucket} is ready.")  # type: ignore[attr-defined]
