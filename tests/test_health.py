"""The health check (``GET /health``, ``msc3870.health``): each component failing, the
per-process cache, a hanging probe answered "timed out" without holding a request
thread, beat's tick from both schedulers. The real components stopped and started
again: ``tests/services/test_health_services.py``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from msc3870 import health, heartbeat
from msc3870.health import HealthMonitor, Result
from msc3870.models import Heartbeat

from .asgi_driver import call, request, run, until
from .helpers import msc3870_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ok() -> Result:
    return Result(True)


def down(exc: BaseException) -> Callable[[], Result]:
    def probe() -> Result:
        raise exc

    return probe


class Counting:
    def __init__(self, probe: Callable[[], Result] = ok) -> None:
        self.calls = 0
        self.probe = probe

    def __call__(self) -> Result:
        self.calls += 1
        return self.probe()


def ticked(seconds_ago: float | None) -> Callable[[], Result]:
    def probe() -> Result:
        if seconds_ago is None:
            return Result(True)
        return Result(True, tick=timezone.now() - timedelta(seconds=seconds_ago))

    return probe


@pytest.fixture
def install() -> Iterator[Callable[..., HealthMonitor]]:
    """Make the process's monitor one with these probes (the database probe reports a
    fresh tick unless given)."""

    def make(clock: Callable[[], float] = time.monotonic, **probes: Any) -> HealthMonitor:
        probes.setdefault("database", ticked(1))
        probes.setdefault("storage", ok)
        probes.setdefault("broker", ok)
        monitor = HealthMonitor(probes, clock=clock)
        health.reset(monitor)
        return monitor

    yield make
    health.reset()


def get_health(path: str = "/health") -> Any:
    return Client().get(path)


def test_healthy_is_200_with_every_component(db: None, install: Any) -> None:
    install()
    for path in ("/health", "/healthz"):
        response = get_health(path)
        assert response.status_code == 200, response.content
        body = response.json()
        assert body["status"] == "ok"
        # No broker in the unit suite: the components are the other three.
        assert list(body["components"]) == ["database", "storage", "beat"]
        assert all(state["ok"] for state in body["components"].values())
        assert body["components"]["beat"]["age_seconds"] < 5
        assert response["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    ("component", "exc", "words"),
    [
        ("database", ConnectionRefusedError("connection refused"), "unreachable"),
        ("storage", TimeoutError("read timed out"), "timed out"),
        ("storage", RuntimeError("the bucket is gone"), "error"),
    ],
)
def test_a_failing_component_is_503_naming_it(
    db: None, install: Any, component: str, exc: BaseException, words: str
) -> None:
    install(**{component: down(exc)})
    response = get_health()
    assert response.status_code == 503
    body = response.json()
    assert body["errcode"] == "M_UNKNOWN"
    assert body["status"] == "down"
    assert component in body["down"]
    assert body["components"][component] == {"ok": False, "error": words}
    # Fixed words only: the probe's own message (addresses, buckets) stays in the log.
    assert str(exc) not in response.content.decode()


def test_the_broker_is_checked_where_one_is_configured(
    db: None, install: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, "broker_configured", lambda: True)
    install(broker=down(ConnectionRefusedError()))
    body = get_health().json()
    assert body["down"] == ["broker"]
    install()
    assert get_health().json()["components"]["broker"]["ok"] is True


@pytest.mark.parametrize(
    ("seconds_ago", "error"), [(None, "no tick recorded"), (120, "no recent tick")]
)
def test_beat_without_a_recent_tick_is_down(
    db: None, install: Any, seconds_ago: float | None, error: str
) -> None:
    install(database=ticked(seconds_ago))
    response = get_health()
    assert response.status_code == 503
    assert response.json()["down"] == ["beat"]
    assert response.json()["components"]["beat"]["error"] == error
    with msc3870_settings(HEALTH_COMPONENTS=["database", "storage"]):
        assert get_health().status_code == 200  # the operator's choice: beat not checked


def test_beat_keeps_its_last_tick_while_the_database_is_down(db: None, install: Any) -> None:
    """Beat's tick cannot be read while the database is down: the last one read is judged
    by its age, so only the database is reported down meanwhile."""
    clock = Clock()
    answers = iter([ticked(1), down(ConnectionRefusedError())])
    monitor = install(clock=clock, database=lambda: next(answers)())
    assert get_health().status_code == 200
    clock.now += 10
    monitor.refresh()
    for _ in range(100):
        if get_health().json().get("down") == ["database"]:
            break
        time.sleep(0.01)
    body = get_health().json()
    assert body["down"] == ["database"]
    assert body["components"]["beat"]["ok"] is True


def test_results_are_reused_for_the_cache_period(db: None, install: Any) -> None:
    clock = Clock()
    storage = Counting()
    monitor = install(clock=clock, storage=storage)
    for _ in range(20):
        assert get_health().status_code == 200
    assert storage.calls == 1
    clock.now += 2.5  # past HEALTH_CACHE_SECONDS (2)
    get_health()
    until_called = time.monotonic() + 5
    while storage.calls < 2 and time.monotonic() < until_called:
        time.sleep(0.01)
    assert storage.calls == 2
    assert monitor.refresh() is None  # one probe at a time, a result in hand


def test_a_probe_that_hangs_makes_its_component_timed_out_without_holding_a_thread(
    app: Any, install: Any
) -> None:
    """Storage hangs: the first check (no result yet) is parked on the loop for at most
    HEALTH_TIMEOUT_SECONDS while other requests are answered; then 503 "timed out", and
    the next checks answer at once while the probe still hangs; one probe only."""
    release = threading.Event()
    hanging = Counting(lambda: release.wait(30) and Result(True))
    install(storage=hanging)

    async def scenario() -> None:
        started = time.monotonic()
        first = request(app, "GET", "/health")
        await until(lambda: app.caps.total == 1, "the check parked")
        versions = await call(app, "GET", "/_matrix/client/versions")
        assert versions.status == 200
        reply = await first.reply(timeout=10)
        waited = time.monotonic() - started
        assert reply.status == 503, reply.body
        assert reply.json()["components"]["storage"] == {"ok": False, "error": "timed out"}
        assert 0.4 <= waited < 2.5, waited
        for _ in range(3):
            started = time.monotonic()
            again = await call(app, "GET", "/health")
            assert again.status == 503
            assert time.monotonic() - started < 0.5
        assert hanging.calls == 1
        release.set()
        await until(lambda: hanging.calls == 1 and health.monitor().refresh() is None, "the probe")

    with msc3870_settings(HEALTH_TIMEOUT_SECONDS=0.5):
        run(scenario)


def test_head_answers_the_status(db: None, install: Any) -> None:
    install(storage=down(OSError("disk gone")))
    response = Client().head("/health")
    assert response.status_code == 503
    assert response.content == b""


def test_health_skips_the_admin_middleware(app: Any, install: Any) -> None:
    """Through the request plane like /_matrix (no session, no CSRF cookie)."""
    install()

    async def scenario() -> None:
        reply = await call(app, "GET", "/health")
        assert reply.status == 200
        assert "set-cookie" not in reply.headers
        assert "vary" not in reply.headers or "Cookie" not in reply.headers["vary"]

    run(scenario)


# ---------------------------------------------------------------------- the real probes


def test_the_real_probes_on_the_embedded_default(transactional_db: None) -> None:
    """SQLite and the local disk: the database probe reads beat's tick, which the
    in-process scheduler's Ticker writes."""
    health.reset()
    try:
        assert get_health().json()["components"]["beat"]["error"] == "no tick recorded"
        assert heartbeat.Ticker().maybe_tick()
        health.reset()
        body = get_health().json()
        assert body["status"] == "ok", body
        assert Heartbeat.objects.get(name="beat").at > timezone.now() - timedelta(seconds=5)
    finally:
        health.reset()


def test_the_ticker_writes_at_most_every_interval_and_survives_a_database_error(
    db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    ticker = heartbeat.Ticker(clock=clock)
    assert ticker.maybe_tick()
    assert not ticker.maybe_tick()
    clock.now += heartbeat.TICK_SECONDS
    calls: list[str] = []

    def broken(name: str = "beat") -> None:
        calls.append(name)
        raise RuntimeError("database is down")

    monkeypatch.setattr(heartbeat, "record_tick", broken)
    assert not ticker.maybe_tick()  # logged, not raised
    assert not ticker.maybe_tick()
    assert len(calls) == 2  # tried again at once: no tick was written


def test_celery_beat_ticks(transactional_db: None) -> None:
    """The scheduler mediarepo gives celery beat writes the tick as it ticks."""
    from celery import current_app

    from msc3870.beat import TickingDatabaseScheduler

    Heartbeat.objects.all().delete()
    scheduler = TickingDatabaseScheduler(app=current_app, lazy=True)
    scheduler.setup_schedule()
    interval = scheduler.tick()
    assert interval <= heartbeat.TICK_SECONDS
    assert Heartbeat.objects.filter(name="beat").exists()


def test_an_unwritable_media_directory_is_down(tmp_path: Any) -> None:
    from django.core.files.storage import FileSystemStorage

    from msc3870.stores.local import LocalMediaStore

    store = LocalMediaStore(FileSystemStorage(location=str(tmp_path / "data" / "media")))
    store.probe(1)  # missing, but an ancestor is writable: made on the first upload
    (tmp_path / "data").write_bytes(b"a file where the directory should be")
    with pytest.raises(PermissionError):
        store.probe(1)
