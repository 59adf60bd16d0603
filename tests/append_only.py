"""The checks that the moderators' audit trail is append-only in the database, run on
SQLite (``test_moderation_append_only.py``) and on PostgreSQL
(``services/test_moderation_records.py``)."""

from __future__ import annotations

import pytest
from django.db import DatabaseError, connection, transaction

from msc3870 import moderation
from msc3870.models import Media, ModerationRecord

TABLE = ModerationRecord._meta.db_table


def raw_update(assignments: str) -> None:
    """An UPDATE of every record, as any client of the database could send it."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"UPDATE {TABLE} SET {assignments}")


def record_of(media: Media) -> ModerationRecord:
    assert moderation.purge(media, by="mod", reason="original")
    return ModerationRecord.objects.get(media=media)


def assert_the_database_refuses_changes(record: ModerationRecord) -> None:
    """Each kind of change fails, and the record is as it was."""
    other = Media.objects.exclude(pk=record.media_id).values_list("pk", flat=True).first()
    for assignments in (
        "reason = 'rewritten'",
        "actor = 'someone else'",
        "media_id = NULL, reason = 'rewritten'",  # the allowed change, with another
        f"media_id = {other}",  # pointed at other media
    ):
        with pytest.raises(DatabaseError, match="append-only"):
            raw_update(assignments)
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        ModerationRecord._base_manager.filter(pk=record.pk).update(reason="rewritten")
    assert ModerationRecord.objects.get(pk=record.pk).reason == "original"
    assert ModerationRecord.objects.get(pk=record.pk).media_id == record.media_id


def assert_deleting_the_media_keeps_the_record(record: ModerationRecord) -> None:
    media_pk = record.media_id
    Media.objects.filter(pk=media_pk).delete()  # what the old-tombstone sweep does
    kept = ModerationRecord.objects.get(pk=record.pk)
    assert kept.media_id is None
    assert (kept.mxc_uri, kept.actor, kept.reason, kept.at) == (
        record.mxc_uri,
        record.actor,
        record.reason,
        record.at,
    )
