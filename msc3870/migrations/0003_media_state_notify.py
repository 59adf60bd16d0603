"""On PostgreSQL, every change of a media row's state is announced with NOTIFY on the
``msc3870_media`` channel (payload ``<pk>:<state>``), delivered when the transaction
commits. Web processes LISTEN and wake the requests waiting on that row at once, from
whichever process or task made the change (msc3870/wakeup.py). A trigger, so that no
code path (sweeps, bulk moderation, a manual UPDATE) can forget it, and no query is added
to the requests that change states. Other databases need nothing here: their waiters poll.
"""

from django.db import migrations

CHANNEL = "msc3870_media"

CREATE = f"""
CREATE OR REPLACE FUNCTION msc3870_notify_media_state() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', NEW.id::text || ':' || NEW.state);
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS msc3870_media_state_notify ON msc3870_media;
CREATE TRIGGER msc3870_media_state_notify
    AFTER UPDATE OF state ON msc3870_media
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION msc3870_notify_media_state();
"""

DROP = """
DROP TRIGGER IF EXISTS msc3870_media_state_notify ON msc3870_media;
DROP FUNCTION IF EXISTS msc3870_notify_media_state();
"""


def _on_postgresql(sql: str):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(sql)

    return run


class Migration(migrations.Migration):
    dependencies = [("msc3870", "0002_media_storage_key_index")]

    operations = [migrations.RunPython(_on_postgresql(CREATE), _on_postgresql(DROP))]
