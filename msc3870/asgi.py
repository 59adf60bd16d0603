"""The ASGI entry point of the media server: Django's sync views on a fixed set of threads,
waiting on the event loop.

Why not Django's own ``ASGIHandler``: it gives every request a new thread (and so a new
database connection), and its sync ``request_started`` receivers hold a thread even in
async views: about twice the CPU of WSGI per request. Here:

- sync work (middleware, views, signals) runs on ``threads`` long-lived threads, each
  keeping its database connection (``CONN_MAX_AGE``), so a request costs what it costs
  under WSGI;
- a request whose answer depends on media still uploading or being checked (a view
  returned ``DeferredResponse``) is parked on the event loop's wake-up hub
  (``msc3870.wakeup``): it holds no thread and no connection, however long it waits, and
  is answered from one fetch of the row shared with every other waiter on it. Waiting is
  capped per process, per media and for unauthenticated requests: past a cap, an
  immediate 429, never a queue;
- request bodies are read on the loop into a spooled file (memory up to
  ``SPOOL_MEMORY_BYTES``, disk beyond) and refused with 413 from ``Content-Length`` before
  a byte is read, or as soon as they pass the limit; an upload's credential is checked
  and its place among the bodies being read taken before a byte is read, and a body that
  stops arriving or arrives too slowly is dropped (``msc3870.admission``). An upload's
  body past ``SPOOL_MEMORY_BYTES`` is not spooled: its view starts then, on a thread of
  its own, and reads the rest as it arrives (``msc3870.streamed_body``), so that it is
  stored while it is received, in one pass;
- requests under ``/_matrix/`` and ``/_synapse/admin/`` (and the health check and
  metrics) skip the middleware only the admin site needs (sessions, authentication,
  messages, CSRF, clickjacking, static files);
- every request is counted and timed by route name (``msc3870.metrics``), and written as
  one line once answered (``msc3870.logs``: the access log's line, then the route, user,
  media id, the state the request moved the media to, and the duration);
- an overlong URI or header block, which a server would refuse in its own words, gets a
  Matrix error (``mediarepo.server`` does the same at the protocol level).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

from django.conf import settings
from django.core import signals
from django.core.exceptions import RequestDataTooBig
from django.core.handlers import base
from django.core.handlers.asgi import ASGIRequest, get_script_prefix
from django.db import connections
from django.http import HttpResponseBase, UnreadablePostError
from django.urls import Resolver404, ResolverMatch, resolve, set_script_prefix

from . import admission, logs, metrics, wakeup
from .api.deferred import CAN_DEFER, RETRIED, DeferredResponse
from .api.errors import API_PREFIXES, json_error, to_matrix_error
from .conf import app_settings
from .errors import (
    BodyTooSlow,
    HeadersTooLarge,
    InvalidParam,
    LimitExceeded,
    MatrixError,
    ServiceUnavailable,
    TooLarge,
    Unrecognized,
    URITooLong,
)
from .pace_watch import PaceWatch
from .streamed_body import RECEIVE_INTO, BodyEnded, ConnectionKeepers, DirectBody, StreamedBody
from .waiting import LEGACY, MediaWait, RetryWhenDone

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

FEDERATION_PREFIX = "/_matrix/federation/"
# Served like /_matrix requests (no admin middleware): the operators' endpoints.
OPERATING_PATHS = frozenset({"/health", "/healthz", "/metrics"})
# Where a request's log fields are gathered (route, user, media id, state).
NOTE = "msc3870.note"
UNMATCHED = "unmatched"
# 499: the client went away before an answer (nginx's word for it).
CLIENT_GONE = 499
LINE_ORDER = ("user", "media_id", "state")
# Middleware only the admin needs: not run for /_matrix requests.
ADMIN_ONLY_MIDDLEWARE = frozenset(
    {
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.middleware.clickjacking.XFrameOptionsMiddleware",
        "whitenoise.middleware.WhiteNoiseMiddleware",
    }
)
# The request targets whose bodies are media (PUT/POST): everything else under /_matrix
# is a small JSON body.
MEDIA_BODY_PATH = re.compile(
    r"^/_matrix/media/[^/]+(?:/[^/]+)?/(?:upload|upload_url/[^/]+|upload/[^/]+/[^/]+)$"
)
JSON_BODY_LIMIT = 64 * 1024
OTHER_BODY_LIMIT = 10 * 1024 * 1024  # the admin's forms
SPOOL_MEMORY_BYTES = 1024 * 1024
MAX_URI_BYTES = 8 * 1024
MAX_HEADER_BYTES = 32 * 1024
RESPONSE_CHUNK = 64 * 1024
# Streamed responses up to this size are read whole on the pool thread that made them.
SMALL_STREAM_BYTES = 64 * 1024
# A body declared this many times over the limit is not drained after the 413: the
# connection is closed instead.
DRAIN_FACTOR = 4
# An upload refused before its body is read (credential, caps) is drained after the answer
# up to this size, so that the client reads the answer on a connection it keeps; a larger
# one, or one of unknown length, closes the connection instead.
REFUSED_BODY_DRAIN_BYTES = 1024 * 1024
# Where the handler's own refusals put the response for the middleware to wrap.
REFUSAL = "msc3870.refusal"


class _ClientGone(Exception):
    pass


def _receive_into(scope: Scope) -> dict[str, Any] | None:
    """The server's ``RECEIVE_INTO`` extension, if it offers it for this request."""
    extensions = scope.get("extensions") or {}
    into = extensions.get(RECEIVE_INTO)
    return into if isinstance(into, dict) else None


@dataclass
class _Streaming:
    """An upload whose body its view reads as it arrives: what the loop needs to go on
    receiving it (``_pump``)."""

    body: StreamedBody | DirectBody
    received: int
    limit: int
    declared: int | None
    pace: admission.BodyPace
    #: Whose place among the bodies being read this body holds (released by the pump).
    address: str | None
    #: Why the loop stopped receiving before the end: a refusal it made (408, 413), or
    #: the client left (``gone``).
    refusal: MatrixError | None = None
    gone: bool = False
    #: The server's ``RECEIVE_INTO``, which fills a ``DirectBody``.
    into: dict[str, Any] | None = None


class WaitCaps:
    """How many requests wait: in total, unauthenticated, per media and per requester."""

    def __init__(self) -> None:
        self.total = 0
        self.legacy = 0
        self.per_media: Counter[int] = Counter()
        self.per_requester: Counter[str] = Counter()

    def admit(self, wait: MediaWait[Any] | RetryWhenDone) -> MatrixError | None:
        pk = wait.pk if isinstance(wait, MediaWait) else None
        if self.total >= app_settings.WAIT_MAX_WAITERS:
            return LimitExceeded("Too many requests are waiting", retry_after_ms=1000)
        if wait.kind == LEGACY and self.legacy >= app_settings.LEGACY_WAIT_MAX_WAITERS:
            return LimitExceeded(
                "Too many unauthenticated requests are waiting", retry_after_ms=1000
            )
        if pk is not None and self.per_media[pk] >= app_settings.WAIT_MAX_WAITERS_PER_MEDIA:
            return LimitExceeded("Too many requests wait for this media", retry_after_ms=1000)
        if self.per_requester[wait.requester] >= app_settings.WAIT_MAX_WAITERS_PER_REQUESTER:
            return LimitExceeded("You have too many requests waiting", retry_after_ms=1000)
        self.total += 1
        self.legacy += wait.kind == LEGACY
        if pk is not None:
            self.per_media[pk] += 1
        self.per_requester[wait.requester] += 1
        return None

    def release(self, wait: MediaWait[Any] | RetryWhenDone) -> None:
        self.total -= 1
        self.legacy -= wait.kind == LEGACY
        if isinstance(wait, MediaWait):
            _decrement(self.per_media, wait.pk)
        _decrement(self.per_requester, wait.requester)


def _decrement(counter: Counter[Any], key: Any) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


class InFlight:
    """Requests in flight per key (a client address), at most ``cap()`` each."""

    def __init__(self, cap: Callable[[], int]) -> None:
        self.cap = cap
        self.counts: Counter[str] = Counter()

    def admit(self, key: str) -> bool:
        if self.counts[key] >= self.cap():
            return False
        self.counts[key] += 1
        return True

    def release(self, key: str) -> None:
        _decrement(self.counts, key)


_BUSY_ADDRESS = LimitExceeded(
    "Too many federation requests in flight from this address", retry_after_ms=1000
)


class _Chain(base.BaseHandler):
    """One middleware chain, run synchronously."""

    def __init__(self, middleware: list[str]) -> None:
        super().__init__()
        # load_middleware reads settings.MIDDLEWARE; swap the list in for the call only
        # (at start-up, before any request).
        configured = settings.MIDDLEWARE
        settings.MIDDLEWARE = middleware
        try:
            self.load_middleware(is_async=False)
        finally:
            settings.MIDDLEWARE = configured

    def resolve_request(self, request: Any) -> Any:
        """The URL resolved once per request: an upload's route was already resolved to
        check its credential before its body (``admission.upload_request``)."""
        match = request.scope.get(admission.RESOLVER_MATCH) if hasattr(request, "scope") else None
        if match is None or hasattr(request, "urlconf"):  # a middleware chose another URLconf
            return super().resolve_request(request)
        request.resolver_match = match
        return match


class _RefusalChain(_Chain):
    """The middleware around a refusal the handler made before any view ran (no URL is
    resolved, no view runs): the answer carries the headers a view's would (CORS, so that
    a browser client can read a 401 and refresh its token)."""

    def _get_response(self, request: Any) -> HttpResponseBase:
        response: HttpResponseBase = request.META[REFUSAL]
        return response


#: Threads per process for sync work. Enough for the few calls that block on the network
#: (S3, a homeserver's whoami), few enough not to queue for the GIL (more threads gave
#: fewer round trips and a longer tail).
DEFAULT_THREADS = 4


def default_threads() -> int:
    return int(os.environ.get("WEB_THREADS") or DEFAULT_THREADS)


class MediaASGIHandler:
    def __init__(self, threads: int | None = None) -> None:
        self.full_chain = _Chain(list(settings.MIDDLEWARE))
        matrix_middleware = [m for m in settings.MIDDLEWARE if m not in ADMIN_ONLY_MIDDLEWARE]
        self.matrix_chain = _Chain(matrix_middleware)
        self.refusal_chain = _RefusalChain(matrix_middleware)
        self.threads = threads or default_threads()
        self.executor = ThreadPoolExecutor(self.threads, thread_name_prefix="msc3870-web")
        # Requests with large bodies (uploads spooled to disk) take seconds, not
        # milliseconds: their own threads, so that they never hold up the small ones.
        self.bulk_executor = ThreadPoolExecutor(self.threads, thread_name_prefix="msc3870-bulk")
        # A streamed upload holds its thread while its body arrives, however slowly the
        # client sends it: one thread for each body admitted (``UPLOAD_BODIES_MAX``), so
        # that no body waits for another's.
        self.upload_executor = ThreadPoolExecutor(
            app_settings.UPLOAD_BODIES_MAX, thread_name_prefix="msc3870-upload"
        )
        self.upload_connection_keepers = ConnectionKeepers(self.threads)
        self.caps = WaitCaps()
        self.federation_in_flight = InFlight(lambda: app_settings.FEDERATION_REQUESTS_PER_ADDRESS)
        self.bodies = admission.BodyCaps()
        self._resumes = _Batches(self)

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise ValueError(f"Only HTTP is served, not {scope['type']}")
        arrived = time.perf_counter()
        started = False
        status = CLIENT_GONE
        note: dict[str, Any] = {}
        scope[NOTE] = note

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                status = message["status"]
            started = True
            await send(message)

        address = scope["client"][0] if scope.get("client") else ""
        federation = scope["path"].startswith(FEDERATION_PREFIX)
        if federation and not self.federation_in_flight.admit(address):
            # Refused on the loop, before any thread: anyone can send these, and a burst
            # of them must not queue ahead of other requests for the request threads.
            await self._send(Outgoing.error(_BUSY_ADDRESS), tracking_send)
            _observe(scope, note, status, arrived)
            return
        try:
            await self._handle(scope, receive, tracking_send)
        except _ClientGone:
            pass  # nobody to answer
        except Exception as exc:
            # A failure outside Django's own handling (reading a body to send, the
            # hub): still a Matrix error, unless the answer had begun (then the server
            # can only drop the connection).
            log.exception("Unhandled error on %s %s", scope["method"], scope["path"])
            if started:
                raise
            await self._send(Outgoing.error(_error_of(exc)), send)
        finally:
            if federation:
                self.federation_in_flight.release(address)
            _observe(scope, note, status, arrived)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                hub = wakeup.current_hub()
                if hub is not None and hub.loop is asyncio.get_running_loop():
                    await hub.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _run(
        self,
        function: Callable[..., Any],
        *args: Any,
        bulk: bool = False,
        executor: ThreadPoolExecutor | None = None,
    ) -> asyncio.Future[Any]:
        executor = executor or (self.bulk_executor if bulk else self.executor)
        return asyncio.get_running_loop().run_in_executor(executor, function, *args)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        is_matrix = scope["path"].startswith(API_PREFIXES) or scope["path"] in OPERATING_PATHS
        refusal = _request_head_error(scope) or _off_the_metrics_listener(scope)
        if refusal is not None:
            await self._send(Outgoing.error(refusal), send)
            return
        body = await self._read_body(scope, receive, is_matrix)
        if isinstance(body, Outgoing):  # refused
            await self._send(body, send)
            return
        chain = self.matrix_chain if is_matrix else self.full_chain
        if isinstance(body, _Streaming):
            outgoing = await self._respond_streaming(chain, scope, receive, body)
        else:
            outgoing = await self._run(self._respond, chain, scope, body, bulk=_is_large(body))
        del body  # closed by _respond or with the response; not held while parked
        if isinstance(outgoing, Parking) and isinstance(outgoing.wait, RetryWhenDone):
            again = await self._retry_when_done(outgoing, chain, scope, receive)
            if again is None:
                return  # the client went away while it waited
            outgoing = again
        if isinstance(outgoing, Parking):
            answer = await self._after_wait(outgoing, receive)
            if answer is None:
                return  # the client went away while it waited
            outgoing = answer
        await self._send(outgoing, send)

    # ------------------------------------------------------------------ body

    async def _read_body(
        self, scope: Scope, receive: Receive, is_matrix: bool
    ) -> IO[bytes] | _Streaming | Outgoing:
        """The body (closed with the request by ``_respond``), or its refusal: as it came
        if it came in one message, else spooled. An upload's credential is checked, and
        its place among the bodies being read taken, before a byte of it is read."""
        limit = _body_limit(scope, is_matrix)
        declared = _declared_length(scope)
        if declared == -1:
            return _refusal(InvalidParam("Invalid Content-Length"), close=True)
        if declared is not None and declared > limit:
            # Refused before a byte is read. A modest excess is drained by the server
            # after the answer (the client reads the 413, not a reset); a gross one closes.
            return _refusal(_too_large(limit), close=declared > DRAIN_FACTOR * max(limit, 1))
        if not _is_media_body(scope, is_matrix):
            return await self._receive_body(scope, receive, limit, declared)
        close = declared is None or declared > REFUSED_BODY_DRAIN_BYTES
        upload = admission.upload_request(scope)
        # (Not an upload route, or the wrong method: its 404 or 405 comes from the view,
        # after the body, which is capped like any other of its size.)
        if upload is not None:
            refused = await self._credential_refusal(scope, upload)
            if refused is not None:
                return _closing(refused) if close else refused
        address = admission.client_address(scope)
        error = self.bodies.admit(address)
        if error is not None:
            return await self._refuse(scope, error, close=close)
        body: IO[bytes] | _Streaming | Outgoing | None = None
        try:
            body = await self._receive_body(
                scope, receive, limit, declared, stream=upload is not None, address=address
            )
            return body
        finally:
            if not isinstance(body, _Streaming):  # else released once it is received
                self.bodies.release(address)

    async def _credential_refusal(
        self, scope: Scope, upload: admission.UploadRequest
    ) -> Outgoing | None:
        """The refusal of an upload whose credential does not hold, or None. An access
        token this process has resolved lately is judged on the loop; another one on a
        pool thread."""
        if upload.route == admission.UPLOAD_URL_ROUTE:
            error = admission.upload_url_error(upload)
        else:
            credential = admission.access_credential(scope)
            if isinstance(credential, MatrixError):
                error = credential
            else:
                verdict = admission.cached_verdict(credential)
                if verdict is admission.NOT_CACHED:
                    return await self._run(self._check_access_token, scope, credential)
                error = verdict
        if error is None:
            return None
        return await self._run(self._refused, scope, error)

    async def _receive_body(
        self,
        scope: Scope,
        receive: Receive,
        limit: int,
        declared: int | None,
        *,
        stream: bool = False,
        address: str | None = None,
    ) -> IO[bytes] | _Streaming | Outgoing:
        """The body, read against the clock of ``admission.BodyPace``: a body that stops
        arriving, or arrives too slowly, is answered 408 and its connection closed.
        ``stream`` (an upload's, from ``address``): a body past ``SPOOL_MEMORY_BYTES`` is
        handed on as it arrives (``_Streaming``)."""
        if not declared and not _has_header(scope, b"transfer-encoding"):
            # No body (every GET): its one message is there already, no clock needed.
            return await self._spool_body(scope, receive, limit, declared, None)
        loop = asyncio.get_running_loop()
        pace = admission.BodyPace(loop.time())
        try:
            async with asyncio.timeout_at(pace.deadline()) as timer:
                # Only receive() is awaited inside: the timeout cancels nothing else.
                if stream:
                    return await self._start_streaming(
                        scope, receive, limit, declared, (pace, timer), address
                    )
                return await self._spool_body(scope, receive, limit, declared, (pace, timer))
        except TimeoutError:
            return await self._refuse(scope, pace.error(loop.time()), close=True)

    async def _spool_body(
        self,
        scope: Scope,
        receive: Receive,
        limit: int,
        declared: int | None,
        clock: tuple[admission.BodyPace, asyncio.Timeout] | None,
    ) -> IO[bytes] | Outgoing:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        if not message.get("more_body", False):
            return _body_of_one_message(scope, message, limit, declared)
        loop = asyncio.get_running_loop()
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES, mode="w+b")  # noqa: SIM115
        size = 0
        try:
            while True:
                if message["type"] == "http.disconnect":
                    raise _ClientGone()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    spool.close()
                    return _refusal(_too_large(limit), close=False)
                if chunk:
                    try:
                        spool.write(chunk)
                    except OSError as exc:
                        # The spool directory is full or unwritable: the body cannot be
                        # taken now. The client may try again; the rest is not read.
                        log.warning("Cannot spool a request body: %s", exc)
                        spool.close()
                        return _refusal(ServiceUnavailable(), close=True)
                if not message.get("more_body", False):
                    break
                if clock is not None:
                    pace, timer = clock
                    pace.arrived(len(chunk), loop.time())
                    timer.reschedule(pace.deadline())
                message = await receive()
        except BaseException:
            spool.close()  # at once: a dropped body holds neither memory nor a file
            raise
        spool.seek(0)
        if declared is None:
            # A chunked body, now of known length: views see it like any other.
            scope["headers"] = [*scope["headers"], (b"content-length", str(size).encode())]
        return spool

    async def _start_streaming(
        self,
        scope: Scope,
        receive: Receive,
        limit: int,
        declared: int | None,
        clock: tuple[admission.BodyPace, asyncio.Timeout],
        address: str | None,
    ) -> IO[bytes] | _Streaming | Outgoing:
        """An upload's body: in memory if it ends within ``SPOOL_MEMORY_BYTES`` (as any
        small body), else the bytes so far, to be handed to the view with the rest to
        come. A body announced larger is handed on at once: the view's work before it
        reads (its database writes) is done while the first bytes arrive."""
        loop = asyncio.get_running_loop()
        pace, timer = clock
        if declared is not None and declared > SPOOL_MEMORY_BYTES:
            into = _receive_into(scope)
            body = DirectBody(loop, []) if into else StreamedBody(loop, [])
            return _Streaming(body, 0, limit, declared, pace, address, into=into)
        chunks: list[bytes] = []
        size = 0
        message = await receive()
        while True:
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return _refusal(_too_large(limit), close=False)
            chunks.append(chunk)
            pace.arrived(len(chunk), loop.time())
            timer.reschedule(pace.deadline())
            if not message.get("more_body", False):
                break
            if size > SPOOL_MEMORY_BYTES:
                into = _receive_into(scope) if declared is not None else None
                body = DirectBody(loop, chunks) if into else StreamedBody(loop, chunks)
                return _Streaming(body, size, limit, declared, pace, address, into=into)
            message = await receive()
        if declared is None:
            scope["headers"] = [*scope["headers"], (b"content-length", str(size).encode())]
        return io.BytesIO(b"".join(chunks))

    async def _respond_streaming(
        self, chain: _Chain, scope: Scope, receive: Receive, streaming: _Streaming
    ) -> Outgoing | Parking:
        """Run the view of an upload on a thread of its own while the loop goes on
        receiving its body (``_pump``); the view's answer, unless the client left."""
        pump = asyncio.ensure_future(self._pump(receive, streaming))
        try:
            outgoing: Outgoing | Parking = await self._run(
                self._respond_streamed, chain, scope, streaming.body, executor=self.upload_executor
            )
        finally:
            streaming.body.close()
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        if streaming.gone:
            raise _ClientGone()
        if isinstance(streaming.refusal, BodyTooSlow) and isinstance(outgoing, Outgoing):
            outgoing = _closing(outgoing)  # the rest of a stalled body is not waited for
        return outgoing

    async def _pump(self, receive: Receive, streaming: _Streaming) -> None:
        """Receive the rest of a streamed body into it, against the body's clock; the
        time the view takes to make room does not count against the client."""
        loop = asyncio.get_running_loop()
        body, pace = streaming.body, streaming.pace
        task = asyncio.current_task()
        assert task is not None
        watch = PaceWatch(pace, task)
        try:
            if streaming.into is not None:
                await self._pump_into(streaming.into, streaming, watch)
            else:
                await self._pump_messages(receive, streaming, watch)
        except asyncio.CancelledError:
            if not watch.expired:
                raise
            task.uncancel()  # the watch's own cancellation: the body was too slow
            streaming.refusal = pace.error(loop.time())
            body.fail(streaming.refusal)
        finally:
            watch.stop()
            self.bodies.release(streaming.address)
            # The view must never wait for bytes no one will receive.
            body.fail(BodyEnded("The request body stopped"))

    async def _pump_messages(
        self, receive: Receive, streaming: _Streaming, watch: PaceWatch
    ) -> None:
        loop = asyncio.get_running_loop()
        body, pace = streaming.body, streaming.pace
        while True:
            if body.full:
                watch.hold()
                paused = loop.time()
                await body.wait_for_room()
                pace.paused(loop.time() - paused)
                watch.resume()
            if body.closed:
                return
            message = await receive()
            if message["type"] == "http.disconnect":
                streaming.gone = True
                body.fail(BodyEnded("The client went away"))
                return
            chunk = message.get("body", b"")
            streaming.received += len(chunk)
            if streaming.received > streaming.limit:
                streaming.refusal = _too_large(streaming.limit)
                body.fail(streaming.refusal)
                return
            pace.arrived(len(chunk), loop.time())
            body.feed(chunk)
            if not message.get("more_body", False):
                body.end()
                return

    async def _pump_into(
        self, into: dict[str, Any], streaming: _Streaming, watch: PaceWatch
    ) -> None:
        """``_pump_messages`` for a ``DirectBody``: each buffer its reader hands over is
        filled by the server (``RECEIVE_INTO``), the clock stopped while the reader has
        none to fill; if the pump stops before the body's end, the server discards the
        rest."""
        loop = asyncio.get_running_loop()
        body, pace = streaming.body, streaming.pace
        assert isinstance(body, DirectBody)

        def arrived(count: int) -> None:
            pace.arrived(count, loop.time())

        ended = False
        try:
            while not ended:
                watch.hold()
                waited = loop.time()
                await body.asked.wait()
                pace.paused(loop.time() - waited)
                watch.resume()
                buffer = body.wanted()
                if buffer is None:
                    return  # closed by its reader
                try:
                    count = await into["receive_into"](buffer, arrived)
                except OSError:
                    streaming.gone = True
                    body.fail(BodyEnded("The client went away"))
                    return
                streaming.received += count
                ended = count < len(buffer)
                body.filled(count)
        finally:
            if not ended:
                into["discard"]()

    async def _refuse(self, scope: Scope, error: MatrixError, *, close: bool) -> Outgoing:
        outgoing: Outgoing = await self._run(self._refused, scope, error)
        return _closing(outgoing) if close else outgoing

    # ------------------------------------------------------------------ sync work

    def _check_access_token(
        self, scope: Scope, credential: admission.AccessCredential
    ) -> Outgoing | None:
        """An upload's access token, resolved before its body is read, on a pool thread
        (the resolver may query the database or the homeserver): None if it resolves,
        else the refusal."""
        signals.request_started.send(sender=self.__class__, scope=scope)
        try:
            error = admission.resolved_verdict(credential)
        except Exception as exc:
            if to_matrix_error(exc) is None:
                log.exception("Unhandled error checking an upload's access token")
            error = _error_of(exc)
        if error is None:
            signals.request_finished.send(sender=self.__class__)
            return None
        return self._refusal_response(scope, error)

    def _refused(self, scope: Scope, error: MatrixError) -> Outgoing:
        """A refusal made before the view, through the middleware, on a pool thread."""
        signals.request_started.send(sender=self.__class__, scope=scope)
        return self._refusal_response(scope, error)

    def _refusal_response(self, scope: Scope, error: MatrixError) -> Outgoing:
        set_script_prefix(get_script_prefix(scope))
        try:
            request = ASGIRequest(scope, io.BytesIO())
        except UnicodeDecodeError:
            signals.request_finished.send(sender=self.__class__)
            return Outgoing.error(error)
        request.META[REFUSAL] = json_error(error)
        return _finish(self.refusal_chain.get_response(request))

    def _respond(
        self, chain: _Chain, scope: Scope, body: IO[bytes], retried: bool = False
    ) -> Outgoing | Parking:
        """One request through Django, on a pool thread (``retried``: again, after a
        ``RetryWhenDone``); what its work notes goes on its log line."""
        with logs.collecting(scope.setdefault(NOTE, {})):
            return self._respond_noted(chain, scope, body, retried)

    def _respond_streamed(
        self, chain: _Chain, scope: Scope, body: StreamedBody | DirectBody
    ) -> Outgoing | Parking:
        """``_respond`` for a streamed upload, on its own thread; that thread's database
        connection is closed afterwards, but for a few threads' (there are as many of these
        threads as bodies may be received at once: their connections must not all outlive
        their requests)."""
        try:
            return self._respond(chain, scope, body)  # type: ignore[arg-type]
        finally:
            if not self.upload_connection_keepers.keeps():
                connections.close_all()

    def _respond_noted(
        self, chain: _Chain, scope: Scope, body: IO[bytes], retried: bool
    ) -> Outgoing | Parking:
        set_script_prefix(get_script_prefix(scope))
        signals.request_started.send(sender=self.__class__, scope=scope)
        try:
            request = MediaASGIRequest(scope, body)
        except UnicodeDecodeError:
            response: HttpResponseBase = json_error(InvalidParam("Undecodable request"))
        except RequestDataTooBig:
            response = json_error(TooLarge("Request body is too large"))
        else:
            if isinstance(body, StreamedBody) and "CONTENT_LENGTH" not in request.META:
                # A chunked body still arriving: its end is its length (as gunicorn says
                # of the chunked bodies it decodes).
                request.META["wsgi.input"] = body
                request.META["wsgi.input_terminated"] = True
            request.META[CAN_DEFER] = True
            request.META[RETRIED] = retried
            response = chain.get_response(request)
            _note_request(scope[NOTE], request)
        if isinstance(response, DeferredResponse):
            # Parked with only what the answer needs: the response and request go now.
            # A request to run again keeps its body, which is small: only bodiless
            # federation requests wait that way.
            again = isinstance(response.wait, RetryWhenDone) and isinstance(body, io.BytesIO)
            kept = body.getvalue() if again else b""  # type: ignore[attr-defined]
            response.close()  # closes the request, and its body
            body.close()
            return Parking(response.wait, response.added_headers_encoded(), kept)
        response._resource_closers.append(body.close)
        return _finish(response)

    def _resume(self, wait: MediaWait[HttpResponseBase], row: Any) -> Outgoing | MediaWait[Any]:
        """A parked request's answer (or its next wait), from the fresh row, on a pool
        thread."""
        signals.request_started.send(sender=self.__class__, scope=None)
        try:
            response = wait.resume(row)
        except MediaWait as again:
            signals.request_finished.send(sender=self.__class__)
            return again.with_traceback(None)  # kept while it waits: drop the frames
        except Exception as exc:
            error = to_matrix_error(exc)
            if error is None:
                log.exception("Unhandled error answering a parked request")
                error = MatrixError("Internal error")
            response = json_error(error)
        return _finish(response)

    def _resume_all(
        self, jobs: list[tuple[MediaWait[HttpResponseBase], Any]]
    ) -> list[Outgoing | MediaWait[Any]]:
        """Answers of requests woken together. Those asking the same thing of the same
        row (equal share keys) get one rendering: a thousand recipients of one upload
        cost one response, sent a thousand times. Only successes are shared (an error
        may depend on the request's own deadline)."""
        shared: dict[tuple[Hashable, int], Outgoing] = {}
        answers: list[Outgoing | MediaWait[Any]] = []
        for wait, row in jobs:
            key = (wait.share_key, id(row)) if wait.share_key is not None else None
            answer = shared.get(key) if key is not None else None
            if answer is None:
                answer = self._resume(wait, row)
                if (
                    key is not None
                    and isinstance(answer, Outgoing)
                    and answer.body is not None
                    and answer.response.status_code < 400
                ):
                    shared[key] = answer
            answers.append(answer)
        return answers

    # ------------------------------------------------------------------ waiting

    async def _retry_when_done(
        self, parking: Parking, chain: _Chain, scope: Scope, receive: Receive
    ) -> Outgoing | Parking | None:
        """Park a request until its ``RetryWhenDone`` future is done (or its deadline),
        holding no thread, then run it again from the start."""
        wait = parking.wait
        assert isinstance(wait, RetryWhenDone)
        refusal = self.caps.admit(wait)
        if refusal is not None:
            metrics.wait_refused(wait.kind)
            return Outgoing.error(refusal)
        done = _on_loop(wait.future)
        gone = asyncio.ensure_future(_disconnected(receive))
        metrics.parked(wait.kind)
        try:
            await asyncio.wait(
                {done, gone}, timeout=wait.deadline.remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if gone.done():
                return None
        finally:
            metrics.unparked(wait.kind, gone=gone.done())
            self.caps.release(wait)
            gone.cancel()
            done.cancel()  # only the loop's copy: the work goes on for others
        return await self._run(self._respond, chain, scope, io.BytesIO(parking.body), True)

    async def _after_wait(self, parking: Parking, receive: Receive) -> Outgoing | None:
        hub = wakeup.install_hub(asyncio.get_running_loop(), self.executor)
        wait = parking.wait
        assert isinstance(wait, MediaWait)
        parked: wakeup.Parked | None = None  # what a hang-up stops waiting for

        def on_gone(_watch: asyncio.Future[None]) -> None:
            if parked is not None:
                hub.unpark(parked)  # idempotent: a finished wait is left as it is

        gone = asyncio.ensure_future(_disconnected(receive))
        gone.add_done_callback(on_gone)
        try:
            while True:
                refusal = self.caps.admit(wait)
                if refusal is not None:
                    metrics.wait_refused(wait.kind)
                    answer: Outgoing | MediaWait[Any] = Outgoing.error(refusal)
                    break
                parked = hub.park(wait.pk, wait.states, wait.deadline.remaining)
                metrics.parked(wait.kind)
                try:
                    row = await parked.future
                except asyncio.CancelledError:
                    if gone.done():
                        return None  # the client went away while it waited
                    raise
                finally:
                    metrics.unparked(wait.kind, gone=gone.done())
                    hub.unpark(parked)
                    self.caps.release(wait)
                answer = await self._resumes.submit((wait, row))
                if isinstance(answer, MediaWait):
                    wait = answer
                    continue
                break
        finally:
            gone.remove_done_callback(on_gone)
            gone.cancel()
        assert isinstance(answer, Outgoing)
        if parking.added_headers:
            # The answer may be shared with other requests: add to a copy of its head.
            answer = Outgoing(answer.response, answer.body, answer.head(parking.added_headers))
        return answer

    # ------------------------------------------------------------------ sending

    async def _send(self, outgoing: Outgoing, send: Send) -> None:
        response = outgoing.response
        body = outgoing.body
        chunks: Iterator[bytes] | None = None
        first: bytes | None = None
        if body is None and not response.is_async:  # type: ignore[attr-defined]
            # The first chunk before the status line: a store that fails at once (it is
            # down) is answered with its error, not with a 200 cut short.
            chunks = iter(response)  # type: ignore[call-overload]
            try:
                first = await self._run(next, chunks, None)
            except Exception as exc:
                await self._run(response.close)
                error = to_matrix_error(exc)
                if error is None:
                    raise
                await self._send(Outgoing.error(error), send)
                return
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": outgoing.head(),
            }
        )
        if body is not None:
            for start in range(0, max(len(body), 1), RESPONSE_CHUNK):
                await send(
                    {
                        "type": "http.response.body",
                        "body": body[start : start + RESPONSE_CHUNK],
                        "more_body": start + RESPONSE_CHUNK < len(body),
                    }
                )
            return
        try:
            await self._stream(response, send, chunks, first)
        finally:
            await self._run(response.close)

    async def _stream(
        self,
        response: HttpResponseBase,
        send: Send,
        chunks: Iterator[bytes] | None,
        first: bytes | None,
    ) -> None:
        if chunks is None:
            async for chunk in response:  # type: ignore[attr-defined]
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        else:
            chunk = first
            while chunk is not None:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunk = await self._run(next, chunks, None)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@dataclass(slots=True)
class Parking:
    """A request parked until its media changes (or, ``RetryWhenDone``, until work off
    the request threads is done): the wait, and the headers the middleware put on the
    placeholder response (CORS, security) that its answer carries too."""

    wait: MediaWait[HttpResponseBase] | RetryWhenDone
    added_headers: list[tuple[bytes, bytes]]
    #: The body of a request parked to run again.
    body: bytes = b""


@dataclass
class Outgoing:
    """A response ready to send: its body already in hand (``body``), or a stream."""

    response: HttpResponseBase
    body: bytes | None
    #: The encoded head, made once (shared answers are sent many times).
    headers: list[tuple[bytes, bytes]] | None = None
    #: The head with each set of extra headers asked for, made once each.
    extended: dict[tuple[tuple[bytes, bytes], ...], list[tuple[bytes, bytes]]] = field(
        default_factory=dict
    )

    def head(self, extra: list[tuple[bytes, bytes]] = ()) -> list[tuple[bytes, bytes]]:  # type: ignore[assignment]
        """The response's headers for ASGI, plus ``extra`` ones it does not have."""
        if self.headers is None:
            response = self.response
            headers = [
                (name.encode("latin1"), str(value).encode("latin1"))
                for name, value in response.items()
            ]
            headers += [
                (b"set-cookie", cookie.output(header="").encode("ascii").strip())
                for cookie in response.cookies.values()
            ]
            if self.body is not None and not response.has_header("Content-Length"):
                headers.append((b"content-length", str(len(self.body)).encode()))
            self.headers = headers
        if not extra:
            return self.headers
        key = tuple(extra)
        head = self.extended.get(key)
        if head is None:
            present = {name.lower() for name, _ in self.headers}
            head = [*self.headers, *(item for item in extra if item[0].lower() not in present)]
            self.extended[key] = head
        return head

    @classmethod
    def error(cls, error: MatrixError) -> Outgoing:
        """A refusal made by the handler itself (no Django request cycle to close)."""
        response = json_error(error)
        return cls(response, response.content)


class MediaASGIRequest(ASGIRequest):
    """Django's request, whose body is also read as a file's with ``readinto``: a store
    reads an upload straight into its part buffers (``MeteredReader.readinto``), not
    into a new bytes object per read. As Django's ``read``: the body counts as read, and
    a body that cannot be read is ``UnreadablePostError``."""

    def readinto(self, buffer: memoryview, /) -> int:
        self._read_started = True
        fill = getattr(self._stream, "readinto", None)
        try:
            if fill is not None:
                return int(fill(buffer) or 0)
            chunk = self._stream.read(len(buffer))
        except OSError as exc:
            raise UnreadablePostError(*exc.args) from exc
        buffer[: len(chunk)] = chunk
        return len(chunk)


def _finish(response: HttpResponseBase) -> Outgoing:
    """On a pool thread: take the body of a plain or small streamed response now (a small
    download is one read; the loop then sends it without coming back to a thread) and
    close the response (``request_finished``: connections are checked, kept)."""
    if not response.streaming:
        response.close()
        return Outgoing(response, response.content)  # type: ignore[attr-defined]
    length = response.get("Content-Length")
    if not response.is_async and length is not None and int(length) <= SMALL_STREAM_BYTES:  # type: ignore[attr-defined]
        try:
            body = b"".join(response)  # type: ignore[arg-type]
        except Exception as exc:
            # Nothing has been sent yet: the reader's failure (the storage went away) is
            # this request's answer, not an error of every request answered with it.
            response.close()
            if to_matrix_error(exc) is None:
                log.exception("Unhandled error reading a response body")
            return _finish(json_error(_error_of(exc)))
        response.close()
        return Outgoing(response, body)
    return Outgoing(response, None)


def _error_of(exc: BaseException) -> MatrixError:
    """What the client hears of an exception no view turned into an answer."""
    return to_matrix_error(exc) or MatrixError("Internal error")


class _Batches:
    """Runs the answers of parked requests woken together as one job on the pool: a
    thousand waiters woken by one upload cost one thread hop per ``BATCH``, not one each."""

    BATCH = 256

    def __init__(self, handler: MediaASGIHandler) -> None:
        self.handler = handler
        self.jobs: list[tuple[tuple[Any, Any], asyncio.Future[Any]]] = []
        self.running: set[asyncio.Future[None]] = set()

    def submit(self, job: tuple[Any, Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self.jobs:
            loop.call_soon(self._flush)
        self.jobs.append((job, future))
        return future

    def _flush(self) -> None:
        jobs, self.jobs = self.jobs, []
        for start in range(0, len(jobs), self.BATCH):
            task = asyncio.ensure_future(self._run(jobs[start : start + self.BATCH]))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _run(self, jobs: list[tuple[tuple[Any, Any], asyncio.Future[Any]]]) -> None:
        try:
            results = await self.handler._run(self.handler._resume_all, [job for job, _ in jobs])
        except BaseException as exc:
            for _, future in jobs:
                if not future.done():
                    future.set_exception(exc)
            raise
        for (_, future), result in zip(jobs, results, strict=True):
            if not future.done():
                future.set_result(result)


def _on_loop(work: Future[Any]) -> asyncio.Future[None]:
    """A loop future done when ``work`` (a thread's future) is; cancelling it leaves
    ``work`` alone (``asyncio.wrap_future`` would cancel a shared job that has not
    started)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(_work: Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    work.add_done_callback(settle)
    return done


async def _disconnected(receive: Receive) -> None:
    """Returns when the client hangs up (the body has been read: nothing else arrives)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _route_name(match: ResolverMatch) -> str:
    """A route's metric label and log field: its URL name (never the path, which holds
    media ids); every admin page is "admin"."""
    if match.app_name == "admin" or match.namespace.startswith("admin"):
        return "admin"
    return match.url_name or UNMATCHED


def _note_request(note: dict[str, Any], request: Any) -> None:
    """What the request's log line and metrics take from Django's request, once the view
    has run: its route, its media id, who made it (a Matrix user, or another server)."""
    match: ResolverMatch | None = getattr(request, "resolver_match", None)
    if match is None:
        note.setdefault("route", UNMATCHED)
        return
    route = note["route"] = _route_name(match)
    if route == "admin":
        return  # its user is a Django account, read from the session only if asked
    media_id = match.kwargs.get("media_id")
    if media_id:
        note.setdefault("media_id", media_id)
    user = request.__dict__.get("user")  # set by DRF's authentication, if it ran
    if user is not None and getattr(user, "is_authenticated", False):
        note.setdefault("user", str(user))


def _route_of(path: str) -> str:
    """The route of a request answered before any view ran (refusals)."""
    try:
        return _route_name(resolve(path))
    except Resolver404:
        return UNMATCHED


def _observe(scope: Scope, note: dict[str, Any], status: int, arrived: float) -> None:
    """Count, time and log one request, once it is answered (or its client is gone)."""
    seconds = time.perf_counter() - arrived
    route = note.get("route") or _route_of(scope["path"])
    method = scope["method"]
    metrics.request_done(route, method, status, seconds)
    if logs.requests_log.isEnabledFor(logging.INFO):
        # The same order on every line: route, user, media id, state, the rest, duration.
        fields = {"route": route}
        fields.update((key, note[key]) for key in LINE_ORDER if key in note)
        fields.update(note)
        fields["route"] = route
        fields["duration_ms"] = round(seconds * 1000, 1)
        client = scope.get("client")
        logs.log_request(
            f"{client[0]}:{client[1]}" if client else "-",
            method,
            scope["path"],
            scope.get("query_string") or b"",
            scope.get("http_version", "1.1"),
            status,
            fields,
        )


def _is_large(body: IO[bytes]) -> bool:
    """Whether a body is past what is spooled in memory (a large upload)."""
    size = body.seek(0, io.SEEK_END)
    body.seek(0)
    return size > SPOOL_MEMORY_BYTES


def _body_of_one_message(
    scope: Scope, message: dict[str, Any], limit: int, declared: int | None
) -> IO[bytes] | Outgoing:
    """The whole body in one message (every GET, most JSON): already in memory."""
    chunk = message.get("body", b"")
    if len(chunk) > limit:
        return _refusal(_too_large(limit), close=False)
    if declared is None:
        scope["headers"] = [*scope["headers"], (b"content-length", b"%d" % len(chunk))]
    return io.BytesIO(chunk)


def _refusal(error: MatrixError, *, close: bool) -> Outgoing:
    outgoing = Outgoing.error(error)
    return _closing(outgoing) if close else outgoing


def _closing(outgoing: Outgoing) -> Outgoing:
    """The answer, as the connection's last (its body is not read)."""
    outgoing.response["Connection"] = "close"
    outgoing.headers = None  # the head is made again, with the header
    return outgoing


def _too_large(limit: int) -> TooLarge:
    return TooLarge(f"Request body is over the limit of {limit} bytes")


def _declared_length(scope: Scope) -> int | None:
    """Content-Length, None if absent, -1 if malformed."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return -1
            return length if length >= 0 else -1
    return None


def _has_header(scope: Scope, name: bytes) -> bool:
    return any(key == name for key, _ in scope["headers"])


def _is_media_body(scope: Scope, is_matrix: bool) -> bool:
    return (
        is_matrix
        and scope["method"] in ("PUT", "POST")
        and MEDIA_BODY_PATH.match(scope["path"]) is not None
    )


def _body_limit(scope: Scope, is_matrix: bool) -> int:
    if not is_matrix:
        return OTHER_BODY_LIMIT
    if _is_media_body(scope, is_matrix):
        return app_settings.MAX_UPLOAD_SIZE
    return JSON_BODY_LIMIT


def _off_the_metrics_listener(scope: Scope) -> MatrixError | None:
    """The metrics listener (``METRICS_PORT``) serves the operators' paths only."""
    port = app_settings.METRICS_PORT
    if port is None or scope["path"] in OPERATING_PATHS:
        return None
    server = scope.get("server")
    if server is not None and server[1] == port:
        return Unrecognized()
    return None


def _request_head_error(scope: Scope) -> MatrixError | None:
    if len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") > MAX_URI_BYTES:
        return URITooLong()
    if sum(len(n) + len(v) + 4 for n, v in scope["headers"]) > MAX_HEADER_BYTES:
        return HeadersTooLarge()
    return None


def get_asgi_application(threads: int | None = None) -> MediaASGIHandler:
    """Like ``django.core.asgi.get_asgi_application``: set Django up, return the handler."""
    import django

    django.setup(set_prefix=False)
    return MediaASGIHandler(threads)
