"""Who is calling: access token -> Matrix user id.

The resolver is pluggable (``MSC3870["TOKEN_RESOLVER"]``). Two are built in:
``LocalTokenResolver`` (tokens minted by ``manage.py create_access_token``) and
``HomeserverTokenResolver`` (ask the homeserver's ``/account/whoami``, cached briefly).
Application services masquerade with ``?user_id=``; the resolver decides whether the token
may do that, and the identity returned is the masqueraded user.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import quote

import requests
from django.core.cache import cache
from django.utils import timezone
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from .conf import app_settings
from .errors import (
    Codes,
    Forbidden,
    HomeserverUnavailable,
    InvalidParam,
    LimitExceeded,
    MatrixError,
    UnknownToken,
)
from .models import AccessToken, digest_token
from .server_names import is_valid_server_name

# Matrix user ids: @localpart:server_name (historical localparts allowed, no whitespace,
# no colon). The server name is the spec's grammar (msc3870.server_names) and no looser:
# with a lax server part, ``@x:evil.example:localhost`` would pass for a user of
# ``localhost`` under a namespace like ``@.*:localhost``.
LOCALPART_RE = re.compile(r"[\x21-\x39\x3b-\x7e]+")
# A server name no pattern can mean on purpose (RFC 6761): a namespace that matches a user
# of this server also matches the same localpart here only if its server part is a
# wildcard, and then it does not name other servers.
_PROBE_SERVER = "server.invalid"


@dataclass(frozen=True)
class MatrixUser:
    """The authenticated caller, as DRF's ``request.user``."""

    user_id: str
    device_id: str | None = None
    is_appservice: bool = False
    is_guest: bool = False

    is_authenticated: ClassVar[bool] = True
    is_anonymous: ClassVar[bool] = False

    def __str__(self) -> str:
        return self.user_id


def validate_user_id(user_id: str) -> str:
    localpart, colon, server_name = user_id[1:].partition(":")
    if (
        len(user_id) > 255
        or not user_id.startswith("@")
        or not colon
        or not LOCALPART_RE.fullmatch(localpart)
        or not is_valid_server_name(server_name)
    ):
        raise InvalidParam(f"{user_id!r} is not a Matrix user id")
    return user_id


def is_user_id(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        validate_user_id(value)
    except InvalidParam:
        return False
    return True


def local_namespace(server_name: str) -> str:
    """The default namespace of an application-service token: this server's users only."""
    return "@[^:]+:" + re.escape(server_name)


def namespace_allows(pattern: str, user_id: str, server_name: str) -> bool:
    """Whether an application-service token with namespace ``pattern`` may act as
    ``user_id`` (already validated).

    An empty pattern allows nobody (tokens minted before namespaces were required had
    one, and meant "anyone on any server"). The pattern must match the whole user id, and
    a user of another server is allowed only if the pattern names that server: one that
    matches the same localpart on any server (``@bridge_.*``) is held to this server.
    """
    if not pattern:
        return False
    try:
        if not re.fullmatch(pattern, user_id):
            return False
        localpart, _, user_server = user_id.partition(":")
        if user_server == server_name:
            return True
        return re.fullmatch(pattern, f"{localpart}:{_PROBE_SERVER}") is None
    except re.error:
        return False  # a pattern edited into the database by hand: refuse, do not 500


class TokenResolver:
    """Interface of a token resolver. Raise ``UnknownToken``/``Forbidden`` to refuse."""

    def resolve(
        self, token: str, *, masquerade_as: str | None = None, device_id: str | None = None
    ) -> MatrixUser:
        raise NotImplementedError

    def resolve_cached(
        self, token: str, *, masquerade_as: str | None = None, device_id: str | None = None
    ) -> MatrixUser | None:
        """``resolve``'s answer if this process holds it (a user, or a refusal raised),
        with no I/O, so callable on an event loop; None: ask ``resolve``."""
        return None

    def is_homeserver_admin(self, token: str, user: MatrixUser) -> bool:
        """Whether the homeserver counts ``user``, who sent ``token``, as one of its
        admins. False where there is no homeserver to ask."""
        return False


class ProcessCache:
    """A small per-process cache of resolved tokens (no network, no lock: a dict read is
    atomic). Entries live ``TOKEN_CACHE_SECONDS``: a revoked token stops working at most
    that much later. Bounded: when full, the oldest half is dropped."""

    MAX_ENTRIES = 20_000

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, Any]] = {}

    def get(self, key: str) -> Any:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Keep ``value`` for ``TOKEN_CACHE_SECONDS``, or less when ``ttl`` says so."""
        ttl = min(app_settings.TOKEN_CACHE_SECONDS, ttl if ttl is not None else math.inf)
        if ttl <= 0:
            return
        if len(self._entries) >= self.MAX_ENTRIES:
            for stale in list(self._entries)[: self.MAX_ENTRIES // 2]:
                self._entries.pop(stale, None)
        self._entries[key] = (time.monotonic() + ttl, value)

    def clear(self) -> None:
        self._entries.clear()


token_cache = ProcessCache()


@dataclass(frozen=True)
class _LocalToken:
    pk: int
    user_id: str
    is_appservice: bool
    masquerade_regex: str
    expires_at: datetime | None


class LocalTokenResolver(TokenResolver):
    # Writing last_used_at on every request would turn every read into a write.
    LAST_USED_RESOLUTION = timedelta(minutes=5)

    def _lookup(self, token: str) -> _LocalToken:
        digest = digest_token(token)
        cached = token_cache.get("local:" + digest)
        if cached is not None:
            return cached
        row = AccessToken.objects.filter(token_digest=digest).first()
        if row is None or not row.is_usable():
            raise UnknownToken()
        now = timezone.now()
        if row.last_used_at is None or now - row.last_used_at > self.LAST_USED_RESOLUTION:
            AccessToken.objects.filter(pk=row.pk).update(last_used_at=now)
        found = _LocalToken(
            row.pk, row.user_id, row.is_appservice, row.masquerade_regex, row.expires_at
        )
        token_cache.set("local:" + digest, found)
        return found

    def resolve(
        self, token: str, *, masquerade_as: str | None = None, device_id: str | None = None
    ) -> MatrixUser:
        return self._as_user(self._lookup(token), masquerade_as, device_id)

    def resolve_cached(
        self, token: str, *, masquerade_as: str | None = None, device_id: str | None = None
    ) -> MatrixUser | None:
        row = token_cache.get("local:" + digest_token(token))
        return None if row is None else self._as_user(row, masquerade_as, device_id)

    def _as_user(
        self, row: _LocalToken, masquerade_as: str | None, device_id: str | None
    ) -> MatrixUser:
        if row.expires_at is not None and row.expires_at <= timezone.now():
            raise UnknownToken()
        if masquerade_as and masquerade_as != row.user_id:
            if not row.is_appservice:
                raise Forbidden("Only application service tokens may act as another user")
            validate_user_id(masquerade_as)
            if not namespace_allows(row.masquerade_regex, masquerade_as, app_settings.SERVER_NAME):
                raise Forbidden("Application service cannot masquerade as this user")
            return MatrixUser(masquerade_as, device_id, is_appservice=True)
        return MatrixUser(row.user_id, device_id, is_appservice=row.is_appservice)


_http = requests.Session()

_slots_lock = threading.Lock()
_slots: tuple[int, threading.BoundedSemaphore] | None = None


def _whoami_slots(size: int) -> threading.BoundedSemaphore:
    """The per-process semaphore of whoami calls in flight (made again if the cap changes;
    holders of the old one release the old one)."""
    global _slots
    with _slots_lock:
        if _slots is None or _slots[0] != size:
            _slots = (size, threading.BoundedSemaphore(size))
        return _slots[1]


class HomeserverTokenResolver(TokenResolver):
    """Ask the homeserver who a token belongs to, as matrix-media-repo does.

    Answers are cached: a user for ``WHOAMI_CACHE_SECONDS``, a refusal (401/403) for
    ``NEGATIVE_CACHE_SECONDS``, so a client retrying a dead token, or someone trying
    tokens, costs the homeserver one call per token per few seconds. Errors of the
    homeserver itself (5xx, 429, unreachable) are never cached. At most
    ``MAX_CONCURRENT_WHOAMI`` calls are in flight per process: each can hold a thread for
    the whole ``TIMEOUT``; a request that finds no slot within ``WHOAMI_SLOT_WAIT_SECONDS``
    is answered 429 ``M_LIMIT_EXCEEDED`` (retry_after_ms, Retry-After), so that clients
    back off and keep their session, where a 502 would read as a broken server.
    Subclass to change these (``MSC3870["TOKEN_RESOLVER"]``).
    """

    TIMEOUT = (3.05, 10)
    NEGATIVE_CACHE_SECONDS = 5.0
    MAX_CONCURRENT_WHOAMI = 4
    WHOAMI_SLOT_WAIT_SECONDS = 2.0
    BUSY_RETRY_AFTER_MS = 1000

    def resolve(
        self, token: str, *, masquerade_as: str | None = None, device_id: str | None = None
    ) -> MatrixUser:
        base = app_settings.HOMESERVER_URL
        if not base:
            raise HomeserverUnavailable("MSC3870['HOMESERVER_URL'] is not set")
        cache_key = self._cache_key(token, masquerade_as, device_id)
        cached = self._cached(cache_key)
        if cached is not None:
            return cached
        slots = _whoami_slots(self.MAX_CONCURRENT_WHOAMI)
        if not slots.acquire(timeout=self.WHOAMI_SLOT_WAIT_SECONDS):
            raise LimitExceeded(
                "Too many access tokens are being checked with the homeserver; retry",
                retry_after_ms=self.BUSY_RETRY_AFTER_MS,
            )
        try:
            # Requests with the same token that waited for a slot find the first one's
            # answer here instead of asking again.
            cached = self._cached(cache_key)
            if cached is not None:
                return cached
            return self._whoami(base, token, cache_key, masquerade_as, device_id)
        finally:
            slots.release()

    def resolve_cached(
        self, token: str, *, masquerade_as: str | None = None, device_id: str | None = None
    ) -> MatrixUser | None:
        # The process's own cache only: the shared one may be over the network (Redis).
        return self._cached(self._cache_key(token, masquerade_as, device_id), shared=False)

    @staticmethod
    def _cache_key(token: str, masquerade_as: str | None, device_id: str | None) -> str:
        joined = "\0".join((token, masquerade_as or "", device_id or ""))
        return "msc3870:whoami:" + hashlib.sha256(joined.encode()).hexdigest()

    def _cached(self, cache_key: str, *, shared: bool = True) -> MatrixUser | None:
        """The cached answer: the user, or the homeserver's refusal raised again."""
        cached = token_cache.get(cache_key) or (cache.get(cache_key) if shared else None)
        if cached is None:
            return None
        if "refused" in cached:
            raise _homeserver_refusal(cached["refused"], cached["body"])
        token_cache.set(cache_key, cached)
        return MatrixUser(**cached)

    def _whoami(
        self,
        base: str,
        token: str,
        cache_key: str,
        masquerade_as: str | None,
        device_id: str | None,
    ) -> MatrixUser:
        params: dict[str, str] = {}
        if masquerade_as:
            params["user_id"] = masquerade_as
        if device_id:
            params["device_id"] = device_id
        try:
            response = _http.get(
                f"{base}/_matrix/client/v3/account/whoami",
                headers={"Authorization": f"Bearer {token}"},
                params=params,
                timeout=self.TIMEOUT,
            )
        except requests.RequestException as exc:
            raise HomeserverUnavailable(f"Homeserver unreachable: {type(exc).__name__}") from exc
        body = _json_or_empty(response)
        if response.status_code == 200 and isinstance(body.get("user_id"), str):
            user = {
                "user_id": body["user_id"],
                "device_id": body.get("device_id") or device_id,
                # The homeserver decides whether ?user_id= was honoured, not the caller.
                "is_appservice": bool(masquerade_as) and body["user_id"] == masquerade_as,
                "is_guest": bool(body.get("is_guest")),
            }
            cache.set(cache_key, user, app_settings.WHOAMI_CACHE_SECONDS)
            token_cache.set(cache_key, user)
            return MatrixUser(**user)
        if response.status_code in (401, 403) and self.NEGATIVE_CACHE_SECONDS > 0:
            # Only the homeserver's verdict on this token; the body is kept so that the
            # cached refusal reads the same (errcode, soft_logout).
            kept = {k: body[k] for k in ("errcode", "soft_logout") if k in body}
            kept["error"] = str(body.get("error") or "")[:500]
            refused = {"refused": response.status_code, "body": kept}
            cache.set(cache_key, refused, self.NEGATIVE_CACHE_SECONDS)
            token_cache.set(cache_key, refused, self.NEGATIVE_CACHE_SECONDS)
        raise _homeserver_refusal(response.status_code, body)

    def is_homeserver_admin(self, token: str, user: MatrixUser) -> bool:
        """Synapse's ``GET /_synapse/admin/v1/users/{user_id}/admin``, asked with the
        caller's own token: Synapse answers it (``{"admin": true}``) only to its admins,
        and refuses everyone else (403). A homeserver without that endpoint (404, 400)
        has no admins here. Answers are cached ``ADMIN_CACHE_SECONDS``; the homeserver's
        own errors (5xx, 429, unreachable) are not, and no decision is made on them."""
        base = app_settings.HOMESERVER_URL
        if not base:
            return False
        key = "msc3870:admin:" + hashlib.sha256(f"{token}\0{user.user_id}".encode()).hexdigest()
        cached = token_cache.get(key) or cache.get(key)
        if cached is not None:
            token_cache.set(key, cached, app_settings.ADMIN_CACHE_SECONDS)
            return bool(cached["admin"])
        slots = _whoami_slots(self.MAX_CONCURRENT_WHOAMI)
        if not slots.acquire(timeout=self.WHOAMI_SLOT_WAIT_SECONDS):
            raise LimitExceeded(
                "Too many requests are being checked with the homeserver; retry",
                retry_after_ms=self.BUSY_RETRY_AFTER_MS,
            )
        try:
            response = _http.get(
                f"{base}/_synapse/admin/v1/users/{quote(user.user_id, safe='@:')}/admin",
                headers={"Authorization": f"Bearer {token}"},
                timeout=self.TIMEOUT,
            )
        except requests.RequestException as exc:
            raise HomeserverUnavailable(f"Homeserver unreachable: {type(exc).__name__}") from exc
        finally:
            slots.release()
        if response.status_code == 200:
            admin = _json_or_empty(response).get("admin") is True
        elif response.status_code in (400, 401, 403, 404, 405):
            admin = False
        else:
            raise HomeserverUnavailable(
                f"Homeserver answered {response.status_code} to the admin check"
            )
        answer = {"admin": admin}
        cache.set(key, answer, app_settings.ADMIN_CACHE_SECONDS)
        token_cache.set(key, answer, app_settings.ADMIN_CACHE_SECONDS)
        return admin


def _homeserver_refusal(status: int, body: dict[str, Any]) -> MatrixError:
    """The homeserver's own refusal, passed on: its errcode (M_USER_LOCKED, ...), and
    ``soft_logout`` so a client keeps its session and keys where it may refresh."""
    message = str(body.get("error") or "") or None
    errcode = body.get("errcode")
    extra = {"soft_logout": body["soft_logout"]} if "soft_logout" in body else {}
    if status == 429:
        return LimitExceeded(message, retry_after_ms=body.get("retry_after_ms", 1000))
    if status in (401, 403):
        error: MatrixError = (UnknownToken if status == 401 else Forbidden)(message, **extra)
        if Codes.in_spec_namespace(errcode):
            error.errcode = errcode
        return error
    return HomeserverUnavailable(f"Homeserver answered {status} to whoami")


def _json_or_empty(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def get_resolver() -> TokenResolver:
    return app_settings.TOKEN_RESOLVER()


def is_admin(user: MatrixUser, token: str | None) -> bool:
    """Whether ``user`` (who sent ``token``) may use the admin API: listed in ``ADMINS``,
    or an admin of the homeserver (``HOMESERVER_ADMINS``). Never an application service's
    identity, masqueraded or its own (a namespace that matched an admin would make the
    bridge one), nor a guest."""
    if user.is_appservice or user.is_guest:
        return False
    if user.user_id in app_settings.ADMINS:
        return True
    if token is None or not app_settings.HOMESERVER_ADMINS:
        return False
    return get_resolver().is_homeserver_admin(token, user)


def token_from(authorization: str, query: Mapping[str, str]) -> str | None:
    """The access token of a request: ``Authorization: Bearer``, else the ``access_token``
    query parameter (deprecated by the spec, but still accepted, never required)."""
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return query.get("access_token") or None


def token_from_request(request: Request) -> str | None:
    return token_from(request.META.get("HTTP_AUTHORIZATION", ""), request.query_params)


class MatrixTokenAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[MatrixUser, str] | None:
        token = token_from_request(request)
        if token is None:
            return None
        user = get_resolver().resolve(
            token,
            masquerade_as=request.query_params.get("user_id") or None,
            device_id=request.query_params.get("device_id") or None,
        )
        return user, token

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="matrix"'
