"""SQLite for several web processes of many threads: one writer at a time, handed over.

SQLite lets one connection write at a time; the others retry through its busy handler,
which sleeps 1, 2, 5, 10, 15, 20, 25 ... ms between tries whatever the lock's real hold
time (about 0.1 ms here). With several threads and processes writing, those sleeps are the
tail latency of concurrent uploads. Here a writer first takes a lock of its process (the
process's threads queue on it), then an exclusive ``flock`` on ``<database>.writer-lock``
(one thread per process queues there): each is handed over the moment it is free, and
SQLite's own lock is then always free.

The locks are taken for a transaction (``BEGIN``, held until commit or rollback) or for
one writing statement in autocommit mode, through Django's documented execute wrappers.
Waiting for the process's lock is bounded: past ``LOCK_TIMEOUT`` the statement goes on
without either lock, and SQLite's own locking keeps it correct. The file lock is only
taken with the process's lock held, and the kernel releases it if its process dies.
"""

from __future__ import annotations

import fcntl
import os
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


# Per database and process (a descriptor inherited through fork would share its lock).
_lock_files: dict[tuple[str, int], int] = {}


def _lock_file_for(name: str) -> int | None:
    """The descriptor to ``flock`` for database ``name`` in this process (None for an
    in-memory database, which no other process sees). Called with the process's lock
    held, so never twice at once for one database."""
    if name in ("", ":memory:") or "mode=memory" in name:
        return None
    key = (name, os.getpid())
    descriptor = _lock_files.get(key)
    if descriptor is None:
        descriptor = os.open(f"{name}.writer-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        _lock_files[key] = descriptor
    return descriptor


class DatabaseWrapper(base.DatabaseWrapper):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writer_lock = _lock_for(str(self.settings_dict["NAME"]))
        self._holding_writer_lock = False
        self._holding_file_lock: int | None = None
        self.execute_wrappers.append(self._one_writer_at_a_time)

    def _acquire(self) -> bool:
        self._holding_writer_lock = self._writer_lock.acquire(timeout=LOCK_TIMEOUT)
        if self._holding_writer_lock:
            descriptor = _lock_file_for(str(self.settings_dict["NAME"]))
            if descriptor is not None:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX)
                except BaseException:
                    self._holding_writer_lock = False
                    self._writer_lock.release()
                    raise
                self._holding_file_lock = descriptor
        return self._holding_writer_lock

    def _release(self) -> None:
        if self._holding_writer_lock:
            self._holding_writer_lock = False
            descriptor, self._holding_file_lock = self._holding_file_lock, None
            try:
                if descriptor is not None:
                    fcntl.flock(descriptor, fcntl.LOCK_UN)
            finally:
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
