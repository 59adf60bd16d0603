"""Diagnostic: what ``S3MediaStore.write_stream`` (the PUT fallback's path to S3) holds in
memory, and what the post-upload move and hash of the upload-to-URL flow cost, in isolation.

Runs in this process, against the bench S3 server (started fresh for each case):

* ``write``: stream ``--size-mib`` MiB from a fast in-memory reader through
  ``get_store().write_stream`` and report the peak RSS (VmHWM, reset before) and CPU time,
  with the app's ``S3_UPLOAD_CONCURRENCY`` (parts in flight; one part buffer more is
  held) as configured and changed (in a child process); and with botocore's default
  request checksums off (``AWS_REQUEST_CHECKSUM_CALCULATION=when_required``).
* ``complete``: time ``store.move`` (CopyObject + DeleteObject) and a full streamed read +
  SHA-256 (what ``check_sha256`` does) of an object of that size.

    .venv/bin/python bench/s3_write_probe.py --size-mib 256
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _shared import PYTHON, ROOT, S3Server, load_average, markdown_table, s3_env

MiB = 1024 * 1024


def status_kib(name: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def cpu_s() -> float:
    times = os.times()
    return times.user + times.system


class FastBody:
    """``size`` bytes from a 1 MiB random block: the reader is never the bottleneck."""

    def __init__(self, size: int) -> None:
        self.remaining = size
        self.block = os.urandom(MiB)

    def read(self, size: int = MiB) -> bytes:
        amount = min(size, self.remaining)
        self.remaining -= amount
        return (self.block * (amount // MiB + 1))[:amount]


def case(kind: str, size: int) -> dict[str, Any]:
    """One measurement in this (fresh) process; the store is configured by the env."""
    import django

    django.setup()
    from msc3870.conf import app_settings
    from msc3870.stores import get_store

    store = get_store()
    store.head("warm-up")
    if kind == "write":
        store.write_stream("probe/warm", FastBody(16 * MiB), max_size=size * 2)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # VmHWM := current RSS
        before, c0, t0 = status_kib("VmRSS"), cpu_s(), time.monotonic()
        written = store.write_stream(
            "probe/x", FastBody(size), max_size=size * 2, expected_size=size
        )
        assert written.size == size
        return {
            "rss_before_kib": before,
            "peak_kib": status_kib("VmHWM"),
            "cpu_s": cpu_s() - c0,
            "wall_s": time.monotonic() - t0,
            "concurrency": app_settings.S3_UPLOAD_CONCURRENCY,
        }
    store.write_stream("incoming/probe", FastBody(size), max_size=size * 2, expected_size=size)
    t0 = time.monotonic()
    store.move("incoming/probe", "media/pr/probe")
    t1, c1 = time.monotonic(), cpu_s()
    digest = hashlib.sha256()
    for chunk in store.iter_bytes("media/pr/probe"):
        digest.update(chunk)
    return {"move_s": t1 - t0, "hash_read_s": time.monotonic() - t1, "hash_cpu_s": cpu_s() - c1}


def run_case(s3: S3Server, size_mib: int, spec: str, env: dict[str, str]) -> dict[str, Any]:
    """One case in a child process, against a fresh S3 server (SeaweedFS does not reclaim
    deleted space at once); the child's JSON result."""
    s3.start()
    try:
        out = subprocess.run(
            [str(PYTHON), __file__, "--size-mib", str(size_mib), "--case", spec],
            cwd=ROOT,
            env={**os.environ, **env},
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        s3.stop()
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # child: kind
    args = parser.parse_args()
    size = args.size_mib * MiB
    if args.case:  # a child: the parent's environment
        print(json.dumps(case(args.case, size)))
        return

    data_dir = tempfile.mkdtemp(prefix="s3-probe-")
    os.environ.update(
        {
            **s3_env(),
            "DJANGO_SETTINGS_MODULE": "mediarepo.settings",
            "DJANGO_SECRET_KEY": "bench-probe",
            "MEDIAREPO_DATA_DIR": data_dir,
            "MSC3870_MAX_UPLOAD_SIZE": str(size * 2),
        }
    )
    variants: list[tuple[str, str, dict[str, str]]] = [
        ("write_stream, app config", "write", {}),
        ("write_stream, 8 parts in flight", "write", {"MSC3870_S3_UPLOAD_CONCURRENCY": "8"}),
        ("write_stream, 1 part in flight", "write", {"MSC3870_S3_UPLOAD_CONCURRENCY": "1"}),
        (
            "write_stream, app config, request checksums when_required",
            "write",
            {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required"},
        ),
    ]
    s3 = S3Server(manage=True, wait_for_ports=60)
    rows: list[list[str]] = []
    timings: list[list[str]] = []
    try:
        for _ in range(args.repeat):
            for label, spec, env in variants:
                r = run_case(s3, args.size_mib, spec, env)
                rows.append(
                    [
                        label,
                        f"{r['rss_before_kib'] / 1024:.0f}",
                        f"{r['peak_kib'] / 1024:.0f}",
                        f"+{(r['peak_kib'] - r['rss_before_kib']) / 1024:.0f}",
                        f"{r['cpu_s']:.2f}",
                        f"{r['wall_s']:.2f}",
                    ]
                )
            r = run_case(s3, args.size_mib, "complete", {})
            timings.append(
                [f"{r['move_s']:.2f}", f"{r['hash_read_s']:.2f}", f"{r['hash_cpu_s']:.2f}"]
            )
    finally:
        s3.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    print(f"{args.size_mib} MiB; load average at the end {load_average()}\n")
    print(
        markdown_table(
            ["case", "RSS before MiB", "peak MiB", "peak - before", "CPU s", "wall s"], rows
        )
    )
    print()
    print(
        markdown_table(
            ["move (CopyObject + delete) s", "full read + SHA-256 s", "its CPU s"], timings
        )
    )


if __name__ == "__main__":
    main()
