"""The app's one settings object: every setting declared once, below, grouped by topic.

Each is a ``Setting`` (``msc3870/setting.py``): its kind, default, whether None is allowed
(``null``), whether a misread weakens a defence (``security``), the bounds and choices the
value checks hold it to, and the environment variable the deployable project reads it from
(``Env``). Everything else is derived from it: the typed value (``app_settings.NAME``, read
from the ``MSC3870`` dict on every access, so ``override_settings`` works in tests; import
strings resolved lazily, errors naming the setting), ``DEFAULTS``, the type checks
(``checks.py``, one id per kind), and the dict ``mediarepo/settings.py`` builds from the
environment (``settings_from_environment``). The app itself never reads the environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from .setting import (
    BOOL,
    DATETIME,
    IMPORT_STRING,
    IMPORT_STRING_LIST,
    INT,
    KEY_SERVERS,
    NUMBER,
    OEMBED_PROVIDERS,
    PATH,
    STR,
    STR_LIST,
    Env,
    Setting,
    aware_datetime,
    cidr_list,
    constant,
    from_environment,
    integer,
    settings_of,
    text,
    zero_is_none,
)

MiB = 1024 * 1024

TYPE_MISMATCH_POLICIES = ("sniffed", "reject", "declared")
# Synapse's built-in oEmbed providers (synapse/res/providers.json), in oembed.com's
# providers.json format: URLs these schemes match are previewed from the endpoint.
DEFAULT_OEMBED_PROVIDERS: list[dict[str, Any]] = [
    {
        "provider_name": "X",
        "provider_url": "https://x.com/",
        "endpoints": [
            {
                "schemes": [
                    "https://x.com/*",
                    "https://x.com/*/status/*",
                    "https://*.x.com/*/status/*",
                ],
                "url": "https://publish.x.com/oembed",
            }
        ],
    },
    {
        "provider_name": "YouTube Shorts",
        "provider_url": "http://www.youtube.com/",
        "endpoints": [
            {
                "schemes": ["https://youtube.com/shorts/*", "https://*.youtube.com/shorts/*"],
                "url": "https://www.youtube.com/oembed",
            }
        ],
    },
]
SHA256_WHEN_CHOICES = ("needed", "always")


def _url(name: str, value: Any) -> str:
    return str(value).rstrip("/")


def _url_or_none(name: str, value: Any) -> str | None:
    return str(value).rstrip("/") if value else None


def _text_or_none(name: str, value: Any) -> str | None:
    return str(value) if value else None


def _whole_seconds(name: str, value: Any) -> int:
    return int(value)


def _cidrs(name: str, value: Any) -> list[str]:
    return cidr_list(name, value or [])


def _cidrs_or_none(name: str, value: Any) -> list[str] | None:
    return None if value is None else cidr_list(name, value)


def _incoming_expiration_days(name: str, value: Any) -> int:
    if value is None:  # a day more than an unused id can wait, rounded up
        return -(-app_settings.UNUSED_EXPIRATION // 86400) + 1
    return max(1, int(value))


def _without_trailing_slash(text: str, default: Any) -> str:
    return text.rstrip("/")


class MSC3870Settings:
    """Typed view of ``settings.MSC3870``, read on every access."""

    # ------------------------------------------------------------- this server

    # The server name in mxc:// ids. Media of other servers is never served from here.
    SERVER_NAME = Setting(STR, "localhost", env=Env("MATRIX_SERVER_NAME", always=True))
    # This server's public base URL: absolute upload URLs and Location headers. The
    # project's default is http://127.0.0.1:$PORT.
    PUBLIC_BASEURL = Setting(
        STR,
        "http://127.0.0.1:8008",
        read=_url,
        env=Env("PUBLIC_BASEURL", parse=_without_trailing_slash, always=True),
    )
    # Alias in Django's STORAGES of the storage media bytes live in.
    STORAGE_ALIAS = Setting(STR, "msc3870")
    # The MediaStore class over that storage (import string); None: the one made for the
    # storage's class (msc3870.stores.STORE_FOR_STORAGE: local disk, S3).
    STORE = Setting(IMPORT_STRING, None, null=True)

    # ------------------------------------------------------------ access tokens

    # Callable (import string) turning an access token into a Matrix user id. The project
    # switches to the homeserver's whoami when MATRIX_HOMESERVER_URL is set.
    TOKEN_RESOLVER = Setting(
        IMPORT_STRING,
        "msc3870.auth.LocalTokenResolver",
        security=True,
        env=Env("MATRIX_HOMESERVER_URL", parse=constant("msc3870.auth.HomeserverTokenResolver")),
    )
    # Homeserver asked by msc3870.auth.HomeserverTokenResolver (/account/whoami).
    HOMESERVER_URL = Setting(
        STR, None, null=True, read=_url_or_none, security=True, env=Env("MATRIX_HOMESERVER_URL")
    )
    # Seconds a successful whoami answer is cached: a logged-out token works this long.
    WHOAMI_CACHE_SECONDS = Setting(
        NUMBER,
        15,
        read=_whole_seconds,
        security=True,
        env=Env(parse=integer, always=True, only_with="MATRIX_HOMESERVER_URL"),
    )
    # Seconds a resolved access token is trusted per process: a revoked token (or a
    # logged-out one, with a homeserver) stops working at most this much later.
    TOKEN_CACHE_SECONDS = Setting(NUMBER, 10, security=True, env=Env())

    # ---------------------------------------------------------------- admin API

    # Matrix users who may call the admin API (/_synapse/admin/v1: list, quarantine,
    # protect and delete media) and download quarantined media, as matrix-media-repo's
    # `admins`. The project takes them comma-separated.
    ADMINS = Setting(STR_LIST, [], security=True, env=Env())
    # Also ask the homeserver (HOMESERVER_URL) whether a caller is one of its admins:
    # Synapse's GET /_synapse/admin/v1/users/{user_id}/admin with the caller's own token,
    # which it answers only to its admins. False: only ADMINS are.
    HOMESERVER_ADMINS = Setting(BOOL, True, security=True, env=Env())
    # Seconds the homeserver's answer is cached: an admin demoted there keeps access here
    # this long.
    ADMIN_CACHE_SECONDS = Setting(
        INT, 30, security=True, floor=0, must_be="non-negative", env=Env()
    )
    # The most media one admin API request changes, so that none holds a thread for
    # minutes: deleting a user's media deletes at most this many of the page asked for;
    # deleting by date, purging the remote cache and quarantining a user's media do this
    # many in the request and queue the rest (msc3870/queue.py), as many more at a time.
    ADMIN_API_ITEMS_PER_REQUEST = Setting(INT, 1000, floor=1, must_be="positive", env=Env())

    # ------------------------------------------------------------------ uploads

    # Largest accepted upload, in bytes.
    MAX_UPLOAD_SIZE = Setting(
        INT, 50 * MiB, security=True, must_be="positive", env=Env(always=True)
    )
    # Seconds a created media id waits for its upload (MSC2246 recommends 24 h).
    UNUSED_EXPIRATION = Setting(
        INT, 24 * 60 * 60, security=True, must_be="positive", env=Env(always=True)
    )
    # Media ids a user may hold in the pending state at once.
    MAX_PENDING_UPLOADS = Setting(
        INT, 5, security=True, must_be="non-negative", env=Env(always=True)
    )
    # Rate of /create per user, DRF syntax ("N/s", "N/min", "N/hour", "N/day"); None = off.
    CREATE_RATE = Setting(STR, "60/min", null=True, security=True, env=Env(always=True))
    # Seconds /complete and the upload PUT wait for the post-upload checks to decide.
    COMPLETE_WAIT_SECONDS = Setting(NUMBER, 20.0, must_be="positive", env=Env(always=True))
    # False: /complete (MSC3870) answers once what needs only metadata or a ranged read is
    # decided (the object exists, its size, its sniffed type); the full-object checks
    # (SHA-256, block list, virus scan) go on after the answer while downloads wait; a
    # later rejection makes them 404 (the uploader's retried /complete says why). True:
    # /complete waits for the verdict.
    COMPLETE_WAITS_FOR_CHECKS = Setting(BOOL, False, env=Env(always=True))
    # Seconds in PROCESSING after which screening is assumed lost and queued again.
    STUCK_AFTER_SECONDS = Setting(INT, 300, env=Env(always=True))
    # Seconds a body streaming through this server (PUT, one-shot POST) is given before
    # the stuck sweep decides the process receiving it died: slow clients on big files
    # take minutes. The sweep then frees the id (PUT) or rejects it (POST), and deletes
    # what such a request stored without recording it.
    IN_FLIGHT_UPLOAD_SECONDS = Setting(INT, 3600, must_be="positive", env=Env())

    # Upload bodies being read (msc3870/admission.py), per process and per client address
    # (an IPv6 client by its /64): past a cap, 429 M_LIMIT_EXCEEDED before a byte is read.
    # Raise the per-address cap where many clients share one address (carrier NAT).
    UPLOAD_BODIES_MAX = Setting(INT, 64, security=True, must_be="positive", env=Env())
    UPLOAD_BODIES_PER_ADDRESS_MAX = Setting(INT, 8, security=True, must_be="positive", env=Env())
    # A request body silent for UPLOAD_IDLE_TIMEOUT_SECONDS, or slower on average than
    # UPLOAD_MIN_BYTES_PER_SECOND once UPLOAD_RATE_GRACE_SECONDS have passed, is dropped
    # with 408. Low enough for a slow mobile link: GPRS at its worst sends 2 KiB/s, a
    # radio waking up or a handover stalls for seconds, a tunnel for tens of seconds.
    # 0 bytes/s turns the rate check off (the idle timeout stays).
    UPLOAD_MIN_BYTES_PER_SECOND = Setting(
        NUMBER, 1024, security=True, must_be="non-negative", env=Env()
    )
    UPLOAD_RATE_GRACE_SECONDS = Setting(
        NUMBER, 30, security=True, must_be="non-negative", env=Env()
    )
    UPLOAD_IDLE_TIMEOUT_SECONDS = Setting(NUMBER, 60, security=True, must_be="positive", env=Env())

    # ------------------------------------------------- post-upload checks (screening)

    # Post-upload checks, run in order on the bytes that will be served. The project takes
    # them comma-separated.
    CHECKS = Setting(
        IMPORT_STRING_LIST,
        [
            "msc3870.screening.check_size",
            "msc3870.screening.check_content_type",
            "msc3870.screening.check_sha256",
            "msc3870.screening.check_not_blocked",
            "msc3870.screening.check_user_quota",
            "msc3870.screening.check_clamav",
        ],
        security=True,
        env=Env(),
    )
    # Which uploads check_sha256 hashes: "needed" (only content other media could share:
    # the same size and first 8 KiB; deduplication and the block list still find every
    # twin, since identical bytes share both) or "always".
    SHA256_WHEN = Setting(
        STR, "needed", security=True, choices=SHA256_WHEN_CHOICES, env=Env(always=True)
    )
    # Bytes of live media a user may hold (None = no quota; the project's "0" too).
    USER_QUOTA_BYTES = Setting(
        INT, None, null=True, security=True, env=Env(parse=zero_is_none(integer), always=True)
    )
    # clamd to scan uploads with: "tcp://host:3310" or "unix:///run/clamav/clamd.ctl".
    CLAMAV_URL = Setting(
        STR, None, null=True, read=_text_or_none, security=True, env=Env(always=True)
    )
    CLAMAV_TIMEOUT_SECONDS = Setting(NUMBER, 60)
    # Content types (globs, matched against the type sniffed from the bytes, or the declared
    # one when the bytes are not recognised) that may be stored, and those refused. The
    # project takes them comma-separated: never a bare string, which would be read as a
    # list of its characters (and "*" would allow everything).
    ALLOWED_CONTENT_TYPES = Setting(STR_LIST, ["*"], security=True, env=Env())
    DENIED_CONTENT_TYPES = Setting(STR_LIST, [], security=True, env=Env())
    # When the declared type contradicts the bytes: "sniffed" serves the sniffed type,
    # "reject" refuses the upload, "declared" keeps what the client said.
    TYPE_MISMATCH = Setting(STR, "sniffed", security=True, choices=TYPE_MISMATCH_POLICIES)

    # ---------------------------------------------------------------- downloads

    # Download wait for media that is not uploaded yet (ms): default and cap.
    DOWNLOAD_TIMEOUT_MS = Setting(INT, 20_000, must_be="non-negative")
    DOWNLOAD_TIMEOUT_MS_MAX = Setting(INT, 60_000, must_be="non-negative")
    # Unauthenticated (legacy /_matrix/media/v3) downloads wait at most this long (ms).
    LEGACY_DOWNLOAD_TIMEOUT_MS_MAX = Setting(INT, 10_000, env=Env())
    # Media created after this time (a timezone-aware datetime, or an ISO 8601 string with
    # a time zone) is not served by the unauthenticated /_matrix/media/v3 endpoints: 404
    # M_NOT_FOUND, as Synapse answers for media stored once authenticated media is on
    # (MSC3916). None: off. Off by default while other servers reach our media only
    # through those endpoints.
    LEGACY_MEDIA_FREEZE_AFTER = Setting(DATETIME, None, null=True, security=True, env=Env())
    # Redirect authenticated (v1) downloads to signed storage URLs where the storage can.
    REDIRECT_DOWNLOADS = Setting(BOOL, False, env=Env(always=True))
    # Lifetime in seconds of signed download URLs.
    DOWNLOAD_URL_LIFETIME = Setting(INT, 300, security=True)

    # Requests waiting on media (downloads of pending media, /complete and PUTs waiting
    # for the checks) per process, per media id, and unauthenticated ones per process.
    # Past a cap the answer is an immediate 429 M_LIMIT_EXCEEDED, never a queue.
    WAIT_MAX_WAITERS = Setting(INT, 10_000, security=True, env=Env())
    WAIT_MAX_WAITERS_PER_MEDIA = Setting(INT, 5_000, security=True, env=Env())
    LEGACY_WAIT_MAX_WAITERS = Setting(INT, 500, security=True, env=Env())
    # Requests one requester (a Matrix user, or the address of an unauthenticated client
    # or of a server whose keys are being fetched) may have waiting per process.
    WAIT_MAX_WAITERS_PER_REQUESTER = Setting(INT, 200, security=True, env=Env())

    # Wake-up hub (msc3870/wakeup.py): the batched poll's interval where it is the only
    # source (SQLite), the safety poll's behind PostgreSQL LISTEN, and whether to LISTEN.
    WAKEUP_POLL_SECONDS = Setting(NUMBER, 0.05, env=Env())
    WAKEUP_SAFETY_POLL_SECONDS = Setting(NUMBER, 2.0, env=Env())
    WAKEUP_LISTEN = Setting(BOOL, True, env=Env())
    # Redis URL for wake-ups across processes where the database cannot LISTEN (None: off);
    # the project's shared cache.
    WAKEUP_REDIS_URL = Setting(
        STR, None, null=True, read=_text_or_none, env=Env("REDIS_URL", always=True)
    )

    # --------------------------------------------------------------- thumbnails

    # Largest source (bytes) and image (pixels) that will be decoded.
    THUMBNAIL_MAX_SOURCE_BYTES = Setting(INT, 20 * MiB, security=True)
    THUMBNAIL_MAX_PIXELS = Setting(INT, 32_000_000, security=True)
    # Memory one render may decode into, from the header before decoding (192 MiB: a 32 Mpx
    # PNG takes 122 MiB, a 12 Mpx WebP 183 MiB); renders at once per process; seconds a
    # request waits for its turn before 429 M_LIMIT_EXCEEDED. Peak per process is about
    # CONCURRENT_RENDERS x (MAX_DECODED_BYTES + MAX_SOURCE_BYTES).
    THUMBNAIL_MAX_DECODED_BYTES = Setting(INT, 192 * MiB, security=True)
    THUMBNAIL_CONCURRENT_RENDERS = Setting(INT, 2, security=True, floor=1)
    THUMBNAIL_RENDER_WAIT_SECONDS = Setting(NUMBER, 5.0, floor=0)

    # ---------------------------------------------------------- storage and rows

    # Days tombstones (expired, purged, rejected by checks) are kept; None = forever.
    TOMBSTONE_RETENTION_DAYS = Setting(INT, 30, null=True)
    # Separate endpoint for URLs handed to clients (CDN, transfer acceleration); None = same.
    S3_PUBLIC_ENDPOINT_URL = Setting(STR, None, null=True, env=Env(always=True))
    # A bucket of its own for upload URLs' objects, with versioning on (ensure_media_bucket
    # turns it on): /complete records the version it looked at, the checks read that
    # version and downloads serve it at once; the copy to the media bucket follows in the
    # background. None: upload URLs write to the media bucket, and the bytes are copied out
    # of the URL's reach before the checks (the first download waits for the copy).
    S3_INCOMING_BUCKET = Setting(STR, None, null=True, env=Env())
    # Ask S3 for the SHA-256 of the server-side copy (CopyObject ChecksumAlgorithm=SHA256):
    # where the store returns it (AWS), the bytes are never read back to hash them.
    S3_COPY_CHECKSUM = Setting(BOOL, True, env=Env(always=True))
    # Copies above this many bytes are multipart (parallel UploadPartCopy); S3 copies at
    # most 5 GiB in one request. Parts of S3_COPY_PART_SIZE, S3_COPY_CONCURRENCY at once.
    S3_COPY_PART_THRESHOLD = Setting(INT, 5 * 1024 * MiB)
    S3_COPY_PART_SIZE = Setting(INT, 512 * MiB)
    S3_COPY_CONCURRENCY = Setting(INT, 4, floor=1)
    # Uploads through this server are written as they arrive, multipart past one part:
    # parts of S3_UPLOAD_PART_SIZE bytes (S3's least is 5 MiB; larger for an upload limit
    # over 10,000 parts), S3_UPLOAD_CONCURRENCY of them read and not yet stored at once.
    # Memory per upload is about one part more than that, whatever the upload's size.
    S3_UPLOAD_PART_SIZE = Setting(INT, 8 * MiB, floor=5 * MiB, env=Env())
    S3_UPLOAD_CONCURRENCY = Setting(INT, 4, floor=1, env=Env())
    # A body of known length (a Content-Length), at least 1 MiB and at most this, goes as
    # one PUT sent as it arrives, where botocore sends bodies as they are (a plain-HTTP
    # store with S3_SIGN_PAYLOAD off): nothing held back until a part is whole, none of
    # a multipart upload's extra requests. Such a PUT cannot be retried once under way
    # (the client sends the upload again); parts are, one by one. 0: always parts.
    S3_UPLOAD_SINGLE_PUT_LIMIT = Setting(INT, 256 * MiB, floor=0, env=Env())
    # Over plain HTTP botocore signs every request's body: one SHA-256 pass more over each
    # byte stored, beside the one this server makes of what it stores. Off, bodies go as
    # UNSIGNED-PAYLOAD (as botocore sends them over HTTPS, where TLS protects them): for a
    # store on a network the operator trusts. Requests are signed either way.
    S3_SIGN_PAYLOAD = Setting(BOOL, False, env=Env(always=True))
    # Batched deletes in flight at once (S3: DeleteObjects requests of up to 1,000 keys),
    # in the sweeps and in one large delete.
    DELETE_CONCURRENCY = Setting(INT, 16, floor=1, must_be="positive", env=Env())
    # Days after which the bucket's lifecycle rule (ensure_media_bucket) expires objects
    # under incoming/ (a second line of defence behind the expiry sweeps); None: one day
    # more than UNUSED_EXPIRATION.
    S3_INCOMING_EXPIRATION_DAYS = Setting(INT, None, null=True, read=_incoming_expiration_days)

    # ---------------------------------------------------------------- retention

    # The retention sweep (msc3870.retention) purges this server's own media, and deletes
    # other servers' media from the cache (fetched again if asked for), once it is older
    # than MAX_AGE (since it was created or fetched) or unused for longer than UNUSED (since
    # it was last served, else created: Synapse's media_retention local_media_lifetime and
    # remote_media_lifetime). None (the project's "0"): no such rule. Only media larger
    # than RETENTION_MIN_BYTES goes; quarantined and protected media stays, and so does
    # what RETENTION_KEEP (given mxc:// URIs, returns those to keep: profile pictures)
    # names.
    RETENTION_LOCAL_MAX_AGE_SECONDS = Setting(
        INT, None, null=True, floor=1, must_be="positive", env=Env(parse=zero_is_none(integer))
    )
    RETENTION_LOCAL_UNUSED_SECONDS = Setting(
        INT, None, null=True, floor=1, must_be="positive", env=Env(parse=zero_is_none(integer))
    )
    RETENTION_REMOTE_MAX_AGE_SECONDS = Setting(
        INT, None, null=True, floor=1, must_be="positive", env=Env(parse=zero_is_none(integer))
    )
    RETENTION_REMOTE_UNUSED_SECONDS = Setting(
        INT, None, null=True, floor=1, must_be="positive", env=Env(parse=zero_is_none(integer))
    )
    RETENTION_MIN_BYTES = Setting(INT, 0, floor=0, must_be="non-negative", env=Env())
    RETENTION_KEEP = Setting(IMPORT_STRING, None, null=True, env=Env())

    # --------------------------------------------------------------- federation

    # This server's Ed25519 signing key file (Synapse's format); made on first use if
    # missing. None: federation is off until a path is set. The project's default is
    # signing.key in its data directory.
    SIGNING_KEY_PATH = Setting(PATH, None, null=True, read=_text_or_none, security=True, env=Env())
    # valid_until_ts of our /_matrix/key/v2/server answer: how long others may cache it.
    SIGNING_KEY_VALIDITY_SECONDS = Setting(INT, 24 * 60 * 60, security=True)
    # Notaries asked for other servers' keys before the servers themselves, as Synapse's
    # trusted_key_servers: [{"server_name": "matrix.org", "verify_keys": {"ed25519:auto":
    # "<base64>"}}]. Their answers must be signed by one of the listed keys. The project
    # takes them as JSON.
    TRUSTED_KEY_SERVERS = Setting(KEY_SERVERS, [], security=True, env=Env(always=True))
    # Outbound requests (keys, remote media) never reach these addresses (CIDRs), unless
    # FEDERATION_IP_RANGE_ALLOWLIST holds them (as Synapse's ip_range_blacklist/whitelist).
    # None: the built-in list of private, loopback, link-local, multicast and reserved
    # ranges. The project takes them comma-separated.
    FEDERATION_IP_RANGE_DENYLIST = Setting(
        STR_LIST, None, null=True, read=_cidrs_or_none, security=True, env=Env()
    )
    FEDERATION_IP_RANGE_ALLOWLIST = Setting(
        STR_LIST, [], read=_cidrs, security=True, env=Env(always=True)
    )
    # Verify other servers' TLS certificates (turn off only in tests).
    FEDERATION_VERIFY_TLS = Setting(BOOL, True, security=True, env=Env(always=True))
    # Rate of federation media requests (download and thumbnail together) per origin
    # server, DRF syntax, as a leaky bucket (bursts of N); None (the project's "0") = off.
    FEDERATION_MEDIA_RATE = Setting(
        STR, "600/min", null=True, security=True, env=Env(parse=zero_is_none(text))
    )
    # Failed X-Matrix authentications per client address, DRF syntax, as a leaky bucket;
    # past it the address's federation requests are refused (429) before any work. None
    # (the project's "0") = off.
    FEDERATION_AUTH_FAILURE_RATE = Setting(
        STR, "30/min", null=True, security=True, env=Env(parse=zero_is_none(text))
    )
    # Federation requests in flight (waiting included) per client address per process;
    # past it, an immediate 429 from the event loop, before any thread is involved.
    FEDERATION_REQUESTS_PER_ADDRESS = Setting(INT, 50, security=True, env=Env())
    # Fetches of other servers' keys in flight per process (one per origin at most; past
    # it, a request needing another origin's keys is refused with 401), and the time one
    # fetch may take in all: discovery, notaries, the origin's own key server.
    FEDERATION_KEY_FETCHES = Setting(INT, 4, security=True, floor=1, env=Env())
    FEDERATION_KEY_FETCH_TIMEOUT_SECONDS = Setting(NUMBER, 20, security=True, floor=1, env=Env())

    # ---------------------------------------------------- other servers' media

    # Fetched when a client asks for it (needs SIGNING_KEY_PATH): a failed fetch
    # (unreachable, unknown, too large) is answered from the row this long, then tried
    # again; one fetch may take this long in all (discovery, redirects, bytes).
    FETCH_REMOTE_MEDIA = Setting(BOOL, True, env=Env(always=True))
    REMOTE_MEDIA_FAILURE_SECONDS = Setting(INT, 60, floor=0, env=Env(always=True))
    REMOTE_MEDIA_TIMEOUT_SECONDS = Setting(
        NUMBER, 120, floor=1, env=Env(parse=integer, always=True)
    )
    # Bytes of other servers' media each user may have fetched, as Synapse's
    # remote_media_download_per_second and _burst_count: a leaky bucket of BURST_COUNT
    # bytes drained at PER_SECOND. A user whose bucket is full gets 429 before a new fetch
    # starts; a fetch's bytes are counted once they have arrived. Media already held costs
    # nothing, nor does waiting for a fetch another user started. PER_SECOND None (the
    # project's "0"): off.
    REMOTE_MEDIA_DOWNLOAD_PER_SECOND = Setting(
        INT,
        87 * 1024,
        null=True,
        security=True,
        floor=1,
        must_be="positive",
        env=Env(parse=zero_is_none(integer)),
    )
    REMOTE_MEDIA_DOWNLOAD_BURST_COUNT = Setting(
        INT, 500 * MiB, security=True, floor=1, must_be="positive", env=Env()
    )
    # Fetches of other servers' media in flight across the deployment; a request that
    # would start one more gets 429 M_LIMIT_EXCEEDED with a retry time, never a queue.
    REMOTE_MEDIA_MAX_FETCHES = Setting(
        INT, 64, security=True, floor=1, must_be="positive", env=Env()
    )
    # Bytes of other servers' media kept; past it the least recently served are deleted
    # (the next request fetches them again) down to 90 % of it. None (the project's "0"):
    # no bound.
    REMOTE_MEDIA_CACHE_MAX_BYTES = Setting(
        INT,
        10 * 1024 * MiB,
        null=True,
        security=True,
        floor=0,
        must_be="non-negative",
        env=Env(parse=zero_is_none(integer)),
    )

    # ------------------------------------------------------------- URL previews

    # GET /_matrix/client/v1/media/preview_url (and /_matrix/media/v3/preview_url). Off by
    # default: 404 M_UNRECOGNIZED, as Synapse with url_preview_enabled off.
    URL_PREVIEW_ENABLED = Setting(BOOL, False, security=True, env=Env())
    # Addresses previews never fetch from (CIDRs), unless URL_PREVIEW_IP_RANGE_ALLOWLIST
    # holds them (Synapse's url_preview_ip_range_blacklist/whitelist; the allowlist wins,
    # on any form of an address). None: the built-in list of private, loopback,
    # link-local, multicast and reserved ranges, as for federation. An empty list with
    # previews on is refused (msc3870.E025): every internal address would be reachable.
    # The project takes them comma-separated.
    URL_PREVIEW_IP_RANGE_DENYLIST = Setting(
        STR_LIST, None, null=True, read=_cidrs_or_none, security=True, env=Env()
    )
    URL_PREVIEW_IP_RANGE_ALLOWLIST = Setting(STR_LIST, [], read=_cidrs, security=True, env=Env())
    # Previews a user may start (fetches: answers from the cache, and waiting for a fetch
    # another request started, cost nothing), DRF syntax, as a leaky bucket (bursts of N).
    # None (the project's "0"): no limit.
    URL_PREVIEW_RATE = Setting(
        STR, "30/min", null=True, security=True, env=Env(parse=zero_is_none(text))
    )
    # One deadline for a whole preview: the page, its oEmbed answer and its image, every
    # redirect hop, from the first DNS query to the last byte; the origin's connection is
    # closed at it.
    URL_PREVIEW_TIMEOUT_SECONDS = Setting(
        NUMBER, 20, security=True, floor=1, must_be="positive", env=Env()
    )
    # Largest image, oEmbed answer or other body a preview reads (Synapse's
    # max_spider_size): larger is refused (from Content-Length, or while reading).
    URL_PREVIEW_MAX_BYTES = Setting(INT, 10 * MiB, security=True, must_be="positive", env=Env())
    # Bytes of an HTML page read and parsed; the rest is never read (Open Graph tags and
    # the title are in the head).
    URL_PREVIEW_MAX_HTML_BYTES = Setting(INT, 1 * MiB, security=True, must_be="positive")
    # Answers are cached per URL and time bucket of this many seconds (one fetch per URL
    # per bucket, however many ask); failures are answered from the cache this long, then
    # fetched again.
    URL_PREVIEW_CACHE_SECONDS = Setting(INT, 3600, floor=60, must_be="positive")
    URL_PREVIEW_FAILURE_SECONDS = Setting(INT, 60, floor=0, must_be="non-negative")
    # Seconds a preview's image stays downloadable after it was fetched (clients show its
    # mxc:// as long as the message is on screen; Synapse keeps them two days).
    URL_PREVIEW_IMAGE_RETENTION_SECONDS = Setting(INT, 2 * 86400, floor=0)
    # oEmbed providers, as Synapse's oembed config, in oembed.com's providers.json format:
    # [{"provider_name": ..., "endpoints": [{"schemes": ["https://x.com/*"], "url":
    # "https://publish.x.com/oembed"}]}]. A URL one of an endpoint's schemes matches is
    # previewed from the endpoint's JSON answer instead of its page. Default: Synapse's
    # built-in providers. The project takes them as JSON.
    URL_PREVIEW_OEMBED_PROVIDERS = Setting(OEMBED_PROVIDERS, DEFAULT_OEMBED_PROVIDERS, env=Env())
    # Accept-Language of preview fetches (Synapse's url_preview_accept_language).
    URL_PREVIEW_ACCEPT_LANGUAGE = Setting(STR_LIST, ["en"])

    # ---------------------------------------------------------------- operating

    # Health check (GET /health, msc3870/health.py): the components checked ("broker" only
    # where one is configured; drop "beat" or "broker" to keep a load balancer from taking
    # web processes out for them), how long a probe's result is reused, how long an answer
    # waits for a probe (a probe running longer makes its component down), and how old
    # the periodic scheduler's last tick may be.
    HEALTH_COMPONENTS = Setting(STR_LIST, ["database", "storage", "broker", "beat"], env=Env())
    HEALTH_CACHE_SECONDS = Setting(NUMBER, 2.0, floor=0, must_be="non-negative", env=Env())
    HEALTH_TIMEOUT_SECONDS = Setting(NUMBER, 2.0, floor=0.1, must_be="positive", env=Env())
    HEALTH_BEAT_MAX_AGE_SECONDS = Setting(NUMBER, 60, floor=1, must_be="positive", env=Env())
    # Prometheus metrics (GET /metrics, msc3870/metrics.py): the local port they are served
    # on (a listener of their own, never the public one; None: not served), and the client
    # networks (CIDRs) that may read them there.
    METRICS_PORT = Setting(INT, None, null=True, security=True, env=Env("METRICS_PORT"))
    METRICS_ALLOWED_NETWORKS = Setting(
        STR_LIST, ["127.0.0.0/8", "::1/128"], read=_cidrs, security=True, env=Env()
    )


SETTINGS: dict[str, Setting[Any]] = settings_of(MSC3870Settings)
DEFAULTS: dict[str, Any] = {name: setting.default for name, setting in SETTINGS.items()}

app_settings = MSC3870Settings()


def settings_from_environment(
    environ: Mapping[str, str], defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``MSC3870`` dict a deployment's environment variables give (each setting's
    ``Env``): what the deployable project puts in its settings. ``defaults`` are the
    project's own defaults of some of those settings (then always in the dict)."""
    return from_environment(SETTINGS.values(), environ, defaults or {})


def parse_freeze_time(value: Any) -> datetime | None:
    """``LEGACY_MEDIA_FREEZE_AFTER``: None, an aware datetime or an ISO 8601 string with a
    time zone."""
    return None if value is None else aware_datetime("LEGACY_MEDIA_FREEZE_AFTER", value)
