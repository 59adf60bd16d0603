"""The fixed server CPU of one upload-to-URL (issue 9): N small uploads, the same way
``upload_bench.py --compare`` makes them (``make_run_stack``: gunicorn, one web process,
PostgreSQL, the bench SeaweedFS, tasks in-process), after ``--warmup`` (5) unmeasured
ones. Each upload stores its size twice (incoming and served) in a store of 100 volumes
of 64 MiB: for large sizes keep ``(warmup + uploads) * 2 * size`` under 6 GiB.

Each upload is /create, a PUT of ``--size-kib`` to the presigned URL, /complete, the wait
for the decision, and one download (as ``one_upload`` does); the figure is the server
tree's CPU per upload, idle CPU over the window included. With ``--py-spy FILE`` the web
process is recorded meanwhile (collapsed stacks, one per thread).

    .venv/bin/python bench/url_fixed_cost.py --uploads 30 --policy metadata-only
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import upload_bench as bench
from _shared import PYTHON, ROOT, S3Server, drop_database, recreate_database, s3_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=30)
    parser.add_argument("--size-kib", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured uploads first")
    parser.add_argument("--policy", default="metadata-only", choices=sorted(bench.POLICY_ENV))
    parser.add_argument("--py-spy", type=Path, help="record the web process into this file")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="url-fixed-cost-"))
    s3 = S3Server(manage=True)
    stack = None
    database_url = recreate_database(bench.DB_NAME)
    env = {
        **os.environ,
        **s3_env(),
        "DJANGO_SETTINGS_MODULE": "mediarepo.settings",
        "DATABASE_URL": database_url,
        "DJANGO_SECRET_KEY": "bench-" + os.urandom(16).hex(),
        "MSC3870_MAX_PENDING_UPLOADS": "1000",
        "MSC3870_CREATE_RATE": "10000/min",
        "MSC3870_MAX_UPLOAD_SIZE": str(args.size_kib * 1024 + 1024 * 1024),
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("REDIS_URL", "CELERY_BROKER_URL"):
        env.pop(name, None)
    try:
        s3.start()
        manage = [str(PYTHON), "manage.py"]
        subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
        minted = subprocess.run(
            [*manage, "create_access_token", "@fixedcost:localhost"],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        token = minted.stdout.strip().splitlines()[-1]
        stack, _, roots = bench.make_run_stack(env, args.policy, logs / "stack", False)
        size = args.size_kib * 1024

        def upload() -> None:
            bench.one_upload(
                "url", stack.base_url, token, size, roots, database_url, recipient_waits=False
            )

        for _ in range(args.warmup):
            upload()
        spy = None
        if args.py_spy:
            web = [pid for pid in bench.tree_pids(roots[0]) if pid != roots[0]][-1]
            spy = subprocess.Popen(
                [
                    shutil.which("py-spy") or "py-spy",
                    "record",
                    "-p",
                    str(web),
                    "-r",
                    "200",
                    "-o",
                    str(args.py_spy),
                    "-f",
                    "raw",
                    "--nonblocking",
                    "--threads",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.5)
        cpu0 = bench.CpuMark.of(roots)
        started = time.monotonic()
        for _ in range(args.uploads):
            upload()
        cpu = bench.CpuMark.of(roots).since(cpu0)
        wall = time.monotonic() - started
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        print(
            f"{args.uploads} uploads of {args.size_kib} KiB ({args.policy}): "
            f"{cpu / args.uploads * 1000:.1f} ms of server CPU per upload "
            f"({wall / args.uploads:.2f} s each, idle included)"
        )
    finally:
        if stack is not None:  # an upload that failed must not leave gunicorn running
            stack.stop()
        s3.stop()
        drop_database(bench.DB_NAME)
        shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    main()
