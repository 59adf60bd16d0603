"""One test per system check id."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from django.core.checks import Tags, run_checks
from django.core.checks.registry import registry
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from msc3870 import checks
from msc3870.checks import check_settings
from msc3870.conf import DEFAULTS, app_settings
from msc3870.models import Media, MediaState

from .helpers import MatrixClient, msc3870_settings


def ids(**overrides: Any) -> set[str]:
    with msc3870_settings(**overrides):
        return {message.id for message in check_settings()}


def test_default_configuration_is_clean() -> None:
    assert ids() == set()


def test_e001_not_a_dict() -> None:
    with override_settings(MSC3870=["nope"]):
        assert {m.id for m in check_settings()} == {"msc3870.E001"}


def test_w001_unknown_key() -> None:
    assert "msc3870.W001" in ids(MAX_UPLOAD_SIZ=3)


def test_w003_retention_by_last_access_shorter_than_its_resolution() -> None:
    assert "msc3870.W003" in ids(RETENTION_LOCAL_UNUSED_SECONDS=600)
    assert "msc3870.W003" in ids(RETENTION_REMOTE_UNUSED_SECONDS=3599)
    assert "msc3870.W003" not in ids(
        RETENTION_LOCAL_UNUSED_SECONDS=3600, RETENTION_REMOTE_UNUSED_SECONDS=86400
    )
    # By age, any lifetime is as meant.
    assert "msc3870.W003" not in ids(RETENTION_LOCAL_MAX_AGE_SECONDS=1)


def test_e002_server_name() -> None:
    assert "msc3870.E002" in ids(SERVER_NAME="not a server/name")


def test_e003_public_baseurl() -> None:
    assert "msc3870.E003" in ids(PUBLIC_BASEURL="example.com/media")


def test_e004_storage_alias() -> None:
    assert "msc3870.E004" in ids(STORAGE_ALIAS="missing")
    with override_settings(
        STORAGES={
            "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
            "msc3870": {"BACKEND": "django.core.files.storage.InMemoryStorage"},
        }
    ):
        assert "msc3870.E004" in {m.id for m in check_settings()}


@pytest.mark.parametrize(
    "overrides",
    [{"TOKEN_RESOLVER": "nowhere.Resolver"}, {"CHECKS": ["msc3870.screening.no_such_check"]}],
)
def test_e005_import_strings(overrides: dict[str, Any]) -> None:
    assert "msc3870.E005" in ids(**overrides)


def test_e006_limits() -> None:
    assert "msc3870.E006" in ids(MAX_UPLOAD_SIZE=0)
    assert "msc3870.E006" in ids(MAX_PENDING_UPLOADS=-1)
    # Remote media limits: a fetch bound or a rate of 0 would refuse every fetch, a
    # negative cache bound evict everything; None turns the rate and the bound off.
    assert "msc3870.E006" in ids(REMOTE_MEDIA_MAX_FETCHES=0)
    assert "msc3870.E006" in ids(REMOTE_MEDIA_DOWNLOAD_PER_SECOND=0)
    assert "msc3870.E006" in ids(REMOTE_MEDIA_DOWNLOAD_BURST_COUNT=0)
    assert "msc3870.E006" in ids(REMOTE_MEDIA_CACHE_MAX_BYTES=-1)
    assert "msc3870.E006" not in ids(
        REMOTE_MEDIA_DOWNLOAD_PER_SECOND=None, REMOTE_MEDIA_CACHE_MAX_BYTES=None
    )
    # Retention: a lifetime of 0 would delete everything at once (None is no rule); a
    # negative size floor means nothing; deletes need at least one in flight.
    assert "msc3870.E006" in ids(RETENTION_LOCAL_MAX_AGE_SECONDS=0)
    assert "msc3870.E006" in ids(RETENTION_REMOTE_UNUSED_SECONDS=0)
    assert "msc3870.E006" in ids(RETENTION_MIN_BYTES=-1)
    assert "msc3870.E006" in ids(DELETE_CONCURRENCY=0)
    assert "msc3870.E006" not in ids(RETENTION_LOCAL_MAX_AGE_SECONDS=None, RETENTION_MIN_BYTES=0)


def test_e007_type_mismatch_policy() -> None:
    assert "msc3870.E007" in ids(TYPE_MISMATCH="maybe")


def test_e008_homeserver_resolver_without_url() -> None:
    assert "msc3870.E008" in ids(
        TOKEN_RESOLVER="msc3870.auth.HomeserverTokenResolver", HOMESERVER_URL=None
    )


def test_e010_create_rate() -> None:
    assert "msc3870.E010" in ids(CREATE_RATE="lots")
    assert "msc3870.E010" in ids(URL_PREVIEW_RATE="often")
    assert "msc3870.E010" not in ids(URL_PREVIEW_RATE=None)


# ---------------------------------------------------------------- types


def type_ids(**overrides: Any) -> set[str]:
    """Ids of every msc3870 check, values and types, as ``manage.py check`` runs them."""
    with msc3870_settings(**overrides):
        messages = [
            *check_settings(),
            *checks.check_setting_types(),
            *checks.check_security_setting_types(),
        ]
    return {message.id for message in messages}


def test_every_setting_has_a_type() -> None:
    assert set(DEFAULTS) <= set(checks.SETTING_TYPES), "add the new setting to SETTING_TYPES"


def test_the_defaults_have_their_types() -> None:
    assert checks.mistyped_settings() == {}


def test_checks_are_registered_in_ready_security_ones_tagged() -> None:
    registered = registry.get_checks()
    assert checks.check_settings in registered
    assert checks.check_setting_types in registered
    assert checks.check_security_setting_types in registered
    assert Tags.security in checks.check_security_setting_types.tags  # type: ignore[attr-defined]
    assert Tags.security not in checks.check_setting_types.tags  # type: ignore[attr-defined]


def test_content_types_given_as_a_string_are_a_security_error() -> None:
    """A list given as a string (``"image/*"``) would be read as its characters (["i",
    "m", ..., "*"]) and let HTML through: a security error, not a list."""
    with msc3870_settings(ALLOWED_CONTENT_TYPES="image/*", DENIED_CONTENT_TYPES="text/html"):
        messages = [m for m in run_checks(tags=[Tags.security]) if m.id == "msc3870.E016"]
        assert {m.msg.split("]")[0] for m in messages} == {
            "MSC3870['ALLOWED_CONTENT_TYPES'",
            "MSC3870['DENIED_CONTENT_TYPES'",
        }
        assert all("characters" in (m.hint or "") for m in messages)
        with pytest.raises(ImproperlyConfigured):
            assert not app_settings.ALLOWED_CONTENT_TYPES
        with pytest.raises(ImproperlyConfigured):
            assert not app_settings.DENIED_CONTENT_TYPES


def test_a_misread_allowlist_fails_screening_instead_of_passing(alice: MatrixClient) -> None:
    html = b"<!DOCTYPE html><html><script>alert(1)</script></html>"
    with msc3870_settings(ALLOWED_CONTENT_TYPES="image/*", COMPLETE_WAIT_SECONDS=0):
        response = alice.post("/_matrix/media/v3/upload", html, "text/html")
    media = Media.objects.get(user_id=alice.user_id)
    assert media.state != MediaState.COMPLETE, response.content
    assert "ALLOWED_CONTENT_TYPES" in media.last_error


def test_e012_integer() -> None:
    assert "msc3870.E012" in type_ids(MAX_UPLOAD_SIZE="50M")
    assert "msc3870.E012" in type_ids(MAX_PENDING_UPLOADS=True)  # a bool is not a count
    assert "msc3870.E012" in type_ids(USER_QUOTA_BYTES=1.5)
    assert "msc3870.E012" not in type_ids(USER_QUOTA_BYTES=None)  # None: no quota


def test_e013_number() -> None:
    assert "msc3870.E013" in type_ids(COMPLETE_WAIT_SECONDS="20")
    assert "msc3870.E013" not in type_ids(COMPLETE_WAIT_SECONDS=2.5)


def test_e014_bool() -> None:
    assert "msc3870.E014" in type_ids(REDIRECT_DOWNLOADS="0")  # a non-empty string is true
    assert "msc3870.E014" in type_ids(FEDERATION_VERIFY_TLS=None)


def test_e015_string() -> None:
    assert "msc3870.E015" in type_ids(HOMESERVER_URL=["https://hs.example"])
    assert "msc3870.E015" in type_ids(SERVER_NAME=None)
    assert "msc3870.E015" not in type_ids(CLAMAV_URL=None)


def test_e016_list_of_strings() -> None:
    assert "msc3870.E016" in type_ids(ALLOWED_CONTENT_TYPES="image/*")
    assert "msc3870.E016" in type_ids(DENIED_CONTENT_TYPES=[b"text/html"])
    assert "msc3870.E016" in type_ids(FEDERATION_IP_RANGE_ALLOWLIST="10.0.0.0/8")
    assert "msc3870.E016" not in type_ids(FEDERATION_IP_RANGE_DENYLIST=None)


def test_e017_import_string() -> None:
    assert "msc3870.E017" in type_ids(TOKEN_RESOLVER=object)
    assert "msc3870.E017" in type_ids(TOKEN_RESOLVER="LocalTokenResolver")


def test_e018_list_of_import_strings() -> None:
    assert "msc3870.E018" in type_ids(CHECKS="msc3870.screening.check_size")
    assert "msc3870.E018" in type_ids(CHECKS=[len])


def test_e019_datetime() -> None:
    assert "msc3870.E019" in type_ids(LEGACY_MEDIA_FREEZE_AFTER="yesterday")
    assert "msc3870.E019" in type_ids(LEGACY_MEDIA_FREEZE_AFTER="2025-01-01T00:00:00")  # naive
    assert "msc3870.E019" in type_ids(LEGACY_MEDIA_FREEZE_AFTER=datetime(2025, 1, 1))
    assert "msc3870.E019" not in type_ids(LEGACY_MEDIA_FREEZE_AFTER="2025-01-01T00:00:00Z")
    assert "msc3870.E019" not in type_ids(
        LEGACY_MEDIA_FREEZE_AFTER=datetime(2025, 1, 1, tzinfo=UTC)
    )


def test_e020_trusted_key_servers() -> None:
    assert "msc3870.E020" in type_ids(TRUSTED_KEY_SERVERS="matrix.org")
    assert "msc3870.E020" in type_ids(TRUSTED_KEY_SERVERS=[{"server_name": "matrix.org"}])


def test_e021_path() -> None:
    assert "msc3870.E021" in type_ids(SIGNING_KEY_PATH=42)
    assert "msc3870.E021" not in type_ids(SIGNING_KEY_PATH=Path("/tmp/signing.key"))


def test_e022_metrics_allowed_networks() -> None:
    assert "msc3870.E022" in ids(METRICS_ALLOWED_NETWORKS=["10.0.0.0/8", "the office"])
    assert "msc3870.E022" not in ids(METRICS_ALLOWED_NETWORKS=["10.0.0.0/8", "::1"])
    assert "msc3870.E016" in type_ids(METRICS_ALLOWED_NETWORKS="127.0.0.1/32")


def test_e023_health_components() -> None:
    assert "msc3870.E023" in ids(HEALTH_COMPONENTS=["database", "cache"])
    assert "msc3870.E023" not in ids(HEALTH_COMPONENTS=["database", "beat"])
    assert "msc3870.E006" in ids(HEALTH_TIMEOUT_SECONDS=0)


def test_e024_admins_are_matrix_user_ids() -> None:
    assert "msc3870.E024" in ids(ADMINS=["@root:example.org", "root"])
    assert "msc3870.E024" in ids(ADMINS=["@root"])
    assert "msc3870.E024" not in ids(ADMINS=["@root:example.org", "@ops:localhost:8448"])
    assert "msc3870.E016" in type_ids(ADMINS="@root:example.org")
    assert "msc3870.E006" in ids(ADMIN_API_ITEMS_PER_REQUEST=0)


def test_e030_oembed_providers() -> None:
    assert "msc3870.E030" in type_ids(URL_PREVIEW_OEMBED_PROVIDERS="https://x.com/*")
    assert "msc3870.E030" in type_ids(
        URL_PREVIEW_OEMBED_PROVIDERS=[{"endpoints": [{"schemes": "https://p.test/*"}]}]
    )
    assert "msc3870.E030" not in type_ids(
        URL_PREVIEW_OEMBED_PROVIDERS=[
            {"endpoints": [{"schemes": ["https://p.test/*"], "url": "https://p.test/o"}]}
        ]
    )


def preview_ids(**overrides: Any) -> set[str]:
    with msc3870_settings(**overrides):
        return {message.id for message in checks.check_url_previews()}


def test_e031_previews_on_with_an_empty_deny_list() -> None:
    assert preview_ids(URL_PREVIEW_ENABLED=True, URL_PREVIEW_IP_RANGE_DENYLIST=[]) == {
        "msc3870.E031"
    }
    # Off, or on with the built-in list (None) or a list of one's own: nothing to say.
    assert preview_ids(URL_PREVIEW_ENABLED=False, URL_PREVIEW_IP_RANGE_DENYLIST=[]) == set()
    assert preview_ids(URL_PREVIEW_ENABLED=True) == set()
    assert preview_ids(URL_PREVIEW_ENABLED=True, URL_PREVIEW_IP_RANGE_DENYLIST=["10/8"]) == {
        "msc3870.E032"
    }
    # A security check: `manage.py check --deploy` runs it with the others.
    with msc3870_settings(URL_PREVIEW_ENABLED=True, URL_PREVIEW_IP_RANGE_DENYLIST=[]):
        assert "msc3870.E031" in {m.id for m in run_checks(tags=[Tags.security])}


def test_e032_preview_ranges_must_parse() -> None:
    assert "msc3870.E032" in preview_ids(URL_PREVIEW_IP_RANGE_ALLOWLIST=["localhost"])
    assert "msc3870.E032" in preview_ids(URL_PREVIEW_IP_RANGE_DENYLIST=["10.0.0.0/8", "lan"])
    assert preview_ids(URL_PREVIEW_IP_RANGE_ALLOWLIST=["192.0.2.1", "2001:db8::/32"]) == set()


def test_a_mistyped_setting_does_not_crash_the_value_checks() -> None:
    """Value checks skip what the type checks report (they would raise reading it)."""
    found = type_ids(
        HOMESERVER_URL=5,
        TOKEN_RESOLVER="msc3870.auth.HomeserverTokenResolver",
        UNUSED_EXPIRATION="a day",
        CREATE_RATE=60,
        MAX_UPLOAD_SIZE=None,
    )
    assert {"msc3870.E012", "msc3870.E015"} <= found
