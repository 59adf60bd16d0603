"""The Celery app: ``celery -A mediarepo worker`` and ``celery -A mediarepo beat``.

With ``METRICS_PORT`` set, a worker serves the metrics of its pool's processes on a
listener of its own (``METRICS_HOST``, loopback by default, ``METRICS_PORT``; allowed
networks as the web's, ``MSC3870_METRICS_ALLOWED_NETWORKS``): each process writes its
values to one directory (``PROMETHEUS_MULTIPROC_DIR``, by default
``<data dir>/metrics/celery-<port>``), emptied when the worker starts.
"""

import logging
import os
import sys
from typing import Any

from celery import Celery
from celery.signals import celeryd_init, worker_process_shutdown

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mediarepo.settings")

log = logging.getLogger(__name__)

app = Celery("mediarepo")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@celeryd_init.connect
def serve_worker_metrics(**kwargs: Any) -> None:
    """In the worker's main process, before its pool starts (and before anything has
    made a metric, which must know the directory first)."""
    port = os.environ.get("METRICS_PORT")
    if not port:
        return
    if "prometheus_client" in sys.modules and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        log.warning("Metrics were made before their directory was set: not served")
        return
    data_dir = os.environ.get("MEDIAREPO_DATA_DIR") or os.path.join(
        os.path.dirname(__file__), "..", "var"
    )
    directory = os.environ.setdefault(
        "PROMETHEUS_MULTIPROC_DIR",
        os.path.abspath(os.path.join(data_dir, "metrics", f"celery-{port}")),
    )
    from msc3870.conf import app_settings
    from msc3870.metrics import clean_multiprocess_dir, start_listener

    clean_multiprocess_dir(directory)
    start_listener(
        os.environ.get("METRICS_HOST", "127.0.0.1"),
        int(port),
        lambda: app_settings.METRICS_ALLOWED_NETWORKS,
    )


@worker_process_shutdown.connect
def forget_pool_process(pid: int | None = None, **kwargs: Any) -> None:
    if os.environ.get("METRICS_PORT"):
        from msc3870.metrics import process_exited

        process_exited(pid or os.getpid())
