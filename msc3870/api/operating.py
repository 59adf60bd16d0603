"""What operators and their tools read: the health check and the Prometheus metrics.

- ``GET /health`` (and ``/healthz``, matrix-media-repo's spelling; ``HEAD`` too): 200 with
  each component's state, 503 naming what is down (``msc3870.health``). Unauthenticated,
  as Synapse's ``/health``; never cached.
- ``GET /metrics``: the Prometheus exposition (``msc3870.metrics``), only on the metrics
  listener (``METRICS_PORT``) and only to ``METRICS_ALLOWED_NETWORKS``; anywhere else it
  is ``M_UNRECOGNIZED``, as a path that does not exist.
"""

from __future__ import annotations

import contextlib
from typing import Any

from django.http import HttpResponse, HttpResponseBase
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response

from .. import health, metrics
from ..conf import app_settings
from ..errors import Unrecognized
from ..waiting import LEGACY, Deadline, RetryWhenDone
from .deferred import RETRIED, can_park, requester_of
from .views import MatrixView


class HealthView(MatrixView):
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    def get(self, request: Request) -> Response:
        monitor = health.monitor()
        pending = monitor.refresh()
        django_request = request._request
        timeout = app_settings.HEALTH_TIMEOUT_SECONDS
        if pending is not None:
            # No result yet for some component (this process's first check): wait for
            # it, parked on the event loop where the server can, never past the timeout.
            if can_park(django_request):
                raise RetryWhenDone(
                    pending,
                    Deadline.after_seconds(timeout),
                    requester=requester_of(django_request),
                    kind=LEGACY,
                )
            if not django_request.META.get(RETRIED):
                with contextlib.suppress(TimeoutError):  # then reported as timed out
                    pending.result(timeout)
        report = monitor.report()
        response = Response(
            report.body(),
            status=200 if report.ok else 503,
            headers={"Cache-Control": "no-store"},
        )
        # Not one "Service Unavailable" error line per check (a load balancer's every
        # second): the monitor logs a component's going down and coming back, once each.
        response._has_been_logged = True  # type: ignore[attr-defined]
        return response


class MetricsView(MatrixView):
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    def get(self, request: Request) -> HttpResponseBase:
        meta = request._request.META
        port = app_settings.METRICS_PORT
        if (
            port is None
            or str(meta.get("SERVER_PORT")) != str(port)
            or not metrics.client_allowed(
                meta.get("REMOTE_ADDR"), app_settings.METRICS_ALLOWED_NETWORKS
            )
        ):
            raise Unrecognized()
        # The health gauges (components up, queue depth, beat's tick) as fresh as a probe
        # every HEALTH_CACHE_SECONDS makes them; a scrape never waits for one.
        monitor = health.monitor()
        monitor.refresh()
        monitor.report()
        body, content_type = metrics.exposition()
        return HttpResponse(body, content_type=content_type)
