"""A redis-server of a test's or a bench's own, on a free loopback port, keeping nothing
on disk: stopped and started again, it is an outage and an empty broker. No Django here,
so that ``bench/soak.py`` runs it too."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 20) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not self.answers():
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on :{self.port} did not answer in {timeout} s")
            time.sleep(0.1)

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM, as an operator stops it (it closes its clients' connections), or
        SIGKILL (``kill``)."""
        if self.process is not None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None

    def restart(self, down_seconds: float = 1.0) -> None:
        """Stopped as an operator restarts it, ``down_seconds`` with nothing listening,
        then started again on the same port, empty."""
        self.stop()
        time.sleep(down_seconds)
        self.start()
