"""One test per system check id."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import override_settings

from msc3870.checks import check_settings

from .conftest import msc3870_settings


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


def test_e007_type_mismatch_policy() -> None:
    assert "msc3870.E007" in ids(TYPE_MISMATCH="maybe")


def test_e008_homeserver_resolver_without_url() -> None:
    assert "msc3870.E008" in ids(
        TOKEN_RESOLVER="msc3870.auth.HomeserverTokenResolver", HOMESERVER_URL=None
    )


def test_e010_create_rate() -> None:
    assert "msc3870.E010" in ids(CREATE_RATE="lots")
