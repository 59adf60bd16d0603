"""SQLite for the many threads of a web process: one writer at a time inside the process.

SQLite lets one connection write at a time; the others retry through its busy handler,
which sleeps 1, 2, 5, 10, 15, 20, 25 ... ms between tries whatever the lock's real hold
time (about 0.1 ms here). With eight threads writing, those sleeps are the tail latency
of concurrent uploads. Here the threads of one process queue on a lock of the process
instead, and are handed it the moment it is free; across processes SQLite's own lock
still decides (so there are at most as many contenders as processes). The lock is taken
for a transaction (``BEGIN``, held until commit or rollback) or for one writing
statement in autocommit mode, through Django's documented execute wrappers. Waiting for it
is bounded: past ``LOCK_TIMEOUT`` the statement goes on without it, and SQLite's own
locking keeps it correct.
"""

from __future__ import annotations

import threading
from typing import Any

from django.db.backends.sqlite3 import base

WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")
LOCK_TIMEOUT = 30.0

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(name, threading.Lock())


class DatabaseWrapper(base.DatabaseWrapper):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writer_lock = _lock_for(str(self.settings_dict["NAME"]))
        self._holding_writer_lock = False
        self.execute_wrappers.append(self._one_writer_at_a_time)

    def _acquire(self) -> bool:
        self._holding_writer_lock = self._writer_lock.acquire(timeout=LOCK_TIMEOUT)
        return self._holding_writer_lock

    def _release(self) -> None:
        if self._holding_writer_lock:
            self._holding_writer_lock = False
            self._writer_lock.release()

    def _one_writer_at_a_time(
        self, execute: Any, sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        if self._holding_writer_lock:
            return execute(sql, params, many, context)
        head = sql.lstrip()[:8].upper()
        if head.startswith("BEGIN"):
            self._acquire()  # held until the transaction ends (_commit, _rollback, _close)
            try:
                return execute(sql, params, many, context)
            except BaseException:
                self._release()
                raise
        if head.startswith(WRITES) and not self.in_atomic_block:
            self._acquire()
            try:
                return execute(sql, params, many, context)
            finally:
                self._release()
        return execute(sql, params, many, context)

    def _commit(self) -> None:
        try:
            super()._commit()
        finally:
            self._release()

    def _rollback(self) -> None:
        try:
            super()._rollback()
        finally:
            self._release()

    def _close(self) -> None:
        try:
            super()._close()
        finally:
            self._release()
