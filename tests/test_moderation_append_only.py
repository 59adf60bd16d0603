"""The moderators' audit trail is append-only in the ORM and in the database: the default
manager refuses ``update()`` and ``bulk_update()``, and a trigger (migration 0010) refuses
any UPDATE of the table but the ``media -> NULL`` that deleting a media row makes. Here on
SQLite; the same checks run on PostgreSQL in ``tests/services/test_moderation_records.py``.
"""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.db import DatabaseError, connection

from msc3870.models import AppendOnlyError, ModerationRecord

from .append_only import (
    assert_deleting_the_media_keeps_the_record,
    assert_the_database_refuses_changes,
    raw_update,
    record_of,
)
from .helpers import MatrixClient, media_of


def test_the_default_manager_refuses_update_and_bulk_update(alice: MatrixClient) -> None:
    record = record_of(media_of(alice.uploaded()))
    with pytest.raises(AppendOnlyError):
        ModerationRecord.objects.filter(pk=record.pk).update(reason="rewritten")
    record.reason = "rewritten"
    with pytest.raises(AppendOnlyError):
        ModerationRecord.objects.bulk_update([record], ["reason"])
    assert ModerationRecord.objects.get().reason == "original"


def test_the_database_refuses_changes_but_not_a_media_deletion(
    alice: MatrixClient,
) -> None:
    assert connection.vendor == "sqlite"
    media_of(alice.uploaded())  # other media, for a record pointed elsewhere
    record = record_of(media_of(alice.uploaded()))
    assert_the_database_refuses_changes(record)
    assert_deleting_the_media_keeps_the_record(record)


@pytest.mark.django_db(transaction=True)
def test_the_migration_is_reversible(alice: MatrixClient) -> None:
    record = record_of(media_of(alice.uploaded()))
    call_command("migrate", "msc3870", "0008", verbosity=0)
    try:
        raw_update("reason = 'rewritten'")  # no trigger: allowed
        assert ModerationRecord.objects.get(pk=record.pk).reason == "rewritten"
    finally:
        call_command("migrate", "msc3870", verbosity=0)
    with pytest.raises(DatabaseError, match="append-only"):
        raw_update("reason = 'original'")
