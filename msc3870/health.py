"""The health of what this process depends on, for load balancers and monitoring.

``GET /health`` (and ``/healthz``, matrix-media-repo's spelling) answers 200 with each
component's state, or 503 naming those that are down:

- ``database``: a query on the database (the one that also reads beat's last tick);
- ``storage``: the media store answers (S3: ``HeadBucket``; local disk: the directory is
  there and writable);
- ``broker``: when one is configured, a connection to it, and how many tasks wait in
  the queue;
- ``beat``: the periodic scheduler (celery beat, or the in-process one without a broker)
  records a tick in the database every few seconds (``msc3870.heartbeat``); it is down when
  the last tick read is older than ``HEALTH_BEAT_MAX_AGE_SECONDS``, or when none was.

Cheap enough for a load balancer every second, and fast while a component hangs:
- each process keeps the last result of each probe for ``HEALTH_CACHE_SECONDS`` and
  answers from it; a probe older than that is started again, and the answer meanwhile is
  the last result (the first request of a process, with none yet, waits for it);
- probes run on this module's own threads, at most one per component at a time, never
  on the request threads, each with timeouts of its own; a probe running longer than
  ``HEALTH_TIMEOUT_SECONDS`` makes its component "timed out" at once, without waiting;
- a request that must wait (no result yet) is parked on the event loop holding no thread
  (``RetryWhenDone``), for at most ``HEALTH_TIMEOUT_SECONDS``.

Clients get fixed words ("timed out", "unreachable", "error"); the detail goes to the log
when a component goes down (and a line when it is back), not on every probe.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.utils import timezone

from . import metrics
from .conf import app_settings
from .errors import Codes
from .heartbeat import BEAT

log = logging.getLogger(__name__)

COMPONENTS = ("database", "storage", "broker", "beat")


@dataclass(frozen=True)
class Result:
    """One probe's answer: ``detail`` goes into the component's JSON (beside ``ok``)."""

    ok: bool
    error: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    #: When it was learnt (monotonic clock).
    at: float = 0.0
    #: The database probe's reading of beat's last tick.
    tick: datetime | None = None


Probe = Callable[[], Result]


def reason(exc: BaseException) -> str:
    """The fixed words a client is told about a failed probe."""
    name = " ".join(kind.__name__.lower() for kind in type(exc).__mro__)
    if isinstance(exc, TimeoutError) or "timeout" in name:
        return "timed out"
    # A database driver's OperationalError: the server is not there (or not answering).
    if isinstance(exc, ConnectionError | OSError) or "connection" in name or "operational" in name:
        return "unreachable"
    return "error"


class _Component:
    __slots__ = ("name", "probe", "result", "running", "started")

    def __init__(self, name: str, probe: Probe) -> None:
        self.name = name
        self.probe = probe
        self.result: Result | None = None
        self.running: Future[Result] | None = None
        self.started = 0.0


@dataclass
class Report:
    components: dict[str, dict[str, Any]]

    @property
    def down(self) -> list[str]:
        return [name for name, state in self.components.items() if not state["ok"]]

    @property
    def ok(self) -> bool:
        return not self.down

    def body(self) -> dict[str, Any]:
        if self.ok:
            return {"status": "ok", "components": self.components}
        down = self.down
        return {
            # Matrix's error shape, beside the report: a 503 is an error like any other.
            "errcode": Codes.UNKNOWN.value,
            "error": "Unhealthy: " + ", ".join(down),
            "status": "down",
            "down": down,
            "components": self.components,
        }


class HealthMonitor:
    """The probes of one process and their last results. ``probes``: the functions of
    the probed components (``database``, ``storage``, ``broker``); ``beat`` is judged
    from what the database probe read."""

    def __init__(
        self,
        probes: dict[str, Probe] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        own = _Probes()
        probes = probes or {
            "database": own.database,
            "storage": own.storage,
            "broker": own.broker,
        }
        self._probes = own
        self._components = {name: _Component(name, probe) for name, probe in probes.items()}
        self._pool = ThreadPoolExecutor(len(self._components), thread_name_prefix="msc3870-health")
        self._last_tick: datetime | None = None

    # ------------------------------------------------------------------ public

    def reported(self) -> list[str]:
        """The components answered for, in order: the configured ones, the broker only
        where there is one."""
        wanted = app_settings.HEALTH_COMPONENTS
        return [
            name
            for name in COMPONENTS
            if name in wanted and (name != "broker" or broker_configured())
        ]

    def refresh(self) -> Future[None] | None:
        """Start the probes whose result is older than ``HEALTH_CACHE_SECONDS`` (none
        runs twice at once); a future done once every component has a result, or None if
        each already has one (or has been probed too long to wait for)."""
        now = self._clock()
        waiting: list[Future[Result]] = []
        with self._lock:
            for component in self._probed():
                result = component.result
                if component.running is None and (
                    result is None or now - result.at > app_settings.HEALTH_CACHE_SECONDS
                ):
                    component.started = now
                    component.running = self._pool.submit(self._run, component)
                if (
                    result is None
                    and component.running is not None
                    and now - component.started <= app_settings.HEALTH_TIMEOUT_SECONDS
                ):
                    waiting.append(component.running)
        return _all_done(waiting) if waiting else None

    def report(self) -> Report:
        """Each reported component's state now: its last result, or "timed out" if its
        probe has run longer than ``HEALTH_TIMEOUT_SECONDS`` (or has no result yet)."""
        now = self._clock()
        states: dict[str, dict[str, Any]] = {}
        with self._lock:
            for name in self.reported():
                if name == "beat":
                    states[name] = self._beat()
                    continue
                component = self._components.get(name)
                if component is None:
                    continue
                result = component.result
                hung = (
                    component.running is not None
                    and now - component.started > app_settings.HEALTH_TIMEOUT_SECONDS
                )
                if hung or result is None:
                    states[name] = {"ok": False, "error": "timed out"}
                elif result.ok:
                    states[name] = {"ok": True, **result.detail}
                else:
                    states[name] = {"ok": False, "error": result.error}
        for name, state in states.items():
            metrics.COMPONENT_UP.labels(name).set(1 if state["ok"] else 0)
        return Report(states)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._probes.close()

    # ------------------------------------------------------------------ probes

    def _probed(self) -> list[_Component]:
        reported = self.reported()
        names = set(reported)
        if "beat" in names:
            names.add("database")  # beat's tick is read by the database probe
        return [c for name, c in self._components.items() if name in names]

    def _run(self, component: _Component) -> Result:
        started = time.perf_counter()
        try:
            result = component.probe()
        except Exception as exc:
            result = Result(ok=False, error=reason(exc))
            detail = f"{type(exc).__name__}: {exc}"
        else:
            detail = result.error
        if result.ok:
            ms = round((time.perf_counter() - started) * 1000, 1)
            result = Result(True, detail={"ms": ms, **result.detail}, tick=result.tick)
        result = Result(result.ok, result.error, result.detail, self._clock(), result.tick)
        with self._lock:
            previous = component.result
            component.result = result
            component.running = None
            if component.name == "database" and result.ok:
                self._last_tick = result.tick
        if result.ok and previous is not None and not previous.ok:
            log.warning("Health: %s is back", component.name)
        elif not result.ok and (previous is None or previous.ok):
            log.warning("Health: %s is down: %s", component.name, detail)
        return result

    def _beat(self) -> dict[str, Any]:
        tick = self._last_tick
        if tick is None:
            return {"ok": False, "error": "no tick recorded"}
        metrics.BEAT_LAST_TICK.set(tick.timestamp())
        age = max(0.0, (timezone.now() - tick).total_seconds())
        state: dict[str, Any] = {
            "ok": age <= app_settings.HEALTH_BEAT_MAX_AGE_SECONDS,
            "last_tick": tick.isoformat(),
            "age_seconds": round(age, 1),
        }
        if not state["ok"]:
            state["error"] = "no recent tick"
        return state


def _all_done(futures: list[Future[Result]]) -> Future[None]:
    done: Future[None] = Future()
    remaining = len(futures)
    lock = threading.Lock()

    def one_done(_: Future[Result]) -> None:
        nonlocal remaining
        with lock:
            remaining -= 1
            last = remaining == 0
        if last:
            done.set_result(None)

    for future in futures:
        future.add_done_callback(one_done)
    return done


def broker_configured() -> bool:
    from .verdicts import screens_in_request

    return not screens_in_request()


class _Probes:
    """The probes, each with timeouts of its own, keeping their connections between runs
    (a probe every second or two per process must not open one each time)."""

    def __init__(self) -> None:
        self._pg: Any = None
        self._broker: Any = None

    def database(self) -> Result:
        from django.db import connections

        from .models import Heartbeat

        if connections["default"].vendor == "postgresql":
            return Result(True, tick=self._postgresql_tick())
        tick = Heartbeat.objects.filter(name=BEAT).values_list("at", flat=True).first()
        return Result(True, tick=tick)

    def _postgresql_tick(self) -> datetime | None:
        """On a connection of the probe's own: Django's connects with no timeout."""
        import psycopg

        from .models import Heartbeat
        from .wakeup import connection_params

        timeout = app_settings.HEALTH_TIMEOUT_SECONDS
        connection = self._pg
        if connection is None or connection.closed:
            connection = psycopg.connect(
                **connection_params(),
                autocommit=True,
                connect_timeout=max(2, math.ceil(timeout)),  # libpq's least
                # A server that stops answering mid-query frees the thread this soon.
                tcp_user_timeout=int(timeout * 1000) + 1000,
            )
            connection.execute(f"SET statement_timeout = {int(timeout * 1000)}")
            self._pg = connection
        table = Heartbeat._meta.db_table
        try:
            row = connection.execute(
                f'SELECT "at" FROM "{table}" WHERE "name" = %s', [BEAT]
            ).fetchone()
        except Exception:
            connection.close()
            self._pg = None
            raise
        return row[0] if row else None

    def storage(self) -> Result:
        from .stores import get_store

        get_store().probe(app_settings.HEALTH_TIMEOUT_SECONDS)
        return Result(True)

    def broker(self) -> Result:
        from celery import current_app

        connection = self._broker
        try:
            if connection is None:
                connection = self._broker = current_app.connection_for_write(
                    connect_timeout=app_settings.HEALTH_TIMEOUT_SECONDS
                )
                connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
            queue = current_app.conf.task_default_queue
            try:
                _, depth, _ = connection.default_channel.queue_declare(queue=queue, passive=True)
            except connection.channel_errors:
                # No such queue yet: no worker declared it, nothing was ever queued.
                depth = 0
                connection.release()
                self._broker = None
        except Exception:
            if connection is not None:
                connection.release()
            self._broker = None
            raise
        metrics.QUEUE_DEPTH.labels(queue).set(depth)
        return Result(True, detail={"queue_depth": depth})

    def close(self) -> None:
        for connection in (self._pg, self._broker):
            if connection is not None:
                try:
                    connection.close()
                except Exception:
                    log.debug("closing a probe's connection failed", exc_info=True)
        self._pg = self._broker = None


_monitor: HealthMonitor | None = None
_monitor_lock = threading.Lock()


def monitor() -> HealthMonitor:
    """This process's monitor, made on first use."""
    global _monitor
    with _monitor_lock:
        if _monitor is None:
            _monitor = HealthMonitor()
        return _monitor


def reset(replacement: HealthMonitor | None = None) -> None:
    """Drop this process's monitor (tests), or put another in its place."""
    global _monitor
    with _monitor_lock:
        if _monitor is not None:
            _monitor.close()
        _monitor = replacement
