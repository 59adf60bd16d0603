"""``tests/process_stack.py``, the process stack the services suite and the soak share:
what they rely on, on plain shell processes (no service needed)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import wait_until
from .process_stack import Processes, ProcessExited


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Processes]:
    running = Processes(env=dict(os.environ), logs=tmp_path)
    yield running
    running.stop_all()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is gone for this purpose.
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_kill_takes_the_children_with_it(stack: Processes) -> None:
    stack.spawn("parent", ["sh", "-c", "sleep 60 & sleep 60 & wait"], stack.env)
    children = wait_until(lambda: len(found := stack.child_pids("parent")) == 2 and found)
    parent = stack.processes["parent"]

    stack.kill("parent")

    assert parent.returncode is not None
    assert "parent" not in stack.processes
    wait_until(lambda: not any(alive(pid) for pid in children), 5, "the children to die")


def test_await_ready_waits_for_a_line_in_the_log_since_the_start(stack: Processes) -> None:
    (stack.logs / "worker.log").write_bytes(b"an earlier run: worker ready.\n")
    offset = stack.log_size("worker")
    stack.spawn("worker", ["sh", "-c", "sleep 0.3; echo 'worker ready.'; sleep 60"], stack.env)
    started = time.monotonic()

    stack.await_ready("worker", lambda: b"ready." in stack.logged_since("worker", offset), 10)

    assert time.monotonic() - started >= 0.3
    assert stack.exited() == {}


def test_a_process_that_exits_while_awaited_fails_at_once_with_its_log(
    stack: Processes,
) -> None:
    stack.spawn("server", ["sh", "-c", "echo 'cannot bind'; exit 3"], stack.env)
    started = time.monotonic()

    with pytest.raises(ProcessExited, match="server exited \\(3\\): cannot bind"):
        stack.await_ready("server", lambda: False, 30)

    assert time.monotonic() - started < 10
    assert stack.exited() == {"server": 3}


def test_a_process_that_never_gets_ready_times_out(stack: Processes) -> None:
    stack.spawn("slow", ["sleep", "60"], stack.env)

    with pytest.raises(TimeoutError, match="slow"):
        stack.await_ready("slow", lambda: False, 0.3)
