"""msc3870/conf.py: each setting declared once, read typed on every access."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from msc3870 import screening
from msc3870.auth import LocalTokenResolver
from msc3870.conf import (
    DEFAULT_OEMBED_PROVIDERS,
    DEFAULTS,
    SETTINGS,
    app_settings,
    settings_from_environment,
)

from .helpers import environment_variables, typed

README = Path(__file__).resolve().parent.parent / "README.md"
MiB = 1024 * 1024

# What the code reads with nothing configured: the type matters (20 s is 20.0).
TYPED_DEFAULTS: dict[str, Any] = {
    "SERVER_NAME": "localhost",
    "PUBLIC_BASEURL": "http://127.0.0.1:8008",
    "STORAGE_ALIAS": "msc3870",
    "STORE": None,
    "TOKEN_RESOLVER": LocalTokenResolver,
    "HOMESERVER_URL": None,
    "WHOAMI_CACHE_SECONDS": 15,
    "TOKEN_CACHE_SECONDS": 10.0,
    "ADMINS": [],
    "HOMESERVER_ADMINS": True,
    "ADMIN_CACHE_SECONDS": 30,
    "ADMIN_API_ITEMS_PER_REQUEST": 1000,
    "MAX_UPLOAD_SIZE": 50 * MiB,
    "UNUSED_EXPIRATION": 86400,
    "MAX_PENDING_UPLOADS": 5,
    "CREATE_RATE": "60/min",
    "COMPLETE_WAIT_SECONDS": 20.0,
    "COMPLETE_WAITS_FOR_CHECKS": False,
    "STUCK_AFTER_SECONDS": 300,
    "IN_FLIGHT_UPLOAD_SECONDS": 3600,
    "UPLOAD_BODIES_MAX": 64,
    "UPLOAD_BODIES_PER_ADDRESS_MAX": 8,
    "UPLOAD_MIN_BYTES_PER_SECOND": 1024.0,
    "UPLOAD_RATE_GRACE_SECONDS": 30.0,
    "UPLOAD_IDLE_TIMEOUT_SECONDS": 60.0,
    "CHECKS": [
        screening.check_size,
        screening.check_content_type,
        screening.check_sha256,
        screening.check_not_blocked,
        screening.check_user_quota,
        screening.check_clamav,
    ],
    "SHA256_WHEN": "needed",
    "USER_QUOTA_BYTES": None,
    "CLAMAV_URL": None,
    "CLAMAV_TIMEOUT_SECONDS": 60.0,
    "ALLOWED_CONTENT_TYPES": ["*"],
    "DENIED_CONTENT_TYPES": [],
    "TYPE_MISMATCH": "sniffed",
    "DOWNLOAD_TIMEOUT_MS": 20_000,
    "DOWNLOAD_TIMEOUT_MS_MAX": 60_000,
    "LEGACY_DOWNLOAD_TIMEOUT_MS_MAX": 10_000,
    "LEGACY_MEDIA_FREEZE_AFTER": None,
    "REDIRECT_DOWNLOADS": False,
    "DOWNLOAD_URL_LIFETIME": 300,
    "WAIT_MAX_WAITERS": 10_000,
    "WAIT_MAX_WAITERS_PER_MEDIA": 5_000,
    "LEGACY_WAIT_MAX_WAITERS": 500,
    "WAIT_MAX_WAITERS_PER_REQUESTER": 200,
    "WAKEUP_POLL_SECONDS": 0.05,
    "WAKEUP_SAFETY_POLL_SECONDS": 2.0,
    "WAKEUP_LISTEN": True,
    "WAKEUP_REDIS_URL": None,
    "THUMBNAIL_MAX_SOURCE_BYTES": 20 * MiB,
    "THUMBNAIL_MAX_PIXELS": 32_000_000,
    "THUMBNAIL_MAX_DECODED_BYTES": 192 * MiB,
    "THUMBNAIL_CONCURRENT_RENDERS": 2,
    "THUMBNAIL_RENDER_WAIT_SECONDS": 5.0,
    "TOMBSTONE_RETENTION_DAYS": 30,
    "S3_PUBLIC_ENDPOINT_URL": None,
    "S3_INCOMING_BUCKET": None,
    "S3_COPY_CHECKSUM": True,
    "S3_COPY_PART_THRESHOLD": 5 * 1024 * MiB,
    "S3_COPY_PART_SIZE": 512 * MiB,
    "S3_COPY_CONCURRENCY": 4,
    "S3_UPLOAD_PART_SIZE": 8 * MiB,
    "S3_UPLOAD_CONCURRENCY": 4,
    "S3_UPLOAD_SINGLE_PUT_LIMIT": 256 * MiB,
    "S3_SIGN_PAYLOAD": False,
    "DELETE_CONCURRENCY": 16,
    "S3_INCOMING_EXPIRATION_DAYS": 2,
    "SIGNING_KEY_PATH": None,
    "SIGNING_KEY_VALIDITY_SECONDS": 86400,
    "TRUSTED_KEY_SERVERS": [],
    "FEDERATION_IP_RANGE_DENYLIST": None,
    "FEDERATION_IP_RANGE_ALLOWLIST": [],
    "FEDERATION_VERIFY_TLS": True,
    "FEDERATION_MEDIA_RATE": "600/min",
    "FEDERATION_AUTH_FAILURE_RATE": "30/min",
    "FEDERATION_REQUESTS_PER_ADDRESS": 50,
    "FEDERATION_KEY_FETCHES": 4,
    "FEDERATION_KEY_FETCH_TIMEOUT_SECONDS": 20.0,
    "FETCH_REMOTE_MEDIA": True,
    "REMOTE_MEDIA_FAILURE_SECONDS": 60,
    "REMOTE_MEDIA_TIMEOUT_SECONDS": 120.0,
    "REMOTE_MEDIA_DOWNLOAD_PER_SECOND": 87 * 1024,
    "REMOTE_MEDIA_DOWNLOAD_BURST_COUNT": 500 * MiB,
    "REMOTE_MEDIA_MAX_FETCHES": 64,
    "REMOTE_MEDIA_CACHE_MAX_BYTES": 10 * 1024 * MiB,
    "RETENTION_LOCAL_MAX_AGE_SECONDS": None,
    "RETENTION_LOCAL_UNUSED_SECONDS": None,
    "RETENTION_REMOTE_MAX_AGE_SECONDS": None,
    "RETENTION_REMOTE_UNUSED_SECONDS": None,
    "RETENTION_MIN_BYTES": 0,
    "RETENTION_KEEP": None,
    "URL_PREVIEW_ENABLED": False,
    "URL_PREVIEW_IP_RANGE_DENYLIST": None,
    "URL_PREVIEW_IP_RANGE_ALLOWLIST": [],
    "URL_PREVIEW_RATE": "30/min",
    "URL_PREVIEW_TIMEOUT_SECONDS": 20.0,
    "URL_PREVIEW_MAX_BYTES": 10 * MiB,
    "URL_PREVIEW_MAX_HTML_BYTES": 1 * MiB,
    "URL_PREVIEW_CACHE_SECONDS": 3600,
    "URL_PREVIEW_FAILURE_SECONDS": 60,
    "URL_PREVIEW_IMAGE_RETENTION_SECONDS": 2 * 86400,
    "URL_PREVIEW_OEMBED_PROVIDERS": DEFAULT_OEMBED_PROVIDERS,
    "URL_PREVIEW_ACCEPT_LANGUAGE": ["en"],
    "HEALTH_COMPONENTS": ["database", "storage", "broker", "beat"],
    "HEALTH_CACHE_SECONDS": 2.0,
    "HEALTH_TIMEOUT_SECONDS": 2.0,
    "HEALTH_BEAT_MAX_AGE_SECONDS": 60.0,
    "METRICS_PORT": None,
    "METRICS_ALLOWED_NETWORKS": ["127.0.0.0/8", "::1/128"],
}


def read(**given: Any) -> dict[str, Any]:
    with override_settings(MSC3870=given):
        return {name: getattr(app_settings, name) for name in DEFAULTS}


def test_every_setting_read_typed_with_nothing_configured() -> None:
    assert set(TYPED_DEFAULTS) == set(DEFAULTS), "a setting was added or removed"
    values = read()
    assert {name: typed(values[name]) for name in TYPED_DEFAULTS} == {
        name: typed(value) for name, value in TYPED_DEFAULTS.items()
    }


# (setting, value given, what the code reads)
READ_CASES: list[tuple[str, Any, Any]] = [
    ("PUBLIC_BASEURL", "https://media.test/", "https://media.test"),
    ("HOMESERVER_URL", "https://hs.test/", "https://hs.test"),
    ("HOMESERVER_URL", "", None),
    ("CLAMAV_URL", "", None),
    ("WAKEUP_REDIS_URL", "", None),
    ("SIGNING_KEY_PATH", "", None),
    ("SIGNING_KEY_PATH", Path("/keys/signing.key"), "/keys/signing.key"),
    ("WHOAMI_CACHE_SECONDS", 2.7, 2),  # whole seconds
    ("TOKEN_CACHE_SECONDS", 3, 3.0),
    ("COMPLETE_WAIT_SECONDS", 5, 5.0),
    ("USER_QUOTA_BYTES", 1000, 1000),
    ("TOMBSTONE_RETENTION_DAYS", None, None),
    ("CREATE_RATE", None, None),
    ("REDIRECT_DOWNLOADS", 1, True),
    ("ALLOWED_CONTENT_TYPES", ("image/*",), ["image/*"]),
    ("TRUSTED_KEY_SERVERS", None, []),
    ("FEDERATION_IP_RANGE_ALLOWLIST", None, []),
    ("FEDERATION_IP_RANGE_DENYLIST", ("10.0.0.0/8",), ["10.0.0.0/8"]),
    (
        "LEGACY_MEDIA_FREEZE_AFTER",
        "2025-07-01T00:00:00Z",
        datetime(2025, 7, 1, tzinfo=UTC),
    ),
    # Floors: a value below is read as the floor (the value checks report some of them).
    ("THUMBNAIL_CONCURRENT_RENDERS", 0, 1),
    ("THUMBNAIL_RENDER_WAIT_SECONDS", -1, 0.0),
    ("S3_COPY_CONCURRENCY", 0, 1),
    ("S3_UPLOAD_PART_SIZE", MiB, 5 * MiB),
    ("S3_UPLOAD_CONCURRENCY", 0, 1),
    ("S3_UPLOAD_SINGLE_PUT_LIMIT", -1, 0),
    ("FEDERATION_KEY_FETCHES", 0, 1),
    ("FEDERATION_KEY_FETCH_TIMEOUT_SECONDS", 0.2, 1.0),
    ("REMOTE_MEDIA_FAILURE_SECONDS", -5, 0),
    ("REMOTE_MEDIA_TIMEOUT_SECONDS", 0, 1.0),
    ("REMOTE_MEDIA_DOWNLOAD_PER_SECOND", 0, 1),
    ("REMOTE_MEDIA_DOWNLOAD_PER_SECOND", None, None),
    ("REMOTE_MEDIA_DOWNLOAD_BURST_COUNT", 0, 1),
    ("REMOTE_MEDIA_MAX_FETCHES", 0, 1),
    ("REMOTE_MEDIA_CACHE_MAX_BYTES", -1, 0),
    ("REMOTE_MEDIA_CACHE_MAX_BYTES", None, None),
    ("S3_INCOMING_EXPIRATION_DAYS", 0, 1),
    ("S3_INCOMING_EXPIRATION_DAYS", 9, 9),
    ("ADMIN_CACHE_SECONDS", -1, 0),
    ("ADMIN_API_ITEMS_PER_REQUEST", 0, 1),
    ("ADMINS", ("@root:example.org",), ["@root:example.org"]),
    ("URL_PREVIEW_IP_RANGE_DENYLIST", ("10.0.0.0/8",), ["10.0.0.0/8"]),
    ("URL_PREVIEW_IP_RANGE_ALLOWLIST", None, []),
    ("URL_PREVIEW_RATE", None, None),
    ("URL_PREVIEW_TIMEOUT_SECONDS", 0, 1.0),
    ("URL_PREVIEW_CACHE_SECONDS", 5, 60),
    ("URL_PREVIEW_FAILURE_SECONDS", -1, 0),
]


@pytest.mark.parametrize(("name", "given", "expected"), READ_CASES)
def test_what_the_code_reads(name: str, given: Any, expected: Any) -> None:
    assert typed(read(**{name: given})[name]) == typed(expected)


def test_incoming_expiration_follows_unused_expiration() -> None:
    """None: a day more than an unused id can wait, rounded up to whole days."""
    assert read(UNUSED_EXPIRATION=3 * 86400 + 1)["S3_INCOMING_EXPIRATION_DAYS"] == 5
    assert read(UNUSED_EXPIRATION=3600)["S3_INCOMING_EXPIRATION_DAYS"] == 2


def test_settings_are_read_on_every_access() -> None:
    with override_settings(MSC3870={"MAX_UPLOAD_SIZE": 7}):
        assert app_settings.MAX_UPLOAD_SIZE == 7
        with override_settings(MSC3870={"MAX_UPLOAD_SIZE": 8}):
            assert app_settings.MAX_UPLOAD_SIZE == 8
        assert app_settings.MAX_UPLOAD_SIZE == 7


def test_settings_cannot_be_assigned_on_the_object() -> None:
    with pytest.raises(AttributeError):
        app_settings.MAX_UPLOAD_SIZE = 3  # type: ignore[assignment]
    assert read()["MAX_UPLOAD_SIZE"] == DEFAULTS["MAX_UPLOAD_SIZE"]


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ({"TOKEN_RESOLVER": "nowhere.Resolver"}, ["'TOKEN_RESOLVER'", "nowhere.Resolver"]),
        ({"CHECKS": ["msc3870.screening.nothing"]}, ["'CHECKS'", "msc3870.screening.nothing"]),
        ({"ALLOWED_CONTENT_TYPES": "image/*"}, ["'ALLOWED_CONTENT_TYPES'", "list of strings"]),
        ({"FEDERATION_IP_RANGE_DENYLIST": "10.0.0.0/8"}, ["'FEDERATION_IP_RANGE_DENYLIST'"]),
        ({"TRUSTED_KEY_SERVERS": [{"server_name": "x"}]}, ["'TRUSTED_KEY_SERVERS'"]),
        ({"LEGACY_MEDIA_FREEZE_AFTER": "2025-07-01T00:00"}, ["'LEGACY_MEDIA_FREEZE_AFTER'"]),
    ],
)
def test_errors_name_the_setting(given: dict[str, Any], words: list[str]) -> None:
    (name,) = given
    with override_settings(MSC3870=given), pytest.raises(ImproperlyConfigured) as raised:
        getattr(app_settings, name)
    assert all(word in str(raised.value) for word in words), raised.value


def test_msc3870_must_be_a_dict() -> None:
    with override_settings(MSC3870=["nope"]), pytest.raises(ImproperlyConfigured):
        assert app_settings.SERVER_NAME


# ------------------------------------------------------------------ the environment


def test_the_readme_lists_every_variable() -> None:
    listed = set(re.findall(r"`([A-Z][A-Z0-9_]+)[=`]", README.read_text()))
    assert environment_variables() - listed == set()


def test_the_app_reads_only_the_environment_it_is_given() -> None:
    assert settings_from_environment({}) == {
        name: value
        for name, value in DEFAULTS.items()
        if (env := SETTINGS[name].env) is not None and env.always and not env.only_with
    }
    given = settings_from_environment({"MSC3870_MAX_UPLOAD_SIZE": "12", "MSC3870_CHECKS": "a.b"})
    assert given["MAX_UPLOAD_SIZE"] == 12
    assert given["CHECKS"] == ["a.b"]


def test_a_default_list_is_never_shared_with_the_dict() -> None:
    given = settings_from_environment({})
    given["FEDERATION_IP_RANGE_ALLOWLIST"].append("0.0.0.0/0")
    assert DEFAULTS["FEDERATION_IP_RANGE_ALLOWLIST"] == []


def test_project_defaults_replace_the_apps_and_are_always_set() -> None:
    given = settings_from_environment({}, defaults={"SIGNING_KEY_PATH": "/data/signing.key"})
    assert given["SIGNING_KEY_PATH"] == "/data/signing.key"
    env = {"MSC3870_SIGNING_KEY_PATH": "/keys/k"}
    assert (
        settings_from_environment(env, defaults={"SIGNING_KEY_PATH": "/data/signing.key"})[
            "SIGNING_KEY_PATH"
        ]
        == "/keys/k"
    )
    with pytest.raises(ImproperlyConfigured, match="STORAGE_ALIAS"):
        settings_from_environment({}, defaults={"STORAGE_ALIAS": "media"})  # no variable


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"MSC3870_MAX_UPLOAD_SIZE": "50M"}, ["MSC3870_MAX_UPLOAD_SIZE='50M'", "integer"]),
        ({"MSC3870_COMPLETE_WAIT_SECONDS": "soon"}, ["MSC3870_COMPLETE_WAIT_SECONDS", "number"]),
        ({"MSC3870_TRUSTED_KEY_SERVERS": "matrix.org"}, ["MSC3870_TRUSTED_KEY_SERVERS"]),
        ({"MSC3870_USER_QUOTA_BYTES": "1 GiB"}, ["MSC3870_USER_QUOTA_BYTES", "USER_QUOTA"]),
    ],
)
def test_a_variable_that_does_not_parse_is_named(env: dict[str, str], words: list[str]) -> None:
    with pytest.raises(ImproperlyConfigured) as raised:
        settings_from_environment(env)
    assert all(word in str(raised.value) for word in words), raised.value


def test_one_check_id_per_kind() -> None:
    from msc3870.setting import KINDS

    # E022..E029 were taken by checks of values when the oEmbed providers' kind came.
    assert [kind.id for kind in KINDS] == [f"msc3870.E0{n}" for n in (*range(12, 22), 30)]
    assert {s.kind for s in SETTINGS.values()} <= set(KINDS)
