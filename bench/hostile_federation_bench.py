"""Hostile X-Matrix requests against a key server that never answers.

Anyone can send a federation request naming any origin: the server must then fetch that
origin's keys before it can refuse the signature. This bench starts the project as
``make run`` does (``--project-dir``, a fresh data directory, SQLite unless
``--database-url``), with outbound requests allowed to 127.0.0.1 only, and a "peer" of its
own on 127.0.0.1 that accepts TCP connections and never sends a byte (a TLS client waits
for its hello until its own deadline). Then:

1. **baseline**: ``GET /_matrix/client/versions`` probes (``--probe-hz``) for
   ``--baseline`` seconds, nothing else;
2. **waves** (``--waves``, each naming a new origin, a new silent peer): ``--wave``
   requests (1,000) to ``/_matrix/federation/v1/media/download/x`` sent at once, each on
   its own connection, with ``Authorization: X-Matrix origin="127.0.0.1:<peer>"`` and a
   made-up signature; the probes go on, and go on after the wave until every hostile
   request has its answer (``--no-failure-limit`` turns the per-address failure limit
   off, so that every wave reaches the key fetch);
3. **sustained**: ``--rate`` hostile requests a second for ``--sustained`` seconds (the
   origin's failed fetch is remembered; the client address's failures are limited), the
   probes going on;
4. **after**: probes alone again.

Reported per phase: ``/versions`` p50/p99/max (ms) and failures; the hostile requests'
statuses and answer times; the server's RSS (whole process tree) and thread count, sampled
every 0.25 s (start, peak, end); the peer's connections: how many, and how long each was
held open by the server (from accept to the server's close), against the configured key
fetch deadline.

    .venv/bin/python bench/hostile_federation_bench.py --json bench/results/hostile-federation.json

Needs aiohttp and psutil (``bench/requirements.txt``).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shared import ROOT, machine_info, markdown_table, plot_phases
from request_plane_bench import ProjectServer, percentile, raise_nofile

HOSTILE_PATH = "/_matrix/federation/v1/media/download/someid"
KEY_FETCH_TIMEOUT_SECONDS = 20


@dataclass
class SilentPeer:
    """Accepts connections on 127.0.0.1 and never answers; records how long each stays
    open (until the server closes it)."""

    sock: socket.socket = field(default_factory=socket.socket)
    held: list[float] = field(default_factory=list)
    open_now: int = 0
    accepted: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def server_name(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self.open_now += 1
            threading.Thread(target=self._hold, args=(conn, time.monotonic()), daemon=True).start()

    def _hold(self, conn: socket.socket, since: float) -> None:
        try:
            while conn.recv(65536):
                pass  # whatever the client sends (a TLS hello) is never answered
        except OSError:
            pass
        with self._lock:
            self.held.append(time.monotonic() - since)
            self.open_now -= 1
        conn.close()


def probe_loop(url: str, hz: float, stop: Any, out: Any) -> None:
    """``GET url`` one at a time at ``hz`` over one keep-alive connection until ``stop``;
    puts (latencies, failures) on ``out``. Runs in a process of its own, so that the
    hostile client's work never delays a probe."""
    parts = urlsplit(url)
    conn: http.client.HTTPConnection | None = None
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    period = 1 / hz
    while not stop.is_set():
        started = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            conn.request("GET", parts.path)
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                latencies.append(time.monotonic() - started)
            else:
                failures[str(response.status)] += 1
        except Exception as exc:
            failures[type(exc).__name__] += 1
            if conn is not None:
                conn.close()
            conn = None
        time.sleep(max(0.0, period - (time.monotonic() - started)))
    out.put((latencies, dict(failures)))


class Probes:
    """``/versions`` latencies, one request at a time at a fixed rate, from a process of
    their own."""

    def __init__(self, url: str, hz: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.stop_event = context.Event()
        self.out: Any = context.Queue()
        self.process = context.Process(
            target=probe_loop, args=(url, hz, self.stop_event, self.out), daemon=True
        )
        self.latencies: list[float] = []
        self.failures: dict[str, int] = {}

    def start(self) -> None:
        self.process.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.latencies, self.failures = self.out.get(timeout=30)
        self.process.join(10)

    def summary(self) -> dict[str, Any]:
        return {
            "probes": len(self.latencies),
            "p50_ms": _ms(percentile(self.latencies, 50)),
            "p99_ms": _ms(percentile(self.latencies, 99)),
            "max_ms": _ms(max(self.latencies) if self.latencies else None),
            "failures": self.failures,
        }


@dataclass
class Samples:
    rss: list[int] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "rss_mib_start": _mib(self.rss[0]) if self.rss else None,
            "rss_mib_peak": _mib(max(self.rss)) if self.rss else None,
            "rss_mib_end": _mib(self.rss[-1]) if self.rss else None,
            "threads_start": self.threads[0] if self.threads else None,
            "threads_peak": max(self.threads) if self.threads else None,
            "threads_end": self.threads[-1] if self.threads else None,
        }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def _mib(value: float) -> float:
    return round(value / 1024 / 1024, 1)


async def sample(server: ProjectServer, samples: Samples, stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.rss.append(server.tree.rss())
        threads = 0
        for proc in server.tree.processes():
            try:
                threads += proc.num_threads()
            except Exception:
                continue
        samples.threads.append(threads)
        await asyncio.sleep(0.25)


def hostile_headers(origin: str) -> dict[str, str]:
    return {
        "Authorization": (
            f'X-Matrix origin="{origin}",destination="localhost",key="ed25519:a",'
            'sig="bm90IGEgc2lnbmF0dXJlIGJ1dCBpdCBwYXJzZXMgYXMgb25lIGFueXdheQ"'
        )
    }


async def hostile(
    session: aiohttp.ClientSession,
    url: str,
    origin: str,
    statuses: Counter[str],
    times: list[float],
) -> None:
    started = time.monotonic()
    try:
        async with session.get(
            url, headers=hostile_headers(origin), timeout=aiohttp.ClientTimeout(total=120)
        ) as resp:
            await resp.read()
            statuses[str(resp.status)] += 1
    except Exception as exc:
        statuses[type(exc).__name__] += 1
    times.append(time.monotonic() - started)


async def phase(
    name: str,
    server: ProjectServer,
    seconds: float,
    hz: float,
    load: Any | None = None,
) -> dict[str, Any]:
    """Probes (and ``load``, a coroutine function taking the session) for ``seconds``,
    or until ``load`` is done if it takes longer."""
    probes, samples = Probes(server.url + "/_matrix/client/versions", hz), Samples()
    stop = asyncio.Event()
    probes.start()
    sampling = asyncio.ensure_future(sample(server, samples, stop))
    started = time.monotonic()
    cpu_before = server.tree.cpu_seconds()
    result: dict[str, Any] = {}
    if load is not None:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            result = await load(session)
    remaining = seconds - (time.monotonic() - started)
    if remaining > 0:
        await asyncio.sleep(remaining)
    stop.set()
    await sampling
    cpu = server.tree.cpu_seconds() - cpu_before
    await asyncio.get_running_loop().run_in_executor(None, probes.stop)
    print(f"  {name}: {time.monotonic() - started:.1f} s", flush=True)
    return {
        "name": name,
        "seconds": round(time.monotonic() - started, 1),
        "server_cpu_s": round(cpu, 3),
        "versions": probes.summary(),
        **samples.summary(),
        **result,
    }


def wave_load(url: str, origin: str, count: int) -> Any:
    async def load(session: aiohttp.ClientSession) -> dict[str, Any]:
        statuses: Counter[str] = Counter()
        times: list[float] = []
        await asyncio.gather(
            *(hostile(session, url, origin, statuses, times) for _ in range(count))
        )
        return {"hostile": _hostile_summary(statuses, times)}

    return load


def sustained_load(url: str, origin: str, rate: float, seconds: float) -> Any:
    async def load(session: aiohttp.ClientSession) -> dict[str, Any]:
        statuses: Counter[str] = Counter()
        times: list[float] = []
        tasks = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            tasks.append(asyncio.ensure_future(hostile(session, url, origin, statuses, times)))
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)
        return {"hostile": _hostile_summary(statuses, times)}

    return load


def _hostile_summary(statuses: Counter[str], times: list[float]) -> dict[str, Any]:
    return {
        "sent": sum(statuses.values()),
        "statuses": dict(statuses),
        "answer_p50_ms": _ms(percentile(times, 50)),
        "answer_max_ms": _ms(max(times) if times else None),
    }


async def measure(
    args: argparse.Namespace, server: ProjectServer, peers: list[SilentPeer]
) -> list[dict[str, Any]]:
    url = server.url + HOSTILE_PATH
    phases = [await phase("baseline", server, args.baseline, args.probe_hz)]
    for number in range(1, args.waves + 1):
        # Each wave names a new origin (a new silent peer): its keys were never fetched.
        peer = SilentPeer()
        peer.start()
        peers.append(peer)
        load = wave_load(url, peer.server_name, args.wave)
        phases.append(await phase(f"wave {number}", server, args.baseline, args.probe_hz, load))
    sustained = sustained_load(url, peers[-1].server_name, args.rate, args.sustained)
    phases.append(await phase("sustained", server, args.sustained, args.probe_hz, sustained))
    phases.append(await phase("after", server, args.baseline, args.probe_hz))
    return phases


def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile()
    peers: list[SilentPeer] = []
    data_dir = Path(tempfile.mkdtemp(prefix="hostile-fed-"))
    server = ProjectServer(args.project_dir, data_dir, args.database_url)
    # Outbound requests may reach the peers (127.0.0.1) and nothing else.
    server.extra_env = {
        "MSC3870_FEDERATION_IP_RANGE_ALLOWLIST": "127.0.0.1/32",
        "MSC3870_FEDERATION_KEY_FETCH_TIMEOUT_SECONDS": str(KEY_FETCH_TIMEOUT_SECONDS),
    }
    if args.no_failure_limit:
        server.extra_env["MSC3870_FEDERATION_AUTH_FAILURE_RATE"] = "0"
    print(f"starting make run in {args.project_dir}", flush=True)
    server.start()
    try:
        phases = asyncio.run(measure(args, server, peers))
    finally:
        server.stop()
        for peer in peers:
            peer.sock.close()
    held = [seconds for peer in peers for seconds in peer.held]
    return {
        "machine": machine_info(),
        "project_dir": str(args.project_dir),
        "key_fetch_timeout_s": KEY_FETCH_TIMEOUT_SECONDS,
        "failure_limit": not args.no_failure_limit,
        "peer": {
            "connections": sum(peer.accepted for peer in peers),
            "held_max_s": round(max(held), 2) if held else None,
            "still_open": sum(peer.open_now for peer in peers),
        },
        "phases": phases,
    }


def summary(report: dict[str, Any]) -> str:
    rows = []
    for p in report["phases"]:
        v = p["versions"]
        h = p.get("hostile", {})
        rows.append(
            [
                p["name"],
                v["probes"],
                v["p50_ms"],
                v["p99_ms"],
                v["max_ms"],
                sum(v["failures"].values()),
                h.get("sent", 0),
                ", ".join(f"{k}: {n}" for k, n in sorted(h.get("statuses", {}).items())) or "-",
                h.get("answer_max_ms", "-"),
                p["server_cpu_s"],
                f"{p['rss_mib_start']} / {p['rss_mib_peak']} / {p['rss_mib_end']}",
                f"{p['threads_start']} / {p['threads_peak']} / {p['threads_end']}",
            ]
        )
    table = markdown_table(
        [
            "phase",
            "/versions probes",
            "p50 ms",
            "p99 ms",
            "max ms",
            "probe failures",
            "hostile sent",
            "hostile answers",
            "slowest hostile answer ms",
            "server CPU s",
            "RSS MiB start / peak / end",
            "threads start / peak / end",
        ],
        rows,
    )
    peer = report["peer"]
    return (
        f"{table}\n\npeers: {peer['connections']} connection(s) accepted, held at most "
        f"{peer['held_max_s']} s (key fetch deadline {report['key_fetch_timeout_s']} s), "
        f"{peer['still_open']} still open at the end"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--project-dir", type=Path, default=ROOT)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--baseline", type=float, default=20.0, help="seconds of each probe phase")
    parser.add_argument("--wave", type=int, default=1000, help="hostile requests per wave")
    parser.add_argument("--waves", type=int, default=3, help="waves, each naming a new origin")
    parser.add_argument(
        "--no-failure-limit",
        action="store_true",
        help="run with FEDERATION_AUTH_FAILURE_RATE off, so every wave reaches the key fetch",
    )
    parser.add_argument("--sustained", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--probe-hz", type=float, default=20.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="draw the phases (PNG)")
    args = parser.parse_args()
    report = run(args)
    print(summary(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        phases = [
            {
                "name": p["name"],
                "p50_ms": p["versions"]["p50_ms"],
                "p99_ms": p["versions"]["p99_ms"],
                "rss_mib": p["rss_mib_peak"],
            }
            for p in report["phases"]
        ]
        plot_phases(args.plot, "1,000 X-Matrix requests at once, key server silent", [("", phases)])


if __name__ == "__main__":
    main()
