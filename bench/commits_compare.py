"""Round trips of several commits, interleaved with a reference checkout: where did the
request plane's CPU per round trip change?

Each run starts one checkout as ``make run`` would (gunicorn, ``WEB_CONCURRENCY=2``, the
metrics listener on, SQLite in a fresh data directory), drives ``--clients`` users each
doing ``POST /_matrix/media/v1/create`` then a 1 KiB ``PUT`` for ``--seconds`` (after
``--warmup``), and reports round trips/s, the web workers' CPU per round trip and the
client's own CPU per round trip. The client sends the same requests whatever the commit,
so its CPU per round trip tracks how fast the machine is at that moment (on a shared
virtual machine that moved by half between minutes); **server CPU / client CPU** is the
figure to compare across commits, and each commit's run is followed by the reference's.

Commits are checked out in turn in ``--worktree`` (a git worktree whose ``.venv`` holds
the dependencies of every commit measured: install the newest commit's); the reference
is a checkout with its own ``.venv``.

    git worktree add /tmp/bis <oldest> --detach && cd /tmp/bis && make .venv/.dev-installed
    .venv/bin/python bench/commits_compare.py --worktree /tmp/bis --reference-dir /tmp/before \\
        cca9cbd ff587ff 651740d 42ac726 cd6b482 d1d21f9
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import psutil

BODY = 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _client(
    session: aiohttp.ClientSession, base: str, token: str, deadline: float, done: list[int]
) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    while time.monotonic() < deadline:
        async with session.post(f"{base}/_matrix/media/v1/create", headers=auth, json={}) as r:
            created = await r.json()
            assert r.status == 200, created
        path = created["content_uri"].removeprefix("mxc://")
        headers = {**auth, "Content-Type": "application/octet-stream"}
        url = f"{base}/_matrix/media/v3/upload/{path}"
        async with session.put(url, headers=headers, data=os.urandom(BODY)) as r:
            await r.read()
            assert r.status == 200, r.status
        done[0] += 1


async def _drive(base: str, tokens: list[str], seconds: float) -> int:
    done = [0]
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(_client(session, base, t, deadline, done) for t in tokens))
    return done[0]


def _environment(data: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MSC3870_", "DJANGO_")) and k not in ("DATABASE_URL", "VIRTUAL_ENV")
    }
    port, metrics_port = free_port(), free_port()
    # Commits before the metrics directory's fix need it made before the server starts.
    (data / "metrics" / f"web-{metrics_port}").mkdir(parents=True)
    env.update(
        PORT=str(port),
        METRICS_PORT=str(metrics_port),
        MEDIAREPO_DATA_DIR=str(data),
        MSC3870_CREATE_RATE="1000000/min",
        WEB_CONCURRENCY="2",
    )
    return env


def _tokens(checkout: Path, env: dict[str, str], count: int) -> list[str]:
    python = checkout / ".venv/bin/python"
    subprocess.run(
        [python, "manage.py", "migrate", "--noinput"],
        cwd=checkout,
        env=env,
        check=True,
        capture_output=True,
    )
    code = (
        "import secrets\nfrom msc3870.models import AccessToken, digest_token\n"
        f"for i in range({count}):\n"
        "    t = 'mr_' + secrets.token_urlsafe(32)\n"
        "    AccessToken.objects.create(user_id=f'@u{i}:localhost', token_digest=digest_token(t))\n"
        "    print('TOKEN', t)\n"
    )
    out = subprocess.run(
        [python, "manage.py", "shell", "-c", code],
        cwd=checkout,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return [line.split()[1] for line in out.stdout.splitlines() if line.startswith("TOKEN ")]


def measure(checkout: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One run of one checkout; its figures."""
    data = Path(tempfile.mkdtemp(prefix="commits-compare-"))
    env = _environment(data)
    tokens = _tokens(checkout, env, args.clients)
    base = f"http://127.0.0.1:{env['PORT']}"
    with open(data / "server.log", "wb") as log:
        server = subprocess.Popen(
            [checkout / ".venv/bin/gunicorn", "-c", "mediarepo/gunicorn.conf.py", "mediarepo.asgi"],
            cwd=checkout,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(base + "/_matrix/client/versions", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        time.sleep(1)
        workers = psutil.Process(server.pid).children()
        asyncio.run(_drive(base, tokens, args.warmup))
        cpu0 = sum(sum(w.cpu_times()[:2]) for w in workers)
        client0 = time.process_time()
        done = asyncio.run(_drive(base, tokens, args.seconds))
        client = time.process_time() - client0
        cpu = sum(sum(w.cpu_times()[:2]) for w in workers) - cpu0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    return {
        "round_trips": done,
        "round_trips_per_s": round(done / args.seconds, 1),
        "server_cpu_ms_per_rt": round(1000 * cpu / done, 3),
        "client_cpu_ms_per_rt": round(1000 * client / done, 3),
        "server_per_client_cpu": round(cpu / client, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("commits", nargs="+", help="commits to check out in --worktree")
    parser.add_argument("--worktree", type=Path, required=True)
    parser.add_argument("--reference-dir", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write every run here")
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for commit in args.commits:
            subprocess.run(["git", "-C", args.worktree, "checkout", "-q", "-f", commit], check=True)
            for label, checkout in ((commit, args.worktree), ("reference", args.reference_dir)):
                run = {"label": label, "repeat": repeat, **measure(checkout, args)}
                runs.append(run)
                print(json.dumps(run), flush=True)
    reference = statistics.median(
        r["server_per_client_cpu"] for r in runs if r["label"] == "reference"
    )
    print(f"\nreference: server/client CPU {reference:.3f} (median of its runs)")
    for commit in args.commits:
        ratio = statistics.median(r["server_per_client_cpu"] for r in runs if r["label"] == commit)
        print(f"{commit}: server/client CPU {ratio:.3f} ({100 * (ratio / reference - 1):+.1f} %)")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args), "runs": runs}, default=str))


if __name__ == "__main__":
    sys.exit(main())
