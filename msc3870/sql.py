"""The few statements every upload and download runs, written directly.

Building a query with the ORM costs several times executing it (a compare-and-set
UPDATE, the row lookup of every request). These helpers keep
the ORM's vocabulary (model fields, their column names and value conversions, the
database router) and skip only its query compiler. Anything unusual (an expression other
than a counter ``F(name) + n``, a condition other than exact matches, a model with save
signal receivers) goes through the ORM as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django.db import connection, connections, router
from django.db.models import F, Q, Value, signals
from django.db.models.expressions import CombinedExpression

from .models import LIVE_STATES, Media, MediaState, Uploader

_TABLE = Media._meta.db_table


def _connection(write: bool) -> Any:
    alias = router.db_for_write(Media) if write else router.db_for_read(Media)
    return connections[alias]


def is_plain(value: Any) -> bool:
    """A value, not an expression the ORM must compile."""
    return not hasattr(value, "resolve_expression")


def _increment(name: str, value: Any) -> int | None:
    """``n`` if ``value`` is ``F(name) + n`` (a counter bumped in the same UPDATE)."""
    if (
        isinstance(value, CombinedExpression)
        and value.connector == "+"
        and isinstance(value.lhs, F)
        and value.lhs.name == name
        and isinstance(value.rhs, Value)
        and type(value.rhs.value) is int
    ):
        return value.rhs.value
    return None


def writable(fields: dict[str, Any]) -> bool:
    """Whether ``update_media`` can write these: plain values, or ``F(name) + n``."""
    return all(is_plain(v) or _increment(k, v) is not None for k, v in fields.items())


def equalities(condition: Q | None) -> dict[str, Any] | None:
    """``condition`` as ``{field: value}`` if it is only ANDed exact matches of plain
    values (``Q(a=1, b=None)``), else None (the ORM compiles it)."""
    if condition is None:
        return {}
    if condition.negated or condition.connector != Q.AND:
        return None
    found: dict[str, Any] = {}
    for child in condition.children:
        if not isinstance(child, tuple) or "__" in child[0] or not is_plain(child[1]):
            return None
        found[child[0]] = child[1]
    return found


#: PostgreSQL: let the current transaction commit without waiting for its WAL to reach
#: the disk (``synchronous_commit`` off for that transaction only). Its changes are
#: visible to every session at once; a database crash within a fraction of a second may
#: forget them, and any later synchronous commit (a verdict) makes them durable too, WAL
#: being written in order.
RELAXED_COMMIT = "set_config('synchronous_commit', 'off', true)"


def relaxes_commits(connection: Any, *, own_atomic_blocks: int = 0) -> bool:
    """Whether a statement may relax the commit of the transaction it runs in: only on
    PostgreSQL, and only a transaction of our own (the statement's own in autocommit, or
    ``own_atomic_blocks`` opened by the caller and nothing around them)."""
    if connection.vendor != "postgresql":
        return False
    if own_atomic_blocks == 0:
        return connection.get_autocommit()
    return len(connection.atomic_blocks) == own_atomic_blocks


def update_media(
    pk: int,
    fields: dict[str, Any],
    *,
    states: Iterable[str] | None = None,
    unexpired_at: datetime | None = None,
    where: dict[str, Any] | None = None,
    durable: bool = True,
) -> int:
    """``UPDATE media SET <fields> WHERE id = pk [AND state IN states] [AND
    unused_expires_at > unexpired_at] [AND field = value ...]``: rows changed.

    The compare-and-set of every transition. ``fields`` must be ``writable``; ``where``
    values are plain (None: IS NULL). ``durable=False``: a change that a database crash
    may forget without harm (``RELAXED_COMMIT``), where it commits on its own."""
    connection = _connection(write=True)
    statement, params = _update_sql(
        connection,
        fields,
        {"id": pk, **(where or {})},
        states=states,
        unexpired_at=unexpired_at,
        durable=durable,
    )
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.rowcount


def returns_updated_rows() -> bool:
    """Whether ``claim_media`` can read and change a row in one statement (PostgreSQL, and
    SQLite from 3.35: ``UPDATE ... RETURNING``)."""
    connection = _connection(write=True)
    if connection.vendor == "postgresql":
        return True
    return connection.vendor == "sqlite" and connection.Database.sqlite_version_info >= (3, 35)


def claim_media(
    server_name: str,
    media_id: str,
    fields: dict[str, Any],
    *,
    where: dict[str, Any],
    states: Iterable[str],
    unexpired_at: datetime | None = None,
    durable: bool = True,
) -> Media | None:
    """``update_media`` of ``mxc://server_name/media_id``, returning the row as it is after
    the change (None if the conditions did not hold): the read and the compare-and-set of
    an upload's claim in one statement. Only where ``returns_updated_rows()``."""
    connection = _connection(write=True)
    statement, params = _update_sql(
        connection,
        fields,
        {"server_name": server_name, "media_id": media_id, **where},
        states=states,
        unexpired_at=unexpired_at,
        durable=durable,
    )
    quote = connection.ops.quote_name
    columns = ", ".join(quote(field.column) for field in Media._meta.concrete_fields)
    with connection.cursor() as cursor:
        cursor.execute(f"{statement} RETURNING {columns}", params)
        row = cursor.fetchone()
    return None if row is None else _media_from_row(connection, row)


def _update_sql(
    connection: Any,
    fields: dict[str, Any],
    where: dict[str, Any],
    *,
    states: Iterable[str] | None,
    unexpired_at: datetime | None,
    durable: bool,
) -> tuple[str, list[Any]]:
    quote = connection.ops.quote_name
    assignments, params = [], []
    for name, value in fields.items():
        field = Media._meta.get_field(name)
        column = quote(field.column)
        step = None if is_plain(value) else _increment(name, value)
        if step is not None:
            assignments.append(f"{column} = {column} + %s")
            params.append(step)
        else:
            assignments.append(f"{column} = %s")
            params.append(field.get_db_prep_save(value, connection))
    conditions = []
    for name, value in where.items():
        field = Media._meta.get_field(name)
        if value is None:
            conditions.append(f"{quote(field.column)} IS NULL")
        else:
            conditions.append(f"{quote(field.column)} = %s")
            params.append(field.get_db_prep_value(value, connection))
    if states is not None:
        sources = list(states)
        conditions.append(f"{quote('state')} IN ({', '.join(['%s'] * len(sources))})")
        params.extend(sources)
    if unexpired_at is not None:
        expires = Media._meta.get_field("unused_expires_at")
        conditions.append(f"{quote(expires.column)} > %s")
        params.append(expires.get_db_prep_value(unexpired_at, connection))
    if not durable and relaxes_commits(connection):
        # A condition without a column: evaluated for the one row the key finds.
        conditions.append(f"{RELAXED_COMMIT} = 'off'")
    statement = (
        f"UPDATE {quote(_TABLE)} SET {', '.join(assignments)} WHERE {' AND '.join(conditions)}"
    )
    return statement, params


def media_by_mxc(server_name: str, media_id: str) -> Media | None:
    """The row of ``mxc://server_name/media_id`` (unique), as a model instance."""
    connection = _connection(write=False)
    quote = connection.ops.quote_name
    fields = Media._meta.concrete_fields
    columns = ", ".join(quote(field.column) for field in fields)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {columns} FROM {quote(_TABLE)} WHERE {quote('server_name')} = %s"
            f" AND {quote('media_id')} = %s",
            [server_name, media_id],
        )
        row = cursor.fetchone()
    return None if row is None else _media_from_row(connection, row)


def _media_from_row(connection: Any, row: Any) -> Media:
    """A row of every concrete column, in order, converted as the ORM converts it."""
    values = []
    for value, field_converters in zip(row, _converters(connection), strict=True):
        for converter, expression in field_converters:
            value = converter(value, expression, connection)
        values.append(value)
    fields = Media._meta.concrete_fields
    return Media.from_db(connection.alias, [field.attname for field in fields], values)


_CONVERTERS: dict[tuple[str, str], list[list[tuple[Any, Any]]]] = {}


def _converters(connection: Any) -> list[list[tuple[Any, Any]]]:
    """Per column of the row, the converters the ORM applies to its value (the backend's,
    then the field's: SQLite's datetimes made aware, for one), computed once."""
    key = (connection.alias, connection.vendor)
    if key not in _CONVERTERS:
        found = []
        for field in Media._meta.concrete_fields:
            expression = field.get_col(_TABLE)
            functions = connection.ops.get_db_converters(expression)
            functions += expression.get_db_converters(connection)
            found.append([(function, expression) for function in functions])
        _CONVERTERS[key] = found
    return _CONVERTERS[key]


def inserts_in_one_statement() -> bool:
    """Whether ``insert_media`` is one statement (else ``save()``: the database cannot
    return the new key, or something listens to the model's save signals)."""
    return bool(
        _connection(write=True).features.can_return_columns_from_insert
        and not signals.pre_save.has_listeners(Media)
        and not signals.post_save.has_listeners(Media)
    )


def insert_media(media: Media, *, pending_limit: tuple[datetime, int] | None = None) -> bool:
    """``INSERT`` a new row for ``media`` and set its primary key, as ``save()`` would
    (defaults and ``auto_now_add`` included); True if inserted.

    ``pending_limit=(now, limit)``: only while the media's user has fewer than ``limit``
    ids pending at ``now`` (``count_pending``), decided in the same statement; exact where
    the caller serialises the user's creates. Where something listens to the model's save
    signals, or the database cannot return the new key, ``save()`` itself runs (after a
    count of its own)."""
    connection = _connection(write=True)
    if not inserts_in_one_statement():
        if pending_limit is not None:
            now, limit = pending_limit
            if count_pending(media.user_id, now) >= limit:
                return False
        media.save(force_insert=True, using=connection.alias)
        return True
    quote = connection.ops.quote_name
    fields = [field for field in Media._meta.concrete_fields if field is not Media._meta.pk]
    params = [field.get_db_prep_save(field.pre_save(media, True), connection) for field in fields]
    columns = ", ".join(quote(field.column) for field in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    if pending_limit is None:
        statement = f"INSERT INTO {quote(_TABLE)} ({columns}) VALUES ({placeholders})"
    else:
        now, limit = pending_limit
        pending_sql, pending_params = _pending_count_sql(connection, media.user_id, now)
        statement = (
            f"INSERT INTO {quote(_TABLE)} ({columns}) SELECT {placeholders}"
            f" WHERE ({pending_sql}) < %s"
        )
        params += [*pending_params, limit]
    with connection.cursor() as cursor:
        cursor.execute(f"{statement} RETURNING {quote(Media._meta.pk.column)}", params)
        row = cursor.fetchone()
    if row is None:
        return False
    media.pk = row[0]
    media._state.adding = False
    media._state.db = connection.alias
    return True


def twin_and_block(sha256: str, pk: int) -> tuple[bool, bool]:
    """Whether media other than ``pk`` has this SHA-256, and whether a moderator blocked
    it (an active ``BlockedHash``): one statement for both, as screening asks both."""
    from .models import BlockedHash

    connection = _connection(write=False)
    quote = connection.ops.quote_name
    blocked = quote(BlockedHash._meta.db_table)
    unblocked_at = quote(BlockedHash._meta.get_field("unblocked_at").column)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT EXISTS (SELECT 1 FROM {quote(_TABLE)} WHERE {quote('sha256')} = %s"
            f" AND {quote('id')} <> %s), EXISTS (SELECT 1 FROM {blocked}"
            f" WHERE {quote('sha256')} = %s AND {unblocked_at} IS NULL)",
            [sha256, pk, sha256],
        )
        twin, block = cursor.fetchone()
    return bool(twin), bool(block)


def any_exists(*querysets: Any) -> bool:
    """Whether any of ``querysets`` (of models in the media's database) has a row: one
    statement, ``SELECT EXISTS (...) OR EXISTS (...)``."""
    connection = _connection(write=False)
    parts, params = [], []
    for queryset in querysets:
        query = queryset.values("pk").query
        statement, query_params = query.get_compiler(connection=connection).as_sql()
        parts.append(f"EXISTS ({statement})")
        params.extend(query_params)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {' OR '.join(parts)}", params)
        return bool(cursor.fetchone()[0])


def _pending_count_sql(connection: Any, user_id: str, now: datetime) -> tuple[str, list[Any]]:
    quote = connection.ops.quote_name
    expires = Media._meta.get_field("unused_expires_at")
    return (
        f"SELECT COUNT(*) FROM {quote(_TABLE)} WHERE {quote('user_id')} = %s"
        f" AND {quote('state')} = %s AND {quote(expires.column)} > %s",
        [user_id, MediaState.PENDING, expires.get_db_prep_value(now, connection)],
    )


def count_pending(user_id: str, now: datetime) -> int:
    """Media ids of ``user_id`` still waiting for their upload."""
    connection = _connection(write=False)
    statement, params = _pending_count_sql(connection, user_id, now)
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return int(cursor.fetchone()[0])


def lock_uploader(user_id: str, *, relax_commit: bool = False) -> None:
    """Serialise the user's creates, or completes, until the transaction ends. SQLite's
    write lock (BEGIN IMMEDIATE) already does; PostgreSQL takes an advisory lock on the
    user (one query, no row needed); other databases lock the user's ``Uploader`` row.

    ``relax_commit`` (a create's own transaction only): on PostgreSQL the same statement
    lets the transaction commit without waiting for its WAL flush. A database crash may
    then forget an id reserved in its last fraction of a second, for which no byte was
    accepted (the upload answers M_NOT_FOUND and the client creates anew)."""
    if connection.vendor == "sqlite":
        return
    if connection.vendor == "postgresql":
        relax = (
            f", {RELAXED_COMMIT}"
            if relax_commit and relaxes_commits(connection, own_atomic_blocks=1)
            else ""
        )
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT pg_advisory_xact_lock(hashtext(%s)){relax}", [user_id])
        return
    Uploader.objects.get_or_create(user_id=user_id)
    Uploader.objects.select_for_update().filter(pk=user_id).first()


#: What ``expire_due`` returns of each row: what its objects' keys depend on.
EXPIRED_COLUMNS = ("id", "media_id", "storage_key", "upload_method", "completed_at", "server_name")


def expire_due(now: datetime, limit: int) -> list[tuple[Any, ...]] | None:
    """Move up to ``limit`` PENDING rows whose ``unused_expires_at`` has passed at ``now``
    to EXPIRED, the earliest first, in one statement: the pick and the compare-and-set
    together (the expiry condition is repeated in the UPDATE, so a /complete that claimed
    a row in between wins). Returns the moved rows' ``EXPIRED_COLUMNS``; None where the
    database cannot return updated rows (the caller goes through the ORM). On PostgreSQL
    rows another sweep is moving are skipped, not waited for."""
    if not returns_updated_rows():
        return None
    connection = _connection(write=True)
    quote = connection.ops.quote_name
    table, state = quote(_TABLE), quote("state")
    expires = Media._meta.get_field("unused_expires_at")
    changed = Media._meta.get_field("state_changed_at")
    at = expires.get_db_prep_value(now, connection)
    due = f"{state} = %s AND {quote(expires.column)} <= %s"
    pick = (
        f"SELECT {quote('id')} FROM {table} WHERE {due} ORDER BY {quote(expires.column)} LIMIT %s"
    )
    assign = f"SET {state} = %s, {quote(changed.column)} = %s"
    pending, expired = MediaState.PENDING.value, MediaState.EXPIRED.value
    if connection.vendor == "postgresql":
        # The pick materialized first: as an IN (subquery) with SKIP LOCKED, PostgreSQL may
        # run the subquery more than once and move more than ``limit`` rows.
        columns = ", ".join(f"{table}.{quote(column)}" for column in EXPIRED_COLUMNS)
        statement = (
            f"WITH picked AS MATERIALIZED ({pick} FOR UPDATE SKIP LOCKED) "
            f"UPDATE {table} {assign} FROM picked "
            f"WHERE {table}.{quote('id')} = picked.{quote('id')} AND {due} RETURNING {columns}"
        )
        params = [pending, at, limit, expired, changed.get_db_prep_value(now, connection)]
        params += [pending, at]
    else:
        columns = ", ".join(quote(column) for column in EXPIRED_COLUMNS)
        statement = (
            f"UPDATE {table} {assign} WHERE {quote('id')} IN ({pick}) AND {due} RETURNING {columns}"
        )
        params = [expired, changed.get_db_prep_value(now, connection), pending, at, limit]
        params += [pending, at]
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return list(cursor.fetchall())


def mark_cleaned(pks: list[int], at: datetime) -> int | None:
    """``objects_deleted_at = at`` on those of ``pks`` whose media is dead (not live) and
    not yet cleaned; how many. On PostgreSQL only (None elsewhere: the caller goes through
    the ORM): the keys are one array parameter, where the ORM's ``IN (%s, ...)`` of a
    sweep's batch has a parameter per key to compile, adapt and parse."""
    connection = _connection(write=True)
    if connection.vendor != "postgresql":
        return None
    quote = connection.ops.quote_name
    cleaned = Media._meta.get_field("objects_deleted_at")
    live = sorted(state.value for state in LIVE_STATES)
    statement = (
        f"UPDATE {quote(_TABLE)} SET {quote(cleaned.column)} = %s "
        f"WHERE {quote('id')} = ANY(%s) AND {quote(cleaned.column)} IS NULL "
        f"AND NOT ({quote('state')} = ANY(%s))"
    )
    with connection.cursor() as cursor:
        cursor.execute(statement, [cleaned.get_db_prep_value(at, connection), pks, live])
        return cursor.rowcount
