"""The per-process wake-up hub: requests waiting on a media row await it on the event loop.

A waiting request registers ``(pk, the state it saw)`` and awaits a future; it holds no
thread and no database connection. The hub learns of state changes from:
- this process's own transitions (``announce``, called by ``msc3870.lifecycle`` once the
  change is committed): woken at once;
- on PostgreSQL, ``LISTEN msc3870_media`` (a trigger NOTIFYs every state change, from any
  process or worker: migration 0003), on one connection per process;
- on other databases with ``WAKEUP_REDIS_URL`` set, Redis pub/sub on the same channel
  name: ``announce`` publishes every committed transition there (from web processes and
  celery workers alike), and each web process subscribes;
- a poll: one batched query per tick for every row waited on in this process. It is the
  only source on other databases (SQLite: ``WAKEUP_POLL_SECONDS``), and the slow safety
  net behind LISTEN (``WAKEUP_SAFETY_POLL_SECONDS``) so that a lost notification, or a
  listener that reconnects, never strands a waiter.

Requests woken by one change share one fetch of the row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from functools import partial
from typing import Any

from .conf import app_settings
from .waiting import fetch_row

log = logging.getLogger(__name__)

CHANNEL = "msc3870_media"
# How long a change is remembered: a waiter that registers just after the change it
# waits for (its row was read before the change, the future made after) is woken at once.
RECENT_SECONDS = 10.0
# Rows per batched poll query (well under every database's parameter limit).
POLL_BATCH = 500

_hub: WakeupHub | None = None
_hub_lock = threading.Lock()


def announce(pk: int, state: str) -> None:
    """A transition of this process committed: wake its waiters now (thread-safe, cheap
    when there is no hub, as in a celery worker), and other processes' through Redis
    where that is the push source."""
    announce_many([pk], state)


def announce_many(pks: list[int], state: str) -> None:
    hub = _hub
    if hub is not None:
        for pk in pks:
            hub.notify_threadsafe(pk, state)
    if pks and _redis_is_the_push_source():
        _publish(pks, state)


def _redis_is_the_push_source() -> bool:
    # On PostgreSQL the trigger already tells everyone; Redis would only repeat it.
    return bool(app_settings.WAKEUP_REDIS_URL) and _database_vendor() != "postgresql"


_publishers: dict[str, Any] = {}


def _publish(pks: list[int], state: str) -> None:
    """Best effort: a lost message is found by the safety poll."""
    import redis

    url = app_settings.WAKEUP_REDIS_URL
    try:
        client = _publishers.get(url)  # type: ignore[arg-type]
        if client is None:
            client = _publishers[url] = redis.Redis.from_url(  # type: ignore[arg-type]
                url, socket_connect_timeout=1, socket_timeout=1
            )
        with client.pipeline(transaction=False) as pipe:
            for pk in pks:
                pipe.publish(CHANNEL, f"{pk}:{state}")
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("Could not publish media state changes to Redis: %s", exc)


def current_hub() -> WakeupHub | None:
    return _hub


def install_hub(loop: asyncio.AbstractEventLoop, executor: Executor) -> WakeupHub:
    """The hub of this process, made on first use on the server's event loop."""
    global _hub
    with _hub_lock:
        if _hub is None or _hub.loop is not loop:
            _hub = WakeupHub(loop, executor)
        return _hub


def _fetch_states(pks: list[int]) -> dict[int, str]:
    from .models import Media

    states: dict[int, str] = {}
    for start in range(0, len(pks), POLL_BATCH):
        batch = pks[start : start + POLL_BATCH]
        states.update(Media.objects.filter(pk__in=batch).values_list("pk", "state"))
    return states


class Parked:
    """One parked request. ``future`` resolves to a fresh copy of row ``pk`` (None if the
    row is gone) once the row is in none of ``states``, or once the timeout has passed;
    it is cancelled if the request stops waiting (``WakeupHub.unpark``).

    A plain future and a timer, not a task: thousands are parked at once, and every
    object each of them holds is one more for the garbage collector to scan."""

    __slots__ = ("future", "pk", "states", "timer")

    def __init__(self, pk: int, states: frozenset[str], future: asyncio.Future[Any]) -> None:
        self.pk = pk
        self.states = states
        self.future = future
        self.timer: asyncio.TimerHandle | None = None


class WakeupHub:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        executor: Executor,
        *,
        fetch_states: Callable[[list[int]], dict[int, str]] = _fetch_states,
        fetch_row: Callable[[int], Any] = fetch_row,
    ) -> None:
        self.loop = loop
        self.executor = executor
        self._fetch_states = fetch_states
        self._fetch_row = fetch_row
        # Per row, its parked requests in arrival order (a dict: removal is O(1)).
        self._waiters: dict[int, dict[Parked, None]] = {}
        self._recent: dict[int, tuple[str, float]] = {}
        # Per row, the woken requests that the running fetch of it will answer.
        self._deliveries: dict[int, list[Parked]] = {}
        self._poke = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.listening = False  # a push source (LISTEN) is connected
        self.polls = 0  # batched poll queries run (tests and benchmarks read it)

    # ------------------------------------------------------------------ waiting

    @property
    def waiting(self) -> int:
        return sum(len(waiters) for waiters in self._waiters.values())

    def park(self, pk: int, states: str | frozenset[str], timeout: float) -> Parked:
        """Park a request until row ``pk`` is in none of ``states`` (or ``timeout``
        seconds): await ``.future`` for the fresh row; ``unpark`` when no longer waiting."""
        self._start()
        states = frozenset([states]) if isinstance(states, str) else states
        parked = Parked(pk, states, self.loop.create_future())
        recent = self._recent.get(pk)
        if recent is not None and recent[0] not in states:
            self._deliver(parked)  # it changed between the read and this park
            return parked
        self._waiters.setdefault(pk, {})[parked] = None
        parked.timer = self.loop.call_later(max(timeout, 0.0), self._wake, parked)
        self._poke.set()  # a poll source with nothing to do sleeps until poked
        return parked

    def unpark(self, parked: Parked) -> None:
        """The request no longer waits (its client went away): forget it. Idempotent."""
        self._forget(parked)
        if not parked.future.done():
            parked.future.cancel()

    async def wait_for_change(self, pk: int, states: str | frozenset[str], timeout: float) -> Any:
        """``park``, then the fresh row (None if it is gone)."""
        parked = self.park(pk, states, timeout)
        try:
            return await parked.future
        finally:
            self.unpark(parked)

    def _forget(self, parked: Parked) -> None:
        if parked.timer is not None:
            parked.timer.cancel()
            parked.timer = None
        waiters = self._waiters.get(parked.pk)
        if waiters is not None and parked in waiters:
            del waiters[parked]
            if not waiters:
                del self._waiters[parked.pk]

    def _wake(self, parked: Parked) -> None:
        self._forget(parked)
        self._deliver(parked)

    def _deliver(self, parked: Parked) -> None:
        """Answer with the row, read once for every request woken while the read runs."""
        batch = self._deliveries.get(parked.pk)
        if batch is None:
            batch = self._deliveries[parked.pk] = []
            fetch = self.loop.run_in_executor(self.executor, self._fetch_row, parked.pk)
            fetch.add_done_callback(partial(self._delivered, parked.pk))
        batch.append(parked)

    def _delivered(self, pk: int, fetch: asyncio.Future[Any]) -> None:
        waiting = [p.future for p in self._deliveries.pop(pk, []) if not p.future.done()]
        for future in waiting:
            if fetch.cancelled():
                future.cancel()
            elif (error := fetch.exception()) is not None:
                future.set_exception(error)
            else:
                future.set_result(fetch.result())

    # ------------------------------------------------------------------ changes

    def notify(self, pk: int, state: str) -> None:
        """Row ``pk`` is now in ``state``: wake those waiting for it to leave theirs."""
        self._recent[pk] = (state, time.monotonic())
        waiters = self._waiters.get(pk)
        if waiters:
            for parked in [p for p in waiters if state not in p.states]:
                self._wake(parked)

    def notify_threadsafe(self, pk: int, state: str) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self.loop.call_soon_threadsafe(self.notify, pk, state)

    def _prune_recent(self) -> None:
        horizon = time.monotonic() - RECENT_SECONDS
        for pk in [pk for pk, (_, at) in self._recent.items() if at < horizon]:
            del self._recent[pk]

    # ------------------------------------------------------------------ sources

    def push_sources(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        """Where notifications come from besides the poll (and this process's own)."""
        if _database_vendor() == "postgresql" and app_settings.WAKEUP_LISTEN:
            return [self._listen_loop]
        if _redis_is_the_push_source():
            return [self._redis_loop]
        return []

    def _start(self) -> None:
        if self._tasks:
            return
        self._tasks.append(self.loop.create_task(self._poll_loop()))
        for source in self.push_sources():
            self._tasks.append(self.loop.create_task(source()))

    async def poll_once(self) -> None:
        pks = list(self._waiters)
        if not pks:
            return
        self.polls += 1
        states = await self.loop.run_in_executor(self.executor, self._fetch_states, pks)
        for pk in pks:
            state = states.get(pk)
            if state is None:  # the row is gone: wake its waiters to say so
                for parked in list(self._waiters.get(pk, ())):
                    self._wake(parked)
            else:
                self.notify(pk, state)

    async def _poll_loop(self) -> None:
        while True:
            interval = (
                app_settings.WAKEUP_SAFETY_POLL_SECONDS
                if self.listening
                else app_settings.WAKEUP_POLL_SECONDS
            )
            if not self._waiters:
                self._poke.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poke.wait(), RECENT_SECONDS)
            await asyncio.sleep(interval)
            try:
                await self.poll_once()
            except Exception:
                log.exception("Wake-up poll failed; retrying")
            self._prune_recent()

    async def _listen_loop(self) -> None:
        import psycopg

        backoff = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    **connection_params(), autocommit=True
                ) as connection:
                    await connection.execute(f"LISTEN {CHANNEL}")
                    self.listening = True
                    backoff = 0.5
                    # Changes made while not listening were not heard: look at every row.
                    await self.poll_once()
                    async for note in connection.notifies():
                        pk, _, state = note.payload.partition(":")
                        with contextlib.suppress(ValueError):
                            self.notify(int(pk), state)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("LISTEN %s lost (%s); polling until it is back", CHANNEL, exc)
            self.listening = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _redis_loop(self) -> None:
        import redis.asyncio

        backoff = 0.5
        while True:
            client = redis.asyncio.Redis.from_url(app_settings.WAKEUP_REDIS_URL)  # type: ignore[arg-type]
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    self.listening = True
                    backoff = 0.5
                    await self.poll_once()  # what changed while not subscribed
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        pk, _, state = message["data"].decode().partition(":")
                        with contextlib.suppress(ValueError):
                            self.notify(int(pk), state)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("Redis subscription lost (%s); polling until it is back", exc)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
            self.listening = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()


def _database_vendor() -> str:
    from django.db import connection

    return connection.vendor


def connection_params() -> dict[str, Any]:
    """psycopg connection parameters of the default database, as Django would connect."""
    from django.db import connections

    params = dict(connections["default"].get_connection_params())
    # Django-only keys (adapters context, cursor factory, pool) mean nothing here.
    for key in ("context", "cursor_factory", "prepare_threshold", "pool"):
        params.pop(key, None)
    return params
