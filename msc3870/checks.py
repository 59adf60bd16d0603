"""System checks for misconfiguration (``manage.py check``). No network calls here.

Registered in ``MSC3870Config.ready()``: ``check_settings`` (values), and the type of every
setting in ``DEFAULTS`` (``SETTING_TYPES``), one check id per kind of type, split in two
functions so that the settings a misread would weaken (what may be uploaded, who may
act, what is checked, limits) are tagged ``Tags.security``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import FileSystemStorage, InvalidStorageError, storages

from .conf import (
    DEFAULTS,
    SHA256_WHEN_CHOICES,
    TYPE_MISMATCH_POLICIES,
    app_settings,
    parse_freeze_time,
)

# S3 signs upload URLs for at most 7 days.
S3_MAX_PRESIGN_SECONDS = 7 * 24 * 3600


# ---------------------------------------------------------------------------- types


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int too


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_str_list(value: Any) -> bool:
    # A bare string iterates as its characters: "image/*" would allow "*".
    return isinstance(value, list | tuple) and all(isinstance(item, str) for item in value)


def _is_import_string(value: Any) -> bool:
    return isinstance(value, str) and "." in value.strip(".")


def _is_datetime(value: Any) -> bool:
    if not isinstance(value, str | datetime):
        return False
    try:
        return parse_freeze_time(value) is not None
    except ImproperlyConfigured:
        return False


def _is_key_servers(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(
        isinstance(s, dict)
        and isinstance(s.get("server_name"), str)
        and isinstance(s.get("verify_keys"), dict)
        and s["verify_keys"]
        and all(isinstance(k, str) and isinstance(v, str) for k, v in s["verify_keys"].items())
        for s in value
    )


@dataclass(frozen=True)
class Kind:
    """A type a setting can have, and the check id that reports a value of another type."""

    id: str
    description: str
    accepts: Callable[[Any], bool]


INT = Kind("msc3870.E012", "an integer", _is_int)
NUMBER = Kind("msc3870.E013", "a number", _is_number)
BOOL = Kind("msc3870.E014", "True or False", lambda value: isinstance(value, bool))
STR = Kind("msc3870.E015", "a string", lambda value: isinstance(value, str))
STR_LIST = Kind("msc3870.E016", "a list of strings", _is_str_list)
IMPORT_STRING = Kind("msc3870.E017", "an import string ('package.module.name')", _is_import_string)
IMPORT_STRING_LIST = Kind(
    "msc3870.E018",
    "a list of import strings",
    lambda value: _is_str_list(value) and all(_is_import_string(item) for item in value),
)
DATETIME = Kind(
    "msc3870.E019",
    "a timezone-aware datetime (or an ISO 8601 string with a time zone)",
    _is_datetime,
)
KEY_SERVERS = Kind(
    "msc3870.E020",
    'a list of {"server_name": str, "verify_keys": {key id: base64 key}}',
    _is_key_servers,
)
PATH = Kind(
    "msc3870.E021", "a file path (str or os.PathLike)", lambda v: isinstance(v, str | os.PathLike)
)


@dataclass(frozen=True)
class SettingType:
    kind: Kind
    nullable: bool = False  # None is allowed (and means "off" or "the default")
    security: bool = False  # a misread weakens a defence: reported under Tags.security


def _t(kind: Kind, *, null: bool = False, security: bool = False) -> SettingType:
    return SettingType(kind, null, security)


# Every key of DEFAULTS (tests/test_checks.py makes sure none is missing).
SETTING_TYPES: dict[str, SettingType] = {
    "SERVER_NAME": _t(STR),
    "PUBLIC_BASEURL": _t(STR),
    "MAX_UPLOAD_SIZE": _t(INT, security=True),
    "UNUSED_EXPIRATION": _t(INT, security=True),
    "MAX_PENDING_UPLOADS": _t(INT, security=True),
    "CREATE_RATE": _t(STR, null=True, security=True),
    "STORAGE_ALIAS": _t(STR),
    "TOKEN_RESOLVER": _t(IMPORT_STRING, security=True),
    "HOMESERVER_URL": _t(STR, null=True, security=True),
    "WHOAMI_CACHE_SECONDS": _t(NUMBER, security=True),
    "COMPLETE_WAIT_SECONDS": _t(NUMBER),
    "COMPLETE_WAITS_FOR_CHECKS": _t(BOOL),
    "DOWNLOAD_TIMEOUT_MS": _t(INT),
    "DOWNLOAD_TIMEOUT_MS_MAX": _t(INT),
    "LEGACY_DOWNLOAD_TIMEOUT_MS_MAX": _t(INT),
    "LEGACY_MEDIA_FREEZE_AFTER": _t(DATETIME, null=True, security=True),
    "WAIT_MAX_WAITERS": _t(INT, security=True),
    "WAIT_MAX_WAITERS_PER_MEDIA": _t(INT, security=True),
    "LEGACY_WAIT_MAX_WAITERS": _t(INT, security=True),
    "WAIT_MAX_WAITERS_PER_REQUESTER": _t(INT, security=True),
    "UPLOAD_BODIES_MAX": _t(INT, security=True),
    "UPLOAD_BODIES_PER_ADDRESS_MAX": _t(INT, security=True),
    "UPLOAD_MIN_BYTES_PER_SECOND": _t(NUMBER, security=True),
    "UPLOAD_RATE_GRACE_SECONDS": _t(NUMBER, security=True),
    "UPLOAD_IDLE_TIMEOUT_SECONDS": _t(NUMBER, security=True),
    "WAKEUP_POLL_SECONDS": _t(NUMBER),
    "WAKEUP_SAFETY_POLL_SECONDS": _t(NUMBER),
    "WAKEUP_LISTEN": _t(BOOL),
    "WAKEUP_REDIS_URL": _t(STR, null=True),
    "TOKEN_CACHE_SECONDS": _t(NUMBER, security=True),
    "CHECKS": _t(IMPORT_STRING_LIST, security=True),
    "USER_QUOTA_BYTES": _t(INT, null=True, security=True),
    "CLAMAV_URL": _t(STR, null=True, security=True),
    "CLAMAV_TIMEOUT_SECONDS": _t(NUMBER),
    "THUMBNAIL_MAX_SOURCE_BYTES": _t(INT, security=True),
    "THUMBNAIL_MAX_PIXELS": _t(INT, security=True),
    "THUMBNAIL_MAX_DECODED_BYTES": _t(INT, security=True),
    "THUMBNAIL_CONCURRENT_RENDERS": _t(INT, security=True),
    "THUMBNAIL_RENDER_WAIT_SECONDS": _t(NUMBER),
    "TOMBSTONE_RETENTION_DAYS": _t(INT, null=True),
    "ALLOWED_CONTENT_TYPES": _t(STR_LIST, security=True),
    "DENIED_CONTENT_TYPES": _t(STR_LIST, security=True),
    "TYPE_MISMATCH": _t(STR, security=True),
    "SHA256_WHEN": _t(STR, security=True),
    "REDIRECT_DOWNLOADS": _t(BOOL),
    "DOWNLOAD_URL_LIFETIME": _t(INT, security=True),
    "STUCK_AFTER_SECONDS": _t(INT),
    "S3_PUBLIC_ENDPOINT_URL": _t(STR, null=True),
    "S3_COPY_CHECKSUM": _t(BOOL),
    "S3_COPY_PART_THRESHOLD": _t(INT),
    "S3_COPY_PART_SIZE": _t(INT),
    "S3_COPY_CONCURRENCY": _t(INT),
    "S3_INCOMING_EXPIRATION_DAYS": _t(INT, null=True),
    "SIGNING_KEY_PATH": _t(PATH, null=True, security=True),
    "SIGNING_KEY_VALIDITY_SECONDS": _t(INT, security=True),
    "TRUSTED_KEY_SERVERS": _t(KEY_SERVERS, security=True),
    "FEDERATION_IP_RANGE_DENYLIST": _t(STR_LIST, null=True, security=True),
    "FEDERATION_IP_RANGE_ALLOWLIST": _t(STR_LIST, security=True),
    "FEDERATION_VERIFY_TLS": _t(BOOL, security=True),
    "FEDERATION_MEDIA_RATE": _t(STR, null=True, security=True),
    "FEDERATION_AUTH_FAILURE_RATE": _t(STR, null=True, security=True),
    "FEDERATION_REQUESTS_PER_ADDRESS": _t(INT, security=True),
    "FEDERATION_KEY_FETCHES": _t(INT, security=True),
    "FEDERATION_KEY_FETCH_TIMEOUT_SECONDS": _t(NUMBER, security=True),
    "FETCH_REMOTE_MEDIA": _t(BOOL),
    "REMOTE_MEDIA_FAILURE_SECONDS": _t(INT),
    "REMOTE_MEDIA_TIMEOUT_SECONDS": _t(NUMBER),
    "REMOTE_MEDIA_DOWNLOAD_PER_SECOND": _t(INT, null=True, security=True),
    "REMOTE_MEDIA_DOWNLOAD_BURST_COUNT": _t(INT, security=True),
    "REMOTE_MEDIA_MAX_FETCHES": _t(INT, security=True),
    "REMOTE_MEDIA_CACHE_MAX_BYTES": _t(INT, null=True, security=True),
    "HEALTH_COMPONENTS": _t(STR_LIST),
    "HEALTH_CACHE_SECONDS": _t(NUMBER),
    "HEALTH_TIMEOUT_SECONDS": _t(NUMBER),
    "HEALTH_BEAT_MAX_AGE_SECONDS": _t(NUMBER),
    "METRICS_PORT": _t(INT, null=True, security=True),
    "METRICS_ALLOWED_NETWORKS": _t(STR_LIST, security=True),
}


def _user_settings() -> dict[str, Any] | None:
    user = getattr(settings, "MSC3870", {}) or {}
    return user if isinstance(user, dict) else None


def mistyped_settings() -> dict[str, SettingType]:
    """The settings whose value (given, or the default) has the wrong type."""
    user = _user_settings()
    if user is None:
        return {}
    wrong: dict[str, SettingType] = {}
    for name, default in DEFAULTS.items():
        expected = SETTING_TYPES.get(name)
        if expected is None:
            continue
        value = user.get(name, default)
        if value is None and expected.nullable:
            continue
        if not expected.kind.accepts(value):
            wrong[name] = expected
    return wrong


def _type_errors(*, security: bool) -> list[CheckMessage]:
    user = _user_settings() or {}
    errors: list[CheckMessage] = []
    for name, expected in mistyped_settings().items():
        if expected.security != security:
            continue
        value = user.get(name, DEFAULTS[name])
        listy = expected.kind in (STR_LIST, IMPORT_STRING_LIST)
        errors.append(
            Error(
                f"MSC3870[{name!r}] must be {expected.kind.description}"
                f"{' or None' if expected.nullable else ''}, not {type(value).__name__} "
                f"{value!r:.60}.",
                hint="A string where a list belongs is read as a list of its characters."
                if listy and isinstance(value, str)
                else None,
                id=expected.kind.id,
            )
        )
    return errors


def check_setting_types(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Types of the settings that do not weaken a defence when misread (Tags.compatibility)."""
    return _type_errors(security=False)


def check_security_setting_types(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Types of the settings a misread would weaken (Tags.security)."""
    return _type_errors(security=True)


# ---------------------------------------------------------------------------- values


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The values of the settings. A setting of the wrong type is left to the type checks
    (its value cannot be judged, and reading it could raise)."""
    user = getattr(settings, "MSC3870", {})
    if not isinstance(user, dict):
        return [Error("MSC3870 must be a dict.", id="msc3870.E001")]
    mistyped = mistyped_settings()

    def typed(*names: str) -> bool:
        return not any(name in mistyped for name in names)

    errors: list[CheckMessage] = [
        Warning(
            f"MSC3870[{key!r}] is not a known setting.",
            hint="Known settings: " + ", ".join(sorted(DEFAULTS)),
            id="msc3870.W001",
        )
        for key in user
        if key not in DEFAULTS
    ]
    from .services import SERVER_NAME_RE

    if typed("SERVER_NAME") and not SERVER_NAME_RE.fullmatch(app_settings.SERVER_NAME):
        errors.append(
            Error(
                f"MSC3870['SERVER_NAME'] = {app_settings.SERVER_NAME!r} is not a server name.",
                id="msc3870.E002",
            )
        )
    base = urlsplit(app_settings.PUBLIC_BASEURL)
    if typed("PUBLIC_BASEURL") and (base.scheme not in ("http", "https") or not base.netloc):
        errors.append(
            Error(
                "MSC3870['PUBLIC_BASEURL'] must be an absolute http(s) URL.",
                hint="Upload URLs and redirects are built from it.",
                id="msc3870.E003",
            )
        )
    for name in ("TOKEN_RESOLVER", "CHECKS"):
        if not typed(name):
            continue
        try:
            getattr(app_settings, name)
        except ImproperlyConfigured as exc:
            errors.append(Error(str(exc), id="msc3870.E005"))
    positive = (
        "MAX_UPLOAD_SIZE",
        "UNUSED_EXPIRATION",
        "COMPLETE_WAIT_SECONDS",
        "REMOTE_MEDIA_DOWNLOAD_PER_SECOND",
        "REMOTE_MEDIA_DOWNLOAD_BURST_COUNT",
        "REMOTE_MEDIA_MAX_FETCHES",
        "UPLOAD_BODIES_MAX",
        "UPLOAD_BODIES_PER_ADDRESS_MAX",
        "UPLOAD_IDLE_TIMEOUT_SECONDS",
        "HEALTH_TIMEOUT_SECONDS",
        "HEALTH_BEAT_MAX_AGE_SECONDS",
        "METRICS_PORT",
    )
    non_negative = (
        "MAX_PENDING_UPLOADS",
        "DOWNLOAD_TIMEOUT_MS",
        "DOWNLOAD_TIMEOUT_MS_MAX",
        "REMOTE_MEDIA_CACHE_MAX_BYTES",
        "UPLOAD_MIN_BYTES_PER_SECOND",
        "UPLOAD_RATE_GRACE_SECONDS",
        "HEALTH_CACHE_SECONDS",
    )
    for name in (*positive, *non_negative):
        if not typed(name):
            continue
        # The raw value: the typed properties clamp some of these into range.
        raw = user.get(name, DEFAULTS[name])
        if raw is None and SETTING_TYPES[name].nullable:
            continue  # None: off, or no bound
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = -1
        if value < 0 or (name in positive and value == 0):
            kind = "positive" if name in positive else "non-negative"
            errors.append(Error(f"MSC3870[{name!r}] must be a {kind} number.", id="msc3870.E006"))
    if typed("TYPE_MISMATCH") and app_settings.TYPE_MISMATCH not in TYPE_MISMATCH_POLICIES:
        errors.append(
            Error(
                f"MSC3870['TYPE_MISMATCH'] must be one of {', '.join(TYPE_MISMATCH_POLICIES)}.",
                id="msc3870.E007",
            )
        )
    if typed("SHA256_WHEN") and app_settings.SHA256_WHEN not in SHA256_WHEN_CHOICES:
        errors.append(
            Error(
                f"MSC3870['SHA256_WHEN'] must be one of {', '.join(SHA256_WHEN_CHOICES)}.",
                id="msc3870.E007",
            )
        )
    if (
        user.get("TOKEN_RESOLVER") == "msc3870.auth.HomeserverTokenResolver"
        and typed("HOMESERVER_URL")
        and not app_settings.HOMESERVER_URL
    ):
        errors.append(
            Error(
                "HomeserverTokenResolver needs MSC3870['HOMESERVER_URL'].",
                hint="Set MATRIX_HOMESERVER_URL in mediarepo.",
                id="msc3870.E008",
            )
        )
    rate = app_settings.CREATE_RATE
    if rate is not None and typed("CREATE_RATE"):
        from rest_framework.throttling import SimpleRateThrottle

        try:
            SimpleRateThrottle.parse_rate(None, rate)  # type: ignore[arg-type]
        except (ValueError, KeyError, AttributeError):
            errors.append(
                Error(
                    f"MSC3870['CREATE_RATE'] = {rate!r} is not a rate like '60/min'.",
                    id="msc3870.E010",
                )
            )
    if typed("STORAGE_ALIAS", "UNUSED_EXPIRATION"):
        errors.extend(_check_storage())
    errors.extend(_check_operating(typed))
    return errors


def _check_operating(typed: Callable[..., bool]) -> list[CheckMessage]:
    """The health check's components and the networks that may read metrics."""
    from .health import COMPONENTS

    errors: list[CheckMessage] = []
    if typed("HEALTH_COMPONENTS"):
        unknown = [c for c in app_settings.HEALTH_COMPONENTS if c not in COMPONENTS]
        if unknown:
            errors.append(
                Error(
                    f"MSC3870['HEALTH_COMPONENTS'] names unknown components: {unknown}.",
                    hint="Known components: " + ", ".join(COMPONENTS),
                    id="msc3870.E023",
                )
            )
    if typed("METRICS_ALLOWED_NETWORKS"):
        for network in app_settings.METRICS_ALLOWED_NETWORKS:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                errors.append(
                    Error(
                        f"MSC3870['METRICS_ALLOWED_NETWORKS'] entry {network!r} is not an "
                        "address or network (CIDR).",
                        id="msc3870.E022",
                    )
                )
    return errors


def _check_storage() -> list[CheckMessage]:
    alias = app_settings.STORAGE_ALIAS
    try:
        storage = storages[alias]
    except (InvalidStorageError, ImproperlyConfigured) as exc:
        return [
            Error(
                f"STORAGES has no usable storage {alias!r} (MSC3870['STORAGE_ALIAS']): {exc}",
                id="msc3870.E004",
            )
        ]
    if isinstance(storage, FileSystemStorage):
        return []
    try:
        from storages.backends.s3 import S3Storage
    except ImportError:  # pragma: no cover
        S3Storage = None
    if S3Storage is None or not isinstance(storage, S3Storage):
        return [
            Error(
                f"STORAGES[{alias!r}] is a {type(storage).__name__}; media needs a "
                "FileSystemStorage or django-storages' S3Storage.",
                id="msc3870.E004",
            )
        ]
    errors: list[CheckMessage] = []
    if not getattr(storage, "querystring_auth", True):
        errors.append(
            Error(
                f"STORAGES[{alias!r}] has querystring_auth off: download URLs would be "
                "unsigned and media public.",
                hint="Keep querystring_auth True (the default) and the bucket private.",
                id="msc3870.E009",
            )
        )
    if str(getattr(storage, "default_acl", None) or "").startswith("public"):
        errors.append(
            Error(
                f"STORAGES[{alias!r}] writes objects with ACL {storage.default_acl!r}.",
                hint="Media must not be readable without a signature: drop default_acl.",
                id="msc3870.E009",
            )
        )
    signature = getattr(storage, "signature_version", None)
    if signature not in (None, "s3v4"):
        errors.append(
            Error(
                f"STORAGES[{alias!r}] signs with {signature!r}; presigned uploads need 's3v4'.",
                id="msc3870.E011",
            )
        )
    if app_settings.UNUSED_EXPIRATION > S3_MAX_PRESIGN_SECONDS:
        errors.append(
            Warning(
                "MSC3870['UNUSED_EXPIRATION'] is longer than the 7 days an S3 upload URL "
                "can live: created ids will expire after 7 days.",
                id="msc3870.W002",
            )
        )
    return errors
