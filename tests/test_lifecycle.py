from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import F, Q
from django.db.models.signals import post_save
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from msc3870 import lifecycle, sql
from msc3870.models import Media, MediaState

S = MediaState


def new_media(state: str = S.PENDING) -> Media:
    return Media.objects.create(
        server_name="localhost",
        media_id=f"id{Media.objects.count()}",
        user_id="@a:localhost",
        state=state,
        unused_expires_at=timezone.now() + timedelta(hours=1),
    )


def test_compare_and_set_wins_once(db: None) -> None:
    media = new_media()
    assert lifecycle.transition(media.pk, [S.PENDING], S.PROCESSING) is True
    assert lifecycle.transition(media.pk, [S.PENDING], S.PROCESSING) is False
    assert Media.objects.get().state == S.PROCESSING


def test_transition_updates_the_instance_only_when_it_wins(db: None) -> None:
    media = new_media()
    stale = Media.objects.get()
    assert lifecycle.transition(media, [S.PENDING], S.EXPIRED)
    assert media.state == S.EXPIRED
    assert not lifecycle.transition(stale, [S.PENDING], S.PROCESSING, filename="x")
    assert stale.state == S.PENDING and stale.filename == ""
    assert Media.objects.get().filename == ""


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (S.DELETED, S.COMPLETE),
        (S.EXPIRED, S.PROCESSING),
        (S.REJECTED, S.COMPLETE),
        (S.EXPIRED, S.COMPLETE),
        (S.PENDING, S.QUARANTINED),
    ],
)
def test_illegal_transitions_raise(db: None, source: str, target: str) -> None:
    media = new_media(source)
    with pytest.raises(lifecycle.IllegalTransition):
        lifecycle.transition(media, [source], target)


def test_every_state_can_be_purged_except_deleted() -> None:
    for state in S.values:
        assert (S.DELETED in lifecycle.ALLOWED_TRANSITIONS[state]) is (state != S.DELETED)


def test_claims_and_counters_are_written_directly_and_still_compare(db: None) -> None:
    """A claim condition (``same_claim``) and an ``F(...) + 1`` counter take the direct
    statement, not the ORM's compiler, and still decide and count as the ORM would."""
    media = new_media()
    assert lifecycle.transition(media, [S.PENDING], S.PROCESSING, processing_started_at=None)
    stale_claim = lifecycle.same_claim(media)  # processing_started_at IS NULL
    started = timezone.now()
    assert lifecycle.update_if_state(media, S.PROCESSING, processing_started_at=started)
    with CaptureQueriesContext(connection) as captured:
        lost = lifecycle.update_if_state(media, S.PROCESSING, extra_where=stale_claim, size=1)
        won = lifecycle.transition(
            media,
            [S.PROCESSING],
            S.COMPLETE,
            extra_where=lifecycle.same_claim(media),
            attempts=F("attempts") + 1,
            size=7,
        )
    assert (lost, won) == (False, True)
    row = Media.objects.get()
    assert (row.state, row.size, row.attempts, row.processing_started_at) == (
        S.COMPLETE,
        7,
        1,
        started,
    )
    assert media.attempts == 0  # an expression is written, not mirrored
    statements = [q["sql"] for q in captured.captured_queries]
    # The direct statement's shape (the ORM writes ("msc3870_media"."attempts" + 1) and
    # compares the claim through its lookup compiler).
    assert len(statements) == 2
    assert '"processing_started_at" IS NULL' in statements[0]
    assert '"attempts" = "attempts" + 1' in statements[1]


def test_only_plain_equalities_are_taken_directly() -> None:
    assert sql.equalities(None) == {}
    assert sql.equalities(Q(a=1, b=None)) == {"a": 1, "b": None}
    assert sql.equalities(Q(a__gt=1)) is None
    assert sql.equalities(~Q(a=1)) is None
    assert sql.equalities(Q(a=1) | Q(b=2)) is None
    assert sql.equalities(Q(a=F("b"))) is None
    assert sql.writable({"attempts": F("attempts") + 1, "size": 3})
    assert not sql.writable({"attempts": F("size") + 1})
    assert not sql.writable({"attempts": F("attempts") * 2})


def _row(pk: int) -> dict[str, object]:
    return {k: v for k, v in Media.objects.filter(pk=pk).values().get().items() if k != "id"}


def test_direct_insert_writes_what_save_writes(db: None) -> None:
    when = timezone.now() + timedelta(hours=1)

    def fresh(media_id: str) -> Media:
        return Media(
            server_name="localhost",
            media_id=media_id,
            user_id="@a:localhost",
            unused_expires_at=when,
            created_at=when,
            state_changed_at=when,
        )

    direct, saved = fresh("direct"), fresh("saved")
    sql.insert_media(direct)
    saved.save(force_insert=True)
    assert direct.pk is not None and direct.pk != saved.pk
    assert not direct._state.adding
    assert {**_row(direct.pk), "media_id": "saved"} == _row(saved.pk)
    loaded, by_orm = sql.media_by_mxc("localhost", "direct"), Media.objects.get(pk=direct.pk)
    fields = [field.attname for field in Media._meta.concrete_fields]
    assert [getattr(loaded, f) for f in fields] == [getattr(by_orm, f) for f in fields]
    assert loaded.unused_expires_at == when and loaded.unused_expires_at.tzinfo is not None
    assert sql.media_by_mxc("localhost", "nothing") is None


def test_direct_insert_leaves_save_signals_to_save(db: None) -> None:
    heard: list[str] = []

    def listener(sender: type, instance: Media, **kwargs: object) -> None:
        heard.append(instance.media_id)

    post_save.connect(listener, sender=Media)
    try:
        media = Media(
            server_name="localhost",
            media_id="heard",
            user_id="@a:localhost",
            unused_expires_at=timezone.now(),
        )
        sql.insert_media(media)
    finally:
        post_save.disconnect(listener, sender=Media)
    assert heard == ["heard"] and Media.objects.filter(pk=media.pk).exists()


def test_a_claim_that_may_be_forgotten_is_a_plain_compare_and_set_off_postgresql(
    db: None,
) -> None:
    """``durable=False`` relaxes the commit on PostgreSQL only (tests/services/
    test_relaxed_commits.py); elsewhere the statement is the same compare-and-set."""
    media = new_media()
    with CaptureQueriesContext(connection) as queries:
        assert lifecycle.transition(media.pk, [S.PENDING], S.PROCESSING, durable=False)
        assert not lifecycle.transition(media.pk, [S.PENDING], S.PROCESSING, durable=False)
    assert all(sql.RELAXED_COMMIT not in query["sql"] for query in queries.captured_queries)
    assert Media.objects.get().state == S.PROCESSING


@pytest.fixture(params=["returning", "read-then-update"])
def claim_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``lifecycle.claim`` both ways: one UPDATE ... RETURNING, and the read then the
    compare-and-set of databases without it."""
    if request.param == "read-then-update":
        monkeypatch.setattr(sql, "returns_updated_rows", lambda: False)
    return str(request.param)


def test_a_claim_returns_the_row_as_it_left_it(db: None, claim_path: str) -> None:
    media = new_media()
    now = timezone.now()
    claimed = lifecycle.claim(
        "localhost",
        media.media_id,
        [S.PENDING],
        S.PROCESSING,
        user_id="@a:localhost",
        unexpired_at=now,
        filename="a.txt",
        processing_started_at=now,
    )
    assert claimed is not None and claimed.pk == media.pk
    stored = Media.objects.get(pk=media.pk)
    fields = [field.attname for field in Media._meta.concrete_fields]
    assert [getattr(claimed, f) for f in fields] == [getattr(stored, f) for f in fields]
    assert stored.state == S.PROCESSING and stored.filename == "a.txt"
    assert not claimed._state.adding


def test_a_claim_wins_only_for_the_owner_of_an_unexpired_id_in_state(
    db: None, claim_path: str
) -> None:
    media = new_media()
    now = timezone.now()

    def attempt(media_id: str = media.media_id, **overrides: object) -> Media | None:
        arguments: dict[str, object] = {"user_id": "@a:localhost", "unexpired_at": now}
        arguments.update(overrides)
        return lifecycle.claim("localhost", media_id, [S.PENDING], S.PROCESSING, **arguments)  # type: ignore[arg-type]

    assert attempt("missing") is None
    assert attempt(user_id="@b:localhost") is None
    assert attempt(unexpired_at=now + timedelta(hours=2)) is None
    assert Media.objects.get(pk=media.pk).state == S.PENDING  # none of those changed it
    assert attempt() is not None
    assert attempt() is None  # claimed already: the compare-and-set lost
