"""The deployable's processes (gunicorn, ``celery worker``, ``celery beat``) started,
awaited and killed as an operator's supervisor would: each in a session of its own, so
that a kill takes its children (uvicorn workers, a prefork pool) with it, and its output
appended to ``<logs>/<name>.log``. The services suite's ``Stack`` (``services/conftest.py``)
and the soak's (``bench/soak.py``) are this plus what each starts; no Django here, so that
the soak runs it too (as ``redis_server.py``)."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class ProcessExited(AssertionError):
    """A process exited while it was awaited (an AssertionError: in a test, a failure)."""


def answers_ok(url: str, timeout: float = 1) -> bool:
    """Whether a GET of ``url`` (plain HTTP) answers 200 now."""
    host, _, path = url.removeprefix("http://").partition("/")
    hostname, _, port = host.partition(":")
    conn = http.client.HTTPConnection(hostname, int(port or 80), timeout=timeout)
    try:
        conn.request("GET", "/" + path)
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except OSError:
        return False
    finally:
        conn.close()


def worker_args(node: str, concurrency: int = 2) -> list[str]:
    """``celery worker`` arguments (after ``-A mediarepo``) as both stacks run it: a prefork
    pool, no gossip or mingle (nothing here needs them, and they slow starts)."""
    return [
        *("worker", "-n", node, "-c", str(concurrency), "-l", "info"),
        *("--without-gossip", "--without-mingle"),
    ]


def beat_args(schedule: Path) -> list[str]:
    """``celery beat`` arguments with the database scheduler (the settings') and its
    local state file at ``schedule``."""
    return ["beat", "-l", "info", "-s", str(schedule)]


@dataclass
class Processes:
    """Named processes sharing one environment (``env``) and one log directory."""

    env: dict[str, str]
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes[name] = process
        return process

    def log_size(self, name: str) -> int:
        path = self.logs / f"{name}.log"
        return path.stat().st_size if path.exists() else 0

    def logged_since(self, name: str, offset: int) -> bytes:
        with open(self.logs / f"{name}.log", "rb") as handle:
            handle.seek(offset)
            return handle.read()

    def await_ready(
        self, name: str, ready: Callable[[], bool], timeout: float, interval: float = 0.05
    ) -> None:
        """Until ``ready()``; ProcessExited (with its log's tail) as soon as ``name`` has
        exited, TimeoutError past ``timeout`` seconds."""
        process = self.processes[name]
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise ProcessExited(f"{name} exited ({process.returncode}): {self.tail(name)}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {name} to start")
            time.sleep(interval)

    def start_gunicorn(
        self, name: str, env: dict[str, str], base_url: str, timeout: float = 30
    ) -> subprocess.Popen[bytes]:
        """gunicorn serving the ASGI app on ``env``'s PORT (as ``make run`` and the container
        start it); waits until each of its WEB_CONCURRENCY uvicorn workers (default: one per
        core) has started and ``base_url`` answers."""
        expected = int(env.get("WEB_CONCURRENCY") or os.cpu_count() or 1)
        offset = self.log_size(name)
        process = self.spawn(
            name, [str(BIN / "gunicorn"), "-c", "mediarepo/gunicorn.conf.py", "mediarepo.asgi"], env
        )

        def up() -> bool:
            started = self.logged_since(name, offset).count(b"Application startup complete")
            return started >= expected and answers_ok(f"{base_url}/_matrix/client/versions")

        self.await_ready(name, up, timeout)
        return process

    def start_celery(
        self, name: str, args: list[str], env: dict[str, str], ready_line: bytes, timeout: float
    ) -> subprocess.Popen[bytes]:
        """``celery -A mediarepo <args>``; waits for ``ready_line`` in its log."""
        offset = self.log_size(name)
        process = self.spawn(name, [str(BIN / "celery"), "-A", "mediarepo", *args], env)
        self.await_ready(name, lambda: ready_line in self.logged_since(name, offset), timeout)
        return process

    def child_pids(self, name: str) -> list[int]:
        """The pids of the process ``name``'s children (gunicorn's workers, say)."""
        parent = self.processes[name].pid
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as handle:
                    # After the command (in parentheses, which may hold anything): state, ppid.
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(entry.name))
        return found

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a process and its children (a prefork worker's pool goes with it)."""
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def stop(self, name: str) -> None:
        self.kill(name, signal.SIGTERM)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def exited(self) -> dict[str, int]:
        """The processes that have exited (by themselves: a killed one is forgotten), with
        their exit codes."""
        codes = {name: process.poll() for name, process in self.processes.items()}
        return {name: code for name, code in codes.items() if code is not None}

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
