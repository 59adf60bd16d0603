"""Upload admission: who may send an upload body, how many at once, and how slowly.

An upload body costs the server memory, a temporary file and a place in the process
while it arrives; a client that never finishes one holds them for as long as it likes.
So, before a byte of it is read (``msc3870.asgi`` reads bodies):

- the request's credential is checked: an upload URL's signed token (signature and
  expiry, no database: ``upload_url_error``), or the access token of the other upload
  endpoints, resolved as the views resolve it (same resolver, same cache: the view's
  own check is then a cache hit), on the event loop when this process holds the answer
  (``cached_verdict``), else on a pool thread (``resolved_verdict``);
- the body takes a place among those being read, per process and per client address
  (``BodyCaps``): past either cap, 429 at once;

and while it is read, it must keep arriving (``BodyPace``): a body silent for
``UPLOAD_IDLE_TIMEOUT_SECONDS``, or slower on average than
``UPLOAD_MIN_BYTES_PER_SECOND`` once ``UPLOAD_RATE_GRACE_SECONDS`` have passed, is
dropped with 408.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter
from dataclasses import dataclass
from typing import Any

from django.http import QueryDict
from django.urls import Resolver404, resolve

from .conf import app_settings
from .errors import (
    BodyTooSlow,
    Forbidden,
    InvalidParam,
    LimitExceeded,
    MatrixError,
    MissingToken,
)
from .upload_tokens import read_upload_token

# Routes (``msc3870.api.urls``) whose bodies are uploads, by method: the upload URL's
# token is its credential; the others need an access token.
UPLOAD_URL_ROUTE = "upload-url"
ACCESS_TOKEN_ROUTES = {"PUT": "upload-to-media", "POST": "upload"}
# A client past a cap retries after this long (a place frees when an upload ends).
RETRY_AFTER_MS = 1000


class NotCached(enum.Enum):
    NOT_CACHED = "not cached"


#: The verdict on an access token that this process does not hold: resolve it.
NOT_CACHED = NotCached.NOT_CACHED


@dataclass(frozen=True)
class UploadRequest:
    """An upload request, as found from its route before its body is read."""

    route: str
    #: The upload URL's token (``upload-url`` only).
    token: str | None = None


#: Where ``upload_request`` leaves the route it resolved, for the handler to reuse.
RESOLVER_MATCH = "msc3870.resolver_match"


def upload_request(scope: dict[str, Any]) -> UploadRequest | None:
    """The upload this request is, from the URLconf the views are routed by (so a host
    project's prefix is honoured); None for anything else, left to the views. The route
    is left in the scope: the request is not resolved twice."""
    method = scope["method"]
    path = scope["path"]
    root = scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root) :]
    try:
        match = resolve(path)
    except Resolver404:
        return None
    scope[RESOLVER_MATCH] = match
    if "msc3870" not in match.app_names:
        return None
    if method == "PUT" and match.url_name == UPLOAD_URL_ROUTE:
        return UploadRequest(UPLOAD_URL_ROUTE, match.kwargs.get("token"))
    if ACCESS_TOKEN_ROUTES.get(method) == match.url_name:
        return UploadRequest(match.url_name)
    return None


def upload_url_error(upload: UploadRequest) -> MatrixError | None:
    """The refusal of an upload URL whose token is forged, malformed or expired. Whether
    its media still waits for bytes needs the database: the view decides that."""
    if read_upload_token(upload.token or "") is None:
        return Forbidden("Invalid or expired upload URL")
    return None


@dataclass(frozen=True)
class AccessCredential:
    """What an upload authenticates with, read from its head as the views read it."""

    token: str
    masquerade_as: str | None
    device_id: str | None


def access_credential(scope: dict[str, Any]) -> AccessCredential | MatrixError:
    """The upload's access token (Authorization Bearer, or the deprecated ``access_token``
    query parameter) and the appservice parameters, or the refusal of an upload without
    one."""
    from .auth import token_from  # the models: not before Django is set up

    try:
        query = QueryDict(scope.get("query_string", b"").decode())
    except UnicodeDecodeError:
        return InvalidParam("Undecodable request")
    # As Django's ASGIRequest builds HTTP_AUTHORIZATION: repeated headers joined by commas.
    authorization = ",".join(
        value.decode("latin1") for name, value in scope["headers"] if name == b"authorization"
    )
    token = token_from(authorization, query)
    if token is None:
        return MissingToken()
    return AccessCredential(token, query.get("user_id") or None, query.get("device_id") or None)


def cached_verdict(credential: AccessCredential) -> MatrixError | NotCached | None:
    """The resolver's verdict on a credential if this process holds it, with no I/O (on the
    event loop): None if it resolves, its refusal, or ``NOT_CACHED``."""
    from .auth import get_resolver

    resolve_cached = getattr(get_resolver(), "resolve_cached", None)
    if resolve_cached is None:
        return NOT_CACHED
    try:
        user = resolve_cached(
            credential.token,
            masquerade_as=credential.masquerade_as,
            device_id=credential.device_id,
        )
    except MatrixError as exc:
        return exc
    return NOT_CACHED if user is None else None


def resolved_verdict(credential: AccessCredential) -> MatrixError | None:
    """The resolver's verdict, as ``msc3870.auth.MatrixTokenAuthentication`` would reach
    it (same resolver, same cache). May query the database or the homeserver: call it on
    a pool thread."""
    from .auth import get_resolver

    try:
        get_resolver().resolve(
            credential.token,
            masquerade_as=credential.masquerade_as,
            device_id=credential.device_id,
        )
    except MatrixError as exc:
        return exc
    return None


def client_address(scope: dict[str, Any]) -> str | None:
    """Whom the per-address cap counts: the client's IP address (behind a proxy listed in
    ``FORWARDED_ALLOW_IPS``, the server puts the forwarded one here), an IPv6 client by
    its /64, since one host may hold all of its addresses. None when unknown (a Unix
    socket): only the per-process cap applies."""
    client = scope.get("client")
    if not client:
        return None
    host = str(client[0])
    if ":" not in host:
        return host  # IPv4 (or a name): as it is, without parsing
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class BodyCaps:
    """Upload bodies being read, per process and per client address."""

    def __init__(self) -> None:
        self.total = 0
        self.per_address: Counter[str] = Counter()

    def admit(self, address: str | None) -> MatrixError | None:
        if self.total >= app_settings.UPLOAD_BODIES_MAX:
            return LimitExceeded(
                "Too many uploads are being received", retry_after_ms=RETRY_AFTER_MS
            )
        if (
            address is not None
            and self.per_address[address] >= app_settings.UPLOAD_BODIES_PER_ADDRESS_MAX
        ):
            return LimitExceeded(
                "Too many uploads are being received from your address",
                retry_after_ms=RETRY_AFTER_MS,
            )
        self.total += 1
        if address is not None:
            self.per_address[address] += 1
        return None

    def release(self, address: str | None) -> None:
        self.total -= 1
        if address is not None:
            self.per_address[address] -= 1
            if self.per_address[address] <= 0:
                del self.per_address[address]


class BodyPace:
    """The deadline of a body's next bytes, on the event loop's clock.

    A body may be silent for ``UPLOAD_IDLE_TIMEOUT_SECONDS``, and it has
    ``UPLOAD_RATE_GRACE_SECONDS`` plus one second per ``UPLOAD_MIN_BYTES_PER_SECOND`` bytes
    received to arrive (as Apache's mod_reqtimeout counts): a slow start is forgiven, and
    bytes that came fast earn time for a stall later, up to the idle timeout.
    """

    def __init__(self, now: float) -> None:
        self.idle = app_settings.UPLOAD_IDLE_TIMEOUT_SECONDS
        self.min_rate = app_settings.UPLOAD_MIN_BYTES_PER_SECOND
        self.grace = app_settings.UPLOAD_RATE_GRACE_SECONDS
        self.started = now
        self.last = now
        self.received = 0

    def arrived(self, size: int, now: float) -> None:
        if size:
            self.received += size
            self.last = now

    def paused(self, seconds: float) -> None:
        """This server stopped receiving for ``seconds`` (its store was slower than the
        client): that time is not the client's, and moves its deadlines on."""
        self.started += seconds
        self.last += seconds

    def _rate_deadline(self) -> float | None:
        if self.min_rate <= 0:
            return None
        return self.started + self.grace + self.received / self.min_rate

    def deadline(self) -> float:
        idle = self.last + self.idle
        rate = self._rate_deadline()
        return idle if rate is None else min(idle, rate)

    def error(self, now: float) -> BodyTooSlow:
        """The refusal of a body whose deadline passed."""
        if now >= self.last + self.idle:
            return BodyTooSlow(
                f"No bytes of the request body arrived for {self.idle:g} s; send it again"
            )
        return BodyTooSlow(
            f"The request body arrived at under {self.min_rate:g} bytes/s on average; send it again"
        )
