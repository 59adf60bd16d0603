"""The processes of the services stack (gunicorn and its workers, celery and its pool)
run with the network guard (tests/network_guard.py): its ``sitecustomize`` first on their
``PYTHONPATH``, and the session's findings file. Read from their environment, so that no
process is asked to reach anything to prove it."""

from __future__ import annotations

import os

import psutil
import pytest

from ..conftest import GUARD_FINDINGS, network_guard
from .conftest import Stack

pytestmark = pytest.mark.services


def test_the_stack_processes_are_guarded(live: Stack) -> None:
    processes = []
    for name in ("server", "worker"):
        parent = psutil.Process(live.processes[name].pid)
        processes += [parent, *parent.children(recursive=True)]
    assert len(processes) >= 4  # gunicorn and a worker, celery and its pool
    for process in processes:
        environment = process.environ()
        assert environment["PYTHONPATH"].split(os.pathsep)[0] == str(network_guard.SITE_DIR)
        assert environment[network_guard.LOG_ENV] == str(GUARD_FINDINGS.log_path)
