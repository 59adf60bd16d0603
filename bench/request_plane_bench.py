"""The request plane beside Synapse (issue 7, item 7): round trips and waiting downloads.

One run starts a real Synapse (``scripts/synapse``, its own venv, SQLite) and this project
exactly as a user would (``make run`` in ``--project-dir``, with ``PORT``,
``MEDIAREPO_DATA_DIR`` = a fresh temporary directory and, for ``--database postgres``,
``DATABASE_URL`` = a fresh database ``mediarepo_bench_rp``), and measures both:

1. **Round trips** at 1, 16 and 64 concurrent clients (``--clients``), each client its own
   user: ``POST /_matrix/media/v1/create`` then ``PUT /_matrix/media/v3/upload/{server}/{id}``
   with 1 KiB of fresh random bytes. For each phase (``--warmup`` unmeasured seconds, then
   ``--duration`` measured seconds; no new round trip starts after the deadline): round
   trips/s, p50/p99 latency of a round trip, and CPU seconds per round trip summed over
   every process of each server (psutil, user+system of the whole process tree, reaped
   children included), plus the load client's own CPU. Servers run with their default
   process count (``make run`` as it is; ``WEB_CONCURRENCY`` is left unset). All servers
   are up at once and the phases are interleaved: for each client count, ``--repeats``
   rounds, each running every server's phase back to back (the order reversed on odd
   rounds), so a change in the machine's load hits every server alike; the figures pool
   the rounds (totals over totals, percentiles over all samples; each round is kept).
2. **Waiting downloads**: N (``--waiters``) authenticated
   ``GET /_matrix/client/v1/media/download/{server}/{id}?timeout_ms=60000`` all on ONE id
   that was created but not uploaded. Once they are sent and the server is quiet: server
   RSS (whole tree), then ``/_matrix/client/versions`` latency over ``--probes`` sequential
   requests; then the PUT of the bytes: its latency, the time from its start until the
   last waiter has its answer, and how many got 200 with the right bytes. Memory per waiter
   = RSS growth / N. This project runs this phase with ``WEB_CONCURRENCY=1`` (one process);
   each N gets a freshly restarted server (same data), Synapse included.

Everything is bounded: every request has a timeout; a server that does not answer is
reported as failures (numbers), never a hang. The bench raises ``RLIMIT_NOFILE`` to the
hard limit before starting anything, so both servers (its children) inherit it.

The bench does not care which HTTP server ``make run`` starts: it measures the process
tree of ``make run`` (started in its own session, killed as a process group at the end)
and records the processes it found.

    .venv/bin/python bench/request_plane_bench.py --label current --database both
    git worktree add /tmp/before cabaad8
    .venv/bin/python bench/request_plane_bench.py --project-dir /tmp/before --label before
    .venv/bin/python bench/request_plane_bench.py --plot-only \\
        bench/results/request-plane-before.json bench/results/request-plane-current.json

Results: ``bench/results/request-plane-<label>.json``; ``--plot`` draws
``docs/request-plane.png`` from this run and the ``--compare`` result files.
Needs psutil, aiohttp and matplotlib (``bench/requirements.txt``), PostgreSQL on
127.0.0.1:5432 for ``--database postgres``, and ``scripts/synapse install`` done.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shared import (
    ROOT,
    bench_database,
    drop_database,
    free_port,
    machine_info,
    markdown_table,
    port_in_use,
    recreate_database,
)

RESULTS = ROOT / "bench" / "results"
PLOT = ROOT / "docs" / "request-plane.png"
SYNAPSE_SCRIPT = ROOT / "scripts" / "synapse"
BENCH_DB = bench_database("mediarepo_bench_rp")
# The metrics whose movement over a round-trip phase is reported.
METRICS_CHECKED = (
    "msc3870_http_requests_total",
    "msc3870_http_request_duration_seconds_count",
    "msc3870_media_transitions_total",
    "msc3870_uploaded_bytes_total",
)
BODY_SIZE = 1024
DOWNLOAD_TIMEOUT_MS = 60_000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


def busy_share(before: Any, after: Any) -> float:
    """The share of all cores' time that was not idle between two ``psutil.cpu_times()``."""
    total = sum(after) - sum(before)
    idle = (after.idle - before.idle) + (
        getattr(after, "iowait", 0.0) - getattr(before, "iowait", 0.0)
    )
    return round(1 - idle / total, 3) if total > 0 else 0.0


def postgres_cpu_seconds() -> float:
    """user+system of the PostgreSQL server's processes on this machine (0 if none)."""
    total = 0.0
    for proc in psutil.process_iter(["name", "cpu_times"]):
        if proc.info["name"] in ("postgres", "postmaster") and proc.info["cpu_times"]:
            t = proc.info["cpu_times"]
            total += t.user + t.system
    return total


class ProcessTree:
    """A root process and all its descendants, measured together."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid

    def processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.root_pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """user+system of every live process, plus what they reaped from dead children:
        the sum is conserved when a worker exits and its parent reaps it."""
        total = 0.0
        for proc in self.processes():
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system + t.children_user + t.children_system
        return total

    def rss(self) -> int:
        total = 0
        for proc in self.processes():
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        return total

    def describe(self) -> list[str]:
        out = []
        for proc in self.processes():
            try:
                cmd = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            out.append(f"{proc.pid}: {cmd[:160]}")
        return out

    def wait_quiet(self, limit: float, busy_share: float = 0.05, window: float = 0.5) -> float:
        """Wait until the tree uses under ``busy_share`` of a core over ``window`` s (the
        waiters are parked), at most ``limit`` s; returns the seconds waited."""
        start = time.monotonic()
        last = self.cpu_seconds()
        while time.monotonic() - start < limit:
            time.sleep(window)
            now = self.cpu_seconds()
            if now - last < busy_share * window:
                break
            last = now
        return time.monotonic() - start


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def wait_answers(url: str, limit: float, alive: Callable[[], bool]) -> bool:
    import urllib.request

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with urllib.request.urlopen(url + "/_matrix/client/versions", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class ServerFailed(Exception):
    pass


class ServerDied(Exception):
    """The server's process tree ended in the middle of a phase (something killed it)."""


class ProjectServer:
    """``make run`` in a checkout, in its own session, on a free port."""

    def __init__(self, project_dir: Path, data_dir: Path, database_url: str | None) -> None:
        self.project_dir = project_dir
        self.data_dir = data_dir
        self.database_url = database_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Metrics on, as an operator runs it: their cost is part of what is measured, and
        # the round-trip phases check that they count what the clients did.
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "make-run.log"
        self.web_concurrency: str | None = None
        #: Settings of the bench's own, on top of the cleaned environment.
        self.extra_env: dict[str, str] = {}

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("WEB_CONCURRENCY", "DATABASE_URL", "VIRTUAL_ENV", "PYTHONPATH")
            and not k.startswith(("MSC3870_", "DJANGO_", "GUNICORN_"))
        }
        env.update(
            PORT=str(self.port),
            METRICS_PORT=str(self.metrics_port),
            MEDIAREPO_DATA_DIR=str(self.data_dir),
            MSC3870_CREATE_RATE="1000000/min",
        )
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        if self.web_concurrency:
            env["WEB_CONCURRENCY"] = self.web_concurrency
        env.update(self.extra_env)
        return env

    def start(self, web_concurrency: str | None = None, limit: float = 600) -> None:
        self.web_concurrency = web_concurrency
        if port_in_use(self.port):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"\n=== make run (WEB_CONCURRENCY={web_concurrency})\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                ["make", "run"],
                cwd=self.project_dir,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self.proc
        if not wait_answers(self.url, limit, lambda: proc.poll() is None):
            self.stop()
            raise ServerFailed(f"make run did not answer on {self.url}:\n{tail(self.log_path)}")

    @property
    def tree(self) -> ProcessTree:
        assert self.proc is not None
        return ProcessTree(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # its own session: the group id is its pid
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                continue
            break
        self.proc.wait(timeout=10)
        self.proc = None

    def metric_totals(self) -> dict[str, float]:
        """Each metric's samples summed over their labels, from the metrics listener (empty
        where the checkout has none)."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10
            ) as response:
                text = response.read().decode()
        except OSError:
            return {}
        totals: Counter[str] = Counter()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                totals[sample.name] += sample.value
        return dict(totals)

    def mint_tokens(self, users: Sequence[str]) -> list[str]:
        python = self.project_dir / ".venv" / "bin" / "python"

        def mint(user: str) -> str:
            out = subprocess.run(
                [str(python), "manage.py", "create_access_token", user],
                cwd=self.project_dir,
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=120,
            )
            if out.returncode != 0:
                raise ServerFailed(f"create_access_token {user}: {out.stderr[-2000:]}")
            return out.stdout.strip().splitlines()[-1]

        with ThreadPoolExecutor(max_workers=3) as pool:
            return list(pool.map(mint, users))


class SynapseServer:
    """``scripts/synapse`` with a temporary data dir and a free port."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.started_once = False

    def env(self) -> dict[str, str]:
        return {**os.environ, "SYNAPSE_DIR": str(self.data_dir), "SYNAPSE_PORT": str(self.port)}

    def _script(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SYNAPSE_SCRIPT), *args],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def start(self, web_concurrency: str | None = None, limit: float = 180) -> None:
        del web_concurrency  # one process
        out = self._script("start", *(() if self.started_once else ("--fresh",)), timeout=limit)
        if out.returncode != 0:
            raise ServerFailed(f"scripts/synapse start: {out.stdout}{out.stderr}")
        self.started_once = True

    @property
    def tree(self) -> ProcessTree:
        return ProcessTree(int((self.data_dir / "synapse.pid").read_text()))

    def alive(self) -> bool:
        return psutil.pid_exists(self.tree.root_pid)

    def stop(self) -> None:
        self._script("stop", timeout=60)

    def metric_totals(self) -> dict[str, float]:
        return {}  # Synapse's metrics are off here

    def version(self) -> str:
        python = ROOT / ".venv-synapse" / "bin" / "python"
        out = subprocess.run(
            [str(python), "-c", "import synapse; print(synapse.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout.strip().split(" ")[0]  # without "(b=<branch>,<commit>)" of cwd

    def mint_tokens(self, users: Sequence[str]) -> list[str]:
        """Shared-secret registration (``POST /_synapse/admin/v1/register``)."""
        import urllib.request

        secret = (self.data_dir / "registration_shared_secret").read_text().strip()
        endpoint = f"{self.url}/_synapse/admin/v1/register"

        def register(user: str) -> str:
            localpart = user[1:].split(":", 1)[0]
            with urllib.request.urlopen(endpoint, timeout=30) as resp:
                nonce = json.load(resp)["nonce"]
            password = "bench-" + localpart
            mac = hmac.new(
                secret.encode(),
                "\0".join((nonce, localpart, password, "notadmin")).encode(),
                hashlib.sha1,
            ).hexdigest()
            body = json.dumps(
                {
                    "nonce": nonce,
                    "username": localpart,
                    "password": password,
                    "admin": False,
                    "mac": mac,
                }
            ).encode()
            request = urllib.request.Request(
                endpoint, data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=60) as resp:
                return str(json.load(resp)["access_token"])

        with ThreadPoolExecutor(max_workers=3) as pool:
            return list(pool.map(register, users))


Server = ProjectServer | SynapseServer


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def self_cpu() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


# --------------------------------------------------------------------------- round trips


class Failure(Exception):
    pass


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def create_media(session: aiohttp.ClientSession, base: str, token: str) -> tuple[str, str]:
    async with session.post(f"{base}/_matrix/media/v1/create", headers=auth(token)) as resp:
        raw = await resp.read()
        if resp.status != 200:
            raise Failure(f"create {resp.status} {_errcode(raw)}")
    uri = str(json.loads(raw)["content_uri"])
    server_name, media_id = uri.removeprefix("mxc://").split("/", 1)
    return server_name, media_id


async def upload_media(
    session: aiohttp.ClientSession, base: str, token: str, mxc: tuple[str, str], body: bytes
) -> None:
    headers = {**auth(token), "Content-Type": "application/octet-stream"}
    url = f"{base}/_matrix/media/v3/upload/{mxc[0]}/{mxc[1]}"
    async with session.put(url, data=body, headers=headers) as resp:
        raw = await resp.read()
        if resp.status != 200:
            raise Failure(f"put {resp.status} {_errcode(raw)}")


def _errcode(raw: bytes) -> str:
    try:
        return str(json.loads(raw).get("errcode", ""))
    except (ValueError, AttributeError):
        return "non-JSON"


def _failure_kind(exc: BaseException) -> str:
    if isinstance(exc, Failure):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "client timeout"
    return type(exc).__name__


@dataclass
class PhaseSamples:
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)


async def _clients(
    base: str, tokens: Sequence[str], seconds: float, request_timeout: float
) -> tuple[PhaseSamples, float]:
    samples = PhaseSamples()
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.monotonic()
        deadline = start + seconds

        async def client(token: str) -> None:
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                try:
                    mxc = await create_media(session, base, token)
                    await upload_media(session, base, token, mxc, os.urandom(BODY_SIZE))
                except (TimeoutError, aiohttp.ClientError, Failure, ValueError) as exc:
                    samples.errors[_failure_kind(exc)] += 1
                    await asyncio.sleep(0.05)  # a failing server is not hammered in a loop
                    continue
                samples.latencies.append(time.monotonic() - t0)

        await asyncio.gather(*(client(token) for token in tokens))
        return samples, time.monotonic() - start


def round_trip_phase(
    server: Server, tokens: Sequence[str], clients: int, args: argparse.Namespace
) -> dict[str, Any]:
    users = list(tokens[:clients])
    if args.warmup > 0:
        asyncio.run(_clients(server.url, users, args.warmup, args.request_timeout))
    tree = server.tree
    pids0 = {p.pid for p in tree.processes()}
    metrics0 = server.metric_totals()
    cpu0, client0 = tree.cpu_seconds(), self_cpu()
    machine0, postgres0 = psutil.cpu_times(), postgres_cpu_seconds()
    samples, wall = asyncio.run(_clients(server.url, users, args.duration, args.request_timeout))
    cpu = tree.cpu_seconds() - cpu0
    machine_busy = busy_share(machine0, psutil.cpu_times())
    postgres_cpu = postgres_cpu_seconds() - postgres0
    if not server.alive():
        raise ServerDied(f"{clients} clients: the server's process tree ended during the phase")
    client_cpu = self_cpu() - client0
    done = len(samples.latencies)
    metrics1 = server.metric_totals()
    result = {
        "clients": clients,
        "wall_s": round(wall, 3),
        "round_trips": done,
        "errors": dict(samples.errors),
        "round_trips_per_s": round(done / wall, 1) if wall else None,
        "p50_ms": ms(percentile(samples.latencies, 50)),
        "p99_ms": ms(percentile(samples.latencies, 99)),
        "max_ms": ms(max(samples.latencies, default=None)),
        "server_cpu_s": round(cpu, 3),
        "server_cpu_ms_per_round_trip": round(cpu / done * 1000, 3) if done else None,
        "server_cpu_share_of_wall": round(cpu / wall, 3) if wall else None,
        "client_cpu_s": round(client_cpu, 3),
        "client_cpu_ms_per_round_trip": round(client_cpu / done * 1000, 3) if done else None,
        "loadavg_after": round(os.getloadavg()[0], 2),
        # Every core's busy share over the phase (1.0: all cores saturated), and what the
        # PostgreSQL server spent (outside the project's process tree, so not in its CPU).
        "machine_busy_share": machine_busy,
        "postgres_cpu_ms_per_round_trip": round(postgres_cpu / done * 1000, 3) if done else None,
        "server_processes": len(tree.processes()),
        "process_tree_changed": pids0 != {p.pid for p in tree.processes()},
        # What the server's metrics counted over the phase (requests: two per round trip,
        # plus the failed ones).
        "metrics_moved": {
            name: round(metrics1[name] - metrics0.get(name, 0.0), 3)
            for name in METRICS_CHECKED
            if name in metrics1
        },
        "_latencies": samples.latencies,
    }
    log(
        f"  {clients:>3} clients: {result['round_trips_per_s']} rt/s, p50 {result['p50_ms']} ms, "
        f"p99 {result['p99_ms']} ms, server {result['server_cpu_ms_per_round_trip']} ms CPU/rt, "
        f"client {result['client_cpu_ms_per_round_trip']} ms/rt, "
        f"PostgreSQL {result['postgres_cpu_ms_per_round_trip']} ms/rt, "
        f"machine busy {machine_busy:.0%}, errors {dict(samples.errors)}"
    )
    return result


# --------------------------------------------------------------------------- waiters


@dataclass
class Waiter:
    sent_at: float | None = None
    answered_at: float | None = None
    status: int | None = None
    right_bytes: bool = False
    error: str | None = None


async def _waiter_phase(
    server: Server,
    tokens: Sequence[str],
    n: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    base = server.url
    tree = server.tree
    body = os.urandom(BODY_SIZE)
    uploader = tokens[0]
    out: dict[str, Any] = {"waiters": n}
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as control:
        mxc = await create_media(control, base, uploader)
    rss0 = tree.rss()
    cpu0 = tree.cpu_seconds()

    waiters = [Waiter() for _ in range(n)]
    trace = aiohttp.TraceConfig()

    async def on_sent(
        session: aiohttp.ClientSession, ctx: Any, params: aiohttp.TraceRequestHeadersSentParams
    ) -> None:
        del session, params
        ctx.trace_request_ctx["waiter"].sent_at = time.monotonic()

    trace.on_request_headers_sent.append(on_sent)
    url = f"{base}/_matrix/client/v1/media/download/{mxc[0]}/{mxc[1]}"
    wait_timeout = aiohttp.ClientTimeout(
        total=DOWNLOAD_TIMEOUT_MS / 1000 + args.answer_deadline + 30, sock_connect=30
    )
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    session = aiohttp.ClientSession(
        connector=connector, timeout=wait_timeout, trace_configs=[trace]
    )

    async def wait_one(i: int) -> None:
        waiter = waiters[i]
        try:
            async with session.get(
                url,
                params={"timeout_ms": str(DOWNLOAD_TIMEOUT_MS)},
                headers=auth(tokens[i % len(tokens)]),
                trace_request_ctx={"waiter": waiter},
            ) as resp:
                data = await resp.read()
                waiter.status = resp.status
                waiter.right_bytes = resp.status == 200 and data == body
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            waiter.error = _failure_kind(exc)
        finally:
            waiter.answered_at = time.monotonic()

    t_launch = time.monotonic()
    tasks: list[asyncio.Task[None]] = []
    for i in range(n):  # ramp: 100 connections every 10 ms
        tasks.append(asyncio.create_task(wait_one(i)))
        if i % 100 == 99:
            await asyncio.sleep(0.01)
    # All sent (or failed), bounded.
    send_deadline = time.monotonic() + args.send_timeout
    while time.monotonic() < send_deadline:
        pending = sum(1 for w in waiters if w.sent_at is None and w.answered_at is None)
        if not pending:
            break
        await asyncio.sleep(0.1)
    out["sent"] = sum(1 for w in waiters if w.sent_at is not None)
    out["send_s"] = round(time.monotonic() - t_launch, 2)
    out["quiet_wait_s"] = round(await asyncio.to_thread(tree.wait_quiet, args.quiet_timeout), 2)
    out["answered_before_upload"] = Counter(
        str(w.status if w.status is not None else w.error)
        for w in waiters
        if w.answered_at is not None
    )
    rss1 = tree.rss()
    out["rss_before_mib"] = round(rss0 / 2**20, 1)
    out["rss_waiting_mib"] = round(rss1 / 2**20, 1)
    out["rss_per_waiter_kib"] = round((rss1 - rss0) / n / 1024, 1)
    out["server_processes"] = len(tree.processes())
    out["cpu_to_park_s"] = round(tree.cpu_seconds() - cpu0, 3)

    # Other requests meanwhile: sequential /versions, bounded in total.
    probes: list[float] = []
    probe_errors: Counter[str] = Counter()
    probe_deadline = time.monotonic() + args.probe_budget
    probe_timeout = aiohttp.ClientTimeout(total=args.probe_timeout)
    async with aiohttp.ClientSession(timeout=probe_timeout) as probe:
        for _ in range(args.probes):
            if time.monotonic() >= probe_deadline:
                probe_errors["not tried (probe budget spent)"] += 1
                continue
            t0 = time.monotonic()
            try:
                async with probe.get(f"{base}/_matrix/client/versions") as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise Failure(f"versions {resp.status}")
                probes.append(time.monotonic() - t0)
            except (TimeoutError, aiohttp.ClientError, Failure) as exc:
                probe_errors[_failure_kind(exc)] += 1
    out["versions"] = {
        "answered": len(probes),
        "of": args.probes,
        "errors": dict(probe_errors),
        "p50_ms": ms(percentile(probes, 50)),
        "p99_ms": ms(percentile(probes, 99)),
        "max_ms": ms(max(probes, default=None)),
    }

    # The upload, then every waiter's answer, bounded.
    t_put = time.monotonic()
    client_cpu0 = self_cpu()
    put_error = None
    try:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=args.put_timeout)
        ) as control:
            await upload_media(control, base, uploader, mxc, body)
    except (TimeoutError, aiohttp.ClientError, Failure) as exc:
        put_error = _failure_kind(exc)
    put_end = time.monotonic()
    out["put_ms"] = round((put_end - t_put) * 1000, 1)
    out["put_error"] = put_error
    remaining = [t for t in tasks if not t.done()]
    answer_deadline = max(t_put + args.answer_deadline, put_end + 10)
    if remaining:
        await asyncio.wait(remaining, timeout=max(0.0, answer_deadline - time.monotonic()))
    unanswered = [t for t in tasks if not t.done()]
    for task in unanswered:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await session.close()
    out["client_cpu_s_from_put"] = round(self_cpu() - client_cpu0, 3)

    after = [
        w.answered_at - t_put
        for w in waiters
        if w.answered_at is not None and w.answered_at >= t_put and (w.status or w.error)
    ]
    outcomes = Counter(
        "200 right bytes"
        if w.right_bytes
        else (
            f"HTTP {w.status}" if w.status is not None else (w.error or "no answer by the deadline")
        )
        for w in waiters
    )
    out["answered_before_upload"] = dict(out["answered_before_upload"])
    out["outcomes"] = dict(outcomes)
    out["no_answer_by_deadline"] = len(unanswered)
    out["ok"] = sum(1 for w in waiters if w.right_bytes)
    out["upload_to_last_answer_ms"] = ms(max(after)) if after else None
    ok_after = [w.answered_at - t_put for w in waiters if w.right_bytes and w.answered_at]
    out["upload_to_last_ok_ms"] = ms(max(ok_after)) if ok_after else None
    out["upload_to_median_ok_ms"] = ms(percentile(ok_after, 50))
    out["put_end_to_last_ok_ms"] = ms(max(ok_after) - (put_end - t_put)) if ok_after else None
    out["answer_deadline_s"] = round(answer_deadline - t_put, 1)
    out["server_cpu_s"] = round(tree.cpu_seconds() - cpu0, 3)
    out["loadavg_after"] = round(os.getloadavg()[0], 2)
    log(
        f"  {n} waiters: sent {out['sent']} in {out['send_s']} s, RSS "
        f"+{out['rss_per_waiter_kib']} KiB/waiter, /versions p50 {out['versions']['p50_ms']} "
        f"p99 {out['versions']['p99_ms']} ms ({len(probes)}/{args.probes}), PUT "
        f"{out['put_ms']} ms {put_error or ''}, last answer +{out['upload_to_last_answer_ms']}"
        f" ms, {out['ok']}/{n} had the bytes; {dict(outcomes)}"
    )
    return out


def waiter_phase(
    server: Server, tokens: Sequence[str], n: int, args: argparse.Namespace
) -> dict[str, Any]:
    # Bounded at the top as well: the sum of every inner bound, plus slack.
    limit = args.send_timeout + args.quiet_timeout + args.probe_budget + args.put_timeout
    limit += args.answer_deadline + 120

    async def bounded() -> dict[str, Any]:
        return await asyncio.wait_for(_waiter_phase(server, tokens, n, args), limit)

    try:
        result = asyncio.run(bounded())
    except TimeoutError:
        result = {"waiters": n, "error": f"phase exceeded {limit} s"}
    if not server.alive():
        raise ServerDied(f"{n} waiters: the server's process tree ended during the phase")
    return result


def with_retry(
    name: str, server: Server, phase: Callable[[], dict[str, Any]], web_concurrency: str | None
) -> dict[str, Any]:
    """Run a phase; if the server died under it (killed from outside: the machine is
    shared), restart the server and run the phase once more, and say so."""
    try:
        return phase()
    except ServerDied as exc:
        log(f"{name}: {exc}; restarting the server and running the phase again")
        server.stop()
        server.start(web_concurrency)
        result = phase()
        result["retried_after"] = str(exc)
        return result


# --------------------------------------------------------------------------- a server's run


@dataclass
class Subject:
    """One server under test, its users and what was measured of it."""

    name: str
    server: Server
    waiter_concurrency: str | None
    tokens: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return "failed" not in self.result

    def fail(self, exc: BaseException) -> None:
        log(f"{self.name}: FAILED: {exc}")
        self.result["failed"] = str(exc)
        self.server.stop()


def combine_round_trips(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the repeats of one phase: totals over totals, percentiles over every sample."""
    latencies = [x for r in reps for x in r.pop("_latencies")]
    done = sum(r["round_trips"] for r in reps)
    wall = sum(r["wall_s"] for r in reps)
    cpu = sum(r["server_cpu_s"] for r in reps)
    client_cpu = sum(r["client_cpu_s"] for r in reps)
    errors: Counter[str] = Counter()
    for r in reps:
        errors.update(r["errors"])
    return {
        "clients": reps[0]["clients"],
        "wall_s": round(wall, 3),
        "round_trips": done,
        "errors": dict(errors),
        "round_trips_per_s": round(done / wall, 1) if wall else None,
        "p50_ms": ms(percentile(latencies, 50)),
        "p99_ms": ms(percentile(latencies, 99)),
        "max_ms": ms(max(latencies, default=None)),
        "server_cpu_s": round(cpu, 3),
        "server_cpu_ms_per_round_trip": round(cpu / done * 1000, 3) if done else None,
        "client_cpu_s": round(client_cpu, 3),
        "client_cpu_ms_per_round_trip": round(client_cpu / done * 1000, 3) if done else None,
        "repeats": reps,
    }


def measure(subjects: list[Subject], args: argparse.Namespace) -> None:
    """Round trips with every server up, interleaved: for each client count, each repeat
    runs every server's phase back to back (order reversed on odd repeats), so a change in
    the machine's load hits all servers alike. Then the waiters, one server at a time."""
    users = [f"@rp{i}:localhost" for i in range(max(args.clients))]
    for subject in subjects:
        try:
            log(f"{subject.name}: starting")
            t0 = time.monotonic()
            subject.server.start(None)
            subject.result["start_s"] = round(time.monotonic() - t0, 1)
            subject.result["processes_round_trips"] = subject.server.tree.describe()
            log(f"{subject.name}: up in {subject.result['start_s']} s")
            subject.tokens = subject.server.mint_tokens(users)
            log(f"{subject.name}: {len(subject.tokens)} users with tokens")
        except (ServerFailed, ServerDied) as exc:
            subject.fail(exc)
    for subject in subjects:
        subject.result["round_trips"] = []
    for clients in args.clients:
        reps: dict[str, list[dict[str, Any]]] = {s.name: [] for s in subjects}
        for rep in range(args.repeats):
            order = subjects if rep % 2 == 0 else subjects[::-1]
            for subject in order:
                if not subject.ok:
                    continue
                log(f"{subject.name}: {clients} clients, repeat {rep + 1}/{args.repeats}")
                try:
                    reps[subject.name].append(
                        with_retry(
                            subject.name,
                            subject.server,
                            lambda s=subject, c=clients: round_trip_phase(
                                s.server, s.tokens, c, args
                            ),
                            None,
                        )
                    )
                except (ServerFailed, ServerDied) as exc:
                    subject.fail(exc)
        for subject in subjects:
            if reps[subject.name]:
                subject.result["round_trips"].append(combine_round_trips(reps[subject.name]))
    for subject in subjects:
        subject.server.stop()
    for n in args.waiters:
        for subject in subjects:
            if not subject.ok:
                continue
            result = subject.result
            result["waiter_web_concurrency"] = subject.waiter_concurrency
            try:
                subject.server.start(subject.waiter_concurrency)
                result.setdefault("processes_waiting", subject.server.tree.describe())
                log(f"{subject.name}: {n} waiters")
                result.setdefault("waiting", []).append(
                    with_retry(
                        subject.name,
                        subject.server,
                        lambda s=subject, n=n: waiter_phase(s.server, s.tokens, n, args),
                        subject.waiter_concurrency,
                    )
                )
            except (ServerFailed, ServerDied) as exc:
                subject.fail(exc)
            finally:
                subject.server.stop()


def project_git_head(project_dir: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(project_dir), "log", "-1", "--format=%h %s"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip()


def _terminate(signum: int, frame: object) -> None:
    del frame
    raise SystemExit(128 + signum)  # the finally blocks stop the servers


def run(args: argparse.Namespace) -> dict[str, Any]:
    signal.signal(signal.SIGTERM, _terminate)
    nofile = raise_nofile()
    project_dir = args.project_dir.resolve()
    report: dict[str, Any] = {
        "label": args.label,
        "project_dir": str(project_dir),
        "project_head": project_git_head(project_dir),
        "baseline_head": project_git_head(args.baseline_dir.resolve())
        if args.baseline_dir
        else None,
        "argv": sys.argv[1:],
        "machine": machine_info(),
        "rlimit_nofile": nofile,
        "settings": {
            "clients": args.clients,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "repeats": args.repeats,
            "waiters": args.waiters,
            "body_bytes": BODY_SIZE,
            "download_timeout_ms": DOWNLOAD_TIMEOUT_MS,
            "probes": args.probes,
            "project_env": {"MSC3870_CREATE_RATE": "1000000/min"},
        },
        "servers": [],
    }
    log(f"RLIMIT_NOFILE {nofile}; project {project_dir} ({report['project_head']})")
    scratch = Path(tempfile.mkdtemp(prefix="request-plane-"))
    subjects: list[Subject] = []
    databases = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    try:
        if not args.no_synapse:
            synapse = SynapseServer(scratch / "synapse")
            report["synapse_version"] = synapse.version()
            subjects.append(Subject("synapse", synapse, None))
        for database in databases:
            url = recreate_database(BENCH_DB) if database == "postgres" else None
            server = ProjectServer(project_dir, scratch / f"project-{database}", url)
            subjects.append(Subject(f"this ({database})", server, "1"))
            if args.baseline_dir is not None:
                base_url = recreate_database(BENCH_DB + "_base") if database == "postgres" else None
                baseline = ProjectServer(
                    args.baseline_dir.resolve(), scratch / f"baseline-{database}", base_url
                )
                subjects.append(Subject(f"baseline ({database})", baseline, "1"))
        try:
            measure(subjects, args)
        finally:
            for subject in subjects:
                subject.server.stop()
                report["servers"].append({"server": subject.name, **subject.result})
            if "postgres" in databases:
                drop_database(BENCH_DB)
                if args.baseline_dir is not None:
                    drop_database(BENCH_DB + "_base")
    finally:
        if args.keep_logs:
            log(f"logs kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return report


# --------------------------------------------------------------------------- reporting


def _find(report: dict[str, Any], server: str) -> dict[str, Any] | None:
    return next((s for s in report["servers"] if s["server"] == server), None)


def _rt(server: dict[str, Any], clients: int) -> dict[str, Any] | None:
    return next((r for r in server.get("round_trips", []) if r["clients"] == clients), None)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def targets(report: dict[str, Any]) -> list[list[str]]:
    """Issue 7's targets for each configuration of this project, against the same run's
    Synapse: [server, target, this, Synapse or bound, met?]."""
    rows: list[list[str]] = []
    synapse = _find(report, "synapse")
    for server in report["servers"]:
        if server["server"] == "synapse":
            continue
        name = server["server"]
        for clients in (1, 16, 64):
            r = _rt(server, clients)
            s = _rt(synapse, clients) if synapse else None
            if r is None or s is None or not r["round_trips"]:
                continue
            if clients == 16:
                tp, stp = r["round_trips_per_s"], s["round_trips_per_s"]
                rows.append(
                    [
                        name,
                        "round trips/s at 16 clients >= 1.5 x Synapse",
                        f"{tp} ({_ratio(tp, stp)} x)",
                        f"{stp} (target {1.5 * stp:.1f})",
                        "met" if tp >= 1.5 * stp else "missed",
                    ]
                )
                rows.append(
                    [
                        name,
                        "p99 at 16 clients <= Synapse",
                        f"{r['p99_ms']} ms ({_ratio(r['p99_ms'], s['p99_ms'])} x)",
                        f"{s['p99_ms']} ms",
                        "met" if r["p99_ms"] <= s["p99_ms"] else "missed",
                    ]
                )
            cpu, scpu = r["server_cpu_ms_per_round_trip"], s["server_cpu_ms_per_round_trip"]
            rows.append(
                [
                    name,
                    f"server CPU per round trip <= Synapse ({clients} clients)",
                    f"{cpu} ms ({_ratio(cpu, scpu)} x)",
                    f"{scpu} ms",
                    "met" if cpu <= scpu else "missed",
                ]
            )
        for w in server.get("waiting", []):
            n = w["waiters"]
            if "error" in w:
                rows.append([name, f"{n} waiters", w["error"], "", "missed"])
                continue
            v = w["versions"]
            ok_versions = v["answered"] == v["of"] and (v["p99_ms"] or 1e9) < 50
            rows.append(
                [
                    name,
                    f"{n} waiters: /versions p99 < 50 ms meanwhile",
                    f"{v['p99_ms']} ms ({v['answered']}/{v['of']} answered)",
                    "50 ms",
                    "met" if ok_versions else "missed",
                ]
            )
            last = w.get("put_end_to_last_ok_ms")
            rows.append(
                [
                    name,
                    f"{n} waiters: all answered within 1 s after the upload completes",
                    f"{w['ok']}/{n} had the bytes, the last {last} ms after the PUT's answer",
                    "1000 ms",
                    "met" if w["ok"] == n and last is not None and last <= 1000 else "missed",
                ]
            )
    return rows


def summary(report: dict[str, Any]) -> str:
    lines = [f"## {report['label']}: {report['project_head']}", ""]
    rows = []
    for server in report["servers"]:
        if "failed" in server:
            rows.append([server["server"], "FAILED (see failed)", "", "", "", "", "", ""])
        for r in server.get("round_trips", []):
            rows.append(
                [
                    server["server"],
                    r["clients"],
                    r["round_trips_per_s"],
                    r["p50_ms"],
                    r["p99_ms"],
                    r["server_cpu_ms_per_round_trip"],
                    r["client_cpu_ms_per_round_trip"],
                    sum(r["errors"].values()),
                ]
            )
    lines.append(
        markdown_table(
            [
                "server",
                "clients",
                "round trips/s",
                "p50 ms",
                "p99 ms",
                "server CPU ms/rt",
                "client CPU ms/rt",
                "errors",
            ],
            rows,
        )
    )
    lines.append("")
    rows = []
    for server in report["servers"]:
        for w in server.get("waiting", []):
            if "error" in w:
                rows.append([server["server"], w["waiters"], w["error"], "", "", "", "", ""])
                continue
            v = w["versions"]
            rows.append(
                [
                    server["server"],
                    w["waiters"],
                    f"{v['p50_ms']} / {v['p99_ms']} ({v['answered']}/{v['of']})",
                    f"{w['put_ms']}" + (f" ({w['put_error']})" if w["put_error"] else ""),
                    w["upload_to_last_answer_ms"],
                    f"{w['ok']}/{w['waiters']}",
                    w["rss_per_waiter_kib"],
                    w["server_processes"],
                ]
            )
    lines.append(
        markdown_table(
            [
                "server",
                "waiters",
                "/versions p50 / p99 ms (answered)",
                "PUT ms",
                "upload to last answer ms",
                "200 with the bytes",
                "RSS KiB/waiter",
                "processes",
            ],
            rows,
        )
    )
    synapse = _find(report, "synapse")
    if synapse and "failed" not in synapse:
        lines += ["", "Ratios this/Synapse (throughput, server CPU per round trip, p99):", ""]
        rows = []
        for server in report["servers"]:
            if server is synapse:
                continue
            for r in server.get("round_trips", []):
                s = _rt(synapse, r["clients"])
                if s is None:
                    continue
                rows.append(
                    [
                        server["server"],
                        r["clients"],
                        _ratio(r["round_trips_per_s"], s["round_trips_per_s"]),
                        _ratio(
                            r["server_cpu_ms_per_round_trip"], s["server_cpu_ms_per_round_trip"]
                        ),
                        _ratio(r["p99_ms"], s["p99_ms"]),
                    ]
                )
        lines.append(markdown_table(["server", "clients", "throughput", "CPU/rt", "p99"], rows))
    rows = targets(report)
    if rows:
        lines += ["", "Targets of issue 7:", ""]
        lines.append(markdown_table(["server", "target", "this", "Synapse / bound", ""], rows))
    return "\n".join(lines)


def plot(reports: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    (ax_tp, ax_p99), (ax_cpu, ax_wait) = axes
    series: list[tuple[str, dict[str, Any]]] = []
    for report in reports:
        for server in report["servers"]:
            if not server.get("round_trips") and not server.get("waiting"):
                continue
            if server["server"] == "synapse":
                label = "Synapse " + str(report.get("synapse_version", "")).split(" ")[0]
                if len(reports) > 1:
                    label += f" ({report['label']} run)"
            else:
                label = f"{report['label']}: {server['server']}"
            series.append((label, server))
    for label, server in series:
        rts = server.get("round_trips", [])
        xs = [r["clients"] for r in rts]
        style = "--" if label.startswith("Synapse") else "-"
        ax_tp.plot(xs, [r["round_trips_per_s"] for r in rts], style, marker="o", label=label)
        ax_p99.plot(xs, [r["p99_ms"] for r in rts], style, marker="o", label=label)
        ax_cpu.plot(
            xs, [r["server_cpu_ms_per_round_trip"] for r in rts], style, marker="o", label=label
        )
    for ax, title in (
        (ax_tp, "create + PUT round trips/s (higher is better)"),
        (ax_p99, "p99 round-trip latency, ms (log)"),
        (ax_cpu, "server CPU ms per round trip, all processes"),
    ):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("concurrent clients")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
    ax_p99.set_yscale("log")
    ax_tp.legend(fontsize=7)

    # Waiting downloads: time from upload start to the last answer; unanswered = hatched.
    labels: list[str] = []
    values: list[float] = []
    notes: list[str] = []
    complete: list[bool] = []
    for label, server in series:
        for w in server.get("waiting", []):
            if "error" in w:
                continue
            labels.append(f"{label}\nN={w['waiters']}")
            last = w["upload_to_last_answer_ms"]
            values.append((last or 0) / 1000)
            complete.append(w["ok"] == w["waiters"])
            notes.append(
                f"{w['ok']}/{w['waiters']} ok; /versions p99 {w['versions']['p99_ms']} ms"
                f" ({w['versions']['answered']}/{w['versions']['of']})"
            )
    ys = range(len(labels))
    bars = ax_wait.barh(list(ys), values, color="tab:blue")
    for bar, note, all_ok in zip(bars, notes, complete, strict=True):
        if not all_ok:
            bar.set_hatch("//")
            bar.set_color("tab:orange")
        y = bar.get_y() + bar.get_height() / 2
        ax_wait.text(bar.get_width(), y, " " + note, va="center", fontsize=6)
    ax_wait.set_yticks(list(ys), labels, fontsize=6)
    ax_wait.axvline(1.0, color="red", linestyle=":", linewidth=1)
    ax_wait.set_xscale("symlog", linthresh=1)
    ax_wait.set_title(
        "N downloads waiting on one id: upload start to last answer, s\n"
        "(red: 1 s target; hatched: not all got the bytes)",
        fontsize=10,
    )
    ax_wait.invert_yaxis()
    fig.suptitle(
        "Request plane beside Synapse (bench/request_plane_bench.py), 2 vCPUs", fontsize=11
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    log(f"plot: {path}")


# --------------------------------------------------------------------------- main


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project-dir", type=Path, default=ROOT, help="checkout to `make run`")
    parser.add_argument("--label", default="current", help="names the result file")
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="sqlite")
    parser.add_argument("--clients", type=int_list, default=[1, 16, 64])
    parser.add_argument("--duration", type=float, default=10.0, help="measured s per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured s per phase")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per phase")
    parser.add_argument("--waiters", type=int_list, default=[1000, 5000])
    parser.add_argument("--probes", type=int, default=100, help="/versions samples")
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--send-timeout", type=float, default=60.0)
    parser.add_argument("--quiet-timeout", type=float, default=15.0)
    parser.add_argument("--probe-timeout", type=float, default=10.0)
    parser.add_argument("--probe-budget", type=float, default=30.0, help="s for all probes")
    parser.add_argument("--put-timeout", type=float, default=60.0)
    parser.add_argument(
        "--answer-deadline", type=float, default=30.0, help="s after the PUT starts"
    )
    parser.add_argument("--no-synapse", action="store_true")
    parser.add_argument(
        "--baseline-dir",
        type=Path,
        help="another checkout measured in the same run (e.g. the code before a change)",
    )
    parser.add_argument("--json", type=Path, help="default bench/results/request-plane-LABEL")
    parser.add_argument("--plot", type=Path, nargs="?", const=PLOT, help=f"draw ({PLOT})")
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="results to plot")
    parser.add_argument("--plot-only", type=Path, nargs="+", help="draw these results, no run")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp data dirs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.plot_only:
        reports = [json.loads(p.read_text()) for p in args.plot_only]
        for report in reports:
            print(summary(report) + "\n")
        plot(reports, args.plot or PLOT)
        return
    report = run(args)
    path = args.json or RESULTS / f"request-plane-{args.label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"results: {path}")
    print(summary(report))
    if args.plot:
        plot([*(json.loads(p.read_text()) for p in args.compare), report], args.plot)


if __name__ == "__main__":
    main()
