"""Settings side by side (issue 7): several ``make run`` variants up at once, their
16-client round-trip phases interleaved, so that the machine's swings hit every variant
alike. It chose the defaults of mediarepo (``WEB_THREADS``, the SQLite file lock,
PostgreSQL prepared statements); ``bench/request_plane_bench.py`` is the record beside
Synapse.

Each ``--variant`` is ``LABEL:NAME=VALUE,...``: environment variables for that server.
``DB=mediarepo_bench_x`` runs it on a fresh PostgreSQL database of that name (default: the
embedded SQLite). ``DIR=/path`` runs that variant from another checkout (two commits side
by side). Rounds alternate the order of the variants.

    .venv/bin/python bench/variants_bench.py --rounds 4 \\
        --variant t4:WEB_THREADS=4 --variant t8:WEB_THREADS=8

Reports per variant: round trips/s, p50 and p99 over every round, and the server's CPU
per round trip (its whole process tree), and each round's throughput and p99.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import request_plane_bench as bench
from _shared import ROOT, drop_database, recreate_database


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    label, _, pairs = text.partition(":")
    env = dict(pair.split("=", 1) for pair in pairs.split(",") if pair)
    return label, env


def start(label: str, env: dict[str, str], args: argparse.Namespace) -> bench.ProjectServer:
    database_url = None
    if env.get("DB"):
        recreate_database(env["DB"])
        database_url = f"postgres://postgres@127.0.0.1:5432/{env['DB']}"
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k not in ("DB", "DIR")})
    try:
        data_dir = Path(tempfile.mkdtemp(prefix=f"variant-{label}-"))
        project_dir = Path(env["DIR"]) if env.get("DIR") else args.project_dir
        server = bench.ProjectServer(project_dir, data_dir, database_url)
        server.start(env.get("WEB_CONCURRENCY"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project-dir", type=Path, default=ROOT)
    parser.add_argument("--variant", action="append", type=parse_variant, required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=8.0, help="measured s per phase")
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args()
    bench.raise_nofile()
    servers: dict[str, tuple[bench.ProjectServer, list[str]]] = {}
    try:
        for label, env in args.variant:
            server = start(label, env, args)
            users = [f"@variant{i}:localhost" for i in range(args.clients)]
            servers[label] = (server, server.mint_tokens(users))
        phase = argparse.Namespace(warmup=args.warmup, duration=args.duration, request_timeout=30.0)
        results: dict[str, list[dict[str, Any]]] = {label: [] for label in servers}
        for round_ in range(args.rounds):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            for label in order:
                server, tokens = servers[label]
                results[label].append(bench.round_trip_phase(server, tokens, args.clients, phase))
        for label, rounds in results.items():
            latencies = sorted(x for r in rounds for x in r["_latencies"])
            wall = sum(r["wall_s"] for r in rounds)
            cpu = sum(r["server_cpu_s"] for r in rounds)
            n = len(latencies)
            print(
                f"{label}: {n / wall:.1f} rt/s, p50 {bench.ms(bench.percentile(latencies, 50))} "
                f"ms, p99 {bench.ms(bench.percentile(latencies, 99))} ms, server CPU "
                f"{cpu / n * 1000:.3f} ms/rt; rounds rt/s "
                f"{[r['round_trips_per_s'] for r in rounds]}, p99 {[r['p99_ms'] for r in rounds]}"
            )
    finally:
        for server, _ in servers.values():
            server.stop()
        for _, env in args.variant:
            if env.get("DB"):
                drop_database(env["DB"])


if __name__ == "__main__":
    main()
