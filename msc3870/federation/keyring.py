"""Other servers' verify keys: fetched, checked, cached (Synapse's ``synapse/crypto/keyring.py``).

A server's keys come from its ``GET /_matrix/key/v2/server`` over HTTPS (through
``outbound``, so through the address guard), or first from the notaries in
``MSC3870["TRUSTED_KEY_SERVERS"]`` (``POST /_matrix/key/v2/query``), as Synapse asks its
``trusted_key_servers`` before the origin. An answer is used only if:

- its ``server_name`` is the server asked about;
- every signature it carries from that server by a key it lists verifies, and there is at
  least one (a notary's answer must also verify with one of the notary's configured keys);
- its ``valid_until_ts`` is in the future. It counts as at most seven days ahead, as the
  spec says, so a key published once cannot stay trusted forever.

Keys are cached (Django cache) for at most half of their remaining validity. Only
``verify_keys`` authenticate requests: ``old_verify_keys`` are for old events, not requests.
A server is asked again for a key it did not have at most once a minute, so requests naming
made-up key ids cannot turn this server into a traffic amplifier; a failed fetch is
remembered as long.

Fetching never holds the request plane (``KeyFetches``): each process runs at most one
fetch per server at a time, on a small pool of its own (``FEDERATION_KEY_FETCHES``
threads, no queue: a request that needs another server's keys while the pool is full is
refused), all of it (discovery, notaries, the server's own key server) within
``FEDERATION_KEY_FETCH_TIMEOUT_SECONDS``. A request that needs a fetch in flight either
waits for it in its thread (``get_verify_key(wait=True)``, for servers without the
request plane) or gets ``KeyFetchPending`` to hand to the server, which parks it
holding no thread and runs it again once the fetch is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from canonicaljson import encode_canonical_json
from django.core.cache import cache
from signedjson.key import (
    decode_verify_key_base64,
    encode_verify_key_base64,
    is_signing_algorithm_supported,
)
from signedjson.sign import SignatureVerifyException, verify_signed_json
from signedjson.types import VerifyKey

from ..conf import app_settings
from ..server_names import InvalidServerName
from . import discovery, keys, outbound

log = logging.getLogger(__name__)

MAX_VALIDITY_MS = 7 * 24 * 60 * 60 * 1000
REFETCH_AFTER_SECONDS = 60
# A redirect is not a key server's answer; its target would be unchecked.
FETCH_OPTIONS = outbound.Options(max_bytes=256 * 1024, timeout=10.0, allow_redirects=False)
# Keys known to be compromised, refused whoever publishes them (as Synapse does).
BANNED_VERIFY_KEYS = frozenset({"l/O9hxMVKB6Lg+3Hqf0FQQZhVESQcMzbPN1Cz2nM3og="})


class KeyLookupError(Exception):
    """No usable key: the server could not be asked, or its answer did not check out."""


class KeyFetchPending(Exception):
    """The server's keys are being fetched: ask again once ``future`` is done (at the
    latest at ``deadline``, a ``time.monotonic()`` value)."""

    def __init__(self, future: Future[None], deadline: float) -> None:
        super().__init__("key fetch in flight")
        self.future = future
        self.deadline = deadline


@dataclass(frozen=True)
class ServerKey:
    verify_key: VerifyKey
    valid_until_ts: int


def now_ms() -> int:
    return int(time.time() * 1000)


def _cache_key(kind: str, *parts: str) -> str:
    # Server names and key ids are remote input: hash them into a safe, short cache key.
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return f"msc3870:federation:{kind}:{digest}"


def check_server_keys(response: Any, server_name: str, now: int) -> dict[str, ServerKey]:
    """The verify keys of a Server Keys object, if it is ``server_name``'s, self-signed by
    every key it lists that signed it, and still valid. Raises KeyLookupError."""
    if not isinstance(response, dict):
        raise KeyLookupError("Key response is not a JSON object")
    if response.get("server_name") != server_name:
        raise KeyLookupError(
            f"Key response is for {response.get('server_name')!r}, not {server_name!r}"
        )
    valid_until = response.get("valid_until_ts")
    if not isinstance(valid_until, int) or isinstance(valid_until, bool):
        raise KeyLookupError(f"Key response of {server_name} has no valid_until_ts")
    if valid_until <= now:
        raise KeyLookupError(f"Keys of {server_name} expired at {valid_until}")
    valid_until = min(valid_until, now + MAX_VALIDITY_MS)

    listed = response.get("verify_keys")
    if not isinstance(listed, dict):
        raise KeyLookupError(f"Key response of {server_name} has no verify_keys")
    found: dict[str, ServerKey] = {}
    for key_id, key_data in listed.items():
        if not is_signing_algorithm_supported(key_id):
            continue  # an algorithm we cannot verify with; it cannot sign for us either
        try:
            algorithm, _, version = key_id.partition(":")
            verify_key = decode_verify_key_base64(algorithm, version, key_data["key"])
        except Exception as exc:
            raise KeyLookupError(f"Malformed key {key_id!r} of {server_name}: {exc}") from exc
        if encode_verify_key_base64(verify_key) in BANNED_VERIFY_KEYS:
            raise KeyLookupError(f"Key {key_id!r} of {server_name} is banned")
        found[key_id] = ServerKey(verify_key, valid_until)

    signatures = response.get("signatures")
    own = signatures.get(server_name) if isinstance(signatures, dict) else None
    signed_by = [key_id for key_id in own if key_id in found] if isinstance(own, dict) else []
    if not signed_by:
        raise KeyLookupError(f"Key response of {server_name} is not signed by its own keys")
    for key_id in signed_by:
        try:
            verify_signed_json(response, server_name, found[key_id].verify_key)
        except SignatureVerifyException as exc:
            raise KeyLookupError(f"Bad self-signature by {key_id} of {server_name}") from exc
    return found


def _get_json(method: str, url: str, body: Any | None = None, *, host: str | None = None) -> Any:
    headers = {"Accept": "application/json"}
    if host:
        headers["Host"] = host
    data = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = encode_canonical_json(body)
    try:
        response = outbound.request(method, url, headers=headers, data=data, options=FETCH_OPTIONS)
    except outbound.OutboundError as exc:
        raise KeyLookupError(f"{method} {url}: {exc}") from exc
    if response.status != 200:
        raise KeyLookupError(f"{method} {url} answered {response.status}")
    try:
        return json.loads(response.content)
    except ValueError as exc:
        raise KeyLookupError(f"{method} {url} did not answer JSON") from exc


def _ask(server_name: str, method: str, path: str, body: Any | None = None) -> Any:
    """A key request to ``server_name``, found as the spec says (well-known, SRV, 8448:
    msc3870.federation.discovery), like every other federation request."""
    try:
        destination = discovery.resolve(server_name)
    except (discovery.DiscoveryError, InvalidServerName) as exc:
        raise KeyLookupError(f"Cannot resolve {server_name}: {exc}") from exc
    with outbound.connect_to(destination.overrides()):
        return _get_json(method, destination.base_url + path, body, host=destination.host_header)


def fetch_direct(server_name: str, now: int) -> dict[str, ServerKey]:
    """The keys a server publishes itself."""
    return check_server_keys(_ask(server_name, "GET", "/_matrix/key/v2/server"), server_name, now)


def _notary_verify_keys(notary: dict[str, Any]) -> dict[str, VerifyKey]:
    result = {}
    for key_id, key_base64 in notary["verify_keys"].items():
        algorithm, _, version = key_id.partition(":")
        result[key_id] = decode_verify_key_base64(algorithm, version, key_base64)
    return result


def fetch_from_notary(
    notary: dict[str, Any], server_name: str, key_ids: list[str], now: int
) -> dict[str, ServerKey]:
    """A server's keys as a notary saw them (``POST /_matrix/key/v2/query``): each answer
    must be signed by one of the notary's configured keys and by the server itself."""
    notary_name = notary["server_name"]
    criteria = {key_id: {"minimum_valid_until_ts": now} for key_id in key_ids}
    answer = _ask(
        notary_name, "POST", "/_matrix/key/v2/query", {"server_keys": {server_name: criteria}}
    )
    entries = answer.get("server_keys") if isinstance(answer, dict) else None
    if not isinstance(entries, list):
        raise KeyLookupError(f"Notary {notary_name} answered no server_keys list")
    notary_keys = _notary_verify_keys(notary)
    found: dict[str, ServerKey] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("server_name") != server_name:
            continue
        by_notary = (entry.get("signatures") or {}).get(notary_name) or {}
        known = [key_id for key_id in by_notary if key_id in notary_keys]
        if not known:
            log.warning(
                "Notary %s answer for %s not signed by a known key", notary_name, server_name
            )
            continue
        try:
            for key_id in known:
                verify_signed_json(entry, notary_name, notary_keys[key_id])
            checked = check_server_keys(entry, server_name, now)
        except (SignatureVerifyException, KeyLookupError) as exc:
            log.warning("Notary %s answer for %s refused: %s", notary_name, server_name, exc)
            continue
        for key_id, key in checked.items():
            if key_id not in found or found[key_id].valid_until_ts < key.valid_until_ts:
                found[key_id] = key
    return found


def _remember(server_name: str, found: dict[str, ServerKey], now: int) -> None:
    for key_id, key in found.items():
        # At most half the remaining validity: a key the server drops is not trusted long.
        seconds = (key.valid_until_ts - now) // 2 // 1000
        if seconds >= 1:
            cache.set(
                _cache_key("key", server_name, key_id),
                (encode_verify_key_base64(key.verify_key), key.valid_until_ts),
                timeout=seconds,
            )


def _cached(server_name: str, key_id: str, now: int) -> VerifyKey | None:
    entry = cache.get(_cache_key("key", server_name, key_id))
    if entry is None:
        return None
    key_base64, valid_until = entry
    if valid_until <= now:
        return None
    algorithm, _, version = key_id.partition(":")
    return decode_verify_key_base64(algorithm, version, key_base64)


def get_verify_key(
    server_name: str, key_id: str, now: int | None = None, *, wait: bool = True
) -> VerifyKey:
    """The key ``key_id`` of ``server_name``, valid now. Raises KeyLookupError, or with
    ``wait=False`` KeyFetchPending while the server's keys are being fetched."""
    now = now_ms() if now is None else now
    if not is_signing_algorithm_supported(key_id):
        raise KeyLookupError(f"Unsupported key algorithm in {key_id!r}")
    if server_name == app_settings.SERVER_NAME:
        # Our own keys are on disk: no need to ask ourselves over HTTPS.
        local = keys.verify_keys().get(key_id)
        if local is None:
            raise KeyLookupError(f"{key_id} is not one of this server's keys")
        return local
    if (key := _cached(server_name, key_id, now)) is not None:
        return key
    if cache.get(_cache_key("fetched", server_name)):
        raise KeyLookupError(
            f"Key {key_id} of {server_name} unknown (its keys were fetched in the last minute)"
        )
    future, deadline = fetches.start(server_name, key_id)
    if not wait:
        raise KeyFetchPending(future, deadline)
    try:
        future.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout as exc:
        raise KeyLookupError(f"The key fetch of {server_name} took too long") from exc
    if (key := _cached(server_name, key_id, now_ms())) is not None:
        return key
    raise KeyLookupError(f"{server_name} has no key {key_id}")


class KeyFetches:
    """The key fetches of this process: at most one per server, on a pool of
    ``FEDERATION_KEY_FETCHES`` threads that never queues. Requests for other key ids of
    a server share the fetch started for the first (the server's own answer lists all its
    keys; a key it lacks is asked for again a minute later at the earliest)."""

    #: What a waiter allows beyond the fetch's own deadline before giving up on it.
    SLACK_SECONDS = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, tuple[Future[None], float]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._idle = threading.Condition(self._lock)

    def start(self, server_name: str, key_id: str) -> tuple[Future[None], float]:
        """The fetch of ``server_name``'s keys in flight, started if none is, and the
        time by which it ends. Raises KeyLookupError when the pool is full."""
        with self._lock:
            running = self._running.get(server_name)
            if running is not None:
                return running
            size = app_settings.FEDERATION_KEY_FETCHES
            if len(self._running) >= size:
                raise KeyLookupError(
                    f"Not fetching the keys of {server_name}: {size} key fetches in flight"
                )
            if self._pool is None or self._pool._max_workers < size:
                self._pool = ThreadPoolExecutor(size, thread_name_prefix="msc3870-keys")
            timeout = app_settings.FEDERATION_KEY_FETCH_TIMEOUT_SECONDS
            deadline = time.monotonic() + timeout + self.SLACK_SECONDS
            future = self._pool.submit(self._run, server_name, key_id, timeout)
            self._running[server_name] = (future, deadline)
        future.add_done_callback(lambda _done: self._forget(server_name))
        return future, deadline

    def _forget(self, server_name: str) -> None:
        with self._lock:
            self._running.pop(server_name, None)
            self._idle.notify_all()

    @staticmethod
    def _run(server_name: str, key_id: str, timeout: float) -> None:
        """Everything the keys take, within one deadline; what checks out is cached, and
        the attempt is remembered either way (``REFETCH_AFTER_SECONDS``)."""
        try:
            with outbound.deadline(timeout):
                _fetch(server_name, key_id, now_ms())
        except KeyLookupError as exc:
            log.info("Key fetch of %s failed: %s", server_name, exc)
        except Exception:
            log.exception("Key fetch of %s failed", server_name)
        finally:
            cache.set(_cache_key("fetched", server_name), True, timeout=REFETCH_AFTER_SECONDS)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._running)

    def wait_idle(self, timeout: float) -> bool:
        """Until no fetch is in flight (tests, shutdown); whether that happened in time."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._running, timeout)


fetches = KeyFetches()


def _fetch(server_name: str, key_id: str, now: int) -> dict[str, ServerKey]:
    """Notaries first, then the server itself if none had the key; what checks out is
    cached even when the key asked for is not among it."""
    found: dict[str, ServerKey] = {}
    for notary in app_settings.TRUSTED_KEY_SERVERS:
        try:
            found.update(fetch_from_notary(notary, server_name, [key_id], now))
        except KeyLookupError as exc:
            log.warning("Key lookup of %s through %s failed: %s", server_name, notary, exc)
        if key_id in found:
            break
    try:
        if key_id not in found:
            try:
                found.update(fetch_direct(server_name, now))
            except KeyLookupError as exc:
                raise KeyLookupError(f"Keys of {server_name} could not be fetched: {exc}") from exc
    finally:
        _remember(server_name, found, now)
    return found
