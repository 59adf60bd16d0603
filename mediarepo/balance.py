"""Keep-alive connections spread evenly over the web workers.

gunicorn's workers share one listening socket, and a uvicorn worker accepts every
connection waiting when it wakes. A burst of new keep-alive connections (a reverse proxy's
upstream pool, many clients at once) can so land on one worker and stay there while the
others idle: one worker saturated, the others idle, the whole slower.

So each worker counts its open connections in a table in memory shared by all of them
(made by gunicorn's master before it forks them). A worker holding more than its share
(the mean over the workers, plus one) closes a connection after its next answer
(``Connection: close``); the client reconnects, and the connection is accepted by
whichever worker reaches the socket first, usually a less busy one. Answers are never
cut short: only an idle keep-alive connection goes. Outside gunicorn (tests, a plain
uvicorn) there is no table and nothing is closed.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
from typing import Any

#: Workers the table can hold (one per core is the default; an exited worker's slot is
#: freed for its replacement).
SLOTS = 64


class ConnectionTable:
    """One slot per worker, ``(pid, open connections)`` as two C ints, in shared memory.

    A slot's pid is written by its worker when it starts (under the lock) and cleared by
    the master when the worker exits; its count only by its worker's event loop thread,
    so no lock is needed to update or read counts (a read may be one update behind)."""

    def __init__(self, slots: int = SLOTS) -> None:
        self._memory = mmap.mmap(-1, slots * 8)
        self._ints = memoryview(self._memory).cast("i")
        self._slots = slots
        self._lock = multiprocessing.Lock()
        self._mine: int | None = None

    def join(self, pid: int | None = None) -> None:
        """Claim a free slot for this worker (after the fork)."""
        pid = pid or os.getpid()
        with self._lock:
            for slot in range(self._slots):
                if self._ints[2 * slot] == 0:
                    self._ints[2 * slot] = pid
                    self._ints[2 * slot + 1] = 0
                    self._mine = slot
                    return
        # More workers than slots: this one takes no part (and never closes anything).

    def leave(self, pid: int) -> None:
        """Free the slot of a worker that exited (in the master)."""
        with self._lock:
            for slot in range(self._slots):
                if self._ints[2 * slot] == pid:
                    self._ints[2 * slot] = 0
                    self._ints[2 * slot + 1] = 0

    def opened(self) -> None:
        if self._mine is not None:
            self._ints[2 * self._mine + 1] += 1

    def closed(self) -> None:
        if self._mine is not None and self._ints[2 * self._mine + 1] > 0:
            self._ints[2 * self._mine + 1] -= 1

    def over_share(self) -> bool:
        """Whether this worker holds more connections than the mean of the workers + 1."""
        if self._mine is None:
            return False
        ints = self._ints.tolist()
        workers = sum(1 for pid in ints[0::2] if pid)
        total = sum(ints[1::2])
        mine = ints[2 * self._mine + 1]
        return workers > 1 and mine * workers > total + workers


#: This server's table (made in gunicorn's master by mediarepo/gunicorn.conf.py).
table: ConnectionTable | None = None


def install() -> ConnectionTable:
    """Made in the master, before the workers are forked."""
    global table
    table = ConnectionTable()
    return table


def worker_started(worker: Any) -> None:
    if table is not None:
        table.join(worker.pid)


def worker_exited(worker: Any) -> None:
    if table is not None:
        table.leave(worker.pid)
