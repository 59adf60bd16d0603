"""Helpers shared by the benchmarks: the bench S3 server, bench databases, machine facts.

Everything here is namespaced so a benchmark can run while the test suite runs on the same
machine: its own S3 server directory, port and bucket, databases named ``mediarepo_bench*``
and Redis DB 13 (``MEDIAREPO_BENCH_SLOT`` moves them all). ``scripts/s3-server`` moves
weed's master/filer/volume/... ports with the S3 port, so the bench server on :8433 runs
beside the suite's on :8333.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
PYTHON = BIN / "python"

# MEDIAREPO_BENCH_SLOT=1 or 2 runs a second or third bench beside the first (another
# checkout's, say): its own S3 port, directory, Redis DB and database names.
SLOT = os.environ.get("MEDIAREPO_BENCH_SLOT", "")
_SLOTS = {"": (8433, 13), "1": (8933, 5), "2": (9033, 4)}
if SLOT not in _SLOTS:
    raise SystemExit(f"MEDIAREPO_BENCH_SLOT must be one of 1, 2 (or unset), not {SLOT!r}")
S3_PORT, _REDIS_DB = _SLOTS[SLOT]
S3_BUCKET = "mediarepo-bench"
S3_SERVER_DIR = ROOT / "var" / f"s3-bench{SLOT}"
PG_URL = "postgres://postgres@127.0.0.1:5432"
BROKER_URL = f"redis://127.0.0.1:6379/{_REDIS_DB}"


def bench_database(name: str) -> str:
    """A bench database's name in this slot."""
    return f"{name}_slot{SLOT}" if SLOT else name


def s3_env() -> dict[str, str]:
    """The django-storages variables for the bench bucket (as scripts/services-test sets)."""
    return {
        "AWS_STORAGE_BUCKET_NAME": S3_BUCKET,
        "AWS_S3_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
        "AWS_ACCESS_KEY_ID": "mediarepo",
        "AWS_SECRET_ACCESS_KEY": "mediarepo-secret",
        "AWS_S3_REGION_NAME": "us-east-1",
        "AWS_S3_ADDRESSING_STYLE": "path",
    }


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class S3Server:
    """``scripts/s3-server`` with the bench's port, directory and bucket, or those given
    (``bench/soak.py`` runs one of its own, which it stops and starts as a fault)."""

    def __init__(
        self,
        manage: bool,
        wait_for_ports: float = 0,
        *,
        port: int = S3_PORT,
        directory: Path = S3_SERVER_DIR,
        bucket: str = S3_BUCKET,
        volume_max: str = "100",
        quiet: bool = False,
        cpus: str | None = None,
    ) -> None:
        self.manage = manage
        self.wait_for_ports = wait_for_ports
        self.port = port
        self.directory = directory
        self.bucket = bucket
        self.quiet = quiet
        # The master, filer and volume server move with the S3 port (scripts/s3-server).
        offset = port - 8333
        self.weed_ports = (9333 + offset, 8888 + offset, 9340 + offset)
        self.env = {
            **os.environ,
            "S3_PORT": str(port),
            "S3_SERVER_DIR": str(directory),
            "S3_BUCKET": bucket,
            # The bench's default: room for a 2 GiB upload twice over (incoming and
            # served) and a few more.
            "S3_VOLUME_MAX": volume_max,
        }
        if cpus is not None:  # the CPUs weed may run on (taskset's list)
            self.env["S3_SERVER_CPUS"] = cpus

    def _run(self, *args: str) -> None:
        subprocess.run(
            [str(ROOT / "scripts" / "s3-server"), *args],
            cwd=ROOT,
            env=self.env,
            check=True,
            stdout=subprocess.DEVNULL if self.quiet else None,
        )

    def start(self) -> None:
        """Start with an empty data directory (or check the one already running)."""
        if not self.manage:
            if not port_in_use(self.port):
                sys.exit(f"no S3 server on :{self.port}; start it or drop --external-s3")
            return
        self.stop()
        deadline = time.monotonic() + self.wait_for_ports
        while (busy := [p for p in (self.port, *self.weed_ports) if port_in_use(p)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(5)
        if busy:
            sys.exit(f"ports {busy} are taken; is another bench S3 server running?")
        self._run("start", "--fresh")

    def resume(self) -> None:
        """Start again on the data directory it had (after ``stop``: an outage)."""
        self._run("start")

    def stop(self) -> None:
        if not self.manage:
            return
        # `scripts/s3-server stop` kills the PID in the pid file: make sure it is still ours.
        pid = self.pid()
        if pid is not None and str(self.directory) not in _cmdline(pid):
            (self.directory / "weed.pid").unlink()
        self._run("stop")

    def pid(self) -> int | None:
        path = self.directory / "weed.pid"
        return int(path.read_text()) if path.exists() else None

    def storage_env(self) -> dict[str, str]:
        """The django-storages variables for this server's bucket."""
        return {
            **s3_env(),
            "AWS_STORAGE_BUCKET_NAME": self.bucket,
            "AWS_S3_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
        }


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG_URL}/postgres", autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def database_url(name: str) -> str:
    if not name.startswith("mediarepo_bench"):
        raise ValueError("bench databases are named mediarepo_bench*")
    return f"{PG_URL}/{name}"


def recreate_database(name: str) -> str:
    url = database_url(name)
    pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    pg_admin(f'CREATE DATABASE "{name}"')
    return url


def drop_database(name: str) -> None:
    if not name.startswith("mediarepo_bench"):
        raise ValueError("bench databases are named mediarepo_bench*")
    pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def flush_broker() -> None:
    """Empty Redis DB 13 (the bench broker): no message of an earlier run is replayed."""
    import redis

    redis.Redis.from_url(BROKER_URL).flushdb()


def _run_text(argv: Sequence[str]) -> str:
    try:
        return subprocess.run(
            list(argv), cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return ""


def load_average() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def machine_info() -> dict[str, Any]:
    mem_total_kib = 0
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                mem_total_kib = int(line.split()[1])
    cpu_model = ""
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    dirty = _run_text(["git", "status", "--short", "--untracked-files=no"])
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model,
        "mem_total_gib": round(mem_total_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "loadavg": load_average(),
        "python": platform.python_version(),
        "postgres": _run_text(
            ["psql", "-h", "127.0.0.1", "-U", "postgres", "-Atc", "SHOW server_version"]
        ),
        "git_head": _run_text(["git", "rev-parse", "--short", "HEAD"]),
        "git_dirty": dirty.replace("\n", "; ") if dirty else "",
        "weed": shutil.which("weed", path=str(BIN)) or "",
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def mib(value: float) -> str:
    return f"{value / 1024 / 1024:,.1f}"


def plot_phases(
    path: Path,
    title: str,
    runs: Sequence[tuple[str, Sequence[dict[str, Any]]]],
) -> None:
    """One figure of phased benchmarks: ``/versions`` p50 and p99 (bars, ms) and the
    server's peak RSS (MiB) per phase, for each labelled run. A phase is a dict with
    ``name``, ``p50_ms``, ``p99_ms`` and ``rss_mib``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (latency, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(runs))
    for index, (label, phases) in enumerate(runs):
        xs = [i + index * width for i in range(len(phases))]
        latency.bar(xs, [p["p99_ms"] or 0 for p in phases], width, label=f"{label} p99")
        latency.scatter(xs, [p["p50_ms"] or 0 for p in phases], marker="_", s=200, c="black")
        memory.plot(range(len(phases)), [p["rss_mib"] for p in phases], marker="o", label=label)
    names = [p["name"] for p in runs[0][1]]
    for axis in (latency, memory):
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels(names, rotation=20)
        axis.legend()
    latency.set_ylabel("/versions latency, ms (bar p99, tick p50)")
    memory.set_ylabel("server RSS, MiB (peak in the phase)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
