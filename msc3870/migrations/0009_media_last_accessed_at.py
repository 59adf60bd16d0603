from typing import Any

from django.db import migrations, models
from django.db.models.functions import Coalesce


def remote_media_accessed_when_fetched(apps: Any, schema_editor: Any) -> None:
    """Remote media held before the field existed counts as last served when it was
    fetched: the cache evicts the oldest fetches first, not all of them at once."""
    Media = apps.get_model("msc3870", "Media")
    Media.objects.using(schema_editor.connection.alias).filter(
        upload_method="remote", last_accessed_at__isnull=True
    ).update(last_accessed_at=Coalesce("completed_at", "created_at"))


class Migration(migrations.Migration):
    dependencies = [
        ("msc3870", "0008_media_prefix_sha256"),
    ]

    operations = [
        migrations.AddField(
            model_name="media",
            name="last_accessed_at",
            field=models.DateTimeField(
                blank=True,
                help_text="Another server's media: when it was last served (to the hour), "
                "for evicting the least recently used from the cache.",
                null=True,
            ),
        ),
        migrations.AddIndex(
            model_name="media",
            index=models.Index(
                condition=models.Q(("upload_method", "remote")),
                fields=["state", "last_accessed_at"],
                name="msc3870_remote_state_access",
            ),
        ),
        migrations.RunPython(remote_media_accessed_when_fetched, migrations.RunPython.noop),
    ]
