"""gunicorn settings for `make run` and the container (override with GUNICORN_CMD_ARGS).

One uvicorn worker process per core (``WEB_CONCURRENCY`` overrides): each serves the
ASGI app (msc3870.asgi), running Django's views on ``WEB_THREADS`` threads and parking
requests that wait for media on its event loop. See mediarepo/server.py.
"""

import os
from typing import Any

from mediarepo import balance
from msc3870.logs import FORMATTERS, formatter_name

DATA_DIR = os.environ.get("MEDIAREPO_DATA_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "var"
)

bind = [f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8008')}"]
# Prometheus metrics on a listener of their own (METRICS_PORT; METRICS_HOST, loopback by
# default): the workers serve /metrics there only, never on the public port. Each worker
# writes its values to files in one directory, which any of them adds up for a scrape;
# the master empties it at start (on_starting).
METRICS_PORT = os.environ.get("METRICS_PORT")
if METRICS_PORT:
    bind.append(f"{os.environ.get('METRICS_HOST', '127.0.0.1')}:{METRICS_PORT}")
    os.environ.setdefault(
        "PROMETHEUS_MULTIPROC_DIR",
        os.path.abspath(os.path.join(DATA_DIR, "metrics", f"web-{METRICS_PORT}")),
    )
workers = int(os.environ.get("WEB_CONCURRENCY") or os.cpu_count() or 1)
worker_class = "mediarepo.server.MediaUvicornWorker"
timeout = 120
keepalive = 75
# Thousands of parked downloads may connect at once.
backlog = 4096
# No access log of gunicorn's or uvicorn's: the application writes one line per request
# (msc3870.logs), with what an access log says and more.
accesslog = None
# gunicorn's and uvicorn's own lines in the application's format (LOG_FORMAT=json: JSON).
logconfig_dict = {
    "root": {"level": "INFO", "handlers": []},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": False},
    },
    "handlers": {
        "error_console": {
            "class": "logging.StreamHandler",
            "formatter": "generic",
            "stream": "ext://sys.stderr",
        }
    },
    "formatters": {"generic": FORMATTERS[formatter_name(os.environ.get("LOG_FORMAT"))]},
}
# gunicorn's control socket defaults to one path per user ($HOME/.gunicorn/gunicorn.ctl):
# a second server of the same user would take it over. One per data directory instead.
control_socket = os.path.abspath(os.path.join(DATA_DIR, "gunicorn.ctl"))
# A Unix socket path has at most 107 bytes: past that, no control socket rather than none
# of the server.
control_socket_disable = len(control_socket.encode()) > 100
# What the server makes (the SQLite database, the sweeps' lock, media files) is for this
# user only; mediarepo.settings sets the same umask in each worker.
umask = 0o077
os.umask(umask)

# The workers' open connections, counted in memory they share, so that keep-alive
# connections spread evenly over them (mediarepo/balance.py).
balance.install()


def on_starting(server: object) -> None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if METRICS_PORT and directory:
        from msc3870.metrics_files import clean_multiprocess_dir

        clean_multiprocess_dir(directory)


def post_fork(server: object, worker: object) -> None:
    balance.worker_started(worker)


def child_exit(server: object, worker: Any) -> None:
    balance.worker_exited(worker)
    if METRICS_PORT:
        from msc3870.metrics_files import process_exited

        process_exited(worker.pid)


def post_worker_init(worker: object) -> None:
    # Without a broker there is no beat: run the periodic sweeps in-process, in one
    # worker (a PostgreSQL advisory lock decides which across every node; on SQLite, a
    # file lock in the data directory).
    from mediarepo.embedded import start_periodic_thread

    start_periodic_thread()
