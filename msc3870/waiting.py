"""Answers that depend on a media row changing state, and how a request waits for them.

A service that cannot answer yet (a download of media still uploading, a ``/complete``
whose checks are still running) raises ``MediaWait``: "ask ``resume`` again once row
``pk`` has left ``state``, or once ``deadline`` has passed". It never sleeps itself.

Who waits depends on the server:
- under ``msc3870.asgi.MediaASGIHandler`` the request is parked on the event loop's
  wake-up hub (``msc3870.wakeup``): no thread, no database connection;
- anywhere else (WSGI, Django's test client) ``block_until_answered`` polls the row from
  the calling thread, as a plain synchronous server must.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

#: Waits are counted in classes, each with its own caps (``msc3870.asgi``).
AUTHENTICATED = "authenticated"
LEGACY = "legacy"  # unauthenticated /_matrix/media/v3 reads: lower caps


@dataclass(frozen=True)
class Deadline:
    """A point on the monotonic clock."""

    at: float

    @classmethod
    def after_ms(cls, milliseconds: float) -> Deadline:
        return cls(time.monotonic() + milliseconds / 1000)

    @classmethod
    def after_seconds(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    @property
    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.at


class MediaWait(Exception, Generic[T]):
    """The answer depends on media row ``pk`` leaving ``state`` (one state, or several
    that all mean "not yet": a download waits through PENDING and PROCESSING alike, so
    the start of an upload does not wake it for nothing).

    ``resume(row)`` computes the answer from a fresh copy of the row (None if the row is
    gone); it may raise ``MediaWait`` again (the row moved on to another state that is
    still not an answer) or a ``MatrixError``.
    """

    def __init__(
        self,
        pk: int,
        state: str | Iterable[str],
        deadline: Deadline,
        resume: Callable[[Any], T],
    ) -> None:
        self.states = frozenset([state] if isinstance(state, str) else state)
        super().__init__(f"waiting for media {pk} to leave {sorted(self.states)}")
        self.pk = pk
        self.deadline = deadline
        self.resume = resume
        self.kind = AUTHENTICATED
        #: Who waits (a Matrix user, or an address): capped per requester.
        self.requester = ""
        #: Waits with equal keys woken by the same change get the same successful answer,
        #: rendered once (a view sets it from everything its rendering depends on).
        self.share_key: Hashable | None = None

    def then(
        self,
        render: Callable[[T], Any],
        *,
        kind: str | None = None,
        share_key: Hashable = None,
        requester: str | None = None,
    ) -> MediaWait[Any]:
        """The same wait, with ``render`` applied to its answer (views add the HTTP part)."""

        # Hold the inner resume, not this exception: its traceback holds the frames (and
        # the request) that raised it, for as long as the request waits.
        inner = self.resume
        kind = kind or self.kind
        requester = self.requester if requester is None else requester

        def resume(row: Any) -> Any:
            try:
                return render(inner(row))
            except MediaWait as again:
                raise again.then(
                    render, kind=kind, share_key=share_key, requester=requester
                ) from None

        wait: MediaWait[Any] = MediaWait(self.pk, self.states, self.deadline, resume)
        wait.kind = kind
        wait.share_key = share_key
        wait.requester = requester
        return wait


class RetryWhenDone(Exception):
    """The request cannot be decided until ``future`` (work running off the request
    threads, such as fetching another server's keys) is done. The server parks it until
    then or until ``deadline``, holding no thread, and runs it again from the start."""

    def __init__(
        self, future: Future[Any], deadline: Deadline, *, requester: str, kind: str = LEGACY
    ) -> None:
        super().__init__("waiting for work off the request threads")
        self.future = future
        self.deadline = deadline
        self.requester = requester
        self.kind = kind


def fetch_row(pk: int) -> Any:
    from .models import Media

    return Media.objects.filter(pk=pk).first()


def block_until_answered(wait: MediaWait[T]) -> T:
    """The synchronous fallback: poll the row from this thread (20 ms rising to 0.5 s)."""
    delay = 0.02
    while True:
        row = fetch_row(wait.pk)
        if row is None or row.state not in wait.states or wait.deadline.passed:
            try:
                return wait.resume(row)
            except MediaWait as again:
                wait = again
                continue
        time.sleep(min(delay, max(wait.deadline.remaining, 0.001)))
        delay = min(delay * 1.5, 0.5)
