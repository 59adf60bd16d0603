"""One timer for a whole streamed body, however many messages it comes in.

A timeout around each ``receive()`` would schedule and cancel a timer for every chunk of
an upload (thousands for a large one, all on the event loop). ``PaceWatch`` arms one for
the body's deadline (``admission.BodyPace``); each message only moves that deadline, and
the timer, when it fires before the deadline as it now is, arms itself again for it. Once
the deadline has passed, it cancels the receiving task, which asks ``expired`` whether the
cancellation was the watch's.
"""

from __future__ import annotations

import asyncio

from .admission import BodyPace


class PaceWatch:
    def __init__(self, pace: BodyPace, task: asyncio.Task[object]) -> None:
        self._loop = task.get_loop()
        self._pace = pace
        self._task = task
        self._handle: asyncio.TimerHandle | None = None
        #: The deadline passed and the task was cancelled for it.
        self.expired = False
        self.resume()

    def hold(self) -> None:
        """The server itself stopped receiving (its reader is behind): no deadline runs
        until ``resume``; the pause is the server's, not the client's (``BodyPace.paused``)."""
        self._cancel_timer()

    def resume(self) -> None:
        if self._handle is None and not self.expired:
            self._handle = self._loop.call_at(self._pace.deadline(), self._check)

    def stop(self) -> None:
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        self._handle = None
        if self._loop.time() < self._pace.deadline():
            self.resume()  # bytes came since it was armed: the deadline moved on
            return
        self.expired = True
        self._task.cancel()
