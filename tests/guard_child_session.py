"""A test session of its own, started by
``test_network_guard.py::test_a_swallowed_refusal_fails_the_test_at_teardown``: its one
test swallows the guard's refusal and passes by itself; the guard's teardown check must
fail it. Not named ``test_*.py``, so the suite collects it only when a run names it."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import pytest

from .conftest import network_guard


def test_swallows_a_refused_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    reached: list[Any] = []
    # Even if the guard let it through, the connection would reach nothing.
    monkeypatch.setitem(network_guard.REAL, "connect", lambda *args: reached.append(args))
    with contextlib.suppress(OSError):
        socket.socket().connect(("192.0.2.1", 9))
    assert reached == []
