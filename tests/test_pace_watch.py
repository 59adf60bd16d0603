"""PaceWatch: one timer for a streamed body, moved on by the bytes that arrive."""

from __future__ import annotations

import asyncio

from msc3870.admission import BodyPace
from msc3870.pace_watch import PaceWatch

from .helpers import msc3870_settings

IDLE = 0.5


def watched(pace_seconds: float, feed_every: float | None, hold: bool = False) -> bool:
    """Whether a task that waits ``pace_seconds`` is cancelled by its watch (bytes fed
    every ``feed_every`` s; ``hold``: the server is not receiving)."""

    async def scenario() -> bool:
        loop = asyncio.get_running_loop()
        with msc3870_settings(UPLOAD_IDLE_TIMEOUT_SECONDS=IDLE, UPLOAD_MIN_BYTES_PER_SECOND=0):
            pace = BodyPace(loop.time())
        waiting = asyncio.ensure_future(asyncio.sleep(pace_seconds))
        watch = PaceWatch(pace, waiting)  # type: ignore[arg-type]
        if hold:
            watch.hold()
        while not waiting.done():
            await asyncio.wait([waiting], timeout=feed_every)
            if feed_every:
                pace.arrived(1, loop.time())
        watch.stop()
        assert watch.expired == waiting.cancelled()
        return watch.expired

    return asyncio.run(scenario())


def test_a_body_that_stops_arriving_is_cancelled_at_its_deadline() -> None:
    assert watched(pace_seconds=10.0, feed_every=None) is True


def test_bytes_that_keep_arriving_move_the_deadline_on() -> None:
    # Four idle timeouts long, with bytes every tenth of one: never expires.
    assert watched(pace_seconds=4 * IDLE, feed_every=IDLE / 10) is False


def test_no_deadline_runs_while_the_server_holds_the_body() -> None:
    assert watched(pace_seconds=4 * IDLE, feed_every=None, hold=True) is False
