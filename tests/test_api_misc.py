"""Versions, config, unknown endpoints and methods, CORS, and errors that must not be HTML."""

from __future__ import annotations

import pytest
from django.test import Client

from .helpers import MatrixClient, msc3870_settings


def test_versions_lists_v1_11_and_the_unstable_features(db: None) -> None:
    response = Client().get("/_matrix/client/versions")
    assert response.status_code == 200
    body = response.json()
    assert "v1.11" in body["versions"]
    assert "r0.6.1" in body["versions"]
    for feature in ("com.beeper.msc3870", "fi.mau.msc2246", "com.beeper.msc3880"):
        assert body["unstable_features"][feature] is True


@pytest.mark.parametrize("path", ["/_matrix/client/v1/media/config", "/_matrix/media/v3/config"])
def test_config(alice: MatrixClient, path: str) -> None:
    with msc3870_settings(MAX_UPLOAD_SIZE=1234):
        response = alice.get(path)
    assert response.status_code == 200
    assert response.json() == {"m.upload.size": 1234}


def test_config_needs_a_token(db: None) -> None:
    response = Client().get("/_matrix/client/v1/media/config")
    assert response.status_code == 401
    assert response.json()["errcode"] == "M_MISSING_TOKEN"


@pytest.mark.parametrize(
    "path",
    [
        "/_matrix/media/v3/nonsense",
        "/_matrix/client/v1/media/thumbnailz/localhost/abc",
        "/_matrix/media/v1/create/",
        "/_matrix/",
    ],
)
def test_unknown_endpoint_is_m_unrecognized(db: None, path: str) -> None:
    response = Client().get(path)
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json()["errcode"] == "M_UNRECOGNIZED"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/_matrix/media/v1/create"),
        ("DELETE", "/_matrix/client/versions"),
        ("POST", "/_matrix/client/v1/media/download/localhost/abc"),
        ("GET", "/_matrix/media/v1/upload/localhost/abc/complete"),
    ],
)
def test_wrong_method_is_405_m_unrecognized(alice: MatrixClient, method: str, path: str) -> None:
    response = alice.client.generic(
        method, path, headers={"Authorization": f"Bearer {alice.token}"}
    )
    assert response.status_code == 405
    assert response.json()["errcode"] == "M_UNRECOGNIZED"


def test_cors_preflight_for_browser_clients(db: None) -> None:
    response = Client().options(
        "/_matrix/media/v1/create",
        headers={
            "Origin": "https://app.element.io",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert response.status_code == 200
    assert response["Access-Control-Allow-Origin"] == "*"
    assert "authorization" in response["Access-Control-Allow-Headers"]


def test_unexpected_error_is_a_matrix_500_not_html(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from msc3870 import uploads

    def broken(user: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(uploads, "create_media", broken)
    client = Client(raise_request_exception=False)
    response = client.post(
        "/_matrix/media/v1/create", headers={"Authorization": f"Bearer {alice.token}"}
    )
    assert response.status_code == 500
    assert response.json() == {"errcode": "M_UNKNOWN", "error": "Internal error"}


def test_access_token_in_query_is_still_accepted(alice: MatrixClient) -> None:
    response = Client().get(f"/_matrix/client/v1/media/config?access_token={alice.token}")
    assert response.status_code == 200


def test_non_bearer_authorization_is_missing_token(db: None) -> None:
    response = Client().get(
        "/_matrix/client/v1/media/config", headers={"Authorization": "Basic Zm9vOmJhcg=="}
    )
    assert response.status_code == 401
    assert response.json()["errcode"] == "M_MISSING_TOKEN"


def test_errors_are_json_whatever_the_accept_header(alice: MatrixClient) -> None:
    response = alice.get(
        "/_matrix/client/v1/media/download/localhost/nothing", headers={"Accept": "image/*"}
    )
    assert response.status_code == 404
    assert response.json()["errcode"] == "M_NOT_FOUND"
