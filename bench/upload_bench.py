"""What a large upload costs the media server: upload-to-URL (MSC3870) versus PUT fallback.

For one upload of ``--size-mib`` MiB to S3 storage (the bench SeaweedFS server), this runs
the real deployable, a ``gunicorn`` process (``mediarepo/gunicorn.conf.py``) and a
``celery worker -c 1`` on PostgreSQL and Redis, and measures per process:

* bytes read: ``rchar`` and ``read_bytes`` of ``/proc/PID/io``. Linux counts only
  ``read(2)``-family calls in ``rchar``, not ``recv(2)``, and Python sockets use ``recv``,
  so network input does not show there; hence also
* TCP bytes received and sent, summed over the process's sockets (``ss -tinp``
  ``bytes_received``/``bytes_sent``, sampled every ``--poll`` seconds and once more before
  the connections close), split by peer (the client, S3, PostgreSQL, Redis);
* CPU time: ``utime + stime`` of ``/proc/PID/stat``;
* peak memory: ``VmHWM`` of ``/proc/PID/status``, a high-water mark since process start.
  So every flow gets freshly started processes (and a fresh S3 server); each fresh stack
  first makes one unmeasured ``--warmup-mib`` upload of the same flow (the first requests
  import most of the app and open connection pools), then ``VmHWM`` is reset to the
  current RSS (``echo 5 > /proc/PID/clear_refs``, Linux >= 4.0) and the measured upload
  runs. Reported: RSS before, the peak during the flow, and ``VmHWM`` since start.

Flow ``url``: POST /create, PUT the body straight to the presigned ``upload_url``, POST
/complete. Flow ``put``: POST /create, PUT the body to ``/_matrix/media/v3/upload/..`` on
gunicorn. Both wait for the screening task (the answer comes once it decided). The body is
random (`RandomBody`), made and hashed in 1 MiB chunks while it is sent; afterwards the row's size
and SHA-256 are checked, and the media is downloaded (a separate, extra phase, measured on
its own) and hashed. The screening task's own duration is read from the celery log.

    .venv/bin/python bench/upload_bench.py --size-mib 256

starts and stops the bench S3 server itself (``scripts/s3-server`` on :8433 with
directory ``var/s3-bench``, bucket ``mediarepo-bench``), creates
and drops the database ``mediarepo_bench``, uses Redis DB 13 (flushed) and free ports.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shared import (
    BIN,
    BROKER_URL,
    PYTHON,
    ROOT,
    S3_PORT,
    S3Server,
    bench_database,
    drop_database,
    flush_broker,
    free_port,
    load_average,
    machine_info,
    markdown_table,
    mib,
    recreate_database,
    s3_env,
)

MiB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
DB_NAME = bench_database("mediarepo_bench")
USER_ID = "@bench:localhost"

# ------------------------------------------------------------------ /proc sampling


@dataclass(frozen=True)
class ProcSample:
    rchar: int
    read_bytes: int
    wchar: int
    cpu_s: float
    vm_hwm_kib: int
    vm_rss_kib: int


def sample_proc(pid: int) -> ProcSample:
    io: dict[str, int] = {}
    with open(f"/proc/{pid}/io") as handle:
        for line in handle:
            name, value = line.split(":")
            io[name] = int(value)
    with open(f"/proc/{pid}/stat") as handle:
        # Fields after the command name (which may contain spaces): state is field 3.
        after_comm = handle.read().rsplit(")", 1)[1].split()
    utime, stime = int(after_comm[11]), int(after_comm[12])
    status: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(("VmHWM:", "VmRSS:")):
                name, value = line.split(":")
                status[name] = int(value.split()[0])
    return ProcSample(
        rchar=io["rchar"],
        read_bytes=io["read_bytes"],
        wchar=io["wchar"],
        cpu_s=(utime + stime) / CLK_TCK,
        vm_hwm_kib=status["VmHWM"],
        vm_rss_kib=status["VmRSS"],
    )


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return sorted(found)


# ------------------------------------------------------------------ TCP byte counters

SS_USERS = re.compile(r"pid=(\d+)")
SS_COUNTER = re.compile(r"\b(bytes_received|bytes_sent):(\d+)")


def read_tcp_counters(pids: set[int]) -> dict[tuple[int, str, str], tuple[int, int]]:
    """(pid, local, peer) -> (bytes_received, bytes_sent) of the TCP sockets ``pids`` hold."""
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, check=True).stdout
    counters: dict[tuple[int, str, str], tuple[int, int]] = {}
    lines = out.splitlines()
    for index, line in enumerate(lines):
        if line.startswith(("\t", " ")) or "users:" not in line:
            continue
        parts = line.split()
        # state recv-q send-q local peer users:...  (state is absent with a state filter)
        local, peer = (parts[3], parts[4]) if not parts[0].isdigit() else (parts[2], parts[3])
        info = lines[index + 1] if index + 1 < len(lines) else ""
        values = dict(SS_COUNTER.findall(info))
        for pid in {int(p) for p in SS_USERS.findall(line)} & pids:
            counters[(pid, local, peer)] = (
                int(values.get("bytes_received", 0)),
                int(values.get("bytes_sent", 0)),
            )
    return counters


class TcpMonitor:
    """Largest counter seen per socket while running, minus the counter at start."""

    def __init__(self, pids: set[int], interval: float) -> None:
        self.pids = pids
        self.interval = interval
        self.baseline = read_tcp_counters(pids)
        self.seen: dict[tuple[int, str, str], tuple[int, int]] = dict(self.baseline)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        for key, (received, sent) in read_tcp_counters(self.pids).items():
            old = self.seen.get(key, (0, 0))
            self.seen[key] = (max(old[0], received), max(old[1], sent))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def totals(self, pid: int, categorize: Any) -> dict[str, tuple[int, int]]:
        """Bytes (received, sent) by ``pid`` per peer category."""
        result: dict[str, tuple[int, int]] = {}
        for (owner, local, peer), (received, sent) in self.seen.items():
            if owner != pid:
                continue
            base = self.baseline.get((owner, local, peer), (0, 0))
            category = categorize(local, peer)
            old = result.get(category, (0, 0))
            result[category] = (old[0] + received - base[0], old[1] + sent - base[1])
        return result


# ------------------------------------------------------------------ the server stack


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Stack:
    env: dict[str, str]
    logs: Path
    port: int
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def start(self) -> dict[str, int]:
        """Start gunicorn and a celery worker; return the PIDs to watch by role."""
        server = self.spawn(
            "gunicorn",
            [str(BIN / "gunicorn"), "-c", "mediarepo/gunicorn.conf.py", "mediarepo.wsgi"],
        )

        def answers() -> bool:
            if server.poll() is not None:
                raise RuntimeError(f"gunicorn exited; see {self.logs / 'gunicorn.log'}")
            try:
                status, _ = request("GET", self.base_url + "/_matrix/client/versions")
            except OSError:
                return False
            return status == 200

        wait_until(answers, 60, "gunicorn to answer")
        gunicorn_workers = wait_until(lambda: children_of(server.pid), 30, "a gunicorn worker")
        worker_log = self.logs / "celery.log"
        worker = self.spawn(
            "celery",
            [
                str(BIN / "celery"),
                "-A",
                "mediarepo",
                "worker",
                "-c",
                "1",
                "-n",
                f"bench-{os.getpid()}@%h",
                "-l",
                "info",
                "--without-gossip",
                "--without-mingle",
            ],
        )

        def ready() -> bool:
            if worker.poll() is not None:
                raise RuntimeError(f"celery exited; see {worker_log}")
            return worker_log.exists() and b" ready." in worker_log.read_bytes()

        wait_until(ready, 90, "the celery worker")
        pool = wait_until(lambda: children_of(worker.pid), 30, "the celery pool process")
        if len(gunicorn_workers) != 1 or len(pool) != 1:
            raise RuntimeError(f"expected one child each: {gunicorn_workers}, {pool}")
        return {
            "gunicorn worker": gunicorn_workers[0],
            "gunicorn master": server.pid,
            "celery pool child": pool[0],
            "celery main": worker.pid,
        }

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        for name, process in list(self.processes.items()):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)
            del self.processes[name]


# ------------------------------------------------------------------ HTTP client


def request(
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10,
) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(
            method, parts.path + (f"?{parts.query}" if parts.query else ""), body, headers or {}
        )
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


POOL_SIZE = 64 * MiB


@functools.cache
def random_pool() -> memoryview:
    """64 MiB of random bytes, made once per process from a fixed seed (the same in every
    process, so a seeded body is too)."""
    return memoryview(random.Random(0x5EED).randbytes(POOL_SIZE))


class RandomBody:
    """A body of ``size`` bytes that no other body shares and no compressor shrinks, hashed
    chunk by chunk as it is read. Each chunk is 32 fresh random bytes, then a slice of
    ``random_pool`` at a random offset: making it costs the client a copy, not the kernel's
    random generator, whose CPU (about 160 MB/s) would otherwise be taken from the CPU the
    client shares with the server under test, and not with the store, in a pinned run. With
    ``seed``, the same bytes for the same seed and size (read in the same chunks)."""

    HEAD = 32

    def __init__(self, size: int, seed: int | None = None) -> None:
        self.remaining = size
        self.digest = hashlib.sha256()
        self.pick = random.Random(seed)  # None: seeded from os.urandom
        self.pool = random_pool()

    def read(self, size: int = MiB) -> bytes:
        length = min(size if size > 0 else MiB, self.remaining, MiB)
        head = min(length, self.HEAD)
        offset = self.pick.randrange(POOL_SIZE - length + 1)
        chunk = self.pick.randbytes(head) + self.pool[offset + head : offset + length]
        self.remaining -= len(chunk)
        self.digest.update(chunk)
        return chunk


def stream_put(
    url: str,
    size: int,
    headers: dict[str, str],
    seed: int | None = None,
    method: str = "PUT",
) -> tuple[http.client.HTTPConnection, int, bytes, str]:
    """PUT (or ``method``) ``size`` random bytes (``RandomBody``) to ``url``; the
    connection is left open (its socket's counters are read before it closes). Returns
    it, the status, the answer, the SHA-256."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600, blocksize=MiB)
    body = RandomBody(size, seed)
    conn.request(
        method,
        parts.path + (f"?{parts.query}" if parts.query else ""),
        body=body,  # type: ignore[arg-type]  # http.client streams any object with read()
        headers={
            "Content-Length": str(size),
            "Content-Type": "application/octet-stream",
            **headers,
        },
    )
    response = conn.getresponse()
    answer = response.read()
    if body.remaining:
        raise RuntimeError(f"{body.remaining} bytes of the body were not sent")
    return conn, response.status, answer, body.digest.hexdigest()


def download_sha256(
    url: str, headers: dict[str, str]
) -> tuple[http.client.HTTPConnection, int, int, str]:
    """GET ``url`` in 1 MiB reads; the connection is left open (see ``stream_put``)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    conn.request("GET", parts.path, headers=headers)
    response = conn.getresponse()
    digest, size = hashlib.sha256(), 0
    while chunk := response.read(MiB):
        digest.update(chunk)
        size += len(chunk)
    return conn, response.status, size, digest.hexdigest()


def media_row(database_url: str, media_id: str) -> dict[str, Any]:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        row = conn.execute(
            "SELECT state, size, sha256, upload_method, storage_key, content_type, last_error"
            " FROM msc3870_media WHERE media_id = %s",
            (media_id,),
        ).fetchone()
    if row is None:
        raise RuntimeError(f"no row for {media_id}")
    return dict(row)


def reset_hwm(pid: int) -> None:
    """Reset VmHWM to the current RSS (proc(5), clear_refs value 5, Linux >= 4.0)."""
    with open(f"/proc/{pid}/clear_refs", "w") as handle:
        handle.write("5")


# ------------------------------------------------------------------ one flow


@dataclass
class ProcResult:
    role: str
    pid: int
    rchar: int
    read_bytes: int
    wchar: int
    cpu_s: float
    rss_before_kib: int
    peak_kib: int  # VmHWM since the reset just before the measured phase
    hwm_since_start_kib: int
    tcp: dict[str, tuple[int, int]]

    @property
    def tcp_received(self) -> int:
        return sum(received for received, _ in self.tcp.values())

    @property
    def tcp_sent(self) -> int:
        return sum(sent for _, sent in self.tcp.values())


@dataclass
class FlowResult:
    flow: str
    size: int
    warmup_size: int
    media_id: str = ""
    phases: dict[str, float] = field(default_factory=dict)
    processes: list[ProcResult] = field(default_factory=list)
    sent_sha256: str = ""
    row: dict[str, Any] = field(default_factory=dict)
    download: dict[str, Any] = field(default_factory=dict)
    screening_task_s: float | None = None
    verified: bool = False


class Measurement:
    """/proc and TCP counters of ``roles`` from ``start()`` to ``stop()``."""

    def __init__(self, roles: dict[str, int], poll: float, categorize: Any) -> None:
        self.roles = roles
        self.poll = poll
        self.categorize = categorize

    def start(self) -> None:
        self.hwm_before = {role: sample_proc(pid).vm_hwm_kib for role, pid in self.roles.items()}
        for pid in self.roles.values():
            reset_hwm(pid)
        self.before = {role: sample_proc(pid) for role, pid in self.roles.items()}
        self.tcp = TcpMonitor(set(self.roles.values()), self.poll)
        self.tcp.start()

    def stop(self) -> list[ProcResult]:
        self.tcp.stop()
        after = {role: sample_proc(pid) for role, pid in self.roles.items()}
        before = self.before
        return [
            ProcResult(
                role=role,
                pid=pid,
                rchar=after[role].rchar - before[role].rchar,
                read_bytes=after[role].read_bytes - before[role].read_bytes,
                wchar=after[role].wchar - before[role].wchar,
                cpu_s=after[role].cpu_s - before[role].cpu_s,
                rss_before_kib=before[role].vm_rss_kib,
                peak_kib=after[role].vm_hwm_kib,
                hwm_since_start_kib=max(self.hwm_before[role], after[role].vm_hwm_kib),
                tcp=self.tcp.totals(pid, self.categorize),
            )
            for role, pid in self.roles.items()
        ]


def upload(
    flow: str, stack: Stack, size: int, auth: dict[str, str], phases: dict[str, float]
) -> tuple[http.client.HTTPConnection, str, str, str]:
    """One upload by ``flow``; returns the open connection, server name, media id, SHA-256."""
    t0 = time.monotonic()
    status, raw = request(
        "POST",
        stack.base_url + "/_matrix/media/v1/create",
        headers={**auth, "Content-Type": "application/json"},
        body=b"{}",
    )
    if status != 200:
        raise RuntimeError(f"/create answered {status}: {raw[:300]!r}")
    created = json.loads(raw)
    server_name, media_id = created["content_uri"].removeprefix("mxc://").split("/")
    phases["create"] = time.monotonic() - t0

    t0 = time.monotonic()
    if flow == "url":
        conn, status, raw, sha256 = stream_put(created["upload_url"], size, {})
    else:
        target = f"{stack.base_url}/_matrix/media/v3/upload/{server_name}/{media_id}"
        conn, status, raw, sha256 = stream_put(f"{target}?filename=bench.bin", size, auth)
    phases["PUT"] = time.monotonic() - t0
    if status != 200:
        raise RuntimeError(f"PUT answered {status}: {raw[:300]!r}")

    if flow == "url":
        t0 = time.monotonic()
        status, raw = request(
            "POST",
            f"{stack.base_url}/_matrix/media/v1/upload/{server_name}/{media_id}/complete"
            "?filename=bench.bin",
            headers={**auth, "Content-Type": "application/json"},
            body=b"{}",
            timeout=300,
        )
        phases["complete"] = time.monotonic() - t0
        if status != 200:
            raise RuntimeError(f"/complete answered {status}: {raw[:300]!r}")
    phases["total"] = sum(phases.values())
    return conn, server_name, media_id, sha256


def decided_row(database_url: str, media_id: str) -> dict[str, Any]:
    """The row once the checks decided (the answer normally comes after that anyway)."""
    return wait_until(
        lambda: (row := media_row(database_url, media_id))["state"] != "processing" and row,
        300,
        "the screening to decide",
    )


def run_flow(
    flow: str, args: argparse.Namespace, base_env: dict[str, str], token: str
) -> FlowResult:
    size = args.size_mib * MiB
    logs = Path(tempfile.mkdtemp(prefix=f"upload-bench-{flow}-", dir=args.workdir))
    port = free_port()
    env = {
        **base_env,
        "PORT": str(port),
        "PUBLIC_BASEURL": f"http://127.0.0.1:{port}",
        "MEDIAREPO_DATA_DIR": str(logs / "data"),
    }
    stack = Stack(env=env, logs=logs, port=port)
    result = FlowResult(flow=flow, size=size, warmup_size=int(args.warmup_mib * MiB))
    auth = {"Authorization": f"Bearer {token}"}

    def categorize(local: str, peer: str) -> str:
        if local.endswith(f":{port}"):
            return "client"
        return {f":{S3_PORT}": "S3", ":5432": "PostgreSQL", ":6379": "Redis"}.get(
            peer[peer.rfind(":") :], "other"
        )

    flush_broker()
    try:
        roles = stack.start()
        if args.weed_pid:
            roles["weed (S3 server)"] = args.weed_pid
        if result.warmup_size:
            # The first requests import most of the app (boto3, DRF, ...) and open the
            # connection pools; that is not the upload's cost.
            conn, _, warm_id, warm_sha = upload(flow, stack, result.warmup_size, auth, {})
            conn.close()
            if decided_row(env["DATABASE_URL"], warm_id)["sha256"] != warm_sha:
                raise RuntimeError("the warm-up upload was stored wrong")
        time.sleep(args.settle)

        measurement = Measurement(roles, args.poll, categorize)
        measurement.start()
        conn, server_name, media_id, result.sent_sha256 = upload(
            flow, stack, size, auth, result.phases
        )
        result.media_id = media_id
        result.row = decided_row(env["DATABASE_URL"], media_id)
        time.sleep(args.settle)  # let the worker finish acknowledging the task
        result.processes = measurement.stop()
        conn.close()

        if not args.no_download:
            measurement = Measurement(roles, args.poll, categorize)
            measurement.start()
            t0 = time.monotonic()
            conn, status, got_size, got_sha = download_sha256(
                f"{stack.base_url}/_matrix/client/v1/media/download/{server_name}/{media_id}", auth
            )
            wall = time.monotonic() - t0
            processes = measurement.stop()
            conn.close()
            result.download = {
                "status": status,
                "size": got_size,
                "sha256": got_sha,
                "wall_s": wall,
                "processes": [asdict(p) for p in processes],
            }
        row = result.row
        result.verified = (
            row["state"] == "complete"
            and row["size"] == size
            and row["sha256"] == result.sent_sha256
            and (args.no_download or result.download["sha256"] == result.sent_sha256)
        )
    finally:
        stack.stop()
    # celery logs "Task msc3870.screen_media[..] succeeded in 5.1s: 'complete'": the last is ours.
    durations = re.findall(
        r"msc3870\.screen_media\[[^\]]+\] succeeded in ([0-9.]+)s",
        (logs / "celery.log").read_text(errors="replace"),
    )
    result.screening_task_s = float(durations[-1]) if durations else None
    if not args.keep_logs:
        shutil.rmtree(logs, ignore_errors=True)
    else:
        print(f"logs of flow {flow}: {logs}", file=sys.stderr)
    return result


# ------------------------------------------------------------------ report

FLOW_NAMES = {"url": "A: upload to URL", "put": "B: PUT fallback"}


def mem(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def report(results: list[FlowResult], info: dict[str, Any], args: argparse.Namespace) -> str:
    out = [
        f"Upload of {args.size_mib} MiB (after a {args.warmup_mib} MiB warm-up upload); "
        f"{info['date']}; {info['nproc']} CPUs, {info['mem_total_gib']} GiB; "
        f"Python {info['python']}; PostgreSQL {info['postgres']}; git {info['git_head']}"
        + (f" (modified: {info['git_dirty']})" if info["git_dirty"] else ""),
        "",
        "Phases (wall seconds, as the client saw them) and verification:",
        "",
    ]
    rows = []
    for r in results:
        rows.append(
            [
                FLOW_NAMES[r.flow],
                f"{r.phases.get('create', 0):.3f}",
                f"{r.phases.get('PUT', 0):.2f}",
                f"{r.phases['complete']:.2f}" if "complete" in r.phases else "-",
                f"{r.phases.get('total', 0):.2f}",
                "-" if r.screening_task_s is None else f"{r.screening_task_s:.2f}",
                r.row.get("state", "?"),
                "yes" if r.verified else "NO",
            ]
        )
    out.append(
        markdown_table(
            [
                "flow",
                "create s",
                "PUT s",
                "complete s",
                "total s",
                "screening task s (celery log)",
                "final state",
                "size + SHA-256 match (row and download)",
            ],
            rows,
        )
    )
    out += [
        "",
        "Per process, from /create until the row is decided (bytes in MiB):",
        "",
    ]
    rows = []
    for r in results:
        for p in r.processes:
            rows.append(
                [
                    FLOW_NAMES[r.flow],
                    p.role,
                    mib(p.rchar),
                    mib(p.read_bytes),
                    mib(p.tcp_received),
                    mib(p.tcp_sent),
                    f"{p.cpu_s:.2f}",
                    mem(p.rss_before_kib),
                    mem(p.peak_kib),
                    f"{(p.peak_kib - p.rss_before_kib) / 1024:+.1f}",
                    mem(p.hwm_since_start_kib),
                ]
            )
    out.append(
        markdown_table(
            [
                "flow",
                "process",
                "rchar",
                "read_bytes",
                "TCP received",
                "TCP sent",
                "CPU s",
                "RSS before MiB",
                "peak RSS in flow MiB",
                "peak - before",
                "VmHWM since start MiB",
            ],
            rows,
        )
    )
    out += ["", "TCP bytes by peer (MiB received / sent; media server processes):", ""]
    rows = []
    for r in results:
        for p in r.processes:
            if p.role.startswith("weed"):
                continue
            peers = ", ".join(
                f"{peer} {mib(rcv)} / {mib(snt)}"
                for peer, (rcv, snt) in sorted(p.tcp.items())
                if rcv >= 1024 or snt >= 1024
            )
            rows.append([FLOW_NAMES[r.flow], p.role, peers or "< 1 KiB"])
    out.append(markdown_table(["flow", "process", "peers (>= 1 KiB)"], rows))
    downloads = [r for r in results if r.download]
    if downloads:
        out += ["", "Extra phase: download through gunicorn (GET client/v1/media/download):", ""]
        rows = []
        for r in downloads:
            w = next(p for p in r.download["processes"] if p["role"] == "gunicorn worker")
            rows.append(
                [
                    FLOW_NAMES[r.flow],
                    f"{r.download['wall_s']:.2f}",
                    f"{w['cpu_s']:.2f}",
                    mib(sum(v[0] for v in w["tcp"].values())),
                    mib(sum(v[1] for v in w["tcp"].values())),
                    mem(w["rss_before_kib"]),
                    mem(w["peak_kib"]),
                    "yes" if r.download["sha256"] == r.sent_sha256 else "NO",
                ]
            )
        out.append(
            markdown_table(
                [
                    "media from flow",
                    "wall s",
                    "gunicorn worker CPU s",
                    "TCP received",
                    "TCP sent",
                    "RSS before MiB",
                    "peak RSS MiB",
                    "SHA-256 matches",
                ],
                rows,
            )
        )
    return "\n".join(out)


# ------------------------------------------------------------------ --compare (issue 9)
#
# One run, beside Synapse: for each size, the bare presigned PUT to the store (the limit),
# create -> PUT to upload_url -> /complete on this server, and Synapse's create -> PUT
# (MSC2246 through the homeserver); the time from the start of an upload until a
# recipient already waiting on the id gets the first byte; the CPU of every process of
# each server per GiB uploaded. This server runs as `make run` does (gunicorn + uvicorn
# workers, mediarepo.asgi, tasks in-process unless --celery) under each --policies entry.

SYNAPSE_SCRIPT = ROOT / "scripts" / "synapse"
SYNAPSE_PYTHON = ROOT / ".venv-synapse" / "bin" / "python"
POLICY_ENV: dict[str, dict[str, str]] = {
    # Default: /complete answers on metadata; SHA-256 (dedup, block list) after it.
    "default": {},
    # The full-object checks skipped: size and sniffed type only (no SHA-256, no dedup).
    "metadata-only": {
        "MSC3870_CHECKS": "msc3870.screening.check_size,msc3870.screening.check_content_type"
    },
    # /complete waits for the verdict (the behaviour before issue 9).
    "wait": {"MSC3870_COMPLETE_WAITS_FOR_CHECKS": "1"},
    # Every upload read whole and hashed (the default before SHA256_WHEN "needed").
    "hash-always": {"MSC3870_SHA256_WHEN": "always"},
    # The default, and each measured upload the twin of one made just before it (same
    # size and bytes) and never hashed: the screening reads both (the worst case).
    "twin": {},
    # Upload URLs write to a versioned bucket of their own (S3_INCOMING_BUCKET): the
    # version /complete looked at is checked and served where it is, copied after.
    "versioned": {"MSC3870_S3_INCOMING_BUCKET": "mediarepo-bench-incoming"},
}
TWIN_POLICY = "twin"
# --compare --paths: how the bytes reach this server's store. "url": PUT to the upload
# URL, straight to the store; "put" (MSC2246) and "post" (/upload): through this server.
PATH_NAMES = {"url": "upload URL", "put": "PUT through", "post": "POST through"}


def tree_cpu_ticks(root_pid: int) -> float:
    """user+system of a process and all its descendants, with what they reaped, in the
    kernel's clock ticks (10 ms here): exact about threads that ended, coarse."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def tree_cpu(root_pid: int) -> float:
    """Seconds on a CPU of every live thread of a process tree, to the nanosecond
    (``/proc/<pid>/task/<tid>/schedstat``). A small upload costs this server a few ticks
    in all, so ``tree_cpu_ticks`` alone cannot tell 15 ms from 25 ms; threads that end
    in between are missed here, which ``cpu_between`` checks with the ticks."""
    total = 0
    for pid in tree_pids(root_pid):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


#: Seconds by which the ticks may exceed the nanosecond count before they are believed.
ENDED_THREAD_SLACK = 0.05


@dataclass
class CpuMark:
    precise: float
    ticks: float

    @classmethod
    def of(cls, roots: list[int]) -> CpuMark:
        return cls(
            precise=sum(tree_cpu(pid) for pid in roots),
            ticks=sum(tree_cpu_ticks(pid) for pid in roots),
        )

    def since(self, start: CpuMark) -> float:
        """CPU seconds between two marks: the precise count, unless the ticks show more
        by over ``ENDED_THREAD_SLACK`` (a thread ended in between and took its time with
        it; less is the ticks' own rounding, a tick per process at each end): then the
        ticks."""
        precise, ticks = self.precise - start.precise, self.ticks - start.ticks
        return ticks if ticks - precise > ENDED_THREAD_SLACK else precise


def tree_pids(root_pid: int) -> list[int]:
    import psutil

    try:
        root = psutil.Process(root_pid)
        return [root.pid, *(p.pid for p in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def reset_peaks(roots: list[int]) -> dict[int, int]:
    """Reset every process's VmHWM to its RSS; return the RSS (KiB) by PID."""
    rss = {}
    for root in roots:
        for pid in tree_pids(root):
            try:
                reset_hwm(pid)
                rss[pid] = sample_proc(pid).vm_rss_kib
            except OSError:
                continue
    return rss


def peak_growth_mib(rss_before: dict[int, int]) -> float:
    """The largest growth of one process's peak RSS over its RSS at the reset."""
    growth = 0
    for pid, before in rss_before.items():
        try:
            growth = max(growth, sample_proc(pid).vm_hwm_kib - before)
        except OSError:
            continue
    return growth / 1024


class Recipient(threading.Thread):
    """Asks for the media as soon as its id exists (waiting, MSC2246) and notes when the
    first byte of the answer arrives; then reads and hashes the rest."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.url, self.headers = url, headers
        self.first_byte_at = 0.0
        self.status = 0
        self.sha256 = ""
        self.error = ""

    def run(self) -> None:
        try:
            parts = urlsplit(self.url)
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
            conn.request("GET", f"{parts.path}?{parts.query}", headers=self.headers)
            response = conn.getresponse()
            self.status = response.status
            digest = hashlib.sha256()
            first = response.read(1)
            self.first_byte_at = time.monotonic()
            digest.update(first)
            while chunk := response.read(MiB):
                digest.update(chunk)
            self.sha256 = digest.hexdigest()
            conn.close()
        except Exception as exc:  # reported, not raised: the thread is joined later
            self.error = repr(exc)


class BenchSynapse:
    """Synapse from ``scripts/synapse`` (its own venv, SQLite, media on local disk), with
    max_upload_size raised for the largest size (an extra config file)."""

    def __init__(self, data_dir: Path, max_upload: int) -> None:
        self.data_dir, self.max_upload = data_dir, max_upload
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def _script(self, *args: str) -> None:
        env = {**os.environ, "SYNAPSE_DIR": str(self.data_dir), "SYNAPSE_PORT": str(self.port)}
        subprocess.run(
            [str(SYNAPSE_SCRIPT), *args], cwd=ROOT, env=env, check=True, capture_output=True
        )

    def start(self) -> None:
        # The script writes the config, keys and secrets; it is then restarted with one
        # more config file (Synapse merges every -c).
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._script("start", "--fresh")
        self._script("stop")
        extra = self.data_dir / "bench.yaml"
        extra.write_text(f"max_upload_size: {self.max_upload}\nmax_pending_media_uploads: 100\n")
        log = open(self.data_dir / "bench-synapse.log", "ab")  # noqa: SIM115 - the child's
        self.process = subprocess.Popen(
            [
                str(SYNAPSE_PYTHON),
                "-m",
                "synapse.app.homeserver",
                "-c",
                str(self.data_dir / "homeserver.yaml"),
                "-c",
                str(extra),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def answers() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"synapse exited; see {self.data_dir}/bench-synapse.log")
            try:
                return request("GET", self.url + "/_matrix/client/versions")[0] == 200
            except OSError:
                return False

        wait_until(answers, 120, "synapse to answer")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)

    def version(self) -> str:
        out = subprocess.run(
            [str(SYNAPSE_PYTHON), "-c", "import synapse; print(synapse.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout.strip().split(" ")[0]

    def register(self, localpart: str) -> str:
        import hmac

        secret = (self.data_dir / "registration_shared_secret").read_text().strip()
        endpoint = self.url + "/_synapse/admin/v1/register"
        nonce = json.loads(request("GET", endpoint)[1])["nonce"]
        password = "bench-" + localpart
        mac = hmac.new(
            secret.encode(),
            "\0".join((nonce, localpart, password, "notadmin")).encode(),
            hashlib.sha1,
        ).hexdigest()
        body = {"nonce": nonce, "username": localpart, "password": password, "mac": mac}
        status, raw = request(
            "POST",
            endpoint,
            headers={"Content-Type": "application/json"},
            body=json.dumps(body).encode(),
            timeout=60,
        )
        if status != 200:
            raise RuntimeError(f"synapse register: {status} {raw[:200]!r}")
        return str(json.loads(raw)["access_token"])


def make_run_stack(
    base_env: dict[str, str], policy: str, logs: Path, celery: bool
) -> tuple[Stack, subprocess.Popen[bytes], list[int]]:
    """This server as `make run` starts it (ASGI), one web process; the root PIDs whose
    process trees are measured."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **base_env,
        **POLICY_ENV[policy],
        "PORT": str(port),
        "PUBLIC_BASEURL": f"http://127.0.0.1:{port}",
        "MEDIAREPO_DATA_DIR": str(logs / "data"),
        "WEB_CONCURRENCY": "1",
    }
    if not celery:
        env.pop("CELERY_BROKER_URL", None)
    stack = Stack(env=env, logs=logs, port=port)
    server = stack.spawn(
        "server", [str(BIN / "gunicorn"), "-c", "mediarepo/gunicorn.conf.py", "mediarepo.asgi"]
    )

    def answers() -> bool:
        if server.poll() is not None:
            raise RuntimeError(f"gunicorn exited; see {logs / 'server.log'}")
        try:
            return request("GET", stack.base_url + "/_matrix/client/versions")[0] == 200
        except OSError:
            return False

    wait_until(answers, 60, "gunicorn to answer")
    roots = [server.pid]
    if celery:
        worker = stack.spawn(
            "celery",
            [
                *(str(BIN / "celery"), "-A", "mediarepo", "worker", "-c", "1", "-l", "info"),
                *("--without-gossip", "--without-mingle", "-n", f"bench-{os.getpid()}@%h"),
            ],
        )
        wait_until(
            lambda: (
                b" ready." in (logs / "celery.log").read_bytes()
                if (logs / "celery.log").exists()
                else False
            ),
            90,
            "the celery worker",
        )
        roots.append(worker.pid)
    return stack, server, roots


def fresh_store(s3: S3Server) -> None:
    """A fresh bench SeaweedFS, warmed by one small write to each bucket (the first write
    to a bucket allocates its volumes and is much slower than the next: not what the
    measured upload should pay)."""
    start_store(s3)
    bare_put(MiB)
    client = bench_s3_client()
    for bucket in incoming_buckets():
        client.put_object(Bucket=bucket, Key="warm", Body=b"w" * MiB)
        for version in client.list_object_versions(Bucket=bucket).get("Versions", []):
            client.delete_object(Bucket=bucket, Key="warm", VersionId=version["VersionId"])


def incoming_buckets() -> list[str]:
    """The incoming buckets (versioning on) that the "versioned" policy, or
    MSC3870_S3_INCOMING_BUCKET in the environment, names."""
    names = {env.get("MSC3870_S3_INCOMING_BUCKET") for env in [*POLICY_ENV.values(), os.environ]}
    return sorted(name for name in names if name)


def start_store(s3: S3Server) -> None:
    """Start the bench SeaweedFS empty, with the ``incoming_buckets``."""
    s3.start()
    client = bench_s3_client()
    for bucket in incoming_buckets():
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})


def bench_s3_client() -> Any:
    import boto3
    from botocore.config import Config

    env = s3_env()
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_S3_ENDPOINT_URL"],
        region_name=env["AWS_S3_REGION_NAME"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def bare_put(size: int) -> float:
    """A presigned PUT straight to the bench bucket: what the store alone takes."""
    env = s3_env()
    client = bench_s3_client()
    key = f"bare/{os.urandom(8).hex()}"
    url = client.generate_presigned_url(
        "put_object", Params={"Bucket": env["AWS_STORAGE_BUCKET_NAME"], "Key": key}, ExpiresIn=600
    )
    t0 = time.monotonic()
    conn, status, raw, _ = stream_put(url, size, {})
    wall = time.monotonic() - t0
    conn.close()
    if status != 200:
        raise RuntimeError(f"bare PUT answered {status}: {raw[:200]!r}")
    client.delete_object(Bucket=env["AWS_STORAGE_BUCKET_NAME"], Key=key)
    return wall


def one_upload(
    kind: str,
    base_url: str,
    token: str,
    size: int,
    cpu_roots: list[int],
    database_url: str,
    *,
    recipient_waits: bool,
    seed: int | None = None,
) -> dict[str, Any]:
    """create -> (recipient waiting) -> PUT -> /complete (url) for ``kind`` "url" (this
    server), "put" (MSC2246 PUT through this server), "synapse" (MSC2246 PUT through
    Synapse), or POST /upload through this server ("post": no /create, and no recipient
    can wait, the id is made by the upload). Wall times from the start of the upload; CPU
    of ``cpu_roots``' trees until the media is decided (this server) or downloaded
    (Synapse: it is decided once the PUT answered)."""
    auth = {"Authorization": f"Bearer {token}"}
    rss_before = reset_peaks(cpu_roots)
    cpu0 = CpuMark.of(cpu_roots)
    t0 = time.monotonic()
    if kind == "post":
        recipient_waits = False
        target = f"{base_url}/_matrix/media/v3/upload?filename=b.bin"
        conn, status, raw, sha256 = stream_put(target, size, auth, method="POST")
        if status != 200:
            raise RuntimeError(f"POST /upload: {status} {raw[:200]!r}")
        created = json.loads(raw)
    else:
        status, raw = request(
            "POST",
            base_url + "/_matrix/media/v1/create",
            headers={**auth, "Content-Type": "application/json"},
            body=b"{}",
        )
        if status != 200:
            raise RuntimeError(f"{kind} /create: {status} {raw[:200]!r}")
        created = json.loads(raw)
    server_name, media_id = created["content_uri"].removeprefix("mxc://").split("/")
    download_url = f"{base_url}/_matrix/client/v1/media/download/{server_name}/{media_id}"
    recipient = Recipient(download_url + "?timeout_ms=120000", auth)
    if recipient_waits:
        recipient.start()
    t_create = 0.0 if kind == "post" else time.monotonic() - t0
    if kind == "url":
        conn, status, raw, sha256 = stream_put(created["upload_url"], size, {}, seed)
    elif kind != "post":
        target = f"{base_url}/_matrix/media/v3/upload/{server_name}/{media_id}?filename=b.bin"
        conn, status, raw, sha256 = stream_put(target, size, auth)
    t_put = time.monotonic() - t0
    conn.close()
    if status != 200:
        raise RuntimeError(f"{kind} PUT: {status} {raw[:200]!r}")
    t_done = t_put
    if kind == "url":
        status, raw = request(
            "POST",
            f"{base_url}/_matrix/media/v1/upload/{server_name}/{media_id}/complete",
            headers={**auth, "Content-Type": "application/json"},
            body=b"{}",
            timeout=300,
        )
        t_done = time.monotonic() - t0
        if status != 200:
            raise RuntimeError(f"/complete: {status} {raw[:200]!r}")
    decided = t_done
    row: dict[str, Any] = {}
    if kind != "synapse":
        row = decided_row(database_url, media_id)
        decided = time.monotonic() - t0
        if row["state"] != "complete":
            raise RuntimeError(f"row {row}")
    if recipient_waits:
        recipient.join(600)
    else:
        time.sleep(0.5)  # the background screening thread returns, the worker acknowledges
    cpu = CpuMark.of(cpu_roots).since(cpu0)
    window = time.monotonic() - t0
    peak_mib = peak_growth_mib(rss_before)
    if not recipient_waits:  # verified by a download after the measured window
        recipient.run()
    t_first_byte = recipient.first_byte_at - t0 if recipient_waits else float("nan")
    return {
        "peak_growth_mib": peak_mib,
        "window_s": window,
        "create_s": t_create,
        "put_done_s": t_put,
        "answered_s": t_done,
        "decided_s": decided,
        "first_byte_s": t_first_byte,
        "cpu_s": cpu,
        "verified": recipient.status == 200 and recipient.sha256 == sha256,
        # Not 200: "first byte" is an error's (504 once the wait's cap passed), not the media.
        "recipient_status": recipient.status,
        "recipient_error": recipient.error,
        # This server: whether the screening hashed the bytes, and the object it serves.
        "hashed": bool(row.get("sha256")),
        "storage_key": row.get("storage_key", ""),
    }


def measured_upload(
    kind: str,
    base_url: str,
    token: str,
    size: int,
    cpu_roots: list[int],
    database_url: str,
    *,
    recipient_waits: bool,
    emptied: S3Server | None,
) -> dict[str, Any]:
    """``one_upload`` into a store ``emptied`` first (when given); for ``TWIN_POLICY``,
    of the bytes of an upload made just before it, not measured, never hashed."""
    if emptied is not None:
        fresh_store(emptied)
    if kind != TWIN_POLICY:
        quiet = wait_quiet()
        return one_upload(
            kind, base_url, token, size, cpu_roots, database_url,
            recipient_waits=recipient_waits,
        ) | {"quiet_wait_s": quiet}  # fmt: skip
    seed = random.getrandbits(64)
    partner = one_upload(
        "url", base_url, token, size, cpu_roots, database_url,
        recipient_waits=False, seed=seed,
    )  # fmt: skip
    quiet = wait_quiet()
    twin = one_upload(
        "url", base_url, token, size, cpu_roots, database_url,
        recipient_waits=recipient_waits, seed=seed,
    )  # fmt: skip
    if partner["hashed"] or not twin["hashed"] or twin["storage_key"] != partner["storage_key"]:
        raise RuntimeError(f"not a twin of an unhashed upload: {partner} {twin}")
    return twin | {"quiet_wait_s": quiet}


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def wait_quiet(busy_below: float = 0.15, interval: float = 0.5, limit: float = 20.0) -> float:
    """Flush dirty pages, then wait until the machine is under ``busy_below`` busy over
    ``interval`` (at most ``limit`` s): each measured upload starts on a quiet machine,
    not in the store's or the kernel's work after the last one (seen: Synapse's CPU per
    upload four times higher when it followed four of this server's policies). Returns
    the seconds waited."""
    started = time.monotonic()
    os.sync()
    while time.monotonic() - started < limit:
        busy0, total0 = _cpu_jiffies()
        time.sleep(interval)
        busy1, total1 = _cpu_jiffies()
        if total1 > total0 and (busy1 - busy0) / (total1 - total0) < busy_below:
            break
    return time.monotonic() - started


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def compare_main(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if unknown := set(policies) - set(POLICY_ENV):
        sys.exit(f"unknown policies: {unknown}")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if unknown := set(paths) - set(PATH_NAMES):
        sys.exit(f"unknown paths: {unknown}")
    info = machine_info()
    logs = Path(tempfile.mkdtemp(prefix="upload-compare-", dir=args.workdir))
    store_cpus = None
    if args.store_cpu is not None:
        # The store on a CPU of its own, as on a machine of its own; this process, the
        # servers it starts and their clients on the others (children inherit it).
        others = os.sched_getaffinity(0) - {args.store_cpu}
        if not others:
            sys.exit(f"--store-cpu {args.store_cpu}: no CPU left for the rest")
        os.sched_setaffinity(0, others)
        store_cpus = str(args.store_cpu)
        info["pinned"] = {"store": store_cpus, "rest": sorted(others)}
    s3 = S3Server(manage=not args.external_s3, wait_for_ports=args.wait_s3_ports, cpus=store_cpus)
    database_url = recreate_database(DB_NAME)
    base_env = {
        **os.environ,
        **s3_env(),
        "DJANGO_SETTINGS_MODULE": "mediarepo.settings",
        "DATABASE_URL": database_url,
        "DJANGO_SECRET_KEY": "bench-" + os.urandom(16).hex(),
        "CELERY_BROKER_URL": BROKER_URL,
        "MSC3870_MAX_UPLOAD_SIZE": str(max(sizes) * MiB + MiB),
        "MSC3870_COMPLETE_WAIT_SECONDS": "120",
        "MSC3870_MAX_PENDING_UPLOADS": "100",
        "MSC3870_CREATE_RATE": "10000/min",
        "PYTHONUNBUFFERED": "1",
    }
    base_env.pop("REDIS_URL", None)
    results: dict[str, Any] = {"machine": info, "loadavg": [], "runs": []}
    synapse = BenchSynapse(logs / "synapse", max(sizes) * MiB + MiB) if args.synapse else None
    stacks: list[Stack] = []
    try:
        start_store(s3)
        subprocess.run(
            [str(PYTHON), "manage.py", "migrate", "--noinput", "-v", "0"],
            cwd=ROOT,
            env=base_env,
            check=True,
        )
        token = (
            subprocess.run(
                [str(PYTHON), "manage.py", "create_access_token", USER_ID, "--label", "bench"],
                cwd=ROOT,
                env=base_env,
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        subjects: list[tuple[str, str, str, list[int]]] = []
        for policy in policies:
            flush_broker()
            stack, _, roots = make_run_stack(base_env, policy, logs / policy, args.celery)
            stacks.append(stack)
            for path in paths:
                kind = TWIN_POLICY if policy == TWIN_POLICY and path == "url" else path
                subjects.append(
                    (f"this server ({policy}, {PATH_NAMES[path]})", kind, stack.base_url, roots)
                )
        if synapse is not None:
            synapse.start()
            results["synapse_version"] = synapse.version()
            assert synapse.process is not None
            subjects.append(("Synapse", "synapse", synapse.url, [synapse.process.pid]))
            synapse_token = synapse.register("bench")
        # Warm-up: imports, connection pools, first queries (not the upload's cost).
        for _, kind, url, roots in subjects:
            one_upload(
                "url" if kind == TWIN_POLICY else kind,
                url,
                synapse_token if kind == "synapse" else token,
                4 * MiB,
                roots,
                database_url,
                recipient_waits=True,
            )
        # What each server spends doing nothing (wake-up polls, timers, its periodic
        # sweeps), per second: the report subtracts it over each upload's window. All
        # servers at once, after the warm-up (and the sweeps' first runs), over long
        # enough for this server's sweeps of every minute and every two minutes to run:
        # a few seconds would miss them, and an upload's window of half a minute would
        # then count them as the upload's.
        results["idle_cpu_per_s"] = {}
        marks = {name: CpuMark.of(roots) for name, _, _, roots in subjects}
        time.sleep(args.idle_seconds)
        for name, _, _, roots in subjects:
            idle = CpuMark.of(roots).since(marks[name]) / args.idle_seconds
            results["idle_cpu_per_s"][name] = idle
        for size_mib in sizes:
            size = size_mib * MiB
            for repeat in range(args.repeat):
                results["loadavg"].append(load_average())
                # The bench SeaweedFS reclaims deleted space only by vacuum, and stalls
                # when writes fill one of its 1 GiB volumes, at the same point of every
                # run (docs/benchmarks.md). A fresh one before each repeat, and before
                # each large upload; its clients reconnect (botocore retries the first
                # request).
                fresh = s3.manage and size_mib >= 64
                if s3.manage or repeat == 0:
                    fresh_store(s3)
                run = {"size_mib": size_mib, "repeat": repeat, "bare_put_s": bare_put(size)}
                # A different subject first in each repeat: none always follows the
                # others' uploads (the store's and the kernel's work after them).
                shift = repeat % len(subjects)
                for name, kind, url, roots in subjects[shift:] + subjects[:shift]:
                    subject = (
                        kind,
                        url,
                        synapse_token if kind == "synapse" else token,
                        size,
                        roots,
                        database_url,
                    )
                    emptied = s3 if fresh and kind != "synapse" else None
                    # CPU and answer times without a recipient (its download would count);
                    # then the time to the first byte with one waiting since /create.
                    run[name] = measured_upload(*subject, recipient_waits=False, emptied=emptied)
                    waited = measured_upload(*subject, recipient_waits=True, emptied=emptied)
                    run[name]["first_byte_s"] = waited["first_byte_s"]
                    run[name]["first_byte_status"] = waited["recipient_status"]
                    run[name]["decided_with_recipient_s"] = waited["decided_s"]
                    run[name]["verified"] = run[name]["verified"] and waited["verified"]
                results["runs"].append(run)
                print(f"{size_mib} MiB #{repeat}: " + json.dumps(run), file=sys.stderr, flush=True)
    finally:
        for stack in stacks:  # also when an upload failed: no gunicorn left running
            stack.stop()
        if synapse is not None:
            synapse.stop()
        s3.stop()
        drop_database(DB_NAME)
        if not args.keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
    results["loadavg"].append(load_average())
    text = compare_report(results, [s[0] for s in subjects], sizes)
    print(text)
    if args.plot:
        compare_plot(results, [s[0] for s in subjects], args.plot)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    failed = [
        (run["size_mib"], name)
        for run in results["runs"]
        for name in (s[0] for s in subjects)
        if not run[name]["verified"]
    ]
    if failed:
        sys.exit(f"verification FAILED: {failed}")


def busy_cpu(results: dict[str, Any], name: str, run: dict[str, Any]) -> float:
    """CPU of one upload minus what the server spends idle over the same window."""
    idle = results["idle_cpu_per_s"][name]
    return max(0.0, run[name]["cpu_s"] - idle * run[name]["window_s"])


def compare_report(results: dict[str, Any], names: list[str], sizes: list[int]) -> str:
    info = results["machine"]
    out = [
        f"{info['date']}; {info['nproc']} CPUs"
        + (
            f" (the store on CPU {info['pinned']['store']}, the rest on {info['pinned']['rest']})"
            if info.get("pinned")
            else ""
        )
        + f"; git {info['git_head']}"
        + (f" (modified: {info['git_dirty']})" if info["git_dirty"] else "")
        + f"; Synapse {results.get('synapse_version', '-')}; load average during the run: "
        + ", ".join(results["loadavg"]),
        "Idle CPU per second (measured before the uploads, subtracted over each upload's "
        "window in 'CPU s per GiB'): "
        + ", ".join(f"{k} {v:.3f}" for k, v in results["idle_cpu_per_s"].items()),
        "",
        "Medians over the repeats. 'answered': create + PUT + /complete (this server) or "
        "create + PUT (Synapse), from the start of the upload; 'vs bare': the bare presigned "
        "PUT's wall time divided by it (1.0 = the store's own speed); 'first byte': a "
        "recipient waiting on the id since /create gets its first byte (a second upload); "
        "CPU: every process of that server from /create until the media is decided, in "
        "the upload without a recipient.",
        "",
    ]
    rows = []
    for size_mib in sizes:
        runs = [r for r in results["runs"] if r["size_mib"] == size_mib]
        bare = _median([r["bare_put_s"] for r in runs])
        rows.append(
            [f"{size_mib} MiB", "bare presigned PUT", f"{bare:.2f}", "1.00", "", "", "", "", "", ""]
        )
        synapse_cpu = None
        if "Synapse" in names:
            synapse_cpu = _median([busy_cpu(results, "Synapse", r) for r in runs]) / (
                size_mib / 1024
            )
        for name in names:
            m = {k: _median([r[name][k] for r in runs]) for k in runs[0][name] if k.endswith("_s")}
            raw_per_gib = m["cpu_s"] / (size_mib / 1024)
            per_gib = _median([busy_cpu(results, name, r) for r in runs]) / (size_mib / 1024)
            # What this server adds to the store's PUT: /create, and /complete (0 for
            # Synapse, whose PUT carries the bytes itself).
            added = _median([r[name]["create_s"] for r in runs]) + _median(
                [r[name]["answered_s"] - r[name]["put_done_s"] for r in runs]
            )
            rows.append(
                [
                    f"{size_mib} MiB",
                    name,
                    f"{m['answered_s']:.2f}",
                    f"{bare / m['answered_s']:.2f}",
                    f"{1000 * added:.0f} ms, {bare / (bare + added):.2f}"
                    if name != "Synapse"
                    else "",
                    f"{m['decided_s']:.2f}",
                    f"{m['first_byte_s']:.2f}",
                    f"{per_gib:.2f} ({raw_per_gib:.2f})",
                    "" if not synapse_cpu else f"{100 * per_gib / synapse_cpu:.0f} %",
                    f"{_median([r[name]['peak_growth_mib'] for r in runs]):+.1f}",
                ]
            )
    out.append(
        markdown_table(
            [
                "size",
                "path",
                "answered s",
                "vs bare",
                "added by /create + /complete, bare / (bare + added)",
                "decided s",
                "first byte s",
                "CPU s per GiB, idle subtracted (raw)",
                "CPU vs Synapse",
                "peak RSS growth MiB (one process)",
            ],
            rows,
        )
    )
    if len(sizes) > 1:
        out += ["", cpu_split_report(results, names)]
    return "\n".join(out)


def compare_plot(results: dict[str, Any], names: list[str], path: Path) -> None:
    """Left: each upload's busy CPU against its size, with the least-squares lines of
    ``cpu_split``. Right: from the start of the upload, when the uploader was answered and
    when a waiting recipient got the first byte, beside the bare presigned PUT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    sizes = sorted({r["size_mib"] for r in runs})
    fig, (cpu_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in names:
        xs = [r["size_mib"] for r in runs]
        (points,) = cpu_ax.plot(
            xs, [busy_cpu(results, name, r) for r in runs], "o", alpha=0.6, label=name
        )
        fixed, per_gib = cpu_split(results, name)
        cpu_ax.plot(
            sizes, [fixed + per_gib * x / 1024 for x in sizes], "-", color=points.get_color()
        )
        answered = [
            _median([r[name]["answered_s"] for r in runs if r["size_mib"] == x]) for x in sizes
        ]
        first = [
            _median([r[name]["first_byte_s"] for r in runs if r["size_mib"] == x]) for x in sizes
        ]
        time_ax.plot(sizes, answered, "o-", color=points.get_color(), label=f"{name}: answered")
        time_ax.plot(sizes, first, "s--", color=points.get_color(), label=f"{name}: first byte")
    bare = [_median([r["bare_put_s"] for r in runs if r["size_mib"] == x]) for x in sizes]
    time_ax.plot(sizes, bare, "k:", label="bare presigned PUT")
    cpu_ax.set(xlabel="upload size (MiB)", ylabel="server CPU s, idle subtracted")
    cpu_ax.set_title("CPU per upload (lines: least squares)")
    time_ax.set(xlabel="upload size (MiB)", ylabel="seconds from the start of the upload")
    time_ax.set_title("Answered, and first byte to a waiting recipient")
    cpu_ax.legend(fontsize=8)
    time_ax.legend(fontsize=7)
    fig.suptitle(f"{results['machine']['date']}, git {results['machine']['git_head']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_split(results: dict[str, Any], name: str) -> tuple[float, float]:
    """(seconds per upload, seconds per GiB): the least-squares line through every
    upload's busy CPU against its size. What an upload costs whatever its size, and what
    each further GiB adds: CPU per GiB at one size mixes the two."""
    points = [(r["size_mib"] / 1024, busy_cpu(results, name, r)) for r in results["runs"]]
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return mean_y - slope * mean_x, slope


def cpu_split_report(results: dict[str, Any], names: list[str]) -> str:
    split = {name: cpu_split(results, name) for name in names}
    synapse_slope = split["Synapse"][1] if "Synapse" in split else None
    rows = [
        [
            name,
            f"{1000 * fixed:.1f}",
            f"{slope:.3f}",
            "" if not synapse_slope else f"{100 * slope / synapse_slope:.1f} %",
        ]
        for name, (fixed, slope) in split.items()
    ]
    return (
        "CPU split into a cost per upload and a cost per GiB (least squares over every "
        "upload of every size, idle subtracted):\n\n"
        + markdown_table(
            ["path", "ms per upload", "s per GiB", "per GiB vs Synapse's per GiB"], rows
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument(
        "--warmup-mib",
        type=float,
        default=16,
        help="size of the unmeasured upload first made on each fresh stack (0: none)",
    )
    parser.add_argument("--flows", default="url,put", help="comma-separated: url, put")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between ss samples")
    parser.add_argument("--settle", type=float, default=2.0, help="idle seconds around flows")
    parser.add_argument("--no-download", action="store_true", help="skip the download phase")
    parser.add_argument(
        "--external-s3",
        action="store_true",
        help="use an S3 server already running on :8433 (default: start a fresh one per flow)",
    )
    parser.add_argument(
        "--wait-s3-ports",
        type=float,
        default=60,
        help="seconds to wait for the bench S3 server's ports to be free",
    )
    parser.add_argument("--keep-db", action="store_true", help=f"do not drop {DB_NAME}")
    parser.add_argument("--keep-logs", action="store_true", help="keep gunicorn/celery logs")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--workdir", default=str(ROOT / "var"), help="where logs go")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="issue 9: bare presigned PUT vs create+PUT+/complete vs Synapse, time to first "
        "byte for a waiting recipient, CPU per GiB (see the comment above compare_main)",
    )
    parser.add_argument("--sizes", default="1,32,256", help="--compare: MiB, comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="--compare: runs per size")
    parser.add_argument(
        "--policies",
        default="default,metadata-only,wait",
        help="--compare: " + ", ".join(POLICY_ENV),
    )
    parser.add_argument(
        "--paths",
        default="url",
        help="--compare: how the bytes reach this server's store, comma-separated: "
        + ", ".join(f"{k} ({v})" for k, v in PATH_NAMES.items()),
    )
    parser.add_argument("--celery", action="store_true", help="--compare: a celery worker")
    parser.add_argument(
        "--idle-seconds", type=float, default=130, help="--compare: idle CPU measured this long"
    )
    parser.add_argument("--no-synapse", dest="synapse", action="store_false")
    parser.add_argument(
        "--store-cpu",
        type=int,
        help="--compare: run the S3 server on this CPU alone and everything else on the "
        "other CPUs (the store as on a machine of its own)",
    )
    parser.add_argument(
        "--report-from", type=Path, help="--compare: print the report of a saved --json"
    )
    parser.add_argument("--plot", type=Path, help="--compare: draw CPU and times into this PNG")
    args = parser.parse_args()
    if args.compare and args.report_from:
        saved = json.loads(args.report_from.read_text())
        names = [k for k, v in saved["runs"][0].items() if isinstance(v, dict)]
        sizes = list(dict.fromkeys(run["size_mib"] for run in saved["runs"]))
        print(compare_report(saved, names, sizes))
        if args.plot:
            compare_plot(saved, names, args.plot)
        return
    if args.compare:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        compare_main(args)
        return
    flows = [f.strip() for f in args.flows.split(",") if f.strip()]
    if unknown := set(flows) - set(FLOW_NAMES):
        parser.error(f"unknown flows: {unknown}")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)

    info = machine_info()
    s3 = S3Server(manage=not args.external_s3, wait_for_ports=args.wait_s3_ports)
    database_url = recreate_database(DB_NAME)
    base_env = {
        **os.environ,
        **s3_env(),
        "DJANGO_SETTINGS_MODULE": "mediarepo.settings",
        "DATABASE_URL": database_url,
        "DJANGO_SECRET_KEY": "bench-" + os.urandom(16).hex(),
        "CELERY_BROKER_URL": BROKER_URL,
        "MSC3870_MAX_UPLOAD_SIZE": str(args.size_mib * MiB + MiB),
        "MSC3870_COMPLETE_WAIT_SECONDS": "120",
        "PYTHONUNBUFFERED": "1",
    }
    base_env.pop("REDIS_URL", None)
    results: list[FlowResult] = []
    try:
        subprocess.run(
            [str(PYTHON), "manage.py", "migrate", "--noinput", "-v", "0"],
            cwd=ROOT,
            env=base_env,
            check=True,
        )
        out = subprocess.run(
            [str(PYTHON), "manage.py", "create_access_token", USER_ID, "--label", "bench"],
            cwd=ROOT,
            env=base_env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        token = out.strip().splitlines()[-1]
        for flow in flows:
            start_store(s3)  # fresh per flow: an empty bucket, and a fresh VmHWM for weed
            args.weed_pid = s3.pid() if s3.manage else None
            try:
                print(f"flow {flow}: {args.size_mib} MiB ...", file=sys.stderr, flush=True)
                results.append(run_flow(flow, args, base_env, token))
            finally:
                s3.stop()
    finally:
        if not args.keep_db:
            drop_database(DB_NAME)
    text = report(results, info, args)
    text += f"\n\nLoad average at start {info['loadavg']}, at end {load_average()}."
    print(text)
    if args.json:
        args.json.write_text(
            json.dumps({"machine": info, "results": [asdict(r) for r in results]}, indent=2)
        )
    if not all(r.verified for r in results):
        sys.exit("verification FAILED")


if __name__ == "__main__":
    main()
