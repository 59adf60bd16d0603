"""Where the time goes when N downloads parked on one pending id are answered (issue 7).

Starts ``make run`` in ``--project-dir`` with one web process (``WEB_CONCURRENCY=1``),
parks ``--waiters`` authenticated downloads on one created id, waits until the server is
quiet, then uploads the bytes and reports the PUT's latency, the time from the upload to
the last answer, how many got the bytes, and the worker's CPU over the answer. With
``--py-spy FILE`` it records the worker with py-spy (``--format raw`` for collapsed
stacks) from just before the upload until the last answer.

    .venv/bin/python bench/waiter_profile.py --waiters 5000
    .venv/bin/python bench/waiter_profile.py --waiters 5000 --py-spy /tmp/answers.txt --format raw

Needs aiohttp and psutil (``bench/requirements.txt``) and, for ``--py-spy``, py-spy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import request_plane_bench as bench
from _shared import ROOT


async def answer_phase(
    server: bench.ProjectServer, tokens: list[str], args: argparse.Namespace
) -> None:
    body = os.urandom(bench.BODY_SIZE)
    async with aiohttp.ClientSession() as control:
        mxc = await bench.create_media(control, server.url, tokens[0])
    url = f"{server.url}/_matrix/client/v1/media/download/{mxc[0]}/{mxc[1]}"
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        timeout=aiohttp.ClientTimeout(total=120),
    )
    answers: list[tuple[float, bool]] = []

    async def wait_one(i: int) -> None:
        headers = bench.auth(tokens[i % len(tokens)])
        async with session.get(url, params={"timeout_ms": "60000"}, headers=headers) as resp:
            data = await resp.read()
            answers.append((time.monotonic(), resp.status == 200 and data == body))

    tasks = []
    for i in range(args.waiters):  # ramp: 100 connections every 10 ms, as the bench does
        tasks.append(asyncio.create_task(wait_one(i)))
        if i % 100 == 99:
            await asyncio.sleep(0.01)
    await asyncio.to_thread(server.tree.wait_quiet, 30)
    worker = max(server.tree.processes(), key=lambda p: p.memory_info().rss)
    spy = None
    if args.py_spy:
        command = [
            args.py_spy_bin,
            "record",
            "-p",
            str(worker.pid),
            "-r",
            "400",
            "-o",
            str(args.py_spy),
            "-f",
            args.format,
            "--nonblocking",
        ]
        spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.sleep(1.5)  # py-spy attaches
    cpu0 = worker.cpu_times()
    started = time.monotonic()
    async with aiohttp.ClientSession() as control:
        await bench.upload_media(control, server.url, tokens[0], mxc, body)
    put = time.monotonic() - started
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    cpu1 = worker.cpu_times()
    await session.close()
    if spy is not None:
        await asyncio.sleep(0.5)
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
    last = max(at for at, _ in answers) - started
    cpu = cpu1.user + cpu1.system - cpu0.user - cpu0.system
    print(
        f"{args.waiters} waiters: PUT {put * 1000:.0f} ms, last answer {last * 1000:.0f} ms "
        f"after the upload began, {sum(ok for _, ok in answers)}/{args.waiters} had the bytes, "
        f"worker CPU {cpu:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project-dir", type=Path, default=ROOT)
    parser.add_argument("--waiters", type=int, default=5000)
    parser.add_argument("--database-url", help="PostgreSQL (default: the embedded SQLite)")
    parser.add_argument("--py-spy", type=Path, help="record the worker into this file")
    parser.add_argument("--format", default="speedscope", help="py-spy's output format")
    parser.add_argument("--py-spy-bin", default=shutil.which("py-spy") or "py-spy")
    args = parser.parse_args()
    bench.raise_nofile()
    data_dir = Path(tempfile.mkdtemp(prefix="waiter-profile-"))
    server = bench.ProjectServer(args.project_dir, data_dir, args.database_url)
    server.start("1")
    try:
        tokens = server.mint_tokens(["@waiter0:localhost", "@waiter1:localhost"])
        asyncio.run(answer_phase(server, tokens, args))
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
