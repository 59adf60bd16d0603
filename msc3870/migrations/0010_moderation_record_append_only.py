"""The database refuses changes to moderation records, whoever asks: the audit trail is
append-only for raw SQL, the base manager and other clients of the database too.

One change is allowed: ``media`` to NULL, which deleting a media row makes
(``on_delete=SET_NULL``, the old-tombstone sweep), with every other column unchanged.

PostgreSQL compares whole rows (``to_jsonb``), so columns added later are covered. SQLite
compares the columns that exist now: a later migration that adds a column recreates the
trigger, and one that rebuilds the table (SQLite's way of altering it) drops it, which
``tests/test_moderation_append_only.py`` would notice. Other databases get no trigger.
"""

from typing import Any

from django.db import migrations

TABLE = "msc3870_moderationrecord"
TRIGGER = "msc3870_moderationrecord_append_only"
MESSAGE = "moderation records are append-only"

POSTGRESQL_FORWARD = [
    f"""
    CREATE FUNCTION {TRIGGER}() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF OLD.media_id IS NOT NULL AND NEW.media_id IS NULL
           AND to_jsonb(NEW) - 'media_id' = to_jsonb(OLD) - 'media_id' THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION '{MESSAGE}' USING ERRCODE = 'restrict_violation';
    END;
    $$
    """,
    f"""
    CREATE TRIGGER {TRIGGER} BEFORE UPDATE ON {TABLE}
    FOR EACH ROW EXECUTE FUNCTION {TRIGGER}()
    """,
]
POSTGRESQL_BACKWARD = [
    f"DROP TRIGGER IF EXISTS {TRIGGER} ON {TABLE}",
    f"DROP FUNCTION IF EXISTS {TRIGGER}()",
]


def sqlite_forward(columns: list[str]) -> list[str]:
    unchanged = " AND ".join(f'NEW."{c}" IS OLD."{c}"' for c in columns if c != "media_id")
    return [
        f"""
        CREATE TRIGGER {TRIGGER} BEFORE UPDATE ON {TABLE}
        FOR EACH ROW WHEN NOT (
            OLD.media_id IS NOT NULL AND NEW.media_id IS NULL AND {unchanged}
        )
        BEGIN
            SELECT RAISE(ABORT, '{MESSAGE}');
        END
        """
    ]


SQLITE_BACKWARD = [f"DROP TRIGGER IF EXISTS {TRIGGER}"]


def forward(apps: Any, schema_editor: Any) -> None:
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        statements = POSTGRESQL_FORWARD
    elif vendor == "sqlite":
        model = apps.get_model("msc3870", "ModerationRecord")
        statements = sqlite_forward([field.column for field in model._meta.concrete_fields])
    else:
        return
    for statement in statements:
        schema_editor.execute(statement)


def backward(apps: Any, schema_editor: Any) -> None:
    vendor = schema_editor.connection.vendor
    statements = {"postgresql": POSTGRESQL_BACKWARD, "sqlite": SQLITE_BACKWARD}.get(vendor, [])
    for statement in statements:
        schema_editor.execute(statement)


class Migration(migrations.Migration):
    dependencies = [
        ("msc3870", "0009_media_last_accessed_at"),
    ]

    operations = [migrations.RunPython(forward, backward, elidable=False)]
