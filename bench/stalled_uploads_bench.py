"""Stalled uploads against the real server: what they hold, and what they cost everyone else.

One run starts this project as ``make run`` starts it (``request_plane_bench.ProjectServer``:
its own data directory, SQLite, the default process count, and ``--server-env`` on top),
mints one access token, and runs four phases of ``--duration`` seconds each:

1. ``baseline``: nobody stalls;
2. ``bogus``: ``--stalled`` uploads without a credential: ``PUT`` to
   ``/_matrix/media/unstable/com.beeper.msc3870/upload_url/<bogus token>`` announcing
   ``--declared-mib`` MiB, ``--sent-kib`` KiB sent, then nothing;
3. ``valid``: ``--stalled`` uploads with a valid access token, stalling the same way
   (``POST /_matrix/media/v3/upload``);
4. ``baseline-after``: nobody stalls again (the server once they are gone).

Meanwhile a probe client sends ``GET /_matrix/client/versions`` one after another (every
``--probe-interval`` s): p50, p99 and max latency, failures. The RSS of the server's whole
process tree (every worker) is sampled every ``--rss-interval`` s from a thread of its own,
and the tree's CPU is measured over the phase. Each stalled connection records what it got
back: an answer (status, after how long) or none by the end of the phase, and whether the
server closed it. Between phases the stalled connections are closed and the server is left
to settle.

Up to 1 MiB of a body is spooled in memory, beyond on disk: ``--sent-kib 1024`` makes each
stalled upload that is read hold about 1 MiB of RSS.

Every stalled client connects from 127.0.0.1: with the default caps, the per-address one
(``MSC3870_UPLOAD_BODIES_PER_ADDRESS_MAX``, per process) is what binds; pass
``--server-env MSC3870_UPLOAD_BODIES_PER_ADDRESS_MAX=100000`` to see the per-process cap
and the minimum rate instead. With the default ``--duration`` (40 s) the rate bound of the
default settings (30 s grace + 1 s per KiB received) falls inside the phase.

    .venv/bin/python bench/stalled_uploads_bench.py --label current
    git worktree add /tmp/before main
    .venv/bin/python bench/stalled_uploads_bench.py --project-dir /tmp/before --label before

Prints a table and writes ``bench/results/stalled-uploads-<label>.json`` (``--json``).
Needs psutil and aiohttp (``bench/requirements.txt``); every request and connection is to
127.0.0.1 and bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shared import ROOT, machine_info, markdown_table, plot_phases
from request_plane_bench import (
    ProcessTree,
    ProjectServer,
    _terminate,
    log,
    percentile,
    project_git_head,
    raise_nofile,
)

RESULTS = ROOT / "bench" / "results"
BOGUS_TARGET = "/_matrix/media/unstable/com.beeper.msc3870/upload_url/not-a-token"
VALID_TARGET = "/_matrix/media/v3/upload"
MiB = 1024 * 1024


class BenchServer(ProjectServer):
    """``make run`` with the bench's extra environment."""

    def __init__(self, project_dir: Path, data_dir: Path, extra_env: dict[str, str]) -> None:
        super().__init__(project_dir, data_dir, None)
        self.extra_env = extra_env

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.extra_env}


# --------------------------------------------------------------------------- stalled uploads


@dataclass
class Stalled:
    """One stalled upload: what came back, and when."""

    connected: bool = False
    status: int | None = None
    answer_s: float | None = None
    closed_by_server: bool = False
    error: str | None = None


async def _read_status(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1])


async def stall(
    port: int,
    target: str,
    method: str,
    headers: dict[str, str],
    declared: int,
    sent: int,
    started: float,
    until: float,
    record: Stalled,
) -> None:
    """Announce ``declared`` bytes, send ``sent``, then nothing; watch for an answer and a
    close until ``until`` (loop time)."""
    loop = asyncio.get_running_loop()
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), max(0.1, until - loop.time())
        )
        record.connected = True
        lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {declared}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + b"x" * sent)
        await writer.drain()
        record.status = await asyncio.wait_for(_read_status(reader), max(0.0, until - loop.time()))
        record.answer_s = round(loop.time() - started, 3)
        while await asyncio.wait_for(reader.read(65536), max(0.0, until - loop.time())):
            pass
        record.closed_by_server = True
    except TimeoutError:
        pass  # still open at the end of the phase: the server holds it
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        record.closed_by_server = True
        record.error = type(exc).__name__
    except OSError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()


def summarize_stalled(records: list[Stalled]) -> dict[str, Any]:
    answered = [r for r in records if r.status is not None]
    times = [r.answer_s for r in answered if r.answer_s is not None]
    return {
        "count": len(records),
        "connected": sum(r.connected for r in records),
        "answers": dict(Counter(str(r.status) for r in answered)),
        "unanswered": len(records) - len(answered),
        "answer_s_p50": percentile(times, 50),
        "answer_s_max": max(times) if times else None,
        "closed_by_server": sum(r.closed_by_server for r in records),
        "errors": dict(Counter(r.error for r in records if r.error)),
    }


# --------------------------------------------------------------------------- probes


class RssSampler(threading.Thread):
    """The server tree's RSS every ``interval`` s, on its own thread (psutil calls block)."""

    def __init__(self, tree: ProcessTree, interval: float) -> None:
        super().__init__(daemon=True)
        self.tree = tree
        self.interval = interval
        self.samples: list[int] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.samples.append(self.tree.rss())
            self.stopping.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        self.stopping.set()
        self.join(10)
        samples = self.samples or [0]
        return {
            "samples": len(self.samples),
            "start_mib": round(samples[0] / MiB, 1),
            "max_mib": round(max(samples) / MiB, 1),
            "mean_mib": round(statistics.fmean(samples) / MiB, 1),
            "end_mib": round(samples[-1] / MiB, 1),
        }


async def probe_versions(
    base: str, until: float, interval: float, timeout: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        while loop.time() < until:
            started = time.perf_counter()
            try:
                async with session.get(base + "/_matrix/client/versions") as response:
                    await response.read()
                    if response.status == 200:
                        latencies.append((time.perf_counter() - started) * 1000)
                    else:
                        failures[str(response.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures[type(exc).__name__] += 1
            await asyncio.sleep(interval)
    return {
        "answered": len(latencies),
        "failures": dict(failures),
        "p50_ms": round(percentile(latencies, 50) or 0, 2),
        "p99_ms": round(percentile(latencies, 99) or 0, 2),
        "max_ms": round(max(latencies), 2) if latencies else None,
    }


# --------------------------------------------------------------------------- phases


@dataclass
class Phase:
    name: str
    target: str | None = None
    method: str = "PUT"
    headers: dict[str, str] = field(default_factory=dict)


async def run_phase(phase: Phase, server: BenchServer, args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    tree = server.tree
    cpu_before = tree.cpu_seconds()
    sampler = RssSampler(tree, args.rss_interval)
    sampler.start()
    started = loop.time()
    until = started + args.duration
    records: list[Stalled] = []
    stalls: list[asyncio.Task[None]] = []
    if phase.target is not None:
        records = [Stalled() for _ in range(args.stalled)]
        stalls = [
            asyncio.ensure_future(
                stall(
                    server.port,
                    phase.target,
                    phase.method,
                    phase.headers,
                    args.declared_mib * MiB,
                    args.sent_kib * 1024,
                    started,
                    until,
                    record,
                )
            )
            for record in records
        ]
    versions = await probe_versions(server.url, until, args.probe_interval, args.probe_timeout)
    await asyncio.gather(*stalls, return_exceptions=True)
    rss = sampler.stop()
    result: dict[str, Any] = {
        "phase": phase.name,
        "duration_s": args.duration,
        "versions": versions,
        "rss": rss,
        "server_cpu_s": round(tree.cpu_seconds() - cpu_before, 3),
    }
    if phase.target is not None:
        result["stalled"] = summarize_stalled(records)
    log(f"{phase.name}: {json.dumps(result)}")
    return result


async def run_phases(server: BenchServer, token: str, args: argparse.Namespace) -> list[Any]:
    phases = [
        Phase("baseline"),
        Phase("bogus", BOGUS_TARGET, "PUT"),
        Phase("valid", VALID_TARGET, "POST", {"Authorization": f"Bearer {token}"}),
        Phase("baseline-after"),
    ]
    results = []
    for phase in phases:
        log(f"phase {phase.name} ({args.duration:g} s)")
        results.append(await run_phase(phase, server, args))
        server.tree.wait_quiet(args.settle)
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    signal.signal(signal.SIGTERM, _terminate)  # the finally blocks stop the server
    raise_nofile()
    extra = dict(item.split("=", 1) for item in args.server_env)
    with tempfile.TemporaryDirectory(prefix="stalled-bench-") as data_dir:
        server = BenchServer(args.project_dir.resolve(), Path(data_dir), extra)
        server.start()
        try:
            token = server.mint_tokens(["@bench:localhost"])[0]
            processes = server.tree.describe()
            phases = asyncio.run(run_phases(server, token, args))
        finally:
            server.stop()
    return {
        "label": args.label,
        "project_dir": str(args.project_dir),
        "project_git_head": project_git_head(args.project_dir),
        "machine": machine_info(),
        "server_env": extra,
        "stalled": args.stalled,
        "declared_mib": args.declared_mib,
        "sent_kib": args.sent_kib,
        "processes": processes,
        "phases": phases,
    }


def summary(report: dict[str, Any]) -> str:
    rows = []
    for phase in report["phases"]:
        stalled = phase.get("stalled")
        answers = (
            ", ".join(f"{k}: {v}" for k, v in sorted(stalled["answers"].items())) or "-"
            if stalled
            else ""
        )
        versions = phase["versions"]
        rows.append(
            [
                phase["phase"],
                stalled["count"] if stalled else 0,
                answers,
                (stalled["answer_s_max"] or "-") if stalled else "",
                stalled["unanswered"] if stalled else "",
                versions["p50_ms"],
                versions["p99_ms"],
                versions["max_ms"],
                sum(versions["failures"].values()),
                phase["rss"]["max_mib"],
                phase["rss"]["end_mib"],
                phase["server_cpu_s"],
            ]
        )
    title = (
        f"Stalled uploads ({report['label']}, {report['project_git_head'][:50]}): "
        f"{report['stalled']} per phase, {report['declared_mib']} MiB announced, "
        f"{report['sent_kib']} KiB sent"
    )
    headers = [
        "phase",
        "stalled",
        "answers",
        "last answer s",
        "unanswered",
        "/versions p50 ms",
        "p99 ms",
        "max ms",
        "failed",
        "RSS max MiB",
        "RSS end MiB",
        "server CPU s",
    ]
    return title + "\n\n" + markdown_table(headers, rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project-dir", type=Path, default=ROOT, help="checkout to `make run`")
    parser.add_argument("--label", default="current", help="names the result file")
    parser.add_argument("--stalled", type=int, default=200, help="stalled uploads per phase")
    parser.add_argument("--declared-mib", type=int, default=40)
    parser.add_argument("--sent-kib", type=int, default=4)
    parser.add_argument("--duration", type=float, default=40.0, help="s per phase")
    parser.add_argument("--probe-interval", type=float, default=0.05)
    parser.add_argument("--probe-timeout", type=float, default=10.0)
    parser.add_argument("--rss-interval", type=float, default=0.5)
    parser.add_argument("--settle", type=float, default=10.0, help="s to quiet between phases")
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="NAME=VALUE", help="for make run"
    )
    parser.add_argument("--json", type=Path, help="default bench/results/stalled-uploads-LABEL")
    parser.add_argument(
        "--plot",
        type=Path,
        help="draw this run's phases, beside those of the --compare result files (PNG)",
    )
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="results to plot")
    return parser.parse_args(argv)


def plotted(report: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    return report["label"], [
        {
            "name": phase["phase"],
            "p50_ms": phase["versions"]["p50_ms"],
            "p99_ms": phase["versions"]["p99_ms"],
            "rss_mib": phase["rss"]["max_mib"],
        }
        for phase in report["phases"]
    ]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    path = args.json or RESULTS / f"stalled-uploads-{args.label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"results: {path}")
    print(summary(report))
    if args.plot:
        others = [json.loads(other.read_text()) for other in args.compare]
        runs = [plotted(r) for r in [*others, report]]
        plot_phases(args.plot, "Stalled uploads: /versions meanwhile, and the server's RSS", runs)


if __name__ == "__main__":
    main()
