"""The moderation console at scale: the admin's own views on PostgreSQL with N media rows.

Creates the database ``mediarepo_bench_console``, migrates it, seeds N media rows in one
``INSERT ... SELECT FROM generate_series`` (30 days of uploads; a few heavy uploaders and
many light ones; mostly complete, some quarantined, rejected, purged, being checked;
a tenth other servers' media; images, video, audio, text and other types; moderation
records for the moderated ones), ``ANALYZE``s it, runs the dashboard's rollup once (timed:
the periodic task's cost), then, as a logged-in moderator (Django's test client on that
database, through the admin's URLs, middleware and templates), times each page:

- the list (newest first), a search by mxc URI, by uploader (search and filter), by
  SHA-256, by part of a filename, the quarantined media, page 20 of the list;
- the dashboard (reads the rollup; the live parts are bounded queries);
- a media's page.

Each page is fetched ``--warmup`` times, then ``--repeat`` times: the median, p95 and
maximum wall time, the median CPU time of this process (Django's share, which a busy
machine does not inflate), and the SQL queries of one fetch, are reported. Previews are
separate requests (thumbnails stored once) and are not part of a page's time.

    .venv/bin/python bench/console_bench.py --rows 1000000 --json bench/results/console-1m.json
    .venv/bin/python bench/console_bench.py --rows 20000          # a smoke run
    .venv/bin/python bench/console_bench.py --reuse-db            # again, on a kept database

Needs PostgreSQL on 127.0.0.1:5432 (user ``postgres``, trust auth). The database is
dropped at the end unless ``--keep-db``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _shared import (
    PYTHON,
    ROOT,
    bench_database,
    database_url,
    drop_database,
    machine_info,
    markdown_table,
    recreate_database,
)

DATABASE = bench_database("mediarepo_bench_console")

# One row per n: created n * (30 days / N) ago; uploader: a few heavy users (the cube of
# a uniform draw concentrates on small numbers), the rest spread.
SEED_MEDIA = """
INSERT INTO msc3870_media (
    server_name, media_id, user_id, state, created_at, state_changed_at, unused_expires_at,
    upload_method, declared_content_type, sniffed_content_type, content_type, filename,
    size, sha256, prefix_sha256, storage_key, attempts, rejection_errcode, rejection_reason,
    last_error, moderated_by, protected, completed_at, processing_started_at,
    objects_deleted_at
)
SELECT
    CASE WHEN n % 10 = 3 THEN 'remote' || (n % 50) || '.example' ELSE 'localhost' END,
    'm' || lpad(n::text, 10, '0'),
    CASE WHEN n % 10 = 3 THEN ''
         ELSE '@user' || floor({users} * power(random(), 3))::int || ':localhost' END,
    CASE WHEN n % 1000 = 0 THEN 'processing'
         WHEN n % 100 = 1 THEN 'quarantined'
         WHEN n % 50 = 2 THEN 'rejected'
         WHEN n % 100 = 5 THEN 'deleted'
         WHEN n % 500 = 7 THEN 'pending'
         ELSE 'complete' END,
    now() - (n * {spacing}) * interval '1 second',
    now() - (n * {spacing}) * interval '1 second',
    now() - (n * {spacing}) * interval '1 second' + interval '1 day',
    CASE WHEN n % 10 = 3 THEN 'remote' WHEN n % 3 = 0 THEN 'url' ELSE 'post' END,
    t.type, t.type, t.type,
    CASE WHEN n % 7 = 0 THEN '' ELSE 'upload-' || n || t.extension END,
    1000 + (n::bigint * 7919) % 5000000,
    CASE WHEN n % 4 = 0 THEN '' ELSE md5(n::text) || md5((n + 1)::text) END,
    md5((n + 2)::text) || md5((n + 3)::text),
    'local/m' || n,
    CASE WHEN n % 1000 = 0 THEN 2 ELSE 0 END,
    CASE WHEN n % 50 = 2 THEN 'M_FORBIDDEN' ELSE '' END,
    CASE WHEN n % 50 = 2 THEN 'Content type not allowed' ELSE '' END,
    CASE WHEN n % 2000 = 0 THEN 'clamd: connection refused' ELSE '' END,
    CASE WHEN n % 100 = 1 THEN 'mod' ELSE '' END,
    n % 997 = 0,
    now() - (n * {spacing}) * interval '1 second',
    CASE WHEN n % 1000 = 0 THEN now() ELSE NULL END,
    CASE WHEN n % 100 = 5 THEN now() ELSE NULL END
FROM generate_series(1, {rows}) AS n
CROSS JOIN LATERAL (
    SELECT (ARRAY['image/jpeg', 'image/png', 'video/mp4', 'audio/ogg', 'text/plain',
                  'application/pdf', 'image/webp', 'image/gif'])[1 + n % 8] AS type,
           (ARRAY['.jpg', '.png', '.mp4', '.ogg', '.txt', '.pdf', '.webp', '.gif'])[1 + n % 8]
           AS extension
) AS t
"""
SEED_RECORDS = """
INSERT INTO msc3870_moderationrecord (
    media_id, mxc_uri, actor, action, reason, state_before, state_after, at
)
SELECT id, 'mxc://' || server_name || '/' || media_id, 'mod', 'quarantine', 'seeded',
       'complete', 'quarantined', created_at
FROM msc3870_media WHERE state = 'quarantined'
"""


def run_migrations(url: str, data_dir: str) -> None:
    import subprocess

    env = {**os.environ, "DATABASE_URL": url, "MEDIAREPO_DATA_DIR": data_dir}
    subprocess.run(
        [str(PYTHON), "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True
    )


def seed(url: str, rows: int, users: int) -> dict[str, float]:
    import psycopg

    timings = {}
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.monotonic()
        # Numbers only, formatted in: no parameters, so "%" stays SQL's modulo.
        sql = SEED_MEDIA.format(rows=int(rows), users=int(users), spacing=30 * 86400 / rows)
        conn.execute(sql)  # type: ignore[arg-type]
        timings["insert_media_s"] = time.monotonic() - started
        started = time.monotonic()
        conn.execute(SEED_RECORDS)  # type: ignore[arg-type]
        timings["insert_records_s"] = time.monotonic() - started
        started = time.monotonic()
        conn.execute("ANALYZE msc3870_media")
        conn.execute("ANALYZE msc3870_moderationrecord")
        timings["analyze_s"] = time.monotonic() - started
    return timings


def measure(client: Any, path: str, warmup: int, repeat: int) -> dict[str, Any]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for _ in range(warmup):
        response = client.get(path)
        assert response.status_code == 200, (path, response.status_code)
    times, cpu = [], []
    for _ in range(repeat):
        started, started_cpu = time.perf_counter(), time.process_time()
        response = client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - started_cpu) * 1000)
        assert response.status_code == 200, (path, response.status_code)
    with CaptureQueriesContext(connection) as queries:
        client.get(path)
    times.sort()
    return {
        "path": path,
        "p50_ms": round(statistics.median(times), 1),
        "p95_ms": round(times[min(len(times) - 1, int(len(times) * 0.95))], 1),
        "max_ms": round(times[-1], 1),
        # Django's own CPU (this process): what a busy machine does not inflate.
        "cpu_p50_ms": round(statistics.median(cpu), 1),
        "queries": len(queries.captured_queries),
        "slowest_query_ms": round(
            max((float(q["time"]) * 1000 for q in queries.captured_queries), default=0.0), 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument(
        "--reuse-db", action="store_true", help="measure a database kept by --keep-db (no seed)"
    )
    args = parser.parse_args()

    url = database_url(DATABASE) if args.reuse_db else recreate_database(DATABASE)
    data_dir = tempfile.mkdtemp(prefix="console-bench-")
    Path(data_dir, "static").mkdir()  # whitenoise's root: the pages measured need none
    try:
        run_migrations(url, data_dir)
        seeded = {} if args.reuse_db else seed(url, args.rows, args.users)
        result = bench(url, data_dir, args)
        result["seed"] = seeded
        result["machine"] = machine_info()
        report(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        if not args.keep_db:
            drop_database(DATABASE)


def bench(url: str, data_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    os.environ.update(
        DATABASE_URL=url,
        MEDIAREPO_DATA_DIR=data_dir,
        DJANGO_SETTINGS_MODULE="mediarepo.settings",
        DJANGO_ALLOWED_HOSTS="testserver",
    )
    for name in ("CELERY_BROKER_URL", "REDIS_URL", "AWS_STORAGE_BUCKET_NAME"):
        os.environ.pop(name, None)
    import django

    django.setup()
    from django.contrib.auth.models import Group, User
    from django.test import Client

    from msc3870 import dashboard
    from msc3870.models import Media

    started = time.monotonic()
    dashboard.rollup()
    rollup_s = time.monotonic() - started

    moderator, _ = User.objects.get_or_create(username="bench-mod", defaults={"is_staff": True})
    moderator.groups.add(Group.objects.get(name="Moderators"))
    client = Client()
    client.force_login(moderator)

    heavy = dashboard.snapshot().figures["top_uploaders_week"][0]["user_id"]
    light = Media.objects.filter(user_id__startswith="@user19").values_list("user_id", flat=True)
    light_user = light.first() or heavy
    sample = Media.objects.filter(media_id=f"m{args.rows // 2:010d}").get()
    hashed = Media.objects.exclude(sha256="").filter(pk__gte=sample.pk).order_by("pk").first()
    pages = {
        "list": "/admin/msc3870/media/",
        "list, page 20": "/admin/msc3870/media/?p=20",
        "search: mxc URI": f"/admin/msc3870/media/?q={sample.mxc_uri}",
        "search: uploader (heaviest)": f"/admin/msc3870/media/?q={heavy}",
        "search: uploader (light)": f"/admin/msc3870/media/?q={light_user}",
        "filter: uploader (heaviest)": f"/admin/msc3870/media/?uploader={heavy}",
        "search: SHA-256": f"/admin/msc3870/media/?q={hashed.sha256 if hashed else '0' * 64}",
        "search: filename part": f"/admin/msc3870/media/?q=upload-{args.rows // 3}",
        "filter: quarantined": "/admin/msc3870/media/?state__exact=quarantined",
        "filter: images": "/admin/msc3870/media/?type=image",
        "dashboard": "/admin/msc3870/media/dashboard/",
        "a media's page": f"/admin/msc3870/media/{sample.pk}/change/",
    }
    measured = {
        name: measure(client, path, args.warmup, args.repeat) for name, path in pages.items()
    }
    return {
        "rows": args.rows,
        "users": args.users,
        "media_rows": Media.objects.count(),
        "rollup_s": round(rollup_s, 2),
        "pages": measured,
    }


def report(result: dict[str, Any]) -> None:
    print(
        f"{result['media_rows']:,} media rows; seed {result['seed']}; "
        f"rollup {result['rollup_s']} s; machine {result['machine']['cpu']}, "
        f"{result['machine']['nproc']} cores, load {result['machine']['loadavg']}"
    )
    rows = [
        (
            name,
            m["p50_ms"],
            m["p95_ms"],
            m["max_ms"],
            m["cpu_p50_ms"],
            m["queries"],
            m["slowest_query_ms"],
        )
        for name, m in result["pages"].items()
    ]
    headers = ["page", "p50 ms", "p95 ms", "max ms", "CPU p50 ms", "queries", "slowest query ms"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
