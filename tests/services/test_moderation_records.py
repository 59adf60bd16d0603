"""On real PostgreSQL: the moderation records' trigger refuses any UPDATE (a raw ``SET
reason``, the base manager) but the ``media -> NULL`` that deleting a media row makes.
The same checks on SQLite: ``tests/test_moderation_append_only.py``."""

from __future__ import annotations

import pytest
from django.db import connection

from ..append_only import (
    assert_deleting_the_media_keeps_the_record,
    assert_the_database_refuses_changes,
    record_of,
)
from ..helpers import MatrixClient, media_of

pytestmark = pytest.mark.services


def test_the_trigger_refuses_changes_but_not_a_media_deletion(alice: MatrixClient) -> None:
    assert connection.vendor == "postgresql"
    media_of(alice.uploaded())  # other media, for a record pointed elsewhere
    record = record_of(media_of(alice.uploaded()))
    assert_the_database_refuses_changes(record)
    assert_deleting_the_media_keeps_the_record(record)
