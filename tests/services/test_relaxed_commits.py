"""On real PostgreSQL: the steps a database crash may undo without harm (an upload's claim,
an id's reservation) commit without waiting for the WAL flush, and only their own
transactions are relaxed: never a caller's, never the session's.

What a relaxed commit risks is documented beside ``msc3870.sql.RELAXED_COMMIT``; the
figures that chose it are in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone

from msc3870 import sql, uploads
from msc3870.auth import MatrixUser
from msc3870.models import Media, MediaState
from msc3870.waiting import MediaWait

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


@contextmanager
def statements() -> Iterator[list[str]]:
    seen: list[str] = []

    def log(execute: Any, sql_text: str, params: Any, many: bool, context: Any) -> Any:
        seen.append(sql_text)
        return execute(sql_text, params, many, context)

    with connection.execute_wrapper(log):
        yield seen


def session_synchronous_commit() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        return cursor.fetchone()[0]


def pending_media() -> Media:
    return Media.objects.create(
        server_name="localhost",
        media_id="relaxed" + timezone.now().strftime("%H%M%S%f"),
        user_id="@relaxed:localhost",
        unused_expires_at=timezone.now() + timedelta(hours=1),
    )


def test_a_relaxed_update_changes_the_row_and_not_the_session() -> None:
    assert connection.vendor == "postgresql"
    media = pending_media()
    with statements() as seen:
        changed = sql.update_media(
            media.pk, {"state": MediaState.PROCESSING}, states=[MediaState.PENDING], durable=False
        )
    assert changed == 1
    assert sql.RELAXED_COMMIT in seen[0]
    assert Media.objects.get(pk=media.pk).state == MediaState.PROCESSING
    # The relaxation was the statement's own transaction's: the next one waits again.
    assert session_synchronous_commit() == "on"


def test_a_relaxed_update_that_loses_the_race_changes_nothing() -> None:
    media = pending_media()
    changed = sql.update_media(
        media.pk, {"state": MediaState.PROCESSING}, states=[MediaState.COMPLETE], durable=False
    )
    assert changed == 0
    assert Media.objects.get(pk=media.pk).state == MediaState.PENDING


def test_a_callers_transaction_is_never_relaxed() -> None:
    media = pending_media()
    with transaction.atomic(), statements() as seen:
        sql.update_media(
            media.pk, {"state": MediaState.PROCESSING}, states=[MediaState.PENDING], durable=False
        )
        # Inside, the caller's transaction still commits synchronously.
        assert session_synchronous_commit() == "on"
    assert sql.RELAXED_COMMIT not in seen[0]


def test_durable_updates_are_not_relaxed() -> None:
    media = pending_media()
    with statements() as seen:
        sql.update_media(media.pk, {"state": MediaState.PROCESSING}, states=[MediaState.PENDING])
    assert sql.RELAXED_COMMIT not in seen[0]


def test_a_reservation_relaxes_its_own_transaction_only() -> None:
    user = MatrixUser("@relaxed-create:localhost")
    with statements() as seen:
        created = uploads.create_media(user)
    lock = next(text for text in seen if "pg_advisory_xact_lock" in text)
    assert sql.RELAXED_COMMIT in lock
    assert Media.objects.get(pk=created.media.pk).state == MediaState.PENDING
    assert session_synchronous_commit() == "on"

    # Inside a caller's transaction the reservation leaves the commit to the caller.
    with transaction.atomic(), statements() as seen:
        uploads.create_media(user)
    lock = next(text for text in seen if "pg_advisory_xact_lock" in text)
    assert sql.RELAXED_COMMIT not in lock


def test_an_upload_claims_relaxed_and_records_its_verdict_durably() -> None:
    """The PUT's claim is relaxed; the UPDATE that records the bytes and the verdict, the
    one the client's 200 stands on, is not."""
    user = MatrixUser("@relaxed-put:localhost")
    created = uploads.create_media(user)
    with statements() as seen, contextlib.suppress(MediaWait):
        # With a broker the bytes are recorded and the checks queued: the request would
        # then wait for their verdict (MediaWait), which is the worker's durable UPDATE.
        uploads.upload_to_media(
            user,
            created.media.server_name,
            created.media.media_id,
            io.BytesIO(b"relaxed claim, durable verdict"),
            content_length=30,
            content_type="text/plain",
            filename=None,
        )
    updates = [text for text in seen if text.lstrip().upper().startswith("UPDATE")]
    assert len(updates) >= 2, seen
    assert sql.RELAXED_COMMIT in updates[0]  # the claim
    assert sql.RELAXED_COMMIT not in updates[-1]  # the bytes recorded (and the verdict)
    media = Media.objects.get(pk=created.media.pk)
    assert media.state in (MediaState.COMPLETE, MediaState.PROCESSING)
    assert session_synchronous_commit() == "on"


def test_the_quota_lock_never_relaxes_the_transaction_that_completes_an_upload() -> None:
    """The user's lock is also taken by the transaction that decides a quota at
    completion (``screening.enforce_user_quota``): that commit is an answer's, and waits."""
    from msc3870.screening import QuotaClaim, enforce_user_quota

    media = pending_media()
    claim = QuotaClaim(user_id=media.user_id, size=1, quota=10**9)
    with transaction.atomic(), statements() as seen:
        enforce_user_quota(claim, exclude_pk=media.pk)
        assert session_synchronous_commit() == "on"
    lock = next(text for text in seen if "pg_advisory_xact_lock" in text)
    assert sql.RELAXED_COMMIT not in lock
