"""The wake-up hub on its own (msc3870.wakeup): parking, waking, sharing one read of the
row, timeouts and hang-ups, with the database replaced by a dict."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from msc3870.wakeup import WakeupHub

from .helpers import msc3870_settings


def run_with_hub(
    rows: dict[int, str], scenario: Callable[[WakeupHub, list[int]], Awaitable[Any]]
) -> Any:
    """``scenario(hub, reads)`` on a fresh loop; ``reads`` lists every row read."""
    reads: list[int] = []

    def fetch_row(pk: int) -> str | None:
        reads.append(pk)
        return rows.get(pk)

    async def main() -> Any:
        with ThreadPoolExecutor(2) as executor:
            hub = WakeupHub(
                asyncio.get_running_loop(),
                executor,
                fetch_states=lambda pks: {pk: rows[pk] for pk in pks if pk in rows},
                fetch_row=fetch_row,
            )
            try:
                return await scenario(hub, reads)
            finally:
                await hub.close()

    # Polls far apart: only notify() wakes anyone here.
    with msc3870_settings(WAKEUP_POLL_SECONDS=3600, WAKEUP_SAFETY_POLL_SECONDS=3600):
        return asyncio.run(main())


def test_many_parked_requests_hold_no_task_and_share_one_read_of_the_row() -> None:
    rows = {1: "pending"}

    async def scenario(hub: WakeupHub, reads: list[int]) -> None:
        hub._start()  # its own poll task, before counting
        tasks_before = len(asyncio.all_tasks())
        parked = [hub.park(1, "pending", 30) for _ in range(1000)]
        assert hub.waiting == 1000
        assert len(asyncio.all_tasks()) == tasks_before
        rows[1] = "complete"
        hub.notify(1, "complete")
        results = await asyncio.gather(*(p.future for p in parked))
        assert results == ["complete"] * 1000
        assert reads == [1]
        assert hub.waiting == 0

    run_with_hub(rows, scenario)


def test_a_change_to_another_waited_state_wakes_nobody() -> None:
    rows = {1: "pending"}

    async def scenario(hub: WakeupHub, reads: list[int]) -> None:
        parked = hub.park(1, frozenset({"pending", "processing"}), 30)
        hub.notify(1, "processing")
        await asyncio.sleep(0.05)
        assert not parked.future.done()
        rows[1] = "complete"
        hub.notify(1, "complete")
        assert await parked.future == "complete"

    run_with_hub(rows, scenario)


def test_a_timeout_answers_with_the_row_as_it_is() -> None:
    rows = {1: "pending"}

    async def scenario(hub: WakeupHub, reads: list[int]) -> None:
        parked = hub.park(1, "pending", 0.05)
        assert await asyncio.wait_for(parked.future, 5) == "pending"
        assert hub.waiting == 0

    run_with_hub(rows, scenario)


def test_unparking_forgets_the_request_and_cancels_its_future() -> None:
    rows = {1: "pending"}

    async def scenario(hub: WakeupHub, reads: list[int]) -> None:
        gone = hub.park(1, "pending", 30)
        stays = hub.park(1, "pending", 30)
        hub.unpark(gone)
        hub.unpark(gone)  # idempotent
        assert gone.future.cancelled()
        assert gone.timer is None
        assert hub.waiting == 1
        rows[1] = "complete"
        hub.notify(1, "complete")
        assert await stays.future == "complete"

    run_with_hub(rows, scenario)


def test_a_change_heard_before_parking_answers_at_once() -> None:
    """The row was read before the change, the request parks after it: woken at once."""
    rows = {1: "complete"}

    async def scenario(hub: WakeupHub, reads: list[int]) -> None:
        hub.notify(1, "complete")
        parked = hub.park(1, "pending", 30)
        assert hub.waiting == 0
        assert await asyncio.wait_for(parked.future, 5) == "complete"

    run_with_hub(rows, scenario)


def test_a_failed_read_of_the_row_reaches_every_request_it_would_answer() -> None:
    async def scenario(hub: WakeupHub, reads: list[int]) -> None:
        def broken(pk: int) -> Any:
            raise RuntimeError("database down")

        hub._fetch_row = broken
        parked = [hub.park(1, "pending", 30) for _ in range(3)]
        hub.notify(1, "complete")
        results = await asyncio.gather(*(p.future for p in parked), return_exceptions=True)
        assert [str(r) for r in results] == ["database down"] * 3

    run_with_hub({1: "pending"}, scenario)


def test_the_worker_freezes_start_up_objects_and_collects_young_ones_less_often() -> None:
    """mediarepo.server.tune_garbage_collector, in a process of its own."""
    code = (
        "import gc, os, django\n"
        "os.environ['DJANGO_SETTINGS_MODULE'] = 'mediarepo.settings'\n"
        "django.setup()\n"
        "from mediarepo.server import GC_YOUNG_THRESHOLD, tune_garbage_collector\n"
        "tune_garbage_collector()\n"
        "assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD, gc.get_threshold()\n"
        "assert gc.get_freeze_count() > 10000, gc.get_freeze_count()\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
