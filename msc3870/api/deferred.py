"""How a view hands a wait to the server instead of blocking a thread.

``answer`` runs a service. If the service raises ``MediaWait`` and the request is served
by ``msc3870.asgi.MediaASGIHandler`` (which marks it with ``CAN_DEFER``), the view returns
a ``DeferredResponse``: the handler parks the request on the event loop's wake-up hub and
sends what ``wait.resume(row)`` renders once the row changes. Served any other way (WSGI,
Django's test client), the view waits in its own thread, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from django.http import HttpResponseBase, JsonResponse

from ..errors import NotYetUploaded
from ..waiting import AUTHENTICATED, MediaWait, RetryWhenDone, block_until_answered

T = TypeVar("T")

#: request.META key set by the handler that can park requests.
CAN_DEFER = "msc3870.can_defer"
#: request.META key set by that handler on a request it runs again after a
#: ``RetryWhenDone``: the request may not park that way a second time.
RETRIED = "msc3870.retried"
# Headers that belong to one response's body or status, never carried to another.
REPRESENTATION_HEADERS = frozenset(
    {"etag", "last-modified", "allow", "location", "retry-after", "cache-control", "expires"}
)


class DeferredResponse(JsonResponse):
    """The handler's cue to wait, never sent. (202, so that Django does not log it as a
    server error on its way through the middleware.)"""

    def __init__(self, wait: MediaWait[HttpResponseBase] | RetryWhenDone) -> None:
        super().__init__(NotYetUploaded().as_dict(), status=202)
        self.wait = wait
        self._own_headers = {name.lower() for name in self.headers}

    def added_headers_encoded(self) -> list[tuple[bytes, bytes]]:
        """Once the response has passed the middleware (on the pool thread, while
        parking): the headers the middleware and DRF put on it (CORS, security), encoded,
        which the final answer carries too, so the wake-up has nothing left to compute.
        Not those that describe this placeholder's own body or status (its
        Content-Length above all)."""
        return [
            (name.lower().encode("latin1"), value.encode("latin1"))
            for name, value in self.headers.items()
            if name.lower() not in self._own_headers
            and not name.lower().startswith("content-")
            and name.lower() not in REPRESENTATION_HEADERS
        ]


def can_park(request: Any) -> bool:
    """Whether the server running ``request`` (a Django request) can park it on a
    ``RetryWhenDone``: only the handler that marks it, and only once."""
    return bool(request.META.get(CAN_DEFER)) and not request.META.get(RETRIED)


def requester_of(request: Any) -> str:
    """Who a request waits for, as waiting caps count: its authenticated user (a Matrix
    user, or another server), else its client address."""
    user = getattr(request, "user", None)
    if user is not None and getattr(user, "is_authenticated", False):
        return str(user)
    return "address:" + str(request.META.get("REMOTE_ADDR") or "")


def answer(
    request: Any,
    produce: Callable[[], T],
    render: Callable[[T], HttpResponseBase],
    *,
    kind: str = AUTHENTICATED,
    share_key: Hashable = None,
) -> HttpResponseBase:
    """``render(produce())``, waiting as the server allows when the answer is not ready.

    ``share_key``: what ``render`` depends on besides the row (the file name, Range, ...);
    parked requests with equal keys woken together share one rendering."""
    try:
        value = produce()
    except MediaWait as wait:
        # A new wait: no traceback holding this request.
        rendered = wait.then(
            render, kind=kind, share_key=share_key, requester=requester_of(request)
        )
        if request.META.get(CAN_DEFER):
            return DeferredResponse(rendered)
        return block_until_answered(rendered)
    return render(value)
