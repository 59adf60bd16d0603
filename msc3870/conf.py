"""The app's one settings object.

Everything is read from the ``MSC3870`` dict in Django settings on every access (so
``override_settings`` works in tests); defaults live in ``DEFAULTS``. Import strings are
resolved lazily and errors name the setting.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

MiB = 1024 * 1024

DEFAULTS: dict[str, Any] = {
    # The server name in mxc:// ids. Media of other servers is never served from here.
    "SERVER_NAME": "localhost",
    # This server's public base URL: absolute upload URLs and Location headers.
    "PUBLIC_BASEURL": "http://127.0.0.1:8008",
    # Largest accepted upload, in bytes.
    "MAX_UPLOAD_SIZE": 50 * MiB,
    # Seconds a created media id waits for its upload (MSC2246 recommends 24 h).
    "UNUSED_EXPIRATION": 24 * 60 * 60,
    # Media ids a user may hold in the pending state at once.
    "MAX_PENDING_UPLOADS": 5,
    # Rate of /create per user, DRF syntax ("N/s", "N/min", "N/hour", "N/day"); None = off.
    "CREATE_RATE": "60/min",
    # Alias in Django's STORAGES of the storage media bytes live in.
    "STORAGE_ALIAS": "msc3870",
    # Callable (import string) turning an access token into a Matrix user id.
    "TOKEN_RESOLVER": "msc3870.auth.LocalTokenResolver",
    # Homeserver asked by msc3870.auth.HomeserverTokenResolver (/account/whoami).
    "HOMESERVER_URL": None,
    # Seconds a successful whoami answer is cached: a logged-out token works this long.
    "WHOAMI_CACHE_SECONDS": 15,
    # Seconds /complete and the upload PUT wait for the post-upload checks to decide.
    "COMPLETE_WAIT_SECONDS": 20,
    # False: /complete (MSC3870) answers once what needs only metadata or a ranged read is
    # decided (the object exists, its size, its sniffed type); the full-object checks
    # (SHA-256, block list, virus scan) go on after the answer while downloads wait; a
    # later rejection makes them 404 (the uploader's retried /complete says why). True:
    # /complete waits for the verdict.
    "COMPLETE_WAITS_FOR_CHECKS": False,
    # Download wait for media that is not uploaded yet (ms): default and cap.
    "DOWNLOAD_TIMEOUT_MS": 20_000,
    "DOWNLOAD_TIMEOUT_MS_MAX": 60_000,
    # Unauthenticated (legacy /_matrix/media/v3) downloads wait at most this long (ms).
    "LEGACY_DOWNLOAD_TIMEOUT_MS_MAX": 10_000,
    # Media created after this time (a timezone-aware datetime, or an ISO 8601 string with
    # a time zone) is not served by the unauthenticated /_matrix/media/v3 endpoints: 404
    # M_NOT_FOUND, as Synapse answers for media stored once authenticated media is on
    # (MSC3916). None: off. Off by default while other servers reach our media only
    # through those endpoints (there are no federation media endpoints yet).
    "LEGACY_MEDIA_FREEZE_AFTER": None,
    # Requests waiting on media (downloads of pending media, /complete and PUTs waiting
    # for the checks) per process, per media id, and unauthenticated ones per process.
    # Past a cap the answer is an immediate 429 M_LIMIT_EXCEEDED, never a queue.
    "WAIT_MAX_WAITERS": 10_000,
    "WAIT_MAX_WAITERS_PER_MEDIA": 5_000,
    "LEGACY_WAIT_MAX_WAITERS": 500,
    # Requests one requester (a Matrix user, or the address of an unauthenticated client
    # or of a server whose keys are being fetched) may have waiting per process.
    "WAIT_MAX_WAITERS_PER_REQUESTER": 200,
    # Upload bodies being read (msc3870/admission.py), per process and per client address
    # (an IPv6 client by its /64): past a cap, 429 M_LIMIT_EXCEEDED before a byte is read.
    # Raise the per-address cap where many clients share one address (carrier NAT).
    "UPLOAD_BODIES_MAX": 64,
    "UPLOAD_BODIES_PER_ADDRESS_MAX": 8,
    # A request body silent for UPLOAD_IDLE_TIMEOUT_SECONDS, or slower on average than
    # UPLOAD_MIN_BYTES_PER_SECOND once UPLOAD_RATE_GRACE_SECONDS have passed, is dropped
    # with 408. Low enough for a slow mobile link: GPRS at its worst sends 2 KiB/s, a
    # radio waking up or a handover stalls for seconds, a tunnel for tens of seconds.
    # 0 bytes/s turns the rate check off (the idle timeout stays).
    "UPLOAD_MIN_BYTES_PER_SECOND": 1024,
    "UPLOAD_RATE_GRACE_SECONDS": 30,
    "UPLOAD_IDLE_TIMEOUT_SECONDS": 60,
    # Wake-up hub (msc3870/wakeup.py): the batched poll's interval where it is the only
    # source (SQLite), the safety poll's behind PostgreSQL LISTEN, and whether to LISTEN.
    "WAKEUP_POLL_SECONDS": 0.05,
    "WAKEUP_SAFETY_POLL_SECONDS": 2.0,
    "WAKEUP_LISTEN": True,
    # Redis URL for wake-ups across processes where the database cannot LISTEN (None: off).
    "WAKEUP_REDIS_URL": None,
    # Seconds a resolved access token is trusted per process: a revoked token (or a
    # logged-out one, with a homeserver) stops working at most this much later.
    "TOKEN_CACHE_SECONDS": 10,
    # Post-upload checks, run in order on the bytes that will be served.
    "CHECKS": [
        "msc3870.screening.check_size",
        "msc3870.screening.check_content_type",
        "msc3870.screening.check_sha256",
        "msc3870.screening.check_not_blocked",
        "msc3870.screening.check_user_quota",
        "msc3870.screening.check_clamav",
    ],
    # Which uploads check_sha256 hashes: "needed" (only content other media could share:
    # the same size and first 8 KiB; deduplication and the block list still find every
    # twin, since identical bytes share both) or "always".
    "SHA256_WHEN": "needed",
    # Bytes of live media a user may hold (None = no quota).
    "USER_QUOTA_BYTES": None,
    # clamd to scan uploads with: "tcp://host:3310" or "unix:///run/clamav/clamd.ctl".
    "CLAMAV_URL": None,
    "CLAMAV_TIMEOUT_SECONDS": 60,
    # Thumbnails: largest source (bytes) and image (pixels) that will be decoded.
    "THUMBNAIL_MAX_SOURCE_BYTES": 20 * MiB,
    "THUMBNAIL_MAX_PIXELS": 32_000_000,
    # Memory one render may decode into, from the header before decoding (192 MiB: a 32 Mpx
    # PNG takes 122 MiB, a 12 Mpx WebP 183 MiB); renders at once per process; seconds a
    # request waits for its turn before 429 M_LIMIT_EXCEEDED. Peak per process is about
    # CONCURRENT_RENDERS x (MAX_DECODED_BYTES + MAX_SOURCE_BYTES).
    "THUMBNAIL_MAX_DECODED_BYTES": 192 * MiB,
    "THUMBNAIL_CONCURRENT_RENDERS": 2,
    "THUMBNAIL_RENDER_WAIT_SECONDS": 5.0,
    # Days tombstones (expired, purged, rejected by checks) are kept; None = forever.
    "TOMBSTONE_RETENTION_DAYS": 30,
    # Content types (globs, matched against the type sniffed from the bytes, or the declared
    # one when the bytes are not recognised) that may be stored, and those refused.
    "ALLOWED_CONTENT_TYPES": ["*"],
    "DENIED_CONTENT_TYPES": [],
    # When the declared type contradicts the bytes: "sniffed" serves the sniffed type,
    # "reject" refuses the upload, "declared" keeps what the client said.
    "TYPE_MISMATCH": "sniffed",
    # Redirect authenticated (v1) downloads to signed storage URLs where the storage can.
    "REDIRECT_DOWNLOADS": False,
    # Lifetime in seconds of signed download URLs.
    "DOWNLOAD_URL_LIFETIME": 300,
    # Seconds in PROCESSING after which screening is assumed lost and queued again.
    "STUCK_AFTER_SECONDS": 300,
    # Separate endpoint for URLs handed to clients (CDN, transfer acceleration); None = same.
    "S3_PUBLIC_ENDPOINT_URL": None,
    # Ask S3 for the SHA-256 of the server-side copy (CopyObject ChecksumAlgorithm=SHA256):
    # where the store returns it (AWS), the bytes are never read back to hash them.
    "S3_COPY_CHECKSUM": True,
    # Copies above this many bytes are multipart (parallel UploadPartCopy); S3 copies at
    # most 5 GiB in one request. Parts of S3_COPY_PART_SIZE, S3_COPY_CONCURRENCY at once.
    "S3_COPY_PART_THRESHOLD": 5 * 1024 * 1024 * 1024,
    "S3_COPY_PART_SIZE": 512 * 1024 * 1024,
    "S3_COPY_CONCURRENCY": 4,
    # Days after which the bucket's lifecycle rule (ensure_media_bucket) expires objects
    # under incoming/ (a second line of defence behind the expiry sweeps); None: one day
    # more than UNUSED_EXPIRATION.
    "S3_INCOMING_EXPIRATION_DAYS": None,
    # Federation. This server's Ed25519 signing key file (Synapse's format); made on first
    # use if missing. None: federation is off until a path is set.
    "SIGNING_KEY_PATH": None,
    # valid_until_ts of our /_matrix/key/v2/server answer: how long others may cache it.
    "SIGNING_KEY_VALIDITY_SECONDS": 24 * 60 * 60,
    # Notaries asked for other servers' keys before the servers themselves, as Synapse's
    # trusted_key_servers: [{"server_name": "matrix.org", "verify_keys": {"ed25519:auto":
    # "<base64>"}}]. Their answers must be signed by one of the listed keys.
    "TRUSTED_KEY_SERVERS": [],
    # Outbound requests (keys, remote media) never reach these addresses (CIDRs), unless
    # FEDERATION_IP_RANGE_ALLOWLIST holds them (as Synapse's ip_range_blacklist/whitelist).
    # None: the built-in list of private, loopback, link-local, multicast and reserved ranges.
    "FEDERATION_IP_RANGE_DENYLIST": None,
    "FEDERATION_IP_RANGE_ALLOWLIST": [],
    # Verify other servers' TLS certificates (turn off only in tests).
    "FEDERATION_VERIFY_TLS": True,
    # Rate of federation media requests (download and thumbnail together) per origin
    # server, DRF syntax, as a leaky bucket (bursts of N); None = off.
    "FEDERATION_MEDIA_RATE": "600/min",
    # Failed X-Matrix authentications per client address, DRF syntax, as a leaky bucket;
    # past it the address's federation requests are refused (429) before any work.
    "FEDERATION_AUTH_FAILURE_RATE": "30/min",
    # Federation requests in flight (waiting included) per client address per process;
    # past it, an immediate 429 from the event loop, before any thread is involved.
    "FEDERATION_REQUESTS_PER_ADDRESS": 50,
    # Fetches of other servers' keys in flight per process (one per origin at most; past
    # it, a request needing another origin's keys is refused with 401), and the time one
    # fetch may take in all: discovery, notaries, the origin's own key server.
    "FEDERATION_KEY_FETCHES": 4,
    "FEDERATION_KEY_FETCH_TIMEOUT_SECONDS": 20,
    # Other servers' media, fetched when a client asks for it (needs SIGNING_KEY_PATH): a
    # failed fetch (unreachable, unknown, too large) is answered from the row this long,
    # then tried again; one fetch may take this long in all (discovery, redirects, bytes).
    "FETCH_REMOTE_MEDIA": True,
    "REMOTE_MEDIA_FAILURE_SECONDS": 60,
    "REMOTE_MEDIA_TIMEOUT_SECONDS": 120,
    # Bytes of other servers' media each user may have fetched, as Synapse's
    # remote_media_download_per_second and _burst_count: a leaky bucket of BURST_COUNT
    # bytes drained at PER_SECOND. A user whose bucket is full gets 429 before a new fetch
    # starts; a fetch's bytes are counted once they have arrived. Media already held costs
    # nothing, nor does waiting for a fetch another user started. PER_SECOND None: off.
    "REMOTE_MEDIA_DOWNLOAD_PER_SECOND": 87 * 1024,
    "REMOTE_MEDIA_DOWNLOAD_BURST_COUNT": 500 * MiB,
    # Fetches of other servers' media in flight across the deployment; a request that
    # would start one more gets 429 M_LIMIT_EXCEEDED with a retry time, never a queue.
    "REMOTE_MEDIA_MAX_FETCHES": 64,
    # Bytes of other servers' media kept; past it the least recently served are deleted
    # (the next request fetches them again) down to 90 % of it. None: no bound.
    "REMOTE_MEDIA_CACHE_MAX_BYTES": 10 * 1024 * MiB,
    # Health check (GET /health, msc3870/health.py): the components checked ("broker" only
    # where one is configured; drop "beat" or "broker" to keep a load balancer from taking
    # web processes out for them), how long a probe's result is reused, how long an answer
    # waits for a probe (a probe running longer makes its component down), and how old
    # the periodic scheduler's last tick may be.
    "HEALTH_COMPONENTS": ["database", "storage", "broker", "beat"],
    "HEALTH_CACHE_SECONDS": 2.0,
    "HEALTH_TIMEOUT_SECONDS": 2.0,
    "HEALTH_BEAT_MAX_AGE_SECONDS": 60,
    # Prometheus metrics (GET /metrics, msc3870/metrics.py): the local port they are served
    # on (a listener of their own, never the public one; None: not served), and the client
    # networks (CIDRs) that may read them there.
    "METRICS_PORT": None,
    "METRICS_ALLOWED_NETWORKS": ["127.0.0.0/8", "::1/128"],
}

TYPE_MISMATCH_POLICIES = ("sniffed", "reject", "declared")
SHA256_WHEN_CHOICES = ("needed", "always")


class MSC3870Settings:
    """Typed view of ``settings.MSC3870``, read on every access."""

    def _get(self, name: str) -> Any:
        user = getattr(settings, "MSC3870", {}) or {}
        if not isinstance(user, dict):
            raise ImproperlyConfigured("MSC3870 must be a dict.")
        return user.get(name, DEFAULTS[name])

    def _import(self, name: str) -> Any:
        path = self._get(name)
        try:
            return import_string(path)
        except ImportError as exc:
            raise ImproperlyConfigured(
                f"MSC3870[{name!r}] = {path!r} could not be imported: {exc}"
            ) from exc

    @property
    def SERVER_NAME(self) -> str:
        return str(self._get("SERVER_NAME"))

    @property
    def PUBLIC_BASEURL(self) -> str:
        return str(self._get("PUBLIC_BASEURL")).rstrip("/")

    @property
    def MAX_UPLOAD_SIZE(self) -> int:
        return int(self._get("MAX_UPLOAD_SIZE"))

    @property
    def UNUSED_EXPIRATION(self) -> int:
        return int(self._get("UNUSED_EXPIRATION"))

    @property
    def MAX_PENDING_UPLOADS(self) -> int:
        return int(self._get("MAX_PENDING_UPLOADS"))

    @property
    def CREATE_RATE(self) -> str | None:
        return self._get("CREATE_RATE")

    @property
    def STORAGE_ALIAS(self) -> str:
        return str(self._get("STORAGE_ALIAS"))

    @property
    def TOKEN_RESOLVER(self) -> Callable[..., Any]:
        return self._import("TOKEN_RESOLVER")

    @property
    def HOMESERVER_URL(self) -> str | None:
        url = self._get("HOMESERVER_URL")
        return url.rstrip("/") if url else None

    @property
    def WHOAMI_CACHE_SECONDS(self) -> int:
        return int(self._get("WHOAMI_CACHE_SECONDS"))

    @property
    def COMPLETE_WAIT_SECONDS(self) -> float:
        return float(self._get("COMPLETE_WAIT_SECONDS"))

    @property
    def DOWNLOAD_TIMEOUT_MS(self) -> int:
        return int(self._get("DOWNLOAD_TIMEOUT_MS"))

    @property
    def DOWNLOAD_TIMEOUT_MS_MAX(self) -> int:
        return int(self._get("DOWNLOAD_TIMEOUT_MS_MAX"))

    @property
    def LEGACY_DOWNLOAD_TIMEOUT_MS_MAX(self) -> int:
        return int(self._get("LEGACY_DOWNLOAD_TIMEOUT_MS_MAX"))

    @property
    def WAIT_MAX_WAITERS(self) -> int:
        return int(self._get("WAIT_MAX_WAITERS"))

    @property
    def WAIT_MAX_WAITERS_PER_MEDIA(self) -> int:
        return int(self._get("WAIT_MAX_WAITERS_PER_MEDIA"))

    @property
    def LEGACY_WAIT_MAX_WAITERS(self) -> int:
        return int(self._get("LEGACY_WAIT_MAX_WAITERS"))

    @property
    def WAIT_MAX_WAITERS_PER_REQUESTER(self) -> int:
        return int(self._get("WAIT_MAX_WAITERS_PER_REQUESTER"))

    @property
    def UPLOAD_BODIES_MAX(self) -> int:
        return int(self._get("UPLOAD_BODIES_MAX"))

    @property
    def UPLOAD_BODIES_PER_ADDRESS_MAX(self) -> int:
        return int(self._get("UPLOAD_BODIES_PER_ADDRESS_MAX"))

    @property
    def UPLOAD_MIN_BYTES_PER_SECOND(self) -> float:
        return float(self._get("UPLOAD_MIN_BYTES_PER_SECOND"))

    @property
    def UPLOAD_RATE_GRACE_SECONDS(self) -> float:
        return float(self._get("UPLOAD_RATE_GRACE_SECONDS"))

    @property
    def UPLOAD_IDLE_TIMEOUT_SECONDS(self) -> float:
        return float(self._get("UPLOAD_IDLE_TIMEOUT_SECONDS"))

    @property
    def WAKEUP_POLL_SECONDS(self) -> float:
        return float(self._get("WAKEUP_POLL_SECONDS"))

    @property
    def WAKEUP_SAFETY_POLL_SECONDS(self) -> float:
        return float(self._get("WAKEUP_SAFETY_POLL_SECONDS"))

    @property
    def WAKEUP_LISTEN(self) -> bool:
        return bool(self._get("WAKEUP_LISTEN"))

    @property
    def WAKEUP_REDIS_URL(self) -> str | None:
        return self._get("WAKEUP_REDIS_URL") or None

    @property
    def TOKEN_CACHE_SECONDS(self) -> float:
        return float(self._get("TOKEN_CACHE_SECONDS"))

    @property
    def CHECKS(self) -> list[Callable[..., Any]]:
        checks = []
        for path in _str_list("CHECKS", self._get("CHECKS")):
            try:
                checks.append(import_string(path))
            except ImportError as exc:
                raise ImproperlyConfigured(
                    f"MSC3870['CHECKS'] entry {path!r} could not be imported: {exc}"
                ) from exc
        return checks

    @property
    def ALLOWED_CONTENT_TYPES(self) -> list[str]:
        return _str_list("ALLOWED_CONTENT_TYPES", self._get("ALLOWED_CONTENT_TYPES"))

    @property
    def DENIED_CONTENT_TYPES(self) -> list[str]:
        return _str_list("DENIED_CONTENT_TYPES", self._get("DENIED_CONTENT_TYPES"))

    @property
    def LEGACY_MEDIA_FREEZE_AFTER(self) -> datetime | None:
        return parse_freeze_time(self._get("LEGACY_MEDIA_FREEZE_AFTER"))

    @property
    def TYPE_MISMATCH(self) -> str:
        return str(self._get("TYPE_MISMATCH"))

    @property
    def SHA256_WHEN(self) -> str:
        return str(self._get("SHA256_WHEN"))

    @property
    def REDIRECT_DOWNLOADS(self) -> bool:
        return bool(self._get("REDIRECT_DOWNLOADS"))

    @property
    def DOWNLOAD_URL_LIFETIME(self) -> int:
        return int(self._get("DOWNLOAD_URL_LIFETIME"))

    @property
    def USER_QUOTA_BYTES(self) -> int | None:
        value = self._get("USER_QUOTA_BYTES")
        return None if value is None else int(value)

    @property
    def CLAMAV_URL(self) -> str | None:
        return self._get("CLAMAV_URL") or None

    @property
    def CLAMAV_TIMEOUT_SECONDS(self) -> float:
        return float(self._get("CLAMAV_TIMEOUT_SECONDS"))

    @property
    def THUMBNAIL_MAX_SOURCE_BYTES(self) -> int:
        return int(self._get("THUMBNAIL_MAX_SOURCE_BYTES"))

    @property
    def THUMBNAIL_MAX_PIXELS(self) -> int:
        return int(self._get("THUMBNAIL_MAX_PIXELS"))

    @property
    def THUMBNAIL_MAX_DECODED_BYTES(self) -> int:
        return int(self._get("THUMBNAIL_MAX_DECODED_BYTES"))

    @property
    def THUMBNAIL_CONCURRENT_RENDERS(self) -> int:
        return max(1, int(self._get("THUMBNAIL_CONCURRENT_RENDERS")))

    @property
    def THUMBNAIL_RENDER_WAIT_SECONDS(self) -> float:
        return max(0.0, float(self._get("THUMBNAIL_RENDER_WAIT_SECONDS")))

    @property
    def TOMBSTONE_RETENTION_DAYS(self) -> int | None:
        value = self._get("TOMBSTONE_RETENTION_DAYS")
        return None if value is None else int(value)

    @property
    def STUCK_AFTER_SECONDS(self) -> int:
        return int(self._get("STUCK_AFTER_SECONDS"))

    @property
    def S3_PUBLIC_ENDPOINT_URL(self) -> str | None:
        return self._get("S3_PUBLIC_ENDPOINT_URL")

    @property
    def COMPLETE_WAITS_FOR_CHECKS(self) -> bool:
        return bool(self._get("COMPLETE_WAITS_FOR_CHECKS"))

    @property
    def S3_COPY_CHECKSUM(self) -> bool:
        return bool(self._get("S3_COPY_CHECKSUM"))

    @property
    def S3_COPY_PART_THRESHOLD(self) -> int:
        return int(self._get("S3_COPY_PART_THRESHOLD"))

    @property
    def S3_COPY_PART_SIZE(self) -> int:
        return int(self._get("S3_COPY_PART_SIZE"))

    @property
    def S3_COPY_CONCURRENCY(self) -> int:
        return max(1, int(self._get("S3_COPY_CONCURRENCY")))

    @property
    def S3_INCOMING_EXPIRATION_DAYS(self) -> int:
        days = self._get("S3_INCOMING_EXPIRATION_DAYS")
        if days is None:
            return -(-int(self._get("UNUSED_EXPIRATION")) // 86400) + 1
        return max(1, int(days))

    @property
    def SIGNING_KEY_PATH(self) -> str | None:
        path = self._get("SIGNING_KEY_PATH")
        return str(path) if path else None

    @property
    def SIGNING_KEY_VALIDITY_SECONDS(self) -> int:
        return int(self._get("SIGNING_KEY_VALIDITY_SECONDS"))

    @property
    def TRUSTED_KEY_SERVERS(self) -> list[dict[str, Any]]:
        servers = self._get("TRUSTED_KEY_SERVERS") or []
        if not isinstance(servers, list | tuple) or not all(
            isinstance(s, dict)
            and isinstance(s.get("server_name"), str)
            and isinstance(s.get("verify_keys"), dict)
            and s["verify_keys"]
            for s in servers
        ):
            raise ImproperlyConfigured(
                "MSC3870['TRUSTED_KEY_SERVERS'] must be a list of "
                '{"server_name": str, "verify_keys": {key_id: base64 key}}.'
            )
        return list(servers)

    @property
    def FEDERATION_IP_RANGE_DENYLIST(self) -> list[str] | None:
        ranges = self._get("FEDERATION_IP_RANGE_DENYLIST")
        return None if ranges is None else _cidr_list("FEDERATION_IP_RANGE_DENYLIST", ranges)

    @property
    def FEDERATION_IP_RANGE_ALLOWLIST(self) -> list[str]:
        ranges = self._get("FEDERATION_IP_RANGE_ALLOWLIST") or []
        return _cidr_list("FEDERATION_IP_RANGE_ALLOWLIST", ranges)

    @property
    def FEDERATION_VERIFY_TLS(self) -> bool:
        return bool(self._get("FEDERATION_VERIFY_TLS"))

    @property
    def FEDERATION_MEDIA_RATE(self) -> str | None:
        return self._get("FEDERATION_MEDIA_RATE")

    @property
    def FEDERATION_AUTH_FAILURE_RATE(self) -> str | None:
        return self._get("FEDERATION_AUTH_FAILURE_RATE")

    @property
    def FEDERATION_REQUESTS_PER_ADDRESS(self) -> int:
        return int(self._get("FEDERATION_REQUESTS_PER_ADDRESS"))

    @property
    def FEDERATION_KEY_FETCHES(self) -> int:
        return max(1, int(self._get("FEDERATION_KEY_FETCHES")))

    @property
    def FEDERATION_KEY_FETCH_TIMEOUT_SECONDS(self) -> float:
        return max(1.0, float(self._get("FEDERATION_KEY_FETCH_TIMEOUT_SECONDS")))

    @property
    def FETCH_REMOTE_MEDIA(self) -> bool:
        return bool(self._get("FETCH_REMOTE_MEDIA"))

    @property
    def REMOTE_MEDIA_FAILURE_SECONDS(self) -> int:
        return max(0, int(self._get("REMOTE_MEDIA_FAILURE_SECONDS")))

    @property
    def REMOTE_MEDIA_TIMEOUT_SECONDS(self) -> float:
        return max(1.0, float(self._get("REMOTE_MEDIA_TIMEOUT_SECONDS")))

    @property
    def REMOTE_MEDIA_DOWNLOAD_PER_SECOND(self) -> int | None:
        value = self._get("REMOTE_MEDIA_DOWNLOAD_PER_SECOND")
        return None if value is None else max(1, int(value))

    @property
    def REMOTE_MEDIA_DOWNLOAD_BURST_COUNT(self) -> int:
        return max(1, int(self._get("REMOTE_MEDIA_DOWNLOAD_BURST_COUNT")))

    @property
    def REMOTE_MEDIA_MAX_FETCHES(self) -> int:
        return max(1, int(self._get("REMOTE_MEDIA_MAX_FETCHES")))

    @property
    def REMOTE_MEDIA_CACHE_MAX_BYTES(self) -> int | None:
        value = self._get("REMOTE_MEDIA_CACHE_MAX_BYTES")
        return None if value is None else max(0, int(value))

    @property
    def HEALTH_COMPONENTS(self) -> list[str]:
        return _str_list("HEALTH_COMPONENTS", self._get("HEALTH_COMPONENTS"))

    @property
    def HEALTH_CACHE_SECONDS(self) -> float:
        return max(0.0, float(self._get("HEALTH_CACHE_SECONDS")))

    @property
    def HEALTH_TIMEOUT_SECONDS(self) -> float:
        return max(0.1, float(self._get("HEALTH_TIMEOUT_SECONDS")))

    @property
    def HEALTH_BEAT_MAX_AGE_SECONDS(self) -> float:
        return max(1.0, float(self._get("HEALTH_BEAT_MAX_AGE_SECONDS")))

    @property
    def METRICS_PORT(self) -> int | None:
        value = self._get("METRICS_PORT")
        return None if value is None else int(value)

    @property
    def METRICS_ALLOWED_NETWORKS(self) -> list[str]:
        return _cidr_list("METRICS_ALLOWED_NETWORKS", self._get("METRICS_ALLOWED_NETWORKS"))


def _str_list(name: str, value: Any) -> list[str]:
    """A list of strings. A bare string would be read as a list of its characters (an
    allowlist of "image/*" allowing everything matching "*"): refused, so screening fails
    (and is retried) rather than passing on a misread policy."""
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise ImproperlyConfigured(f"MSC3870[{name!r}] must be a list of strings.")
    return list(value)


def parse_freeze_time(value: Any) -> datetime | None:
    """``LEGACY_MEDIA_FREEZE_AFTER``: None, an aware datetime or an ISO 8601 string with a
    time zone. A naive time would be compared in whatever zone the process runs in."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            value = None
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ImproperlyConfigured(
            "MSC3870['LEGACY_MEDIA_FREEZE_AFTER'] must be None or a timezone-aware datetime."
        )
    return value


def _cidr_list(name: str, ranges: Any) -> list[str]:
    """A list of CIDRs; a bare string would be read as a list of characters."""
    if isinstance(ranges, str) or not isinstance(ranges, list | tuple):
        raise ImproperlyConfigured(f"MSC3870[{name!r}] must be a list of CIDR strings.")
    return [str(r) for r in ranges]


app_settings = MSC3870Settings()
