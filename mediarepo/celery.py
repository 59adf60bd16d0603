"""The Celery app: ``celery -A mediarepo worker`` and ``celery -A mediarepo beat``.

With ``METRICS_PORT`` set, a worker serves the metrics of its pool's processes on a
listener of its own (``METRICS_HOST``, loopback by default, ``METRICS_PORT``; allowed
networks as the web's, ``MSC3870_METRICS_ALLOWED_NETWORKS``): each process writes its
values to one directory (``PROMETHEUS_MULTIPROC_DIR``, by default
``<data dir>/metrics/celery-<port>``), emptied when the worker starts.
"""

import os
import sys
from typing import Any

from celery import Celery
from celery.signals import celeryd_init, worker_process_shutdown

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mediarepo.settings")

METRICS_PORT = os.environ.get("METRICS_PORT")
# A worker (not beat, not another celery command): it serves metrics. The directory must
# be known, and emptied, before any metric is made (they are made when the app's modules
# are imported, before celery's first signal).
SERVES_METRICS = bool(METRICS_PORT) and "worker" in sys.argv[1:]
if SERVES_METRICS:
    _data_dir = os.environ.get("MEDIAREPO_DATA_DIR") or os.path.join(
        os.path.dirname(__file__), "..", "var"
    )
    os.environ.setdefault(
        "PROMETHEUS_MULTIPROC_DIR",
        os.path.abspath(os.path.join(_data_dir, "metrics", f"celery-{METRICS_PORT}")),
    )
    from msc3870.metrics_files import clean_multiprocess_dir

    clean_multiprocess_dir(os.environ["PROMETHEUS_MULTIPROC_DIR"])

app = Celery("mediarepo")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@celeryd_init.connect
def serve_worker_metrics(**kwargs: Any) -> None:
    """In the worker's main process, before its pool starts."""
    if not SERVES_METRICS:
        return
    from msc3870.conf import app_settings
    from msc3870.metrics import start_listener

    start_listener(
        os.environ.get("METRICS_HOST", "127.0.0.1"),
        int(METRICS_PORT or 0),
        lambda: app_settings.METRICS_ALLOWED_NETWORKS,
    )


@worker_process_shutdown.connect
def forget_pool_process(pid: int | None = None, **kwargs: Any) -> None:
    if SERVES_METRICS:
        from msc3870.metrics_files import process_exited

        process_exited(pid or os.getpid())
