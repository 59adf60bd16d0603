"""How long a download waiting on one web node takes to hear of an upload to another.

Two web nodes (``make run``: gunicorn with one uvicorn worker each, their own data
directories and ports) share one PostgreSQL database and the bench S3 server, as behind a
load balancer. Each round creates an id on node A, parks an authenticated download of it
on a node (``cross``: node B; ``same``: node A itself, the peer measured in the same run),
waits until that node counts it among its parked requests, then PUTs the bytes to A. It
records when A answered the PUT and when the waiter answered with the bytes. Rounds of the
two kinds alternate.

Without a broker A checks the PUT's bytes in the request and commits the verdict: its own
waiters are woken by the commit in-process, B's by PostgreSQL's NOTIFY (a trigger on the
row) reaching B's LISTEN connection. ``latency`` is the waiter's answer after A's PUT
answer (negative when the waiter was answered first); ``from PUT start`` includes the PUT;
``complete download`` is the same download once more, of complete media on the same node:
the part of the latency that is serving the bytes (a read from S3), not waking.

    .venv/bin/python bench/two_nodes_bench.py --rounds 200 --json bench/results/two-nodes.json

Needs aiohttp (``bench/requirements.txt``), PostgreSQL on 127.0.0.1:5432 and the bench S3
server's ports (``_shared.S3Server``); ``MEDIAREPO_BENCH_SLOT`` moves them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import request_plane_bench as bench
from _shared import (
    ROOT,
    S3Server,
    bench_database,
    drop_database,
    machine_info,
    markdown_table,
    recreate_database,
    s3_env,
)

WAIT_MS = 30000
BODY = 1024


async def parked(session: aiohttp.ClientSession, metrics_url: str) -> float:
    async with session.get(metrics_url) as response:
        text = await response.text()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("msc3870_waiters{") and 'kind="authenticated"' in line
    )


async def one_round(
    session: aiohttp.ClientSession,
    a: bench.ProjectServer,
    waiter: bench.ProjectServer,
    token: str,
) -> tuple[float, float, float]:
    """(waiter answer - PUT answer, waiter answer - PUT start, a download of the media
    once complete), in seconds."""
    mxc = await bench.create_media(session, a.url, token)
    body = secrets.token_bytes(BODY)
    metrics_url = f"http://127.0.0.1:{waiter.metrics_port}/metrics"
    before = await parked(session, metrics_url)
    answered: list[float] = []

    async def wait() -> None:
        url = f"{waiter.url}/_matrix/client/v1/media/download/{mxc[0]}/{mxc[1]}"
        params = {"timeout_ms": str(WAIT_MS)}
        async with session.get(url, params=params, headers=bench.auth(token)) as response:
            data = await response.read()
            answered.append(time.perf_counter())
            if response.status != 200 or data != body:
                raise bench.Failure(f"waiter got {response.status} {data[:100]!r}")

    task = asyncio.create_task(wait())
    deadline = time.monotonic() + 20
    while await parked(session, metrics_url) <= before:
        if task.done() or time.monotonic() > deadline:
            await task
            raise bench.Failure("the download never parked")
        await asyncio.sleep(0.005)
    started = time.perf_counter()
    await bench.upload_media(session, a.url, token, mxc, body)
    put_answered = time.perf_counter()
    await asyncio.wait_for(task, WAIT_MS / 1000 + 10)
    # The same download again, of media now complete: what serving it costs without a wait.
    url = f"{waiter.url}/_matrix/client/v1/media/download/{mxc[0]}/{mxc[1]}"
    again = time.perf_counter()
    async with session.get(url, headers=bench.auth(token)) as response:
        if response.status != 200 or await response.read() != body:
            raise bench.Failure(f"download of complete media: {response.status}")
    return answered[0] - put_answered, answered[0] - started, time.perf_counter() - again


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000

    return {
        "p50_ms": at(0.5),
        "p99_ms": at(0.99),
        "mean_ms": statistics.fmean(ordered) * 1000,
        "max_ms": ordered[-1] * 1000,
    }


async def measure(
    a: bench.ProjectServer, b: bench.ProjectServer, token: str, rounds: int
) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {
        kind: {"after_put": [], "from_start": [], "complete_download": []}
        for kind in ("cross", "same")
    }
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=WAIT_MS / 1000 + 20)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(3):  # warm both nodes' connections and caches
            await one_round(session, a, b, token)
            await one_round(session, a, a, token)
        for n in range(2 * rounds):
            kind = ("cross", "same")[n % 2]
            after_put, from_start, complete = await one_round(
                session, a, b if kind == "cross" else a, token
            )
            results[kind]["after_put"].append(after_put)
            results[kind]["from_start"].append(from_start)
            results[kind]["complete_download"].append(complete)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200, help="rounds of each kind")
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument(
        "--wait-s3-ports", type=float, default=0, help="wait this long for the S3 ports"
    )
    args = parser.parse_args()

    database = bench_database("mediarepo_bench_two_nodes")
    database_url = recreate_database(database)
    s3 = S3Server(manage=True, wait_for_ports=args.wait_s3_ports)
    s3.start()
    root = Path(tempfile.mkdtemp(prefix="two-nodes-bench-"))
    shared = {
        **s3_env(),
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "MSC3870_MAX_PENDING_UPLOADS": "100000",
        # Only LISTEN/NOTIFY (or this process's own commit) wakes a waiter in time.
        "MSC3870_WAKEUP_SAFETY_POLL_SECONDS": "60",
    }
    nodes = []
    try:
        for name in ("a", "b"):
            node = bench.ProjectServer(ROOT, root / name, database_url)
            node.extra_env = shared  # ProjectServer serves metrics (METRICS_PORT) already
            node.start("1")  # one after the other: each migrates first
            nodes.append(node)
        a, b = nodes
        [token] = a.mint_tokens(["@bench:localhost"])
        started = time.time()
        results = asyncio.run(measure(a, b, token, args.rounds))
        elapsed = time.time() - started
    finally:
        for node in nodes:
            node.stop()
        s3.stop()
        if not args.keep_db:
            drop_database(database)
        shutil.rmtree(root, ignore_errors=True)

    summary = {
        kind: {measure: percentiles(values) for measure, values in measures.items()}
        for kind, measures in results.items()
    }
    rows = []
    for kind, label in (("cross", "waiter on B (cross-node)"), ("same", "waiter on A (same node)")):
        after, start = summary[kind]["after_put"], summary[kind]["from_start"]
        plain = summary[kind]["complete_download"]
        rows.append(
            [
                label,
                f"{after['p50_ms']:.2f}",
                f"{after['p99_ms']:.2f}",
                f"{after['max_ms']:.2f}",
                f"{start['p50_ms']:.2f}",
                f"{start['p99_ms']:.2f}",
                f"{plain['p50_ms']:.2f}",
                f"{plain['p99_ms']:.2f}",
            ]
        )
    headers = [
        "",
        "latency p50 ms",
        "latency p99 ms",
        "max ms",
        "from PUT start p50 ms",
        "from PUT start p99 ms",
        "complete download p50 ms",
        "complete download p99 ms",
    ]
    print(markdown_table(headers, rows))
    cross, same = summary["cross"]["from_start"], summary["same"]["from_start"]
    print(
        f"\n{args.rounds} rounds of each kind in {elapsed:.0f} s; cross/same from PUT start: "
        f"p50 {cross['p50_ms'] / same['p50_ms']:.2f}x, p99 {cross['p99_ms'] / same['p99_ms']:.2f}x"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine_info(),
                    "rounds": args.rounds,
                    "summary": summary,
                    "raw": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    os.umask(0o077)
    main()
