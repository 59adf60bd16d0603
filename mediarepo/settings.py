"""Settings of the deployable media server, all from environment variables.

With none set, this is the embedded default: SQLite, media on the local disk under
``var/``, background tasks run in-process. See the README's table of variables.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url

from msc3870.conf import settings_from_environment
from msc3870.logs import FORMATTERS, formatter_name

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("MEDIAREPO_DATA_DIR", BASE_DIR / "var"))

# The data directory holds the database (admin sessions, token digests), the secret key,
# the signing key and the media: nothing in it is for other local users. Every process
# of the project (web, celery, manage.py) imports these settings, so from here on what it
# makes is 0600/0700. manage.py collectstatic alone uses 022: static files are public,
# and in the container they are made by root at build time and read by the app user.
os.umask(int(os.environ.get("MEDIAREPO_UMASK") or "077", 8))
DATA_DIR.mkdir(parents=True, exist_ok=True)
# Also closes a directory an older version made 0755. One that is not ours (a mount the
# operator prepared) keeps the operator's modes.
with contextlib.suppress(PermissionError):
    DATA_DIR.chmod(0o700)


def env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def env_int(name: str, default: int) -> int:
    return int(env(name) or default)


def _secret_key() -> str:
    """DJANGO_SECRET_KEY, else one generated once and kept in the data directory (upload
    URLs are signed with it, so it must survive restarts)."""
    if key := env("DJANGO_SECRET_KEY"):
        return key
    path = DATA_DIR / "secret_key"
    if not path.exists():
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env("DJANGO_DEBUG") == "1"

PORT = env_int("PORT", 8008)

# The app's settings: each declares the variable it is read from (msc3870/conf.py, listed
# in the README), mostly MSC3870_<name>; here only the defaults that depend on this
# project (its port, its data directory).
MSC3870 = settings_from_environment(
    os.environ,
    defaults={
        "PUBLIC_BASEURL": f"http://127.0.0.1:{PORT}",
        "SIGNING_KEY_PATH": str(DATA_DIR / "signing.key"),
    },
)
PUBLIC_BASEURL = MSC3870["PUBLIC_BASEURL"]

ALLOWED_HOSTS = [
    host.strip() for host in (env("DJANGO_ALLOWED_HOSTS") or "").split(",") if host.strip()
] or [urlsplit(PUBLIC_BASEURL).hostname or "localhost", "localhost", "127.0.0.1", "[::1]"]
CSRF_TRUSTED_ORIGINS = [PUBLIC_BASEURL]
if env("DJANGO_BEHIND_PROXY") == "1":
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    # Behind a TLS-terminating proxy the admin is reached over HTTPS: its session and CSRF
    # cookies must never travel over plain HTTP.
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True

INSTALLED_APPS = [
    # Before the admin: its admin/index.html adds the moderation console's links to the
    # admin's index (extending the admin's own).
    "msc3870",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "corsheaders",
    "django_celery_beat",
]

MIDDLEWARE = [
    "msc3870.api.errors.MatrixErrorMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "mediarepo.urls"
WSGI_APPLICATION = "mediarepo.wsgi.application"
ASGI_APPLICATION = "mediarepo.asgi.application"
APPEND_SLASH = False

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Persistent connections (the web server keeps a fixed set of threads, each with its
# connection); checked before reuse on PostgreSQL.
DATABASES = {
    "default": dj_database_url.parse(
        env("DATABASE_URL") or f"sqlite:///{DATA_DIR / 'mediarepo.sqlite3'}",
        conn_max_age=None,
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Django's PostgreSQL backend, health-checking a connection at most once a second
    # instead of once per request (mediarepo/postgresql/base.py says why).
    DATABASES["default"]["ENGINE"] = "mediarepo.postgresql"
    if env("DATABASE_PREPARED_STATEMENTS") != "0":
        # Parameters sent apart from the statement, and each statement a connection has
        # run 5 times prepared on the server: PostgreSQL parses and plans it once, not
        # on every request (16 clients: 456 against 412 round trips/s, p99 67 against
        # 79 ms). Django leaves this off for transaction-mode poolers (PgBouncer before
        # 1.21): DATABASE_PREPARED_STATEMENTS=0 for those.
        DATABASES["default"].setdefault("OPTIONS", {}).update(
            server_side_binding=True, prepare_threshold=5
        )
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Django's SQLite backend, with the threads of a process writing one at a time
    # (mediarepo/sqlite/base.py says why).
    DATABASES["default"]["ENGINE"] = "mediarepo.sqlite"
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = False  # a file: nothing to lose
    DATABASES["default"]["OPTIONS"] = {
        # Take the write lock at BEGIN: per-user limits stay exact and writers queue
        # instead of failing with "database is locked".
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CACHES = {
    "default": (
        {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": env("REDIS_URL")}
        if env("REDIS_URL")
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    )
}

# Media bytes: S3 (django-storages) when a bucket is named, else the local disk.
AWS_STORAGE_BUCKET_NAME = env("AWS_STORAGE_BUCKET_NAME")
if AWS_STORAGE_BUCKET_NAME:
    MEDIA_STORAGE = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": AWS_STORAGE_BUCKET_NAME,
            "endpoint_url": env("AWS_S3_ENDPOINT_URL"),
            "access_key": env("AWS_ACCESS_KEY_ID"),
            "secret_key": env("AWS_SECRET_ACCESS_KEY"),
            "region_name": env("AWS_S3_REGION_NAME"),
            "addressing_style": env("AWS_S3_ADDRESSING_STYLE"),
            "signature_version": "s3v4",
            "querystring_auth": True,
            "file_overwrite": True,
            "default_acl": None,
        },
    }
else:
    MEDIA_STORAGE = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {
            "location": str(DATA_DIR / "media"),
            # Explicit, whatever the umask of the process that writes (Django's default
            # for files is 0644).
            "file_permissions_mode": 0o600,
            "directory_permissions_mode": 0o700,
        },
    }
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
    "msc3870": MEDIA_STORAGE,
}
STATIC_URL = "static/"
STATIC_ROOT = Path(env("DJANGO_STATIC_ROOT") or DATA_DIR / "static")

# Celery: a broker if one is named; otherwise tasks run in-process (eagerly).
CELERY_BROKER_URL = env("CELERY_BROKER_URL")
CELERY_TASK_ALWAYS_EAGER = CELERY_BROKER_URL is None
CELERY_TASK_EAGER_PROPAGATES = False
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A worker waits for the broker however long it is down (celery's default gives up after
# 100 attempts, 2 to 30 s apart, about 47 minutes, and the worker exits).
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
if CELERY_BROKER_URL and urlsplit(CELERY_BROKER_URL).scheme == "redis":
    # kombu's Redis transport, whose channels finish closing when Redis goes away
    # (mediarepo/broker.py): without it a worker can exit when Redis restarts.
    CELERY_BROKER_TRANSPORT = "mediarepo.broker:Transport"
# A request that queues work must not hang on a dead broker: fail fast, the sweep retries.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5}
CELERY_BROKER_TRANSPORT_OPTIONS = {"socket_connect_timeout": 2, "socket_timeout": 5}
# Beat reads its schedule from the database (editable in the admin); msc3870 installs the
# default sweeps after `migrate` (msc3870/schedule.py).
# It writes beat's tick for the health check (msc3870/beat.py).
CELERY_BEAT_SCHEDULER = "msc3870.beat.TickingDatabaseScheduler"
CELERY_TIMEZONE = "UTC"
# The worker and beat log through LOGGING below (one format, JSON too), not celery's own.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# Browser clients, and the admin web UIs (synapse-admin, ketesa) on their own origin.
CORS_URLS_REGEX = r"^/_(?:matrix|synapse/admin)/.*$"
CORS_ALLOW_ALL_ORIGINS = True
CORS_EXPOSE_HEADERS = ["Content-Disposition", "Content-Range", "ETag"]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# One line per record on stderr: plain text (time, level, logger, message, then the
# structured fields as key=value), or with LOG_FORMAT=json one JSON object per line
# (msc3870/logs.py). Access tokens and upload URLs are credentials: redacted from every
# record the console prints, and from Django's request warnings (which carry the path)
# for its own handlers.
LOG_FORMAT = formatter_name(env("LOG_FORMAT"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"redact_secrets": {"()": "mediarepo.redaction.RedactSecrets"}},
    "formatters": FORMATTERS,
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "filters": ["redact_secrets"],
            "formatter": LOG_FORMAT,
        }
    },
    "loggers": {"django.request": {"filters": ["redact_secrets"]}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", "INFO")},
}
# Python's warnings too, as records (py.warnings) in the same format, not bare stderr text.
logging.captureWarnings(True)
# Neither formatter prints a record's thread, process name or source line: a record need
# not look them up (the logging HOWTO's "Optimization"), which is most of the cost of a
# request's line, written on the event loop.
logging.logThreads = False
logging.logMultiprocessing = False
logging._srcfile = None
