"""mediarepo/settings.py: what the environment turns into (read afresh for each test)."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest

import mediarepo

from .helpers import environment_variables, typed

SETTINGS_FILE = Path(mediarepo.__file__).parent / "settings.py"


def project_settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> dict[str, Any]:
    monkeypatch.setenv("DJANGO_SECRET_KEY", "test-only")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(SETTINGS_FILE))


def test_content_type_lists_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never a bare string, which would be read as a list of characters."""
    read = project_settings(
        monkeypatch,
        MSC3870_ALLOWED_CONTENT_TYPES="image/*, video/*",
        MSC3870_DENIED_CONTENT_TYPES="image/svg+xml",
    )["MSC3870"]
    assert read["ALLOWED_CONTENT_TYPES"] == ["image/*", "video/*"]
    assert read["DENIED_CONTENT_TYPES"] == ["image/svg+xml"]


def test_content_type_lists_default_to_the_apps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MSC3870_ALLOWED_CONTENT_TYPES", raising=False)
    read = project_settings(monkeypatch)["MSC3870"]
    assert "ALLOWED_CONTENT_TYPES" not in read and "DENIED_CONTENT_TYPES" not in read


def test_legacy_media_freeze_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from msc3870.conf import parse_freeze_time

    read = project_settings(monkeypatch, MSC3870_LEGACY_MEDIA_FREEZE_AFTER="2025-07-01T00:00:00Z")
    frozen = parse_freeze_time(read["MSC3870"]["LEGACY_MEDIA_FREEZE_AFTER"])
    assert frozen is not None and frozen.isoformat() == "2025-07-01T00:00:00+00:00"


def test_cookies_are_secure_behind_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind a TLS proxy the admin's cookies must not travel over HTTP."""
    behind = project_settings(monkeypatch, DJANGO_BEHIND_PROXY="1")
    assert behind["SESSION_COOKIE_SECURE"] is True
    assert behind["CSRF_COOKIE_SECURE"] is True
    assert behind["SECURE_PROXY_SSL_HEADER"] == ("HTTP_X_FORWARDED_PROTO", "https")
    monkeypatch.delenv("DJANGO_BEHIND_PROXY")
    direct = project_settings(monkeypatch)
    assert not direct.get("SESSION_COOKIE_SECURE", False)  # plain HTTP (make run) still works


def test_postgresql_prepares_its_statements_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "postgres://media@db.example:5432/media"
    options = project_settings(monkeypatch, DATABASE_URL=url)["DATABASES"]["default"]["OPTIONS"]
    assert options["server_side_binding"] is True
    assert options["prepare_threshold"] == 5
    # Behind a transaction-mode pooler, as Django has it by default.
    pooled = project_settings(monkeypatch, DATABASE_URL=url, DATABASE_PREPARED_STATEMENTS="0")
    options = pooled["DATABASES"]["default"].get("OPTIONS", {})
    assert "server_side_binding" not in options and "prepare_threshold" not in options


def test_remote_media_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "DOWNLOAD_PER_SECOND",
        "DOWNLOAD_BURST_COUNT",
        "MAX_FETCHES",
        "CACHE_MAX_BYTES",
    ):
        monkeypatch.delenv(f"MSC3870_REMOTE_MEDIA_{name}", raising=False)
    unset = project_settings(monkeypatch)["MSC3870"]
    assert not any(key.startswith("REMOTE_MEDIA_D") for key in unset)
    assert "REMOTE_MEDIA_MAX_FETCHES" not in unset and "REMOTE_MEDIA_CACHE_MAX_BYTES" not in unset
    read = project_settings(
        monkeypatch,
        MSC3870_REMOTE_MEDIA_DOWNLOAD_PER_SECOND="1000",
        MSC3870_REMOTE_MEDIA_DOWNLOAD_BURST_COUNT="5000000",
        MSC3870_REMOTE_MEDIA_MAX_FETCHES="8",
        MSC3870_REMOTE_MEDIA_CACHE_MAX_BYTES="1073741824",
    )["MSC3870"]
    assert read["REMOTE_MEDIA_DOWNLOAD_PER_SECOND"] == 1000
    assert read["REMOTE_MEDIA_DOWNLOAD_BURST_COUNT"] == 5_000_000
    assert read["REMOTE_MEDIA_MAX_FETCHES"] == 8
    assert read["REMOTE_MEDIA_CACHE_MAX_BYTES"] == 1 << 30
    off = project_settings(
        monkeypatch,
        MSC3870_REMOTE_MEDIA_DOWNLOAD_PER_SECOND="0",
        MSC3870_REMOTE_MEDIA_CACHE_MAX_BYTES="0",
    )["MSC3870"]
    assert off["REMOTE_MEDIA_DOWNLOAD_PER_SECOND"] is None
    assert off["REMOTE_MEDIA_CACHE_MAX_BYTES"] is None


# ------------------------------------------------- the MSC3870 dict from the environment

# Every variable mediarepo/settings.py turns into the app's MSC3870 dict, and the variables
# of the project that shape it. Each case below pins what one environment gives, so that
# the way the dict is built can change and its meaning cannot.
ENVIRONMENT_OF_THE_APP = (
    "MATRIX_SERVER_NAME",
    "PUBLIC_BASEURL",
    "PORT",
    "REDIS_URL",
    "MATRIX_HOMESERVER_URL",
)


def msc3870_from(monkeypatch: pytest.MonkeyPatch, data_dir: Path, **env: str) -> dict[str, Any]:
    """The MSC3870 dict of mediarepo/settings.py, with only ``env`` set of its variables."""
    import os

    for name in list(os.environ):
        if name.startswith("MSC3870_") or name in ENVIRONMENT_OF_THE_APP:
            monkeypatch.delenv(name)
    monkeypatch.setenv("MEDIAREPO_DATA_DIR", str(data_dir))
    return project_settings(monkeypatch, **env)["MSC3870"]


def unset_environment(data_dir: Path) -> dict[str, Any]:
    return {
        "SERVER_NAME": "localhost",
        "PUBLIC_BASEURL": "http://127.0.0.1:8008",
        "MAX_UPLOAD_SIZE": 50 * 1024 * 1024,
        "UNUSED_EXPIRATION": 86400,
        "MAX_PENDING_UPLOADS": 5,
        "CREATE_RATE": "60/min",
        "REDIRECT_DOWNLOADS": False,
        "S3_PUBLIC_ENDPOINT_URL": None,
        "COMPLETE_WAIT_SECONDS": 20.0,
        "COMPLETE_WAITS_FOR_CHECKS": False,
        "S3_COPY_CHECKSUM": True,
        "S3_SIGN_PAYLOAD": False,
        "STUCK_AFTER_SECONDS": 300,
        "CLAMAV_URL": None,
        "SHA256_WHEN": "needed",
        "USER_QUOTA_BYTES": None,
        "WAKEUP_REDIS_URL": None,
        "SIGNING_KEY_PATH": str(data_dir / "signing.key"),
        "TRUSTED_KEY_SERVERS": [],
        "FEDERATION_IP_RANGE_ALLOWLIST": [],
        "FEDERATION_VERIFY_TLS": True,
        "FETCH_REMOTE_MEDIA": True,
        "REMOTE_MEDIA_FAILURE_SECONDS": 60,
        "REMOTE_MEDIA_TIMEOUT_SECONDS": 120,
    }


KEY_SERVERS_JSON = '[{"server_name": "notary.test", "verify_keys": {"ed25519:a": "AAAA"}}]'

# (environment, the keys it changes or adds in the dict)
ENVIRONMENT_CASES: list[tuple[dict[str, str], dict[str, Any]]] = [
    ({"MATRIX_SERVER_NAME": "media.test"}, {"SERVER_NAME": "media.test"}),
    ({"MATRIX_SERVER_NAME": ""}, {}),  # empty is unset, for every variable
    ({"PUBLIC_BASEURL": "https://media.test/"}, {"PUBLIC_BASEURL": "https://media.test"}),
    ({"PORT": "9000"}, {"PUBLIC_BASEURL": "http://127.0.0.1:9000"}),
    ({"MSC3870_MAX_UPLOAD_SIZE": "1000"}, {"MAX_UPLOAD_SIZE": 1000}),
    ({"MSC3870_MAX_UPLOAD_SIZE": ""}, {}),
    ({"MSC3870_UNUSED_EXPIRATION": "600"}, {"UNUSED_EXPIRATION": 600}),
    ({"MSC3870_MAX_PENDING_UPLOADS": "0"}, {"MAX_PENDING_UPLOADS": 0}),
    ({"MSC3870_CREATE_RATE": "10/s"}, {"CREATE_RATE": "10/s"}),
    ({"MSC3870_CREATE_RATE": "0"}, {"CREATE_RATE": "0"}),  # not "off": E010 reports it
    ({"MSC3870_REDIRECT_DOWNLOADS": "1"}, {"REDIRECT_DOWNLOADS": True}),
    ({"MSC3870_REDIRECT_DOWNLOADS": "yes"}, {}),  # only "1" turns it on
    (
        {"MSC3870_S3_PUBLIC_ENDPOINT_URL": "https://cdn.test"},
        {"S3_PUBLIC_ENDPOINT_URL": "https://cdn.test"},
    ),
    ({"MSC3870_COMPLETE_WAIT_SECONDS": "2.5"}, {"COMPLETE_WAIT_SECONDS": 2.5}),
    ({"MSC3870_COMPLETE_WAIT_SECONDS": "3"}, {"COMPLETE_WAIT_SECONDS": 3.0}),
    ({"MSC3870_COMPLETE_WAITS_FOR_CHECKS": "1"}, {"COMPLETE_WAITS_FOR_CHECKS": True}),
    (
        {"MSC3870_S3_INCOMING_BUCKET": "media-incoming"},
        {"S3_INCOMING_BUCKET": "media-incoming"},
    ),
    ({"MSC3870_S3_COPY_CHECKSUM": "0"}, {"S3_COPY_CHECKSUM": False}),
    ({"MSC3870_S3_COPY_CHECKSUM": "no"}, {}),  # only "0" turns it off
    ({"MSC3870_S3_SIGN_PAYLOAD": "1"}, {"S3_SIGN_PAYLOAD": True}),
    ({"MSC3870_DELETE_CONCURRENCY": "16"}, {"DELETE_CONCURRENCY": 16}),
    ({"MSC3870_S3_UPLOAD_PART_SIZE": "5242880"}, {"S3_UPLOAD_PART_SIZE": 5242880}),
    ({"MSC3870_S3_UPLOAD_CONCURRENCY": "2"}, {"S3_UPLOAD_CONCURRENCY": 2}),
    ({"MSC3870_S3_UPLOAD_SINGLE_PUT_LIMIT": "0"}, {"S3_UPLOAD_SINGLE_PUT_LIMIT": 0}),
    ({"MSC3870_STUCK_AFTER_SECONDS": "60"}, {"STUCK_AFTER_SECONDS": 60}),
    ({"MSC3870_IN_FLIGHT_UPLOAD_SECONDS": "600"}, {"IN_FLIGHT_UPLOAD_SECONDS": 600}),
    ({"MSC3870_CLAMAV_URL": "tcp://127.0.0.1:3310"}, {"CLAMAV_URL": "tcp://127.0.0.1:3310"}),
    ({"MSC3870_SHA256_WHEN": "always"}, {"SHA256_WHEN": "always"}),
    ({"MSC3870_USER_QUOTA_BYTES": "1000"}, {"USER_QUOTA_BYTES": 1000}),
    ({"MSC3870_USER_QUOTA_BYTES": "0"}, {}),  # 0: no quota
    ({"MSC3870_WAIT_MAX_WAITERS": "7"}, {"WAIT_MAX_WAITERS": 7}),
    ({"MSC3870_WAIT_MAX_WAITERS_PER_MEDIA": "6"}, {"WAIT_MAX_WAITERS_PER_MEDIA": 6}),
    ({"MSC3870_LEGACY_WAIT_MAX_WAITERS": "5"}, {"LEGACY_WAIT_MAX_WAITERS": 5}),
    ({"MSC3870_WAIT_MAX_WAITERS_PER_REQUESTER": "0"}, {"WAIT_MAX_WAITERS_PER_REQUESTER": 0}),
    ({"MSC3870_LEGACY_DOWNLOAD_TIMEOUT_MS_MAX": "900"}, {"LEGACY_DOWNLOAD_TIMEOUT_MS_MAX": 900}),
    ({"MSC3870_WAKEUP_POLL_SECONDS": "0.5"}, {"WAKEUP_POLL_SECONDS": 0.5}),
    ({"MSC3870_WAKEUP_SAFETY_POLL_SECONDS": "4"}, {"WAKEUP_SAFETY_POLL_SECONDS": 4.0}),
    ({"MSC3870_TOKEN_CACHE_SECONDS": "0"}, {"TOKEN_CACHE_SECONDS": 0.0}),
    ({"MSC3870_UPLOAD_BODIES_MAX": "3"}, {"UPLOAD_BODIES_MAX": 3}),
    ({"MSC3870_UPLOAD_BODIES_PER_ADDRESS_MAX": "2"}, {"UPLOAD_BODIES_PER_ADDRESS_MAX": 2}),
    ({"MSC3870_UPLOAD_MIN_BYTES_PER_SECOND": "0"}, {"UPLOAD_MIN_BYTES_PER_SECOND": 0.0}),
    ({"MSC3870_UPLOAD_RATE_GRACE_SECONDS": "1.5"}, {"UPLOAD_RATE_GRACE_SECONDS": 1.5}),
    ({"MSC3870_UPLOAD_IDLE_TIMEOUT_SECONDS": "9"}, {"UPLOAD_IDLE_TIMEOUT_SECONDS": 9.0}),
    ({"REDIS_URL": "redis://127.0.0.1:6379/3"}, {"WAKEUP_REDIS_URL": "redis://127.0.0.1:6379/3"}),
    ({"MSC3870_WAKEUP_LISTEN": "0"}, {"WAKEUP_LISTEN": False}),
    ({"MSC3870_WAKEUP_LISTEN": "yes"}, {"WAKEUP_LISTEN": True}),  # only "0" turns it off
    ({"MSC3870_CHECKS": " a.b , c.d,"}, {"CHECKS": ["a.b", "c.d"]}),
    (
        {"MSC3870_ALLOWED_CONTENT_TYPES": "image/*, video/*"},
        {"ALLOWED_CONTENT_TYPES": ["image/*", "video/*"]},
    ),
    ({"MSC3870_ALLOWED_CONTENT_TYPES": ","}, {"ALLOWED_CONTENT_TYPES": []}),
    ({"MSC3870_DENIED_CONTENT_TYPES": "text/html"}, {"DENIED_CONTENT_TYPES": ["text/html"]}),
    (
        {"MSC3870_LEGACY_MEDIA_FREEZE_AFTER": "2025-07-01T00:00:00Z"},
        {"LEGACY_MEDIA_FREEZE_AFTER": "2025-07-01T00:00:00Z"},
    ),
    ({"MSC3870_SIGNING_KEY_PATH": "/keys/signing.key"}, {"SIGNING_KEY_PATH": "/keys/signing.key"}),
    (
        {"MSC3870_TRUSTED_KEY_SERVERS": KEY_SERVERS_JSON},
        {
            "TRUSTED_KEY_SERVERS": [
                {"server_name": "notary.test", "verify_keys": {"ed25519:a": "AAAA"}}
            ]
        },
    ),
    (
        {"MSC3870_FEDERATION_IP_RANGE_DENYLIST": "10.0.0.0/8, ::1/128"},
        {"FEDERATION_IP_RANGE_DENYLIST": ["10.0.0.0/8", "::1/128"]},
    ),
    (
        {"MSC3870_FEDERATION_IP_RANGE_ALLOWLIST": "127.0.0.1/32"},
        {"FEDERATION_IP_RANGE_ALLOWLIST": ["127.0.0.1/32"]},
    ),
    ({"MSC3870_FEDERATION_VERIFY_TLS": "0"}, {"FEDERATION_VERIFY_TLS": False}),
    ({"MSC3870_FEDERATION_VERIFY_TLS": "false"}, {}),  # only "0" turns it off
    ({"MSC3870_FEDERATION_MEDIA_RATE": "10/s"}, {"FEDERATION_MEDIA_RATE": "10/s"}),
    ({"MSC3870_FEDERATION_MEDIA_RATE": "0"}, {"FEDERATION_MEDIA_RATE": None}),
    ({"MSC3870_FEDERATION_REQUESTS_PER_ADDRESS": "9"}, {"FEDERATION_REQUESTS_PER_ADDRESS": 9}),
    ({"MSC3870_FEDERATION_KEY_FETCHES": "2"}, {"FEDERATION_KEY_FETCHES": 2}),
    (
        {"MSC3870_FEDERATION_KEY_FETCH_TIMEOUT_SECONDS": "2.5"},
        {"FEDERATION_KEY_FETCH_TIMEOUT_SECONDS": 2.5},
    ),
    ({"MSC3870_FEDERATION_AUTH_FAILURE_RATE": "5/min"}, {"FEDERATION_AUTH_FAILURE_RATE": "5/min"}),
    ({"MSC3870_FEDERATION_AUTH_FAILURE_RATE": "0"}, {"FEDERATION_AUTH_FAILURE_RATE": None}),
    ({"MSC3870_FETCH_REMOTE_MEDIA": "0"}, {"FETCH_REMOTE_MEDIA": False}),
    ({"MSC3870_REMOTE_MEDIA_FAILURE_SECONDS": "5"}, {"REMOTE_MEDIA_FAILURE_SECONDS": 5}),
    ({"MSC3870_REMOTE_MEDIA_TIMEOUT_SECONDS": "30"}, {"REMOTE_MEDIA_TIMEOUT_SECONDS": 30}),
    (
        {"MSC3870_REMOTE_MEDIA_DOWNLOAD_PER_SECOND": "1000"},
        {"REMOTE_MEDIA_DOWNLOAD_PER_SECOND": 1000},
    ),
    ({"MSC3870_REMOTE_MEDIA_DOWNLOAD_PER_SECOND": "0"}, {"REMOTE_MEDIA_DOWNLOAD_PER_SECOND": None}),
    (
        {"MSC3870_REMOTE_MEDIA_DOWNLOAD_BURST_COUNT": "5000"},
        {"REMOTE_MEDIA_DOWNLOAD_BURST_COUNT": 5000},
    ),
    ({"MSC3870_REMOTE_MEDIA_MAX_FETCHES": "8"}, {"REMOTE_MEDIA_MAX_FETCHES": 8}),
    ({"MSC3870_REMOTE_MEDIA_CACHE_MAX_BYTES": "4096"}, {"REMOTE_MEDIA_CACHE_MAX_BYTES": 4096}),
    ({"MSC3870_REMOTE_MEDIA_CACHE_MAX_BYTES": "0"}, {"REMOTE_MEDIA_CACHE_MAX_BYTES": None}),
    ({"MSC3870_URL_PREVIEW_ENABLED": "1"}, {"URL_PREVIEW_ENABLED": True}),
    ({"MSC3870_URL_PREVIEW_ENABLED": "yes"}, {"URL_PREVIEW_ENABLED": False}),  # "1" only
    (
        {"MSC3870_URL_PREVIEW_IP_RANGE_DENYLIST": "10.0.0.0/8, ::1/128"},
        {"URL_PREVIEW_IP_RANGE_DENYLIST": ["10.0.0.0/8", "::1/128"]},
    ),
    (
        {"MSC3870_URL_PREVIEW_IP_RANGE_ALLOWLIST": "192.0.2.7/32"},
        {"URL_PREVIEW_IP_RANGE_ALLOWLIST": ["192.0.2.7/32"]},
    ),
    ({"MSC3870_URL_PREVIEW_RATE": "10/min"}, {"URL_PREVIEW_RATE": "10/min"}),
    ({"MSC3870_URL_PREVIEW_RATE": "0"}, {"URL_PREVIEW_RATE": None}),
    ({"MSC3870_URL_PREVIEW_TIMEOUT_SECONDS": "7.5"}, {"URL_PREVIEW_TIMEOUT_SECONDS": 7.5}),
    ({"MSC3870_URL_PREVIEW_MAX_BYTES": "1048576"}, {"URL_PREVIEW_MAX_BYTES": 1048576}),
    (
        {
            "MSC3870_URL_PREVIEW_OEMBED_PROVIDERS": '[{"provider_name": "P", "endpoints": '
            '[{"schemes": ["https://p.test/*"], "url": "https://p.test/oembed"}]}]'
        },
        {
            "URL_PREVIEW_OEMBED_PROVIDERS": [
                {
                    "provider_name": "P",
                    "endpoints": [
                        {"schemes": ["https://p.test/*"], "url": "https://p.test/oembed"}
                    ],
                }
            ]
        },
    ),
    (
        {"MSC3870_HEALTH_COMPONENTS": "database,storage"},
        {"HEALTH_COMPONENTS": ["database", "storage"]},
    ),
    ({"MSC3870_HEALTH_CACHE_SECONDS": "0.5"}, {"HEALTH_CACHE_SECONDS": 0.5}),
    ({"MSC3870_HEALTH_TIMEOUT_SECONDS": "3"}, {"HEALTH_TIMEOUT_SECONDS": 3.0}),
    ({"MSC3870_HEALTH_BEAT_MAX_AGE_SECONDS": "120"}, {"HEALTH_BEAT_MAX_AGE_SECONDS": 120.0}),
    ({"METRICS_PORT": "9100"}, {"METRICS_PORT": 9100}),
    (
        {"MSC3870_METRICS_ALLOWED_NETWORKS": "10.0.0.0/8,::1"},
        {"METRICS_ALLOWED_NETWORKS": ["10.0.0.0/8", "::1"]},
    ),
    (
        {"MATRIX_HOMESERVER_URL": "https://hs.test/"},
        {
            "HOMESERVER_URL": "https://hs.test/",
            "TOKEN_RESOLVER": "msc3870.auth.HomeserverTokenResolver",
            "WHOAMI_CACHE_SECONDS": 15,
        },
    ),
    (
        {"MATRIX_HOMESERVER_URL": "https://hs.test", "MSC3870_WHOAMI_CACHE_SECONDS": "30"},
        {
            "HOMESERVER_URL": "https://hs.test",
            "TOKEN_RESOLVER": "msc3870.auth.HomeserverTokenResolver",
            "WHOAMI_CACHE_SECONDS": 30,
        },
    ),
    ({"MSC3870_WHOAMI_CACHE_SECONDS": "30"}, {}),  # read only beside a homeserver
    (
        {"MSC3870_ADMINS": "@root:example.org, @ops:example.org"},
        {"ADMINS": ["@root:example.org", "@ops:example.org"]},
    ),
    ({"MSC3870_HOMESERVER_ADMINS": "0"}, {"HOMESERVER_ADMINS": False}),
    ({"MSC3870_HOMESERVER_ADMINS": "no"}, {"HOMESERVER_ADMINS": True}),  # only "0" is off
    ({"MSC3870_ADMIN_CACHE_SECONDS": "5"}, {"ADMIN_CACHE_SECONDS": 5}),
    ({"MSC3870_ADMIN_API_ITEMS_PER_REQUEST": "200"}, {"ADMIN_API_ITEMS_PER_REQUEST": 200}),
    (
        {"MSC3870_RETENTION_LOCAL_MAX_AGE_SECONDS": "7776000"},
        {"RETENTION_LOCAL_MAX_AGE_SECONDS": 7776000},
    ),
    ({"MSC3870_RETENTION_LOCAL_MAX_AGE_SECONDS": "0"}, {"RETENTION_LOCAL_MAX_AGE_SECONDS": None}),
    (
        {"MSC3870_RETENTION_LOCAL_UNUSED_SECONDS": "2592000"},
        {"RETENTION_LOCAL_UNUSED_SECONDS": 2592000},
    ),
    (
        {"MSC3870_RETENTION_REMOTE_MAX_AGE_SECONDS": "86400"},
        {"RETENTION_REMOTE_MAX_AGE_SECONDS": 86400},
    ),
    (
        {"MSC3870_RETENTION_REMOTE_UNUSED_SECONDS": "604800"},
        {"RETENTION_REMOTE_UNUSED_SECONDS": 604800},
    ),
    ({"MSC3870_RETENTION_REMOTE_UNUSED_SECONDS": "0"}, {"RETENTION_REMOTE_UNUSED_SECONDS": None}),
    ({"MSC3870_RETENTION_MIN_BYTES": "1048576"}, {"RETENTION_MIN_BYTES": 1048576}),
    (
        {"MSC3870_RETENTION_KEEP": "myproject.avatars.keep"},
        {"RETENTION_KEEP": "myproject.avatars.keep"},
    ),
]


@pytest.mark.parametrize(
    ("env", "changes"),
    ENVIRONMENT_CASES,
    ids=[",".join(f"{k}={v}" for k, v in env.items()) for env, _ in ENVIRONMENT_CASES],
)
def test_the_msc3870_dict_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], changes: dict[str, Any]
) -> None:
    """What each variable has always meant: its name, default, parsing, and whether the key
    is in the dict at all when the variable is unset (then the app's default applies)."""
    expected = {**unset_environment(tmp_path), **changes}
    assert typed(msc3870_from(monkeypatch, tmp_path, **env)) == typed(expected)


def test_the_msc3870_dict_with_nothing_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert typed(msc3870_from(monkeypatch, tmp_path)) == typed(unset_environment(tmp_path))


def test_a_variable_that_does_not_parse_names_itself(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Not a bare ValueError from somewhere in the settings module."""
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="MSC3870_UPLOAD_BODIES_MAX='lots'"):
        msc3870_from(monkeypatch, tmp_path, MSC3870_UPLOAD_BODIES_MAX="lots")


def test_every_variable_is_pinned_by_a_case() -> None:
    """The cases above pin what each variable of the app means; a new one gets a case."""
    pinned = {name for env, _ in ENVIRONMENT_CASES for name in env}
    assert environment_variables() - pinned == set()
    assert environment_variables() <= {*ENVIRONMENT_OF_THE_APP, *pinned}


def test_a_redis_broker_uses_the_transport_whose_channels_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mediarepo/broker.py for Redis (tests/services/test_broker_restart.py is the worker
    riding through restarts); another broker keeps its own transport; either way a worker
    never gives up waiting for its broker."""
    redis = project_settings(monkeypatch, CELERY_BROKER_URL="redis://127.0.0.1:6379/0")
    assert redis["CELERY_BROKER_TRANSPORT"] == "mediarepo.broker:Transport"
    assert redis["CELERY_BROKER_CONNECTION_MAX_RETRIES"] is None
    rabbit = project_settings(monkeypatch, CELERY_BROKER_URL="amqp://guest@127.0.0.1:5672//")
    assert "CELERY_BROKER_TRANSPORT" not in rabbit
    assert rabbit["CELERY_BROKER_CONNECTION_MAX_RETRIES"] is None


def test_the_redis_transport_is_kombus_with_its_own_channel() -> None:
    from kombu import Connection

    from mediarepo import broker

    connection = Connection("redis://127.0.0.1:1/0", transport="mediarepo.broker:Transport")
    assert connection.transport_cls == "mediarepo.broker:Transport"
    assert isinstance(connection.transport, broker.Transport)
    assert connection.transport.Channel is broker.Channel
