"""Expiring pending media in bulk: ``msc3870.maintenance.expire_pending`` on PostgreSQL + S3.

For each N in ``--rows``: insert N pending ``Media`` rows whose ``unused_expires_at`` has
passed (``bulk_create``), put a small incoming object (``incoming/<media_id>``) in the
bench bucket for ``--object-fraction`` of them (a boto3 thread pool), ``ANALYZE`` the
table, then, in a fresh child process (so setup does not count in its memory), time

    expire_pending(batch_size=1000, max_batches=10**9)

counting SQL queries (``connection.execute_wrapper``: a count and a time per query shape,
no query text kept per call), S3 requests (botocore ``before-parameter-build`` hooks), peak Python
memory (``tracemalloc``) and the process's max RSS (``getrusage``). Afterwards it checks
that all N rows are EXPIRED with their objects marked deleted and that nothing is left under
``incoming/``.

    .venv/bin/python bench/expiry_bench.py --rows 10000,50000,100000

starts and stops the bench S3 server (``scripts/s3-server`` on :8433, ``var/s3-bench``,
bucket ``mediarepo-bench``) and creates/drops the database ``mediarepo_bench2``.
``tracemalloc`` slows Python code down; ``--no-tracemalloc`` times without it.
``--py-spy FILE`` samples the sweep's own process (every thread, on CPU only) with
py-spy (``pip install py-spy``) into FILE, collapsed stacks (``N=<rows>`` is added to
the name for each N); the CPU columns count only the sweep itself ("sweep CPU s") and
the whole child process with its set-up ("CPU s (child)").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _shared import (
    PG_URL,
    PYTHON,
    ROOT,
    S3Server,
    bench_database,
    drop_database,
    load_average,
    machine_info,
    markdown_table,
    recreate_database,
    s3_env,
)

DB_NAME = bench_database("mediarepo_bench2")
USER_ID = "@bench:localhost"


def configure_env(data_dir: str) -> None:
    os.environ.update(
        {
            **s3_env(),
            "DJANGO_SETTINGS_MODULE": "mediarepo.settings",
            "DATABASE_URL": f"{PG_URL}/{DB_NAME}",
            "DJANGO_SECRET_KEY": "bench-expiry",
            "MEDIAREPO_DATA_DIR": data_dir,
            "LOG_LEVEL": "WARNING",
        }
    )
    for name in ("CELERY_BROKER_URL", "REDIS_URL"):  # tasks in-process, local cache
        os.environ.pop(name, None)


def vm_hwm_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


# ------------------------------------------------------------------ setup (parent)


def setup_rows(
    rows: int, object_fraction: float, threads: int, extra_rows: int
) -> dict[str, float]:
    """Fresh table with ``rows`` due pending media and their incoming objects, and
    ``extra_rows`` COMPLETE media the sweep must leave alone (rows only, no objects)."""
    import boto3
    from botocore.config import Config
    from django.db import connection
    from django.utils import timezone

    from msc3870.models import Media, MediaState
    from msc3870.validation import new_media_id

    with connection.cursor() as cursor:
        # CASCADE: the tables that reference media rows (moderation records, URL
        # previews) are empty here, and TRUNCATE refuses a referenced table without it.
        cursor.execute("TRUNCATE msc3870_media RESTART IDENTITY CASCADE")
    t0 = time.monotonic()
    now = timezone.now()
    media_ids: list[str] = []
    chunk = 5000
    for start in range(0, rows, chunk):
        batch = [
            Media(
                server_name="localhost",
                media_id=new_media_id(),
                user_id=USER_ID,
                state=MediaState.PENDING,
                # All past due (the last an hour ago), a second apart, in insertion order.
                unused_expires_at=now - timedelta(hours=1, seconds=rows - i),
            )
            for i in range(start, min(start + chunk, rows))
        ]
        Media.objects.bulk_create(batch, batch_size=chunk)
        media_ids += [m.media_id for m in batch]
    for start in range(0, extra_rows, chunk):
        complete = []
        for _ in range(start, min(start + chunk, extra_rows)):
            media_id = new_media_id()
            complete.append(
                Media(
                    server_name="localhost",
                    media_id=media_id,
                    user_id=USER_ID,
                    state=MediaState.COMPLETE,
                    unused_expires_at=now - timedelta(days=2),
                    storage_key=f"media/{media_id[:2]}/{media_id}",
                    size=5,
                    sha256=os.urandom(32).hex(),
                    content_type="application/octet-stream",
                )
            )
        Media.objects.bulk_create(complete, batch_size=chunk)
    insert_s = time.monotonic() - t0

    rng = random.Random(0)
    keys = [f"incoming/{mid}" for mid in media_ids if rng.random() < object_fraction]
    env = s3_env()
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_S3_ENDPOINT_URL"],
        region_name=env["AWS_S3_REGION_NAME"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=Config(
            max_pool_connections=threads,
            s3={"addressing_style": "path"},
            retries={"mode": "standard"},
        ),
    )
    bucket = env["AWS_STORAGE_BUCKET_NAME"]
    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(
            lambda key: client.put_object(Bucket=bucket, Key=key, Body=b"bench"), keys
        ):
            pass
    objects_s = time.monotonic() - t0
    t0 = time.monotonic()
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE msc3870_media")
    return {
        "insert_s": insert_s,
        "objects": len(keys),
        "objects_s": objects_s,
        "analyze_s": time.monotonic() - t0,
    }


def count_incoming() -> int:
    from msc3870.stores import get_store

    return sum(1 for _ in get_store().list_keys("incoming/"))


# ------------------------------------------------------------------ measurement (child)

IN_LIST = re.compile(r"IN \((?:%s, )*%s\)")


def query_label(sql: str) -> str:
    """A short name per query shape of the sweep (else the start of the SQL)."""
    shape = IN_LIST.sub("IN (...)", sql)
    if shape.startswith("WITH picked"):  # lifecycle.expire_due on PostgreSQL
        return "UPDATE SET state FROM (pick ORDER BY .. LIMIT) RETURNING"
    if shape.startswith("UPDATE"):
        column = re.search(r'SET "(\w+)"', shape)
        # The pick and the move in one statement (lifecycle.expire_due).
        pick = " WHERE id IN (.. ORDER BY .. LIMIT) RETURNING" if "LIMIT" in shape else ""
        return f"UPDATE SET {column.group(1) if column else '?'}{pick}"
    if shape.startswith("SELECT"):
        selected = re.findall(r'"msc3870_media"\."(\w+)"', shape.split(" FROM ", 1)[0])
        where = shape.split(" WHERE ", 1)[1] if " WHERE " in shape else ""
        filters = sorted(set(re.findall(r'"msc3870_media"\."(\w+)"', where)))
        suffix = " ORDER BY .. LIMIT" if "LIMIT" in shape else ""
        return f"SELECT {','.join(selected)} WHERE {','.join(filters)}{suffix}"
    return shape[:70]


class QueryCounter:
    """``execute_wrapper`` hook: count and time per query shape."""

    def __init__(self) -> None:
        self.count = 0
        self.by_label: dict[str, list[float]] = {}
        self.batch_starts: list[float] = []

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        label = query_label(sql)
        t0 = time.monotonic()
        try:
            return execute(sql, params, many, context)
        finally:
            elapsed = time.monotonic() - t0
            self.count += 1
            stats = self.by_label.setdefault(label, [0, 0.0])
            stats[0] += 1
            stats[1] += elapsed
            if "ORDER BY .. LIMIT" in label:  # a batch's pick
                self.batch_starts.append(t0)


class S3Counter:
    """botocore hooks: requests per operation, keys sent to DeleteObjects, time in calls
    (summed over threads: requests that overlap each count their own time, so this can
    exceed the wall time)."""

    def __init__(self) -> None:
        self.by_operation: dict[str, int] = {}
        self.keys_deleted = 0
        self.seconds = 0.0
        self._lock = threading.Lock()
        self._started = threading.local()

    def register(self, client: Any) -> None:
        events = client.meta.events
        # Once per API call (not per retry), with the API parameters.
        events.register("before-parameter-build.s3", self.count)
        events.register("before-call.s3", self.begin)
        events.register("after-call.s3", self.end)

    def count(self, model: Any, params: dict[str, Any], **kwargs: Any) -> None:
        with self._lock:
            self.by_operation[model.name] = self.by_operation.get(model.name, 0) + 1
            if model.name == "DeleteObjects":
                self.keys_deleted += len(params["Delete"]["Objects"])

    def begin(self, **kwargs: Any) -> None:
        self._started.at = time.monotonic()

    def end(self, **kwargs: Any) -> None:
        elapsed = time.monotonic() - self._started.at
        with self._lock:
            self.seconds += elapsed

    def reset(self) -> None:
        with self._lock:
            self.by_operation.clear()
            self.keys_deleted = 0
            self.seconds = 0.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start_py_spy(output: str) -> subprocess.Popen[bytes]:
    """py-spy sampling this process (all threads, idle ones left out) until stopped."""
    py_spy = shutil.which("py-spy") or str(PYTHON.parent / "py-spy")
    argv = [py_spy, "record", "--pid", str(os.getpid()), "--rate", "200", "--threads"]
    argv += ["--nonblocking", "--format", "raw", "--output", output]
    sampler = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the sweep starts
    return sampler


def stop_py_spy(sampler: subprocess.Popen[bytes]) -> None:
    sampler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    sampler.wait(timeout=60)


def child(args: argparse.Namespace) -> None:
    import django

    django.setup()
    import tracemalloc

    from django.db import connection
    from django.db.models import Count

    from msc3870.maintenance import expire_pending
    from msc3870.models import Media, MediaState
    from msc3870.stores import get_store

    store = get_store()
    s3 = S3Counter()
    s3.register(store.client)  # type: ignore[attr-defined]
    if getattr(store, "delete_client", None) is not None:  # DeleteObjects' own client
        s3.register(store.delete_client)  # type: ignore[attr-defined]
    # Warm up what the first batch would otherwise pay for: the connection, the client.
    Media.objects.filter(pk=0).exists()
    store.head("incoming/warm-up")
    s3.reset()
    queries = QueryCounter()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_before = vm_hwm_kib()
    sampler = start_py_spy(args.py_spy) if args.py_spy else None
    if args.tracemalloc:
        tracemalloc.start()
    cpu0 = cpu_seconds()
    t0 = time.monotonic()
    with connection.execute_wrapper(queries):
        result = expire_pending(batch_size=args.batch_size, max_batches=10**9)
    elapsed = time.monotonic() - t0
    sweep_cpu = cpu_seconds() - cpu0
    if sampler is not None:
        stop_py_spy(sampler)
    traced_peak = tracemalloc.get_traced_memory()[1] if args.tracemalloc else None
    tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_after = vm_hwm_kib()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    s3_requests, s3_seconds, s3_keys = dict(s3.by_operation), s3.seconds, s3.keys_deleted

    states = dict(Media.objects.values_list("state").annotate(n=Count("pk")).order_by())
    cleaned = Media.objects.filter(
        state=MediaState.EXPIRED, objects_deleted_at__isnull=False
    ).count()
    left = count_incoming()
    batch_s = [b - a for a, b in zip(queries.batch_starts, queries.batch_starts[1:], strict=False)]
    print(
        json.dumps(
            {
                "rows": args.rows,
                "moved": result.moved,
                "objects_deleted_rows": result.objects_deleted,
                "seconds": elapsed,
                "queries": queries.count,
                "queries_by_shape": queries.by_label,
                "batches": len(queries.batch_starts) - 1,  # the last pick finds nothing
                "batch_s_first10": sum(batch_s[:10]) / max(1, len(batch_s[:10])),
                "batch_s_last10": sum(batch_s[-10:]) / max(1, len(batch_s[-10:])),
                "s3_requests": s3_requests,
                "s3_keys_deleted": s3_keys,
                "s3_seconds": s3_seconds,
                "sql_seconds": sum(t for _, t in queries.by_label.values()),
                "tracemalloc_peak": traced_peak,
                "maxrss_kib_before": rss_before,
                "maxrss_kib_after": rss_after,
                "vmhwm_kib_before": hwm_before,
                "vmhwm_kib_after": hwm_after,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "sweep_cpu_s": sweep_cpu,
                "states_after": states,
                "rows_marked_cleaned": cleaned,
                "incoming_left": left,
                "verified": states.get(MediaState.EXPIRED) == args.rows
                and states.get(MediaState.COMPLETE, 0) == args.extra_rows
                and len(states) <= 2
                and cleaned == args.rows
                and left == 0,
            }
        )
    )


# ------------------------------------------------------------------ driver


def report(results: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> str:
    out = [
        f"expire_pending(batch_size={args.batch_size}); table also holds {args.extra_rows:,} "
        f"COMPLETE rows; {info['date']}; {info['nproc']} CPUs, "
        f"{info['mem_total_gib']} GiB; Python {info['python']}; PostgreSQL {info['postgres']}; "
        f"tracemalloc {'on' if args.tracemalloc else 'off'}; git {info['git_head']}"
        + (f" (modified: {info['git_dirty']})" if info["git_dirty"] else ""),
        f"Load average at start {info['loadavg']}, at end {load_average()}.",
        "",
    ]
    rows = []
    for r in results:
        s3_total = sum(r["s3_requests"].values())
        s3_ops = ", ".join(f"{k} {v}" for k, v in sorted(r["s3_requests"].items()))
        rows.append(
            [
                f"{r['rows']:,}",
                f"{r['setup']['objects']:,}",
                f"{r['setup']['insert_s']:.1f} + {r['setup']['objects_s']:.1f}",
                f"{r['seconds']:.1f}",
                f"{r['sql_seconds']:.1f}",
                f"{r['s3_seconds']:.1f}",
                f"{r['seconds'] / r['rows'] * 1e3:.2f}",
                f"{r.get('sweep_cpu_s', 0.0):.2f}",
                f"{r['cpu_s']:.2f}",
                f"{r['queries']:,}",
                f"{r['batches']}",
                f"{s3_total} ({s3_ops})",
                f"{r['s3_keys_deleted']:,}",
                "-"
                if r["tracemalloc_peak"] is None
                else f"{r['tracemalloc_peak'] / 1024 / 1024:.2f}",
                f"{r['maxrss_kib_before'] / 1024:.1f} -> {r['maxrss_kib_after'] / 1024:.1f}",
                f"{r['vmhwm_kib_before'] / 1024:.1f} -> {r['vmhwm_kib_after'] / 1024:.1f}",
                f"{r['batch_s_first10'] * 1000:.0f} / {r['batch_s_last10'] * 1000:.0f}",
                "yes" if r["verified"] else "NO",
            ]
        )
    out.append(
        markdown_table(
            [
                "rows",
                "objects",
                "setup s (insert + objects)",
                "expire s",
                "in SQL s",
                "in S3 s (summed over threads)",
                "ms/row",
                "sweep CPU s",
                "CPU s (child)",
                "SQL queries",
                "batches",
                "S3 requests",
                "keys in DeleteObjects",
                "tracemalloc peak MiB",
                "ru_maxrss MiB (before -> after)",
                "VmHWM MiB (before -> after)",
                "ms/batch first 10 / last 10",
                "all EXPIRED, cleaned, incoming/ empty",
            ],
            rows,
        )
    )
    out += ["", "SQL by query shape (count, total seconds):", ""]
    shapes = sorted({label for r in results for label in r["queries_by_shape"]})
    out.append(
        markdown_table(
            ["query shape", *(f"N={r['rows']:,}" for r in results)],
            [
                [
                    f"`{label}`",
                    *(
                        "{:,} / {:.2f}".format(*r["queries_by_shape"].get(label, [0, 0.0]))
                        for r in results
                    ),
                ]
                for label in shapes
            ],
        )
    )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="10000,50000,100000", help="comma-separated Ns")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--object-fraction", type=float, default=1.0)
    parser.add_argument(
        "--extra-rows",
        type=int,
        default=0,
        help="COMPLETE rows also in the table (untouched by the sweep)",
    )
    parser.add_argument("--threads", type=int, default=32, help="S3 uploads in flight (setup)")
    parser.add_argument("--no-tracemalloc", dest="tracemalloc", action="store_false")
    parser.add_argument("--py-spy", help="collapsed stacks of the sweep's process to this file")
    parser.add_argument("--external-s3", action="store_true", help="S3 already on :8433")
    parser.add_argument("--wait-s3-ports", type=float, default=60)
    parser.add_argument("--keep-db", action="store_true", help=f"do not drop {DB_NAME}")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # the parent's environment, data directory included
        args.rows = int(args.rows)
        child(args)
        return

    data_dir = tempfile.mkdtemp(prefix="expiry-bench-")
    configure_env(data_dir)
    counts = [int(n) for n in args.rows.split(",") if n.strip()]
    info = machine_info()
    s3 = S3Server(manage=not args.external_s3, wait_for_ports=args.wait_s3_ports)
    recreate_database(DB_NAME)
    results: list[dict[str, Any]] = []
    try:
        s3.start()
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)
        if left := count_incoming():
            sys.exit(f"the bench bucket already holds {left} incoming objects")
        for n in counts:
            print(f"N={n:,}: setup ...", file=sys.stderr, flush=True)
            setup = setup_rows(n, args.object_fraction, args.threads, args.extra_rows)
            print(
                f"N={n:,}: {setup['objects']:,} objects in {setup['objects_s']:.1f}s; expiring ...",
                file=sys.stderr,
                flush=True,
            )
            # Through a forking shell: Linux keeps a process's max RSS across exec, and a
            # child forked from this (large) process would report ours as its own.
            argv = ["sh", "-c", '"$@"; exit $?', "sh", str(PYTHON), __file__, "--child"]
            argv += ["--rows", str(n)]
            argv += ["--batch-size", str(args.batch_size), "--extra-rows", str(args.extra_rows)]
            if not args.tracemalloc:
                argv.append("--no-tracemalloc")
            if args.py_spy:
                argv += ["--py-spy", f"{args.py_spy}.N={n}"]
            out = subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["setup"] = setup
            results.append(result)
            print(
                f"N={n:,}: {result['seconds']:.2f}s, {result['queries']} queries",
                file=sys.stderr,
                flush=True,
            )
    finally:
        from django.db import connections

        connections.close_all()
        s3.stop()
        if not args.keep_db:
            drop_database(DB_NAME)
        shutil.rmtree(data_dir, ignore_errors=True)
    print(report(results, info, args))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2))
    if not all(r["verified"] for r in results):
        sys.exit("verification FAILED")


if __name__ == "__main__":
    main()
