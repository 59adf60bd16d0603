"""CPU per create + PUT round trip through the real ASGI handler, in one process, no HTTP
server: a repeatable figure for profiling the hot path (issue 7) before optimising it.

It starts the project's settings on SQLite in a temporary data directory (or on
``--database-url``), migrates, makes an access token, then runs round trips the way the
benchmark's clients do (``POST /create``, then ``PUT`` of 1 KiB of random bytes), one at a
time, and reports process CPU per round trip. ``--profile out.prof`` writes a cProfile of
the measured round trips (``python -m pstats out.prof``); ``--top N`` prints the N costliest
functions by own time. Profiling runs Django's work on the loop's thread (``--inline``), as
cProfile sees one thread.

    .venv/bin/python bench/hot_path_profile.py --round-trips 2000
    .venv/bin/python bench/hot_path_profile.py --round-trips 2000 --profile /tmp/hot.prof --top 40
    valgrind --tool=callgrind --instr-atstart=no \
        .venv/bin/python bench/hot_path_profile.py --round-trips 100 --inline --callgrind

Under callgrind, "Collected" is the instructions of the measured round trips only: divide by
the count. It is the figure to compare two versions by on a shared machine.

The figure of record stays ``bench/request_plane_bench.py`` (beside Synapse, over HTTP);
this one leaves out the HTTP server and the event loop's wake-ups, so its CPU is lower.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import cProfile
import os
import pstats
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def setup(data_dir: Path, database_url: str | None) -> Any:
    os.environ["MEDIAREPO_DATA_DIR"] = str(data_dir)
    os.environ["MSC3870_CREATE_RATE"] = "1000000/min"
    os.environ["DJANGO_SETTINGS_MODULE"] = "mediarepo.settings"
    # --inline runs ORM calls on the loop's thread, which Django refuses by default.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    if database_url:
        os.environ["DATABASE_URL"] = database_url
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from msc3870.asgi import get_asgi_application

    return get_asgi_application()


def make_token(user_id: str) -> str:
    from msc3870.auth import digest_token
    from msc3870.models import AccessToken

    token = "mr_" + secrets.token_urlsafe(16)
    AccessToken.objects.create(user_id=user_id, token_digest=digest_token(token))
    return token


async def round_trips(app: Any, token: str, count: int) -> None:
    from tests.asgi_driver import call

    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(count):
        created = await call(app, "POST", "/_matrix/media/v1/create", headers=headers)
        assert created.status == 200, created.body
        server_name, media_id = created.json()["content_uri"][len("mxc://") :].split("/")
        put = await call(
            app,
            "PUT",
            f"/_matrix/media/v3/upload/{server_name}/{media_id}",
            body=os.urandom(1024),
            headers={**headers, "Content-Type": "application/octet-stream"},
        )
        assert put.status == 200, put.body


_POOL_THREAD_CONTEXT = contextvars.Context()


def run_inline(function: Any, *args: Any, bulk: bool = False) -> asyncio.Future[Any]:
    """The handler's ``_run``, on the calling thread, in one context as on a pool thread
    (Django's connections are context-local: each request task would open its own)."""
    future = asyncio.get_running_loop().create_future()
    try:
        future.set_result(_POOL_THREAD_CONTEXT.run(function, *args))
    except Exception as exc:
        future.set_exception(exc)
    return future


def show_sql(app: Any, token: str) -> None:
    """Every statement of one round trip, in order, with the transaction commands the
    backend sends (BEGIN is implicit on PostgreSQL: a statement outside autocommit)."""
    from django.db.backends.signals import connection_created

    def log(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        print(f"  {' '.join(sql.split())[:160]}")
        return execute(sql, params, many, context)

    # The statements of one thread, in order, on a connection opened for them.
    app._run = run_inline
    connection_created.connect(
        lambda connection, **_: connection.execute_wrappers.append(log), weak=False
    )
    asyncio.run(round_trips(app, token, 1))


def callgrind(enabled: bool, state: str) -> None:
    """Instrumentation on or off, when run under callgrind: instruction counts are
    repeatable where CPU seconds on a shared machine are not."""
    if enabled:
        subprocess.run(["callgrind_control", "-i", state, str(os.getpid())], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-trips", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--database-url", help="default: SQLite in a temporary data dir")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the measured part")
    parser.add_argument("--top", type=int, default=0, help="print the N costliest (own time)")
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="under valgrind --tool=callgrind --instr-atstart=no: count only the measured part",
    )
    parser.add_argument(
        "--inline",
        action="store_true",
        help="run Django's work on the loop's thread (cProfile sees only that thread)",
    )
    parser.add_argument(
        "--show-sql", action="store_true", help="print the statements of one round trip, then stop"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hot-path-") as data_dir:
        app = setup(Path(data_dir), args.database_url)
        from django.db import connections

        token = make_token("@hot:localhost")
        connections.close_all()  # the handler's threads keep their own
        if args.inline or args.profile or args.top:
            app._run = run_inline
        asyncio.run(round_trips(app, token, args.warmup))
        if args.show_sql:
            show_sql(app, token)
            return
        # CPU time, not wall: time spent waiting on a database server is not ours.
        profiler = cProfile.Profile(time.process_time) if args.profile or args.top else None
        callgrind(args.callgrind, "on")
        started, wall = time.process_time(), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        asyncio.run(round_trips(app, token, args.round_trips))
        if profiler is not None:
            profiler.disable()
        callgrind(args.callgrind, "off")
        cpu, wall = time.process_time() - started, time.perf_counter() - wall
        print(
            f"{args.round_trips} round trips: {1000 * cpu / args.round_trips:.3f} ms CPU and "
            f"{1000 * wall / args.round_trips:.3f} ms wall per round trip"
            + (" (under cProfile: inflated)" if profiler is not None else "")
        )
        if profiler is not None:
            if args.profile:
                profiler.dump_stats(args.profile)
            if args.top:
                pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
