"""gunicorn settings for `make run` and the container (override with GUNICORN_CMD_ARGS).

One uvicorn worker process per core (``WEB_CONCURRENCY`` overrides): each serves the
ASGI app (msc3870.asgi), running Django's views on ``WEB_THREADS`` threads and parking
requests that wait for media on its event loop. See mediarepo/server.py.
"""

import os

from mediarepo import balance

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8008')}"
workers = int(os.environ.get("WEB_CONCURRENCY") or os.cpu_count() or 1)
worker_class = "mediarepo.server.MediaUvicornWorker"
timeout = 120
keepalive = 75
# Thousands of parked downloads may connect at once.
backlog = 4096
accesslog = "-"
# gunicorn's control socket defaults to one path per user ($HOME/.gunicorn/gunicorn.ctl):
# a second server of the same user would take it over. One per data directory instead.
control_socket = os.path.abspath(
    os.path.join(
        os.environ.get("MEDIAREPO_DATA_DIR")
        or os.path.join(os.path.dirname(__file__), "..", "var"),
        "gunicorn.ctl",
    )
)
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


def post_fork(server: object, worker: object) -> None:
    balance.worker_started(worker)


def child_exit(server: object, worker: object) -> None:
    balance.worker_exited(worker)


def post_worker_init(worker: object) -> None:
    # Without a broker there is no beat: run the periodic sweeps in-process, in one
    # worker per host (a file lock decides which).
    from mediarepo.embedded import start_periodic_thread

    start_periodic_thread()
