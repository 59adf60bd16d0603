"""Prometheus metrics of the media server (``prometheus-client``).

Every metric is updated where the event happens (the request plane, the lifecycle, the
pipeline, the stores) and costs a few microseconds: a label lookup cached per label set,
and one write to memory (or, in multiprocess mode, to a file mapped in memory).

Multiprocess mode: with ``PROMETHEUS_MULTIPROC_DIR`` set before this module is first
imported (``mediarepo`` sets it for gunicorn's workers and for a celery worker's pool),
each process writes its values to files of its own in that directory and the exposition
adds them up, so that any worker answering a scrape answers for all of them. The
directory is emptied when the server starts (gunicorn's master, the celery worker's main
process), never while processes write to it.

Labels are bounded: a route is its URL name (never the path: media ids must not become
label values), a state, a verdict, an outcome, a store error's class.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Iterator
from functools import lru_cache
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_wsgi_app,
    multiprocess,
)

from .metrics_files import multiprocess_dir

log = logging.getLogger(__name__)


# Requests answered from memory take about a millisecond; parked downloads up to a minute.
REQUEST_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Screening and sweeps: a ranged read (milliseconds) to a full scan of a large file.
WORK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

REQUESTS = Counter(
    "msc3870_http_requests",
    "HTTP requests answered, by route name, method and status (499: the client went away).",
    ["route", "method", "status"],
)
REQUEST_SECONDS = Histogram(
    "msc3870_http_request_duration_seconds",
    "Time from a request's arrival to the end of its answer (parked time included).",
    ["route"],
    buckets=REQUEST_BUCKETS,
)
WAITING = Gauge(
    "msc3870_waiters",
    "Requests parked on the event loop now, waiting for media or for work off the threads.",
    ["kind"],
    multiprocess_mode="livesum",
)
WAITERS_PARKED = Counter(
    "msc3870_waiters_parked",
    "Requests parked to wait (one request may park more than once).",
    ["kind"],
)
WAITERS_WOKEN = Counter(
    "msc3870_waiters_woken", "Parked requests woken (a change, or their deadline).", ["kind"]
)
WAITERS_GONE = Counter(
    "msc3870_waiters_gone", "Parked requests whose client hung up while they waited.", ["kind"]
)
WAITERS_REFUSED = Counter(
    "msc3870_waiters_refused", "Requests refused with 429 past a waiting cap.", ["kind"]
)
TRANSITIONS = Counter(
    "msc3870_media_transitions",
    "Media state changes won, by the state entered (pending: ids created).",
    ["state"],
)
SCREENING_SECONDS = Histogram(
    "msc3870_screening_duration_seconds",
    "Screening of one upload (move, checks, verdict), by outcome.",
    ["verdict"],
    buckets=WORK_BUCKETS,
)
UPLOADED_BYTES = Counter(
    "msc3870_uploaded_bytes",
    "Bytes of uploads that completed, by upload method (url, put, post).",
    ["method"],
)
SERVED_BYTES = Counter(
    "msc3870_served_bytes",
    "Bytes of downloads and thumbnails: streamed from storage (local: this server's media, "
    "remote: other servers'), or handed to storage by a redirect (the size redirected).",
    ["source"],
)
REMOTE_FETCHES = Counter(
    "msc3870_remote_fetches",
    "Fetches of other servers' media, by outcome (complete, rejected, failed, skipped).",
    ["outcome"],
)
REMOTE_FETCHED_BYTES = Counter(
    "msc3870_remote_fetched_bytes", "Bytes read from other servers by media fetches."
)
STORE_ERRORS = Counter(
    "msc3870_store_errors", "Failures of the media storage, by error class.", ["error"]
)
SWEEP_SECONDS = Histogram(
    "msc3870_sweep_duration_seconds",
    "Runs of the periodic sweeps, by sweep.",
    ["sweep"],
    buckets=WORK_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "msc3870_queue_depth",
    "Tasks waiting in the broker's queue, as the health probe last read it.",
    ["queue"],
    multiprocess_mode="livemostrecent",
)
COMPONENT_UP = Gauge(
    "msc3870_component_up",
    "1 if the component answered the last health probe, else 0.",
    ["component"],
    multiprocess_mode="livemostrecent",
)
BEAT_LAST_TICK = Gauge(
    "msc3870_beat_last_tick_timestamp_seconds",
    "When the periodic scheduler (celery beat, or the in-process one) last ticked.",
    multiprocess_mode="livemostrecent",
)


class _Children:
    """A metric's children by label values, kept: ``labels()`` takes a lock and builds a
    key on every call; a dict lookup is all the hot path pays here."""

    __slots__ = ("children", "metric")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child


_requests = _Children(REQUESTS)
_request_seconds = _Children(REQUEST_SECONDS)
_waiting = _Children(WAITING)
_parked = _Children(WAITERS_PARKED)
_woken = _Children(WAITERS_WOKEN)
_gone = _Children(WAITERS_GONE)
_refused = _Children(WAITERS_REFUSED)
_transitions = _Children(TRANSITIONS)
_screening = _Children(SCREENING_SECONDS)
_uploaded = _Children(UPLOADED_BYTES)
_served = _Children(SERVED_BYTES)
_fetches = _Children(REMOTE_FETCHES)
_store_errors = _Children(STORE_ERRORS)
_sweeps = _Children(SWEEP_SECONDS)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


def request_done(route: str, method: str, status: int, seconds: float) -> None:
    _requests(route, method if method in _METHODS else "other", str(status)).inc()
    _request_seconds(route).observe(seconds)


def parked(kind: str) -> None:
    _parked(kind).inc()
    _waiting(kind).inc()


def unparked(kind: str, *, gone: bool) -> None:
    _waiting(kind).dec()
    (_gone if gone else _woken)(kind).inc()


def wait_refused(kind: str) -> None:
    _refused(kind).inc()


def transitioned(state: str, count: int = 1) -> None:
    if count:
        _transitions(state).inc(count)


def screened(verdict: str, seconds: float) -> None:
    _screening(verdict).observe(seconds)


def uploaded(method: str, size: int) -> None:
    if size:
        _uploaded(method).inc(size)


def served(source: str, size: int) -> None:
    if size:
        _served(source).inc(size)


def counting(source: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """``chunks`` as they pass, counted as served (a client that hangs up mid-way is
    counted for what it was sent)."""
    counter = _served(source)
    try:
        for chunk in chunks:
            counter.inc(len(chunk))
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # at once, as Django closes a response's iterator (S3: the body)


def fetched(outcome: str, size: int) -> None:
    _fetches(outcome).inc()
    if size:
        REMOTE_FETCHED_BYTES.inc(size)


def store_error(error: str) -> None:
    _store_errors(error).inc()


def swept(sweep: str, seconds: float) -> None:
    _sweeps(sweep).observe(seconds)


# ----------------------------------------------------------------------- exposition


def _registry() -> CollectorRegistry:
    """What a scrape reads: every process's values where they share a directory (read
    afresh each time), else this process's."""
    directory = multiprocess_dir()
    if directory is None:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return registry


def exposition() -> tuple[bytes, str]:
    """The body and content type of a scrape's answer."""
    return generate_latest(_registry()), CONTENT_TYPE_LATEST


@lru_cache(maxsize=16)
def _networks(ranges: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(r, strict=False) for r in ranges)


def client_allowed(address: str | None, ranges: list[str]) -> bool:
    """Whether a scrape from ``address`` may be answered (an IPv4-mapped IPv6 address is
    judged as IPv4)."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in _networks(tuple(ranges)))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        pass


def listener_app(allowed: Callable[[], list[str]]) -> Callable[..., Any]:
    """The WSGI app of a metrics listener of its own (a celery worker's): ``/metrics`` to
    the allowed networks, 404 to everything else."""
    expose = make_wsgi_app(_ExpositionRegistry())

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") != "/metrics" or not client_allowed(
            environ.get("REMOTE_ADDR"), allowed()
        ):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"Not Found\n"]
        return expose(environ, start_response)

    return app


class _ExpositionRegistry:
    """What ``make_wsgi_app`` collects from: the registry of ``_registry``, made per
    scrape (a collector, as prometheus-client's own are)."""

    def collect(self) -> Iterator[Any]:
        yield from _registry().collect()

    def restricted_registry(self, names: Any) -> Any:  # ?name[]=: the whole answer
        return self


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per scrape: a slow scraper holds up no other."""

    daemon_threads = True


def start_listener(host: str, port: int, allowed: Callable[[], list[str]]) -> WSGIServer:
    """Serve ``/metrics`` on a listener of its own, on a daemon thread (celery workers)."""
    server = make_server(
        host,
        port,
        listener_app(allowed),
        server_class=_ThreadingServer,
        handler_class=_QuietHandler,
    )
    thread = threading.Thread(target=server.serve_forever, name="msc3870-metrics", daemon=True)
    thread.start()
    log.info("Metrics on http://%s:%s/metrics", host, port)
    return server
