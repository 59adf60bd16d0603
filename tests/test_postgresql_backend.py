"""mediarepo.postgresql: a persistent connection's health is checked at most once a second,
and a connection that fails its check is still closed."""

from __future__ import annotations

from typing import Any

import pytest

from mediarepo.postgresql import base


class FakeConnection:
    closed = False


def wrapper(monkeypatch: pytest.MonkeyPatch, usable: list[bool]) -> Any:
    """A backend whose server answers the health check with ``usable`` (in turn); no
    PostgreSQL needed: the decision of when to check is the backend's own."""
    db = base.DatabaseWrapper(
        {
            "NAME": "x",
            "USER": "",
            "PASSWORD": "",
            "HOST": "",
            "PORT": "",
            "OPTIONS": {},
            "TIME_ZONE": None,
            "CONN_MAX_AGE": None,
            "CONN_HEALTH_CHECKS": True,
            "AUTOCOMMIT": True,
            "ATOMIC_REQUESTS": False,
            "TEST": {},
        },
        alias="health",
    )
    db.checks: list[bool] = []  # type: ignore[misc]

    def is_usable() -> bool:
        db.checks.append(usable[len(db.checks)])
        return db.checks[-1]

    monkeypatch.setattr(db, "is_usable", is_usable)
    monkeypatch.setattr(db, "close", lambda: setattr(db, "connection", None))
    db.connection = FakeConnection()  # as connect() leaves it, made now
    db.health_check_enabled = True
    db._known_good_at = base.time.monotonic()
    return db


def new_request(db: Any) -> None:
    db.health_check_done = False  # what Django does when a request starts
    db.close_if_health_check_failed()


def test_checked_once_a_second_not_once_a_request(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(base.time, "monotonic", lambda: now[0])
    db = wrapper(monkeypatch, usable=[True, True])
    for _ in range(50):  # 50 requests within the connection's first second
        new_request(db)
        now[0] += 0.01
    assert db.checks == []
    now[0] += base.HEALTH_CHECK_INTERVAL
    for _ in range(50):  # one check, then trusted for another second
        new_request(db)
        now[0] += 0.01
    assert db.checks == [True] and db.connection is not None
    now[0] += base.HEALTH_CHECK_INTERVAL
    new_request(db)
    assert db.checks == [True, True]


def test_a_connection_failing_its_check_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(base.time, "monotonic", lambda: now[0])
    db = wrapper(monkeypatch, usable=[False])
    now[0] += base.HEALTH_CHECK_INTERVAL
    new_request(db)
    assert db.checks == [False] and db.connection is None


def test_the_project_uses_it_on_postgresql(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import mediarepo.settings as project_settings

    monkeypatch.setenv("DATABASE_URL", "postgres://u@127.0.0.1:5432/db")
    try:
        reloaded = importlib.reload(project_settings)
        assert reloaded.DATABASES["default"]["ENGINE"] == "mediarepo.postgresql"
        assert reloaded.DATABASES["default"]["CONN_HEALTH_CHECKS"] is True
    finally:
        monkeypatch.delenv("DATABASE_URL")
        importlib.reload(project_settings)
