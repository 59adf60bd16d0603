"""System checks for misconfiguration (``manage.py check``). No network calls here."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import FileSystemStorage, InvalidStorageError, storages

from .conf import DEFAULTS, TYPE_MISMATCH_POLICIES, app_settings

# S3 signs upload URLs for at most 7 days.
S3_MAX_PRESIGN_SECONDS = 7 * 24 * 3600


@register(Tags.compatibility)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    user = getattr(settings, "MSC3870", {})
    if not isinstance(user, dict):
        return [Error("MSC3870 must be a dict.", id="msc3870.E001")]
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

    if not SERVER_NAME_RE.fullmatch(app_settings.SERVER_NAME):
        errors.append(
            Error(
                f"MSC3870['SERVER_NAME'] = {app_settings.SERVER_NAME!r} is not a server name.",
                id="msc3870.E002",
            )
        )
    base = urlsplit(app_settings.PUBLIC_BASEURL)
    if base.scheme not in ("http", "https") or not base.netloc:
        errors.append(
            Error(
                "MSC3870['PUBLIC_BASEURL'] must be an absolute http(s) URL.",
                hint="Upload URLs and redirects are built from it.",
                id="msc3870.E003",
            )
        )
    for name in ("TOKEN_RESOLVER", "CHECKS"):
        try:
            getattr(app_settings, name)
        except ImproperlyConfigured as exc:
            errors.append(Error(str(exc), id="msc3870.E005"))
    positive = ("MAX_UPLOAD_SIZE", "UNUSED_EXPIRATION", "COMPLETE_WAIT_SECONDS")
    non_negative = ("MAX_PENDING_UPLOADS", "DOWNLOAD_TIMEOUT_MS", "DOWNLOAD_TIMEOUT_MS_MAX")
    for name in (*positive, *non_negative):
        try:
            value = float(getattr(app_settings, name))
        except (TypeError, ValueError):
            value = -1
        if value < 0 or (name in positive and value == 0):
            kind = "positive" if name in positive else "non-negative"
            errors.append(Error(f"MSC3870[{name!r}] must be a {kind} number.", id="msc3870.E006"))
    if app_settings.TYPE_MISMATCH not in TYPE_MISMATCH_POLICIES:
        errors.append(
            Error(
                f"MSC3870['TYPE_MISMATCH'] must be one of {', '.join(TYPE_MISMATCH_POLICIES)}.",
                id="msc3870.E007",
            )
        )
    if (
        user.get("TOKEN_RESOLVER") == "msc3870.auth.HomeserverTokenResolver"
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
    if rate is not None:
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
    errors.extend(_check_storage())
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
