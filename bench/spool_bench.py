"""What the request-body spool costs (issue 7, item 3).

The ASGI handler (msc3870/asgi.py) reads a body on the event loop into a spooled file (in
memory up to 1 MiB, on disk beyond) before the view streams it to storage. This starts
the project as ``make run`` does (local disk, SQLite), PUTs bodies of each size through
``/_matrix/media/v3/upload`` and reports, per size: wall time, server CPU, the server's
peak RSS growth, and the same bytes written straight to a file on the same disk by this
process (the floor: what one write of the bytes costs).

    .venv/bin/python bench/spool_bench.py --sizes-mib 1,64,256 [--json bench/results/spool.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"
MiB = 1024 * 1024


def tree(root: psutil.Process) -> list[psutil.Process]:
    return [root, *root.children(recursive=True)]


def cpu_seconds(root: psutil.Process) -> float:
    total = 0.0
    for process in tree(root):
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def peak_rss_mib(root: psutil.Process) -> float:
    """The largest high-water mark (VmHWM) among the server's processes."""
    peak = 0
    for process in tree(root):
        try:
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except (OSError, psutil.NoSuchProcess):
            pass
    return peak / 1024


def chunks(size: int, block: bytes) -> Any:
    sent = 0
    while sent < size:
        piece = block[: min(len(block), size - sent)]
        sent += len(piece)
        yield piece


class _Limited:
    """The first ``size`` bytes of a file, with a length (sent with Content-Length)."""

    def __init__(self, handle: Any, size: int) -> None:
        self.handle = handle
        self.left = size
        self.size = size

    def __len__(self) -> int:
        return self.size

    def read(self, amount: int = -1) -> bytes:
        amount = self.left if amount < 0 else min(amount, self.left)
        data = self.handle.read(amount)
        self.left -= len(data)
        return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="1,64,256")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mib.split(",")]

    data_dir = Path(tempfile.mkdtemp(prefix="spool-bench-"))
    port = 18700 + os.getpid() % 200
    env = {
        **os.environ,
        "MEDIAREPO_DATA_DIR": str(data_dir),
        "PORT": str(port),
        "WEB_CONCURRENCY": "1",
        "MSC3870_MAX_UPLOAD_SIZE": str((max(sizes) + 1) * MiB),
        "MSC3870_CREATE_RATE": "100000/min",
    }
    for name in ("DATABASE_URL", "CELERY_BROKER_URL", "AWS_STORAGE_BUCKET_NAME", "REDIS_URL"):
        env.pop(name, None)
    server = subprocess.Popen(
        ["make", "run"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    results: list[dict[str, Any]] = []
    try:
        for _ in range(240):
            try:
                if requests.get(f"{base}/_matrix/client/versions", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        token = (
            subprocess.run(
                [str(PYTHON), "manage.py", "create_access_token", "@spool:localhost"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        auth = {"Authorization": f"Bearer {token}"}
        root = psutil.Process(server.pid)
        block = os.urandom(MiB)
        source = data_dir / "source.bin"
        with open(source, "wb") as handle:
            for piece in chunks(max(sizes) * MiB, block):
                handle.write(piece)
        http = requests.Session()
        for size_mib in sizes:
            size = size_mib * MiB
            rss_before = peak_rss_mib(root)
            cpu_before = cpu_seconds(root)
            started = time.perf_counter()
            with open(source, "rb") as body:
                response = http.post(
                    f"{base}/_matrix/media/v3/upload",
                    data=_Limited(body, size),
                    headers={**auth, "Content-Type": "application/octet-stream"},
                    timeout=600,
                )
            wall = time.perf_counter() - started
            assert response.status_code == 200, response.text
            server_cpu = cpu_seconds(root) - cpu_before
            with tempfile.NamedTemporaryFile(dir=data_dir) as floor_file:
                floor_started = time.perf_counter()
                for piece in chunks(size, block):
                    floor_file.write(piece)
                floor_file.flush()
                os.fsync(floor_file.fileno())
                floor = time.perf_counter() - floor_started
            results.append(
                {
                    "size_mib": size_mib,
                    "wall_s": round(wall, 3),
                    "mib_per_s": round(size_mib / wall, 1),
                    "server_cpu_s": round(server_cpu, 3),
                    "server_cpu_s_per_gib": round(server_cpu / size_mib * 1024, 2),
                    "server_peak_rss_growth_mib": round(peak_rss_mib(root) - rss_before, 1),
                    "one_write_to_disk_s": round(floor, 3),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    report = {
        "argv": sys.argv[1:],
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "loadavg": os.getloadavg(),
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
