"""Soak: mixed load on the full stack while a schedule of faults hits it; nothing may be lost.

The stack is the deployable as an operator runs it, every service of it private to this
run (under ``var/soak``), so that it can be stopped and restarted without touching anyone
else's: two web nodes (two gunicorn servers of one uvicorn worker each, their own data
directories and spool directories, the same secrets), a PostgreSQL cluster of its own
(``initdb``, trust auth, a free port), a ``redis-server`` of its own (the Celery broker
and the cache; no persistence), two ``celery worker`` processes and ``celery beat`` (the
sweeps, at short periods), and SeaweedFS (``scripts/s3-server`` on :9133, or ``--s3-port``).

Client threads upload (create, PUT to the upload URL, ``/complete``; or PUT through a
node) random bytes of random sizes up to 64 MiB and small PNGs, park downloads on ids
still pending, download and ask for thumbnails, against either node, and record every
request (time, kind, status, node). Each upload's bytes come from a seed; the client keeps
their SHA-256, never the bytes. Meanwhile a thread runs the faults at fixed offsets and
records each one's window: SIGKILL of a web worker, SIGKILL of a celery worker while it
screens, a PostgreSQL restart, SeaweedFS stopped for 15 s, a Redis restart, the web nodes'
spool directories unwritable for 15 s.

Afterwards, once the sweeps have run: every upload that got a 200 is downloaded from both
nodes and compared byte for byte (SHA-256 and size); no row may be stuck in PENDING or
PROCESSING past its deadline; every key in the bucket must belong to a row that serves it
(or to an upload still in flight); no 5xx outside the fault windows; and per fault, the
errors it caused and how long after its end the first request on its path succeeded.

    .venv/bin/python bench/soak.py --minutes 10 --seed 1 --json bench/results/soak-X.json

Not part of any test suite (it takes minutes). Needs root or the ``postgres`` user's
PostgreSQL binaries (``/usr/lib/postgresql/*/bin``), ``redis-server`` and ``chattr``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import http.client
import io
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tests.redis_server, ...

from _shared import PYTHON, ROOT, S3Server, free_port, machine_info, markdown_table

from tests.process_stack import Processes, beat_args, worker_args
from tests.redis_server import RedisServer

MiB = 1024 * 1024
SOAK_DIR = ROOT / "var" / "soak"
S3_PORT = 9133
S3_BUCKET = "mediarepo-soak"
SERVER_NAME = "localhost"
# What the stack is configured with (short deadlines, so that the sweeps act within the soak).
UNUSED_EXPIRATION_S = 60
STUCK_AFTER_S = 30
MAX_UPLOAD = 64 * MiB
SWEEP_PERIODS_S = {
    "msc3870.expire_pending": 10,
    "msc3870.delete_dead_objects": 15,
    "msc3870.redispatch_stuck": 10,
    "msc3870.delete_orphaned_uploads": 30,
}
# A request overlapping a fault's window, or ending this long after it, counts against it.
GRACE_S = 5.0
FAULT_OUTAGE_S = 15.0
# A body through a node older than this is given up by the stuck sweep (an hour by
# default): short, so that what killed requests left is swept within the soak.
IN_FLIGHT_UPLOAD_S = 120


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(step)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def answers_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------ private services


class PrivatePostgres:
    """A PostgreSQL cluster of this run's own: ``initdb`` into ``directory``, ``pg_ctl``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not binaries:
            raise SystemExit("no /usr/lib/postgresql/*/bin/pg_ctl")
        self.bin = Path(binaries[-1]).parent

    def _run(self, *argv: str) -> None:
        # initdb and postgres refuse to run as root: as the postgres user then.
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *argv], check=True, stdout=subprocess.DEVNULL)

    def init(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.directory / "data"),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
            " -c max_connections=200 -c fsync=off"
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.directory / "data"),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.directory / "postgres.log"),
            "-o",
            options,
            "start",
        )

    def stop(self) -> None:
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.directory / "data"), "-w", "-m", "fast", "stop"
        )

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]


def soak_s3(port: int) -> S3Server:
    """``scripts/s3-server`` on ``port`` in ``var/soak/s3``, with its own bucket."""
    return S3Server(
        manage=True,
        port=port,
        directory=SOAK_DIR / "s3",
        bucket=S3_BUCKET,
        volume_max="300",
        quiet=True,
    )


# ------------------------------------------------------------------ the stack


@dataclass
class Node:
    name: str
    port: int
    data_dir: Path
    spool_dir: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Stack(Processes):
    """The two web nodes, the celery workers and beat (``tests/process_stack.Processes``,
    as the services suite's stack)."""

    nodes: list[Node] = field(default_factory=list)

    def node_env(self, node: Node) -> dict[str, str]:
        return {
            **self.env,
            "PORT": str(node.port),
            "PUBLIC_BASEURL": node.base,
            "MEDIAREPO_DATA_DIR": str(node.data_dir),
            "TMPDIR": str(node.spool_dir),
            "WEB_CONCURRENCY": "1",
        }

    def start_node(self, node: Node) -> None:
        node.spool_dir.mkdir(parents=True, exist_ok=True)
        self.start_gunicorn(node.name, self.node_env(node), node.base, timeout=60)

    def web_worker_pid(self, node: Node) -> int | None:
        kids = self.child_pids(node.name)
        return kids[0] if kids else None

    def celery_env(self, name: str) -> dict[str, str]:
        """Each celery process its own data and temporary directories."""
        data_dir = SOAK_DIR / name
        (data_dir / "tmp").mkdir(parents=True, exist_ok=True)
        return {**self.env, "MEDIAREPO_DATA_DIR": str(data_dir), "TMPDIR": str(data_dir / "tmp")}

    def start_worker(self, name: str) -> None:
        self.start_celery(name, worker_args(f"{name}@%h"), self.celery_env(name), b" ready.", 90)

    def start_beat(self) -> None:
        args = beat_args(SOAK_DIR / "beat" / "schedule")
        self.start_celery("beat", args, self.celery_env("beat"), b"beat: Starting", 90)

    def manage(self, *args: str) -> str:
        env = {**self.env, "MEDIAREPO_DATA_DIR": str(SOAK_DIR / "manage")}
        return subprocess.run(
            [str(PYTHON), "manage.py", *args],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout


def get_status(url: str, timeout: float = 2) -> int:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return 0
    finally:
        conn.close()


# ------------------------------------------------------------------ the client's records


@dataclass
class Record:
    t0: float
    t1: float
    kind: str
    node: str
    status: int
    detail: str = ""
    media_id: str = ""


@dataclass
class Upload:
    """An upload the server accepted (200): what the client knows of its bytes."""

    media_id: str
    flow: str
    size: int
    sha256: str
    seed: int
    image: bool
    t: float


class Journal:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.lock = threading.Lock()
        self.records: list[Record] = []
        self.uploads: list[Upload] = []
        self.corrupt: list[dict[str, Any]] = []
        # Every upload tried, accepted or not: a row that completed although its answer
        # was lost (the node died before answering) is checked against these.
        self.attempts: dict[str, Upload] = {}

    def now(self) -> float:
        return time.monotonic() - self.start

    def add(self, record: Record) -> None:
        with self.lock:
            self.records.append(record)

    def accepted(self, upload: Upload) -> None:
        with self.lock:
            self.uploads.append(upload)

    def pick(self, rng: random.Random, image: bool = False) -> Upload | None:
        with self.lock:
            choices = [u for u in self.uploads if u.image] if image else self.uploads
            return rng.choice(choices) if choices else None


class SeededBody:
    """``size`` bytes from ``seed``, made and hashed chunk by chunk as http.client reads."""

    def __init__(self, size: int, seed: int) -> None:
        self.remaining = size
        self.random = random.Random(seed)
        self.digest = hashlib.sha256()

    def read(self, size: int = MiB) -> bytes:
        chunk = self.random.randbytes(min(MiB, self.remaining))
        self.remaining -= len(chunk)
        self.digest.update(chunk)
        return chunk


def png_of(seed: int) -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    width, height = rng.randint(96, 400), rng.randint(96, 400)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@dataclass
class Answer:
    status: int
    body: bytes = b""
    size: int = 0
    sha256: str = ""
    content_type: str = ""
    error: str = ""

    def errcode(self) -> str:
        try:
            return str(json.loads(self.body).get("errcode", ""))
        except (ValueError, AttributeError):
            return self.body[:80].decode(errors="replace") if self.body else self.error


def exchange(
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: Any = None,
    timeout: float = 120,
    hash_body: bool = False,
) -> Answer:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout, blocksize=MiB)
    try:
        conn.request(
            method, parts.path + (f"?{parts.query}" if parts.query else ""), body, headers or {}
        )
        response = conn.getresponse()
        answer = Answer(response.status, content_type=response.getheader("Content-Type") or "")
        if hash_body and response.status == 200:
            digest = hashlib.sha256()
            while chunk := response.read(MiB):
                digest.update(chunk)
                answer.size += len(chunk)
            answer.sha256 = digest.hexdigest()
            # http.client returns a body cut short by a closed connection without a word:
            # a server that fails mid-stream can only close it. A client sees it by the
            # length, and so does this one: such a body is a dropped answer, not bytes.
            declared = response.getheader("Content-Length")
            if declared is not None and int(declared) != answer.size:
                return Answer(0, error=f"truncated: {answer.size} of {declared} bytes")
        else:
            answer.body = response.read()
        return answer
    except (OSError, http.client.HTTPException) as exc:
        return Answer(0, error=f"{type(exc).__name__}: {exc}"[:200])
    finally:
        conn.close()


class Client:
    """One client thread: a user of its own, the mix of operations, every request recorded."""

    def __init__(
        self, index: int, token: str, nodes: list[Node], journal: Journal, seed: int
    ) -> None:
        self.index = index
        self.auth = {"Authorization": f"Bearer {token}"}
        self.nodes = nodes
        self.journal = journal
        self.rng = random.Random(seed * 1000 + index)

    def _record(self, kind: str, node: str, t0: float, answer: Answer, media_id: str) -> Answer:
        detail = "" if answer.status == 200 else answer.errcode()
        self.journal.add(
            Record(t0, self.journal.now(), kind, node, answer.status, detail, media_id)
        )
        return answer

    def call(
        self, kind: str, node: Node, method: str, path: str, media_id: str = "", **kwargs: Any
    ) -> Answer:
        t0 = self.journal.now()
        answer = exchange(method, node.base + path, **kwargs)
        return self._record(kind, node.name, t0, answer, media_id)

    def node(self) -> Node:
        return self.rng.choice(self.nodes)

    def body(self) -> tuple[Any, int, int, bool, str]:
        """A new upload's body: (body, size, seed, is_image, content type)."""
        seed = self.rng.getrandbits(62)
        if self.rng.random() < 0.2:
            data = png_of(seed)
            return data, len(data), seed, True, "image/png"
        size = int(math.exp(self.rng.uniform(math.log(1024), math.log(MAX_UPLOAD))))
        return SeededBody(size, seed), size, seed, False, "application/octet-stream"

    def create(self, node: Node) -> tuple[str, str] | None:
        """A new id on ``node``: (media id, upload URL)."""
        for _ in range(5):
            answer = self.call(
                "create",
                node,
                "POST",
                "/_matrix/media/v1/create",
                headers={**self.auth, "Content-Type": "application/json"},
                body=b"{}",
            )
            if answer.status == 200:
                created = json.loads(answer.body)
                return created["content_uri"].rsplit("/", 1)[1], created["upload_url"]
            time.sleep(1)
        return None

    def retrying(self, attempt: Callable[[], Answer], tries: int = 6) -> Answer:
        """As a client does: retry what failed on the server's side (5xx, no answer, 429)."""
        answer = attempt()
        for _ in range(tries - 1):
            if answer.status not in (0, 429) and answer.status < 500:
                break
            time.sleep(2)
            answer = attempt()
        return answer

    def upload(self, flow: str, media_id: str, upload_url: str, node: Node) -> Upload | None:
        body, size, seed, image, content_type = self.body()
        sha256 = hashlib.sha256(body).hexdigest() if image else ""
        with self.journal.lock:
            self.journal.attempts[media_id] = Upload(
                media_id, flow, size, sha256, seed, image, self.journal.now()
            )

        def fresh() -> Any:
            return body if image else SeededBody(size, seed)

        headers = {"Content-Type": content_type, "Content-Length": str(size)}
        if flow == "url":
            # The PUT goes to the store's presigned URL; /complete to either node.
            def put_url() -> Answer:
                t0 = self.journal.now()
                sent = fresh()
                answer = exchange("PUT", upload_url, headers=headers, body=sent, timeout=300)
                self._record("put_url", "s3", t0, answer, media_id)
                if answer.status == 200 and not image:
                    nonlocal sha256
                    sha256 = sent.digest.hexdigest()  # of every byte sent: the body is done
                return answer

            if self.retrying(put_url).status != 200:
                return None
            target = self.node()
            path = f"/_matrix/media/v1/upload/{SERVER_NAME}/{media_id}/complete?filename=soak.bin"
            answer = self.retrying(
                lambda: self.call(
                    "complete",
                    target,
                    "POST",
                    path,
                    media_id,
                    headers={**self.auth, "Content-Type": "application/json"},
                    body=b"{}",
                    timeout=120,
                )
            )
        else:

            def put() -> Answer:
                sent = fresh()
                answer = self.call(
                    "put",
                    node,
                    "PUT",
                    f"/_matrix/media/v3/upload/{SERVER_NAME}/{media_id}?filename=soak.bin",
                    media_id,
                    headers={**self.auth, **headers},
                    body=sent,
                    timeout=300,
                )
                if answer.status == 200 and not image:
                    nonlocal sha256
                    sha256 = sent.digest.hexdigest()
                return answer

            answer = self.retrying(put)
        if answer.status != 200:
            return None
        accepted = Upload(media_id, flow, size, sha256, seed, image, self.journal.now())
        self.journal.accepted(accepted)
        return accepted

    def op_upload(self, flow: str) -> None:
        node = self.node()
        created = self.create(node)
        if created:
            self.upload(flow, *created, node)

    def op_wait(self) -> None:
        """A download parked on a pending id on one node while the upload goes to the other."""
        uploader, waiter = self.rng.sample(self.nodes, 2)
        created = self.create(uploader)
        if not created:
            return
        media_id, upload_url = created
        result: dict[str, Answer] = {}

        def wait() -> None:
            result["answer"] = self.call(
                "wait",
                waiter,
                "GET",
                f"/_matrix/client/v1/media/download/{SERVER_NAME}/{media_id}?timeout_ms=60000",
                media_id,
                headers=self.auth,
                timeout=120,
                hash_body=True,
            )

        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        time.sleep(0.3)
        accepted = self.upload(self.rng.choice(["url", "put"]), media_id, upload_url, uploader)
        thread.join(180)
        answer = result.get("answer")
        if accepted and answer and answer.status == 200 and answer.sha256 != accepted.sha256:
            self.journal.corrupt.append({"media_id": media_id, "via": "wait", "node": waiter.name})

    def op_download(self) -> None:
        upload = self.journal.pick(self.rng)
        if upload is None:
            return
        node = self.node()
        answer = self.call(
            "download",
            node,
            "GET",
            f"/_matrix/client/v1/media/download/{SERVER_NAME}/{upload.media_id}",
            upload.media_id,
            headers=self.auth,
            hash_body=True,
        )
        if answer.status == 200 and (answer.sha256, answer.size) != (upload.sha256, upload.size):
            self.journal.corrupt.append(
                {"media_id": upload.media_id, "via": "download", "node": node.name}
            )

    def op_thumbnail(self) -> None:
        upload = self.journal.pick(self.rng, image=True)
        if upload is None:
            return
        method = self.rng.choice(["scale", "crop"])
        size = self.rng.choice([32, 96, 320])
        answer = self.call(
            "thumbnail",
            self.node(),
            "GET",
            f"/_matrix/client/v1/media/thumbnail/{SERVER_NAME}/{upload.media_id}"
            f"?width={size}&height={size}&method={method}",
            upload.media_id,
            headers=self.auth,
        )
        if answer.status == 200 and not answer.content_type.startswith("image/"):
            self.journal.corrupt.append({"media_id": upload.media_id, "via": "thumbnail"})

    def run(self, until: float) -> None:
        operations: list[tuple[Callable[[], None], float]] = [
            (lambda: self.op_upload("url"), 0.3),
            (lambda: self.op_upload("put"), 0.25),
            (self.op_wait, 0.1),
            (self.op_download, 0.25),
            (self.op_thumbnail, 0.1),
        ]
        while self.journal.now() < until:
            operation = self.rng.choices([o for o, _ in operations], [w for _, w in operations])[0]
            try:
                operation()
            except Exception as exc:
                self.journal.add(
                    Record(
                        self.journal.now(),
                        self.journal.now(),
                        "client-error",
                        "-",
                        -1,
                        repr(exc)[:200],
                    )
                )


# ------------------------------------------------------------------ faults


@dataclass
class Fault:
    name: str
    path: list[str]  # the request kinds whose first success after the end is its recovery
    nodes: list[str]  # and the nodes (empty: any)
    start: float = 0.0
    end: float = 0.0
    detail: str = ""


class Faults:
    def __init__(
        self,
        stack: Stack,
        pg: PrivatePostgres,
        redis: RedisServer,
        s3: S3Server,
        journal: Journal,
        database_url: str,
    ) -> None:
        self.stack, self.pg, self.redis, self.s3 = stack, pg, redis, s3
        self.journal = journal
        self.database_url = database_url
        self.done: list[Fault] = []

    def schedule(self) -> list[tuple[str, Callable[[Fault], None], list[str], list[str]]]:
        uploads = ["create", "put", "complete", "wait"]
        return [
            (
                "SIGKILL web worker (node1)",
                self.kill_web_worker,
                [*uploads, "download", "thumbnail"],
                ["node1"],
            ),
            (
                "SIGKILL celery worker mid-screening",
                self.kill_celery_worker,
                ["put", "complete"],
                [],
            ),
            ("restart PostgreSQL", self.restart_postgres, [*uploads, "download", "thumbnail"], []),
            (
                f"stop SeaweedFS {FAULT_OUTAGE_S:.0f} s",
                self.stop_s3,
                ["put_url", "put", "download"],
                [],
            ),
            ("restart Redis", self.restart_redis, ["put", "complete"], []),
            (f"spool unwritable {FAULT_OUTAGE_S:.0f} s", self.spool_unwritable, ["put"], []),
        ]

    def run(self, offsets: list[float]) -> None:
        for offset, (name, action, path, nodes) in zip(offsets, self.schedule(), strict=True):
            while self.journal.now() < offset:
                time.sleep(0.2)
            fault = Fault(name, path, nodes)
            log(f"fault: {name}")
            try:
                action(fault)
            except Exception as exc:
                fault.detail += f" FAILED: {exc!r}"
                fault.end = fault.end or self.journal.now()
            log(f"fault over: {name} ({fault.end - fault.start:.1f} s) {fault.detail}")
            self.done.append(fault)

    def kill_web_worker(self, fault: Fault) -> None:
        node = self.stack.nodes[0]
        pid = self.stack.web_worker_pid(node)
        if pid is None:
            raise RuntimeError("no web worker")
        fault.start = self.journal.now()
        os.kill(pid, signal.SIGKILL)

        def back() -> bool:
            now = self.stack.web_worker_pid(node)
            return (
                now not in (None, pid) and get_status(node.base + "/_matrix/client/versions") == 200
            )

        wait_until(back, 60, "gunicorn to replace its worker", step=0.05)
        fault.end = self.journal.now()
        fault.detail = f"pid {pid}"

    def _screening_in(self, name: str) -> set[str]:
        """The screen_media tasks a worker received and has not finished (its log)."""
        text = (self.stack.logs / f"{name}.log").read_text(errors="replace")
        received = set(re.findall(r"Task msc3870\.screen_media\[([0-9a-f-]+)\] received", text))
        finished = set(
            re.findall(
                r"Task msc3870\.screen_media\[([0-9a-f-]+)\] (?:succeeded|retry|raised)", text
            )
        )
        return received - finished

    def _processing_rows(self) -> int:
        import psycopg

        with psycopg.connect(self.database_url, connect_timeout=2) as conn:
            row = conn.execute(
                "SELECT count(*) FROM msc3870_media"
                " WHERE state = 'processing' AND storage_key <> ''"
            ).fetchone()
        return int(row[0]) if row else 0

    def kill_celery_worker(self, fault: Fault) -> None:
        victim, tasks = "worker1", set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            busy = [(name, self._screening_in(name)) for name in ("worker1", "worker2")]
            busy = [(name, t) for name, t in busy if t]
            if busy and self._processing_rows():
                victim, tasks = busy[0]
                break
            time.sleep(0.05)
        fault.start = self.journal.now()
        self.stack.kill(victim)
        fault.detail = f"{victim}, screening in flight: {len(tasks)}" + (
            "" if tasks else " (none seen in 60 s)"
        )
        time.sleep(2)
        self.stack.start_worker(victim)
        fault.end = self.journal.now()

    def restart_postgres(self, fault: Fault) -> None:
        fault.start = self.journal.now()
        self.pg.stop()
        time.sleep(2)
        self.pg.start()
        fault.end = self.journal.now()

    def stop_s3(self, fault: Fault) -> None:
        fault.start = self.journal.now()
        self.s3.stop()
        time.sleep(FAULT_OUTAGE_S)
        self.s3.resume()
        fault.end = self.journal.now()

    def restart_redis(self, fault: Fault) -> None:
        fault.start = self.journal.now()
        self.redis.stop()
        time.sleep(1)
        self.redis.start()
        fault.end = self.journal.now()

    def spool_unwritable(self, fault: Fault) -> None:
        # chattr +i: no new file in the directory, even for root (chmod would not stop root).
        dirs = [str(node.spool_dir) for node in self.stack.nodes]
        fault.start = self.journal.now()
        subprocess.run(["chattr", "+i", *dirs], check=True)
        try:
            time.sleep(FAULT_OUTAGE_S)
        finally:
            subprocess.run(["chattr", "-i", *dirs], check=True)
        fault.end = self.journal.now()


# ------------------------------------------------------------------ afterwards


def database_rows(database_url: str) -> list[dict[str, Any]]:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return list(
            conn.execute(
                "SELECT media_id, state, upload_method, storage_key, size, sha256,"
                " unused_expires_at, processing_started_at, objects_deleted_at, last_error,"
                " extract(epoch from now()) AS now FROM msc3870_media"
            ).fetchall()
        )


def overdue(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Rows past their deadline: PENDING after its expiry (plus two expiry sweeps),
    PROCESSING with bytes after the stuck deadline (plus two sweeps and a screening), and
    PROCESSING without bytes (a PUT still streaming) after the in-flight timeout."""
    late: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        now = float(row["now"])
        if row["state"] == "pending":
            if (
                row["unused_expires_at"].timestamp() + 2 * SWEEP_PERIODS_S["msc3870.expire_pending"]
                < now
            ):
                late["pending"].append(row["media_id"])
        elif row["state"] == "processing":
            started = row["processing_started_at"].timestamp()
            if row["storage_key"] or row["upload_method"] == "url":
                if (
                    started + STUCK_AFTER_S + 2 * SWEEP_PERIODS_S["msc3870.redispatch_stuck"] + 120
                    < now
                ):
                    late["processing"].append(row["media_id"])
            elif (
                started + IN_FLIGHT_UPLOAD_S + 2 * SWEEP_PERIODS_S["msc3870.redispatch_stuck"] < now
            ):
                late["processing (no bytes)"].append(row["media_id"])
    return late


def settle(database_url: str, timeout: float) -> dict[str, Any]:
    """Wait for the sweeps: until nothing is pending or screening that should not be, and
    the dead rows' objects are deleted; then one more orphan sweep period."""
    t0 = time.monotonic()
    last: dict[str, Any] = {}

    def quiet() -> bool:
        nonlocal last
        rows = database_rows(database_url)
        states = Counter(r["state"] for r in rows)
        screening = states["processing"]
        pending = states["pending"]
        dead_uncleaned = sum(
            1
            for r in rows
            if r["state"] in ("rejected", "expired", "deleted") and r["objects_deleted_at"] is None
        )
        last = {"states": dict(states), "screening": screening, "dead_uncleaned": dead_uncleaned}
        return screening == 0 and pending == 0 and dead_uncleaned == 0

    try:
        wait_until(quiet, timeout, "the sweeps", step=2)
        settled = True
    except RuntimeError:
        settled = False
    time.sleep(2 * SWEEP_PERIODS_S["msc3870.delete_orphaned_uploads"] + 5)
    return {"settled": settled, "seconds": round(time.monotonic() - t0, 1), **last}


def seeded_sha256(upload: Upload) -> str:
    """The SHA-256 of the bytes an upload's seed makes (its body, made again)."""
    if upload.sha256:
        return upload.sha256
    body = SeededBody(upload.size, upload.seed)
    while body.remaining:
        body.read()
    return body.digest.hexdigest()


def verify_downloads(
    journal: Journal,
    nodes: list[Node],
    token: str,
    threads: int = 3,
    answer_lost: list[Upload] | None = None,
) -> dict[str, Any]:
    """Every accepted upload from both nodes, byte for byte (SHA-256 and size); and the
    uploads whose answer was lost but whose row completed, against their seed's bytes."""
    auth = {"Authorization": f"Bearer {token}"}
    lost = [Upload(**{**asdict(u), "sha256": seeded_sha256(u)}) for u in answer_lost or []]
    work = [(upload, node) for upload in [*journal.uploads, *lost] for node in nodes]
    outcomes: Counter[str] = Counter()
    bad: list[dict[str, Any]] = []
    lock = threading.Lock()
    iterator: Iterator[tuple[Upload, Node]] = iter(work)

    def worker() -> None:
        while True:
            with lock:
                item = next(iterator, None)
            if item is None:
                return
            upload, node = item
            answer = exchange(
                "GET",
                f"{node.base}/_matrix/client/v1/media/download/{SERVER_NAME}/{upload.media_id}",
                headers=auth,
                hash_body=True,
                timeout=300,
            )
            if answer.status == 200 and (answer.sha256, answer.size) == (
                upload.sha256,
                upload.size,
            ):
                outcome = "byte-exact"
            elif answer.status == 200:
                outcome = "corrupt"
            else:
                outcome = f"{answer.status} {answer.errcode()}"
            with lock:
                outcomes[outcome] += 1
                if outcome != "byte-exact":
                    bad.append(
                        {
                            "media_id": upload.media_id,
                            "node": node.name,
                            "outcome": outcome,
                            "flow": upload.flow,
                            "accepted_at": round(upload.t, 1),
                        }
                    )

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return {"checked": len(work), "outcomes": dict(outcomes), "bad": bad}


def bucket_audit(rows: list[dict[str, Any]], s3: S3Server) -> dict[str, Any]:
    """Every key in the bucket must belong to a row that serves it, or to an upload in
    flight (an incoming object of a pending id; bytes of a row being screened)."""
    import boto3

    env = s3.storage_env()
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_S3_ENDPOINT_URL"],
        region_name=env["AWS_S3_REGION_NAME"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET):
        keys += [item["Key"] for item in page.get("Contents", [])]
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_id = {row["media_id"]: row for row in rows}
    for row in rows:
        if row["storage_key"]:
            by_key[row["storage_key"]].append(row)
    kinds: Counter[str] = Counter()
    orphans: list[dict[str, Any]] = []
    for key in keys:
        media_id = key.rsplit("/", 1)[-1].split(".", 1)[0]
        if key.startswith("incoming/"):
            row = by_id.get(media_id)
            kind = "incoming, id pending" if row and row["state"] == "pending" else "orphan"
        elif key.startswith("thumbnails/"):
            row = by_id.get(key.split("/")[1])
            kind = (
                "thumbnail of live media"
                if row and row["state"] in ("complete", "quarantined")
                else "orphan"
            )
        elif key.startswith("media/"):
            owners = by_key.get(key, [])
            states = {o["state"] for o in owners}
            if states & {"complete", "quarantined"}:
                kind = "served"
            elif "processing" in states:
                kind = "being screened"
            elif owners:
                kind = "dead, awaiting deletion"
            else:
                kind = "orphan"
        else:
            kind = "orphan"
        kinds[kind] += 1
        if kind == "orphan":
            row = by_id.get(media_id)
            orphans.append(
                {
                    "key": key,
                    "row_state": row["state"] if row else None,
                    "row_key": row["storage_key"] if row else None,
                }
            )
    return {"keys": len(keys), "kinds": dict(kinds), "orphans": orphans}


def fault_report(fault: Fault, records: list[Record]) -> dict[str, Any]:
    def on_path(r: Record) -> bool:
        return r.kind in fault.path and (not fault.nodes or r.node in fault.nodes)

    errors = Counter(
        f"{r.kind} {r.status} {r.detail}".strip()
        for r in records
        if (r.status == 0 or r.status >= 500)
        and r.t1 >= fault.start
        and r.t0 <= fault.end + GRACE_S
    )
    after = [r for r in records if on_path(r) and r.status == 200 and r.t0 >= fault.end]
    first = min(after, key=lambda r: r.t1, default=None)
    return {
        "fault": fault.name,
        "start_s": round(fault.start, 1),
        "end_s": round(fault.end, 1),
        "window_s": round(fault.end - fault.start, 1),
        "detail": fault.detail.strip(),
        "errors": sum(errors.values()),
        "errors_by_kind": dict(errors),
        "recovery_s": round(first.t1 - fault.end, 2) if first else None,
        "recovered_by": f"{first.kind} on {first.node}" if first else "no success after it",
    }


def timed_out(r: Record) -> bool:
    """A download that waited its whole timeout for media still being checked: the
    server's answer to a wait, not a failure of its own."""
    return r.status == 504 and r.detail == "M_NOT_YET_UPLOADED"


def outside_windows(faults: list[Fault], records: list[Record]) -> list[dict[str, Any]]:
    """Requests that failed (no answer, 5xx, waits that timed out) outside every fault's
    window (its start to its end plus ``GRACE_S``)."""

    def in_a_window(r: Record) -> bool:
        return any(r.t1 >= f.start and r.t0 <= f.end + GRACE_S for f in faults)

    return [asdict(r) for r in records if (r.status == 0 or r.status >= 500) and not in_a_window(r)]


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--settle-seconds", type=float, default=300)
    parser.add_argument(
        "--s3-port",
        type=int,
        default=S3_PORT,
        help=f"SeaweedFS's S3 port (default {S3_PORT}; its other ports move with it)",
    )
    parser.add_argument("--keep", action="store_true", help="keep var/soak afterwards")
    args = parser.parse_args()

    # PostgreSQL runs as its own user, which must reach var/soak/pg.
    var = ROOT / "var"
    var.mkdir(exist_ok=True)
    var.chmod(var.stat().st_mode | 0o001)
    if SOAK_DIR.exists():
        subprocess.run(
            ["chattr", "-R", "-i", str(SOAK_DIR)], check=False, stderr=subprocess.DEVNULL
        )
        shutil.rmtree(SOAK_DIR)
    SOAK_DIR.mkdir(parents=True)
    SOAK_DIR.chmod(0o755)
    logs = SOAK_DIR / "logs"
    logs.mkdir()
    pg = PrivatePostgres(SOAK_DIR / "pg")
    redis = RedisServer(SOAK_DIR / "redis")
    s3 = soak_s3(args.s3_port)
    nodes = [
        Node(f"node{i}", free_port(), SOAK_DIR / f"node{i}", SOAK_DIR / f"node{i}" / "spool")
        for i in (1, 2)
    ]
    stack: Stack | None = None
    try:
        log(f"services: PostgreSQL :{pg.port}, Redis :{redis.port}, SeaweedFS :{s3.port}")
        pg.init()
        pg.start()
        pg.create_database("mediarepo_soak")
        database_url = pg.url("mediarepo_soak")
        redis.start()
        s3.start()
        env = {
            **os.environ,
            **s3.storage_env(),
            "DJANGO_SETTINGS_MODULE": "mediarepo.settings",
            "DATABASE_URL": database_url,
            "CELERY_BROKER_URL": redis.url(0),
            "REDIS_URL": redis.url(1),
            # Both nodes (and the workers) share the secrets and the signing key.
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
            "MSC3870_SIGNING_KEY_PATH": str(SOAK_DIR / "signing.key"),
            "MATRIX_SERVER_NAME": SERVER_NAME,
            "MSC3870_MAX_UPLOAD_SIZE": str(MAX_UPLOAD),
            "MSC3870_UNUSED_EXPIRATION": str(UNUSED_EXPIRATION_S),
            "MSC3870_STUCK_AFTER_SECONDS": str(STUCK_AFTER_S),
            "MSC3870_IN_FLIGHT_UPLOAD_SECONDS": str(IN_FLIGHT_UPLOAD_S),
            "MSC3870_CREATE_RATE": "100000/min",
            "MSC3870_MAX_PENDING_UPLOADS": "100",
            "MSC3870_UPLOAD_BODIES_PER_ADDRESS_MAX": "64",
            "PYTHONUNBUFFERED": "1",
        }
        stack = Stack(env=env, logs=logs, nodes=nodes)
        stack.manage("migrate", "--noinput", "-v", "0")
        stack.manage("generate_signing_key")
        periods = ";".join(
            f"set_period({task!r}, {seconds})" for task, seconds in SWEEP_PERIODS_S.items()
        )
        stack.manage(
            "shell",
            "-c",
            "from django_celery_beat.models import IntervalSchedule, PeriodicTask\n"
            "def set_period(task, seconds):\n"
            "    every, _ = IntervalSchedule.objects.get_or_create(\n"
            "        every=seconds, period='seconds')\n"
            "    assert PeriodicTask.objects.filter(task=task).update(interval=every) == 1, task\n"
            f"{periods}\n",
        )
        tokens = [
            stack.manage("create_access_token", f"@soak{i}:{SERVER_NAME}").strip().splitlines()[-1]
            for i in range(args.clients + 1)
        ]
        for node in nodes:
            stack.start_node(node)
        stack.start_worker("worker1")
        stack.start_worker("worker2")
        stack.start_beat()
        log(f"stack up: {', '.join(n.base for n in nodes)}")

        journal = Journal()
        duration = args.minutes * 60
        faults = Faults(stack, pg, redis, s3, journal, database_url)
        spacing = max(duration / (len(faults.schedule()) + 1), 30.0)
        offsets = [spacing * (i + 1) for i in range(len(faults.schedule()))]
        load_until = max(duration, offsets[-1] + FAULT_OUTAGE_S + 30)
        clients = [Client(i, tokens[i], nodes, journal, args.seed) for i in range(args.clients)]
        threads = [threading.Thread(target=c.run, args=(load_until,), daemon=True) for c in clients]
        fault_thread = threading.Thread(target=faults.run, args=(offsets,), daemon=True)
        log(f"load for {load_until:.0f} s, faults at {[round(o) for o in offsets]} s")
        for thread in [*threads, fault_thread]:
            thread.start()
        fault_thread.join()
        for thread in threads:
            thread.join()
        load_seconds = journal.now()
        log(
            f"load over after {load_seconds:.0f} s: {len(journal.records)} requests, "
            f"{len(journal.uploads)} uploads accepted; waiting for the sweeps"
        )

        # A process of the stack that exited by itself (not one a fault killed and
        # started again): the soak does not supervise them, an operator's system would.
        exited = stack.exited()
        if exited:
            log(f"exited during the load: {exited}")
        settled = settle(database_url, args.settle_seconds)
        log(f"sweeps: {settled}")
        accepted_ids = {u.media_id for u in journal.uploads}
        answer_lost = [
            journal.attempts[r["media_id"]]
            for r in database_rows(database_url)
            if r["state"] == "complete"
            and r["media_id"] not in accepted_ids
            and r["media_id"] in journal.attempts
        ]
        verified = verify_downloads(journal, nodes, tokens[-1], answer_lost=answer_lost)
        verified["answer_lost_but_complete"] = [u.media_id for u in answer_lost]
        rows = database_rows(database_url)
        late = overdue(rows)
        audit = bucket_audit(rows, s3)
        accepted_states = Counter(r["state"] for r in rows if r["media_id"] in accepted_ids)
        records = journal.records
        by_kind_status = Counter(f"{r.kind} {r.status}" for r in records)
        result = {
            "machine": machine_info(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "config": {
                "unused_expiration_s": UNUSED_EXPIRATION_S,
                "stuck_after_s": STUCK_AFTER_S,
                "sweep_periods_s": SWEEP_PERIODS_S,
                "max_upload": MAX_UPLOAD,
                "grace_s": GRACE_S,
            },
            "load_seconds": round(load_seconds, 1),
            "requests": len(records),
            "requests_by_kind_status": dict(sorted(by_kind_status.items())),
            "uploads_accepted": len(journal.uploads),
            "uploads_accepted_bytes": sum(u.size for u in journal.uploads),
            "accepted_rows_by_state": dict(accepted_states),
            "faults": [fault_report(f, records) for f in faults.done],
            "errors_outside_windows": outside_windows(faults.done, records),
            "corrupt_during_load": journal.corrupt,
            "exited": exited,
            "settle": settled,
            "verify": verified,
            "rows_by_state": dict(Counter(r["state"] for r in rows)),
            "overdue_rows": dict(late),
            "bucket": audit,
            "lost": sum(n for o, n in verified["outcomes"].items() if o != "byte-exact"),
            "records": [asdict(r) for r in records],
            "uploads": [asdict(u) for u in journal.uploads],
        }
        print(summary(result))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1, default=str))
            log(f"wrote {args.json}")
    finally:
        if stack is not None:
            stack.stop_all()
        for node in nodes:
            subprocess.run(
                ["chattr", "-i", str(node.spool_dir)], check=False, stderr=subprocess.DEVNULL
            )
        redis.stop()
        with contextlib.suppress(subprocess.CalledProcessError):
            pg.stop()
        s3.stop()
        if not args.keep:
            shutil.rmtree(SOAK_DIR, ignore_errors=True)


def summary(result: dict[str, Any]) -> str:
    out = [
        f"load {result['load_seconds']} s, {result['requests']} requests, "
        f"{result['uploads_accepted']} uploads accepted "
        f"({result['uploads_accepted_bytes'] / MiB:,.0f} MiB)",
        "",
        markdown_table(
            ["kind", "status", "count"],
            [(*ks.split(" ", 1), n) for ks, n in result["requests_by_kind_status"].items()],
        ),
        "",
        markdown_table(
            ["fault", "at s", "window s", "errors (0/5xx)", "recovery s", "detail"],
            [
                (f["fault"], f["start_s"], f["window_s"], f["errors"], f["recovery_s"], f["detail"])
                for f in result["faults"]
            ],
        ),
        "",
    ]
    for f in result["faults"]:
        if f["errors_by_kind"]:
            out.append(f"{f['fault']}: {f['errors_by_kind']}")
    out += [
        "",
        "5xx / no answer outside the windows: "
        f"{sum(1 for e in result['errors_outside_windows'] if not timed_out(Record(**e)))}, "
        "waits that timed out (504 M_NOT_YET_UPLOADED): "
        f"{sum(1 for e in result['errors_outside_windows'] if timed_out(Record(**e)))}",
        *[f"  {e}" for e in result["errors_outside_windows"][:20]],
        f"corrupt during load: {len(result['corrupt_during_load'])}",
        f"verify (both nodes): {result['verify']['outcomes']} of {result['verify']['checked']} "
        f"(of which answer lost, row complete: "
        f"{len(result['verify']['answer_lost_but_complete'])} uploads)",
        *[f"  {b}" for b in result["verify"]["bad"][:20]],
        f"accepted uploads' rows: {result['accepted_rows_by_state']}",
        f"rows: {result['rows_by_state']}; "
        f"overdue: { {k: len(v) for k, v in result['overdue_rows'].items()} }",
        f"processes that exited by themselves: {result['exited'] or 'none'}",
        f"settle: {result['settle']}",
        f"bucket: {result['bucket']['keys']} keys {result['bucket']['kinds']}",
        *[f"  orphan {o}" for o in result["bucket"]["orphans"][:20]],
        f"LOST OR CORRUPTED: {result['lost'] + len(result['corrupt_during_load'])}",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    main()
