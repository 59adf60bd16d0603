"""System checks for misconfiguration (``manage.py check``). No network calls here.

Registered in ``MSC3870Config.ready()``: ``check_settings`` (values), and the type of every
setting declared in ``conf.py``, one check id per kind of type (``setting.Kind``), split in
two functions so that the settings a misread would weaken (what may be uploaded, who may
act, what is checked, limits) are tagged ``Tags.security``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import FileSystemStorage, InvalidStorageError, storages

from .conf import SETTINGS, app_settings
from .server_names import is_valid_server_name
from .setting import IMPORT_STRING_LIST, STR_LIST, Setting

# S3 signs upload URLs for at most 7 days.
S3_MAX_PRESIGN_SECONDS = 7 * 24 * 3600


# ---------------------------------------------------------------------------- types

# Each setting's kind, nullability and security tag, as declared.
SETTING_TYPES: dict[str, Setting[Any]] = SETTINGS


def _user_settings() -> dict[str, Any] | None:
    user = getattr(settings, "MSC3870", {}) or {}
    return user if isinstance(user, dict) else None


def mistyped_settings() -> dict[str, Setting[Any]]:
    """The settings whose value (given, or the default) has the wrong type."""
    user = _user_settings()
    if user is None:
        return {}
    return {
        name: setting
        for name, setting in SETTINGS.items()
        if not setting.accepts(user.get(name, setting.default))
    }


def _type_errors(*, security: bool) -> list[CheckMessage]:
    user = _user_settings() or {}
    errors: list[CheckMessage] = []
    for name, expected in mistyped_settings().items():
        if expected.security != security:
            continue
        value = user.get(name, expected.default)
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

    errors = _check_unknown(user)
    errors.extend(_check_addresses(typed))
    errors.extend(_check_imports(typed))
    errors.extend(_check_numbers(user, typed))
    errors.extend(_check_choices(typed))
    errors.extend(_check_homeserver(user, typed))
    errors.extend(_check_rates(typed))
    if typed("STORAGE_ALIAS", "UNUSED_EXPIRATION"):
        errors.extend(_check_storage())
    errors.extend(_check_operating(typed))
    errors.extend(_check_retention(typed))
    if typed("ADMINS"):
        errors.extend(_check_admins())
    return errors


def _check_unknown(user: dict[str, Any]) -> list[CheckMessage]:
    """Keys of ``MSC3870`` that are no setting (a typo leaves the default in force)."""
    return [
        Warning(
            f"MSC3870[{key!r}] is not a known setting.",
            hint="Known settings: " + ", ".join(sorted(SETTINGS)),
            id="msc3870.W001",
        )
        for key in user
        if key not in SETTINGS
    ]


def _check_addresses(typed: Callable[..., bool]) -> list[CheckMessage]:
    """The server's name and the public URL that upload URLs and redirects start with."""
    errors: list[CheckMessage] = []
    if typed("SERVER_NAME") and not is_valid_server_name(app_settings.SERVER_NAME):
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
    return errors


def _check_imports(typed: Callable[..., bool]) -> list[CheckMessage]:
    """The settings that name code to import: each must import."""
    errors: list[CheckMessage] = []
    for name in ("TOKEN_RESOLVER", "CHECKS"):
        if not typed(name):
            continue
        try:
            getattr(app_settings, name)
        except ImproperlyConfigured as exc:
            errors.append(Error(str(exc), id="msc3870.E005"))
    return errors


def _check_numbers(user: dict[str, Any], typed: Callable[..., bool]) -> list[CheckMessage]:
    """Settings that must be positive or non-negative, judged by the raw value: the
    typed one is clamped into range for some of them."""
    errors: list[CheckMessage] = []
    for name, setting in SETTINGS.items():
        if setting.must_be is None or not typed(name):
            continue
        raw = user.get(name, setting.default)
        if raw is None and setting.nullable:
            continue  # None: off, or no bound
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = -1
        if value < 0 or (setting.must_be == "positive" and value == 0):
            errors.append(
                Error(f"MSC3870[{name!r}] must be a {setting.must_be} number.", id="msc3870.E006")
            )
    return errors


def _check_choices(typed: Callable[..., bool]) -> list[CheckMessage]:
    """Settings that take one of a few values."""
    return [
        Error(
            f"MSC3870[{name!r}] must be one of {', '.join(setting.choices)}.",
            id="msc3870.E007",
        )
        for name, setting in SETTINGS.items()
        if setting.choices and typed(name) and getattr(app_settings, name) not in setting.choices
    ]


def _check_homeserver(user: dict[str, Any], typed: Callable[..., bool]) -> list[CheckMessage]:
    """The homeserver token resolver asks the homeserver: it needs its URL."""
    if (
        user.get("TOKEN_RESOLVER") == "msc3870.auth.HomeserverTokenResolver"
        and typed("HOMESERVER_URL")
        and not app_settings.HOMESERVER_URL
    ):
        return [
            Error(
                "HomeserverTokenResolver needs MSC3870['HOMESERVER_URL'].",
                hint="Set MATRIX_HOMESERVER_URL in mediarepo.",
                id="msc3870.E008",
            )
        ]
    return []


def _check_rates(typed: Callable[..., bool]) -> list[CheckMessage]:
    """Rates are read as DRF's throttles read them ('60/min')."""
    from rest_framework.throttling import SimpleRateThrottle

    errors: list[CheckMessage] = []
    for name in ("CREATE_RATE", "URL_PREVIEW_RATE"):
        rate = getattr(app_settings, name) if typed(name) else None
        if rate is None:
            continue
        try:
            SimpleRateThrottle.parse_rate(None, rate)  # type: ignore[arg-type]
        except (ValueError, KeyError, AttributeError):
            errors.append(
                Error(
                    f"MSC3870[{name!r}] = {rate!r} is not a rate like '60/min'.",
                    id="msc3870.E010",
                )
            )
    return errors


def _check_admins() -> list[CheckMessage]:
    """The admin API's admins are Matrix user ids: anything else would never match the
    caller it was meant for."""
    from .auth import is_user_id

    return [
        Error(
            f"MSC3870['ADMINS'] entry {admin!r} is not a Matrix user id.",
            hint="Write each as @localpart:server.name.",
            id="msc3870.E024",
        )
        for admin in app_settings.ADMINS
        if not is_user_id(admin)
    ]


def check_url_previews(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """URL previews fetch any URL a user names: refused on with an empty deny list (every
    internal address reachable, as Synapse refuses url_preview_enabled without
    url_preview_ip_range_blacklist), and every range must parse (Tags.security)."""
    user = _user_settings()
    if user is None:
        return []
    mistyped = mistyped_settings()
    errors: list[CheckMessage] = []
    lists = ("URL_PREVIEW_IP_RANGE_DENYLIST", "URL_PREVIEW_IP_RANGE_ALLOWLIST")
    for name in lists:
        if name in mistyped:
            continue
        for network in getattr(app_settings, name) or ():
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                errors.append(
                    Error(
                        f"MSC3870[{name!r}] entry {network!r} is not an address or network (CIDR).",
                        id="msc3870.E032",
                    )
                )
    if (
        "URL_PREVIEW_ENABLED" not in mistyped
        and lists[0] not in mistyped
        and app_settings.URL_PREVIEW_ENABLED
        and app_settings.URL_PREVIEW_IP_RANGE_DENYLIST == []
    ):
        errors.append(
            Error(
                "URL previews are on with an empty MSC3870['URL_PREVIEW_IP_RANGE_DENYLIST']: "
                "any user could make this server fetch from internal addresses.",
                hint="Leave it unset (None) for the built-in list of private, loopback, "
                "link-local and reserved ranges, or list the ranges to deny; open single "
                "addresses with URL_PREVIEW_IP_RANGE_ALLOWLIST.",
                id="msc3870.E031",
            )
        )
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


def _check_retention(typed: Callable[..., bool]) -> list[CheckMessage]:
    """A rule by last access shorter than the time a download's access is recorded to
    would delete media that is being served."""
    from .availability import ACCESS_GRANULARITY

    warnings: list[CheckMessage] = []
    resolution = int(ACCESS_GRANULARITY.total_seconds())
    for name in ("RETENTION_LOCAL_UNUSED_SECONDS", "RETENTION_REMOTE_UNUSED_SECONDS"):
        seconds = getattr(app_settings, name) if typed(name) else None
        if seconds is not None and seconds < resolution:
            warnings.append(
                Warning(
                    f"MSC3870[{name!r}] is shorter than {resolution} s, the time to which "
                    "the last access of media is recorded: media being served may be "
                    "deleted.",
                    id="msc3870.W003",
                )
            )
    return warnings


def _check_storage() -> list[CheckMessage]:
    """The storage media is kept in: a filesystem, or S3 that keeps it private."""
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
    incoming = app_settings.S3_INCOMING_BUCKET
    if isinstance(storage, FileSystemStorage):
        if incoming:
            return [
                Warning(
                    "MSC3870['S3_INCOMING_BUCKET'] is set, but media are on the local disk: "
                    "it is not used.",
                    id="msc3870.W004",
                )
            ]
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
    return _check_s3(alias, storage)


def _check_s3(alias: str, storage: Any) -> list[CheckMessage]:
    """An S3 storage must sign its URLs (s3v4, as presigned uploads need) and never
    write objects readable without a signature."""
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
    incoming = app_settings.S3_INCOMING_BUCKET
    if incoming and incoming == getattr(storage, "bucket_name", None):
        errors.append(
            Error(
                "MSC3870['S3_INCOMING_BUCKET'] is the media bucket: upload URLs' objects "
                "need a bucket of their own, with versioning on.",
                hint="Name another bucket, or unset it to copy uploads before the checks.",
                id="msc3870.E033",
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
