"""The moderation console: indexes for its list and search, the dashboard's snapshot, and
the block list for the Moderators group.

- The list reads newest first (all media, one state, one uploader): a btree per case.
- Filenames are searched by substring (``filename__icontains``, which PostgreSQL runs as
  ``UPPER(filename::text) LIKE UPPER(...)``): on PostgreSQL a trigram GIN index on that
  very expression answers it (``pg_trgm``, a trusted extension the database's owner may
  create). Other databases get none: SQLite, the embedded default, scans.
- The Moderators group may view the block list (blocking and lifting need
  ``moderate_media``, which it holds).
"""

from typing import Any

from django.db import migrations, models

TRIGRAM_INDEX = "msc3870_filename_trgm"
POSTGRESQL_FORWARD = [
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    f"CREATE INDEX IF NOT EXISTS {TRIGRAM_INDEX} ON msc3870_media "
    "USING gin ((UPPER(filename::text)) gin_trgm_ops)",
]
# The extension stays: something else may use it.
POSTGRESQL_BACKWARD = [f"DROP INDEX IF EXISTS {TRIGRAM_INDEX}"]

GROUP = "Moderators"
VIEW_BLOCKED_HASH = ("blockedhash", "view_blockedhash", "Can view blocked hash")


def trigram_forward(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        for statement in POSTGRESQL_FORWARD:
            schema_editor.execute(statement)


def trigram_backward(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        for statement in POSTGRESQL_BACKWARD:
            schema_editor.execute(statement)


def _view_blocked_hash(apps: Any) -> Any:
    # Permissions are made after all migrations (post_migrate): made now, as Django names
    # them (as migration 0005 does).
    ContentType = apps.get_model("contenttypes", "ContentType")
    Permission = apps.get_model("auth", "Permission")
    model, codename, name = VIEW_BLOCKED_HASH
    content_type, _ = ContentType.objects.get_or_create(app_label="msc3870", model=model)
    permission, _ = Permission.objects.get_or_create(
        content_type=content_type, codename=codename, defaults={"name": name}
    )
    return permission


def group_forward(apps: Any, schema_editor: Any) -> None:
    group = apps.get_model("auth", "Group").objects.filter(name=GROUP).first()
    if group is not None:
        group.permissions.add(_view_blocked_hash(apps))


def group_backward(apps: Any, schema_editor: Any) -> None:
    group = apps.get_model("auth", "Group").objects.filter(name=GROUP).first()
    if group is not None:
        group.permissions.remove(_view_blocked_hash(apps))


class Migration(migrations.Migration):
    dependencies = [
        ("msc3870", "0012_heartbeat"),
        ("msc3870", "0005_moderators_group"),
    ]

    operations = [
        migrations.CreateModel(
            name="DashboardSnapshot",
            fields=[
                ("name", models.CharField(max_length=32, primary_key=True, serialize=False)),
                ("computed_at", models.DateTimeField()),
                ("seconds", models.FloatField(default=0.0, help_text="How long the rollup took.")),
                ("figures", models.JSONField(default=dict)),
            ],
            options={"default_permissions": ()},
        ),
        migrations.AddIndex(
            model_name="media",
            index=models.Index(fields=["created_at", "id"], name="msc3870_created"),
        ),
        migrations.AddIndex(
            model_name="media",
            index=models.Index(fields=["state", "created_at", "id"], name="msc3870_state_created"),
        ),
        migrations.AddIndex(
            model_name="media",
            index=models.Index(fields=["user_id", "created_at", "id"], name="msc3870_user_created"),
        ),
        migrations.AlterModelOptions(
            name="blockedhash",
            options={
                "ordering": ("-blocked_at", "-pk"),
                "verbose_name": "blocked hash",
                "verbose_name_plural": "blocked hashes",
            },
        ),
        migrations.RunPython(trigram_forward, trigram_backward, elidable=False),
        migrations.RunPython(group_forward, group_backward),
    ]
