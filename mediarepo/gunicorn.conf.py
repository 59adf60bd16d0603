"""gunicorn settings for `make run` and the container (override with GUNICORN_CMD_ARGS).

Threads, not processes: downloads of media still uploading wait (up to 60 s) and a
thread is cheap to park. Bodies are streamed, so a thread's memory stays flat.
"""

import os

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8008')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "32"))
timeout = 120
accesslog = "-"


def post_worker_init(worker: object) -> None:
    # Without a broker there is no beat: run the periodic sweeps in-process.
    from mediarepo.embedded import start_periodic_thread

    start_periodic_thread()
