"""mediarepo/balance.py: the workers' shared table of open connections."""

from __future__ import annotations

import os

import pytest

from mediarepo.balance import ConnectionTable


def table_of(counts: list[int]) -> list[ConnectionTable]:
    """One table, seen from each of ``len(counts)`` workers holding those counts."""
    shared = ConnectionTable(slots=8)
    views = []
    for pid, count in enumerate(counts, start=1000):
        view = ConnectionTable.__new__(ConnectionTable)
        view.__dict__.update(shared.__dict__)
        view.join(pid)
        for _ in range(count):
            view.opened()
        views.append(view)
    return views


@pytest.mark.parametrize(
    ("counts", "over"),
    [
        ([8, 8], [False, False]),
        ([9, 7], [False, False]),  # within the mean + 1
        ([10, 6], [True, False]),
        ([15, 1], [True, False]),
        ([16, 0], [True, False]),
        ([5, 5, 5], [False, False, False]),
        ([7, 4, 4], [True, False, False]),
        ([3], [False]),  # a lone worker never closes
        ([0, 0], [False, False]),
    ],
)
def test_a_worker_is_over_its_share_past_the_mean_plus_one(
    counts: list[int], over: list[bool]
) -> None:
    assert [view.over_share() for view in table_of(counts)] == over


def test_closed_connections_and_exited_workers_leave_the_count() -> None:
    busy, idle = table_of([10, 6])
    assert busy.over_share()
    busy.closed()
    assert busy.over_share()  # 9 against 6: over 7.5 + 1
    busy.closed()
    assert not busy.over_share()  # 8 against 6
    idle.leave(1001)  # the master frees the exited worker's slot
    assert not busy.over_share()  # alone now
    replacement = ConnectionTable.__new__(ConnectionTable)
    replacement.__dict__.update(busy.__dict__)
    replacement.join(1002)  # takes the freed slot, with no connections
    assert busy.over_share()
    for _ in range(20):
        idle.closed()  # never below zero, and never another worker's count
    assert replacement.over_share() is False


def test_a_table_outside_gunicorn_never_closes_anything() -> None:
    table = ConnectionTable(slots=2)  # never joined
    table.opened()
    assert table.over_share() is False


def test_the_table_is_shared_with_forked_workers() -> None:
    table = ConnectionTable(slots=4)
    pid = os.fork()
    if pid == 0:  # the worker
        table.join()
        for _ in range(5):
            table.opened()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    table.join()
    assert table.over_share() is False  # this one holds 0 of 5
    for _ in range(9):
        table.opened()
    assert table.over_share() is True  # 9 of 14, over 7 + 1
