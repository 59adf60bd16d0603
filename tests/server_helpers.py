"""The deployable server as a process: gunicorn with the uvicorn workers of
``mediarepo.server`` serving ``mediarepo.asgi``, spawned as ``make run`` spawns it, on
SQLite in a data directory of the test's (``start_server``), and raw HTTP on a socket
(``raw_exchange``, ``read_response``). No external service."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import requests

from .helpers import MatrixClient, bearer, free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: The upload limit of a started server, unless the test sets another.
MAX_UPLOAD = 1024 * 1024
#: What the one worker that runs the periodic sweeps logs.
PERIODIC_LINE = "This process runs the periodic sweeps"
# Settings that would take the server off the embedded default (a broker, S3, Postgres).
FOREIGN_ENV = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "REDIS_URL",
    "AWS_STORAGE_BUCKET_NAME",
    "MATRIX_HOMESERVER_URL",
    "GUNICORN_CMD_ARGS",
    "WEB_THREADS",
)


@dataclass
class Server:
    base_url: str
    port: int
    data_dir: Path
    log: Path
    token: str
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def auth(self) -> dict[str, str]:
        return bearer(self.token)

    @property
    def client(self) -> MatrixClient:
        """A client of this server as the user its token was made for."""
        return MatrixClient.over_http(self.base_url, self.token)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def server_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "mediarepo.settings",  # pytest's is tests.settings
            "MEDIAREPO_DATA_DIR": str(data_dir),
            "PORT": str(port),
            "PUBLIC_BASEURL": f"http://127.0.0.1:{port}",
            "MSC3870_MAX_UPLOAD_SIZE": str(MAX_UPLOAD),
            "MSC3870_CREATE_RATE": "100000/min",
            "MSC3870_MAX_PENDING_UPLOADS": "1000",
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    return env


def manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "python"), "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def start_server(data_dir: Path, name: str, *, migrate: bool, **extra: str) -> Server:
    """The server on a free port with ``extra`` environment, once every worker answers;
    its token is ``@<name>:localhost``'s."""
    port = free_port()
    env = server_env(data_dir, port, **extra)
    if migrate:
        manage(env, "migrate", "--noinput", "-v", "0")
    token = manage(env, "create_access_token", f"@{name}:localhost").strip().splitlines()[-1]
    log = data_dir / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(BIN / "gunicorn"), "-c", "mediarepo/gunicorn.conf.py", "mediarepo.asgi"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", port, data_dir, log, token, process)
    workers = int(extra.get("WEB_CONCURRENCY", "1"))

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"gunicorn exited:\n{server.log_text()[-3000:]}")
        # Every worker up, so that requests can land on any of them.
        if server.log_text().count("Application startup complete") < workers:
            return False
        try:
            return requests.get(f"{server.base_url}/_matrix/client/versions", timeout=2).ok
        except requests.RequestException:
            return False

    try:
        wait_until(up, 30, "gunicorn to answer")
    except BaseException:
        server.stop()
        raise
    return server


# ---------------------------------------------------------------------------- raw HTTP


def read_response(
    sock: socket.socket, *, length_required: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """One response from ``sock``: its status, headers (names in lower case) and body, to
    its Content-Length or, without one, to EOF. ``length_required``: the response must
    have a Content-Length and all of its body."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response head: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers["content-length"] if length_required else headers.get("content-length")
    while length is None or len(body) < int(length):
        chunk = sock.recv(65536)
        if not chunk:
            assert not length_required, "connection closed in the middle of the answer"
            break
        body += chunk
    return int(lines[0].split(" ", 2)[1]), headers, body


def raw_exchange(port: int, data: bytes, timeout: float = 15) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` whole, then read one response (to its Content-Length, or to EOF).
    A reset anywhere raises: that is what the tests look for."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_response(sock)
