"""Redis pub/sub as the wake-up source (databases that cannot LISTEN), on a real Redis."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from msc3870 import wakeup
from msc3870.wakeup import WakeupHub

from ..helpers import msc3870_settings

pytestmark = pytest.mark.services


def test_a_change_published_by_another_process_wakes_waiters_without_a_poll() -> None:
    """The publisher side is ``wakeup.announce`` as any process (a celery worker, another
    web process) runs it; the subscriber is a hub whose polls are an hour apart, so only
    the Redis message can have woken the waiter."""
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")
    rows = {7: "pending"}
    executor = ThreadPoolExecutor(2)

    async def scenario() -> tuple[object, int]:
        hub = WakeupHub(
            asyncio.get_running_loop(),
            executor,
            fetch_states=lambda pks: {pk: rows[pk] for pk in pks},
            fetch_row=lambda pk: rows[pk],
        )
        hub.push_sources = lambda: [hub._redis_loop]  # type: ignore[method-assign]
        hub._start()
        while not hub.listening:
            await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(hub.wait_for_change(7, "pending", 30))
        while hub.waiting == 0:
            await asyncio.sleep(0.01)
        rows[7] = "complete"
        # Published from another thread, as a worker's commit would be.
        await asyncio.to_thread(wakeup._publish, [7], "complete")
        row = await asyncio.wait_for(waiting, 20)
        polls = hub.polls
        await hub.close()
        return row, polls

    with msc3870_settings(
        WAKEUP_REDIS_URL=url, WAKEUP_POLL_SECONDS=3600, WAKEUP_SAFETY_POLL_SECONDS=3600
    ):
        row, polls = asyncio.run(scenario())
    executor.shutdown()
    assert row == "complete"
    assert polls == 0  # woken by the message, not by a poll
