"""mediarepo/settings.py: what the environment turns into (read afresh for each test)."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest

import mediarepo

SETTINGS_FILE = Path(mediarepo.__file__).parent / "settings.py"


def project_settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> dict[str, Any]:
    monkeypatch.setenv("DJANGO_SECRET_KEY", "test-only")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(SETTINGS_FILE))


def test_content_type_lists_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 8.8: never a bare string, which would be read as a list of characters."""
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
    """Issue 8.15: behind a TLS proxy the admin's cookies must not travel over HTTP."""
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
