"""The headers HTTP expects on Matrix errors, and the status of a check's
rejection as the check decided it."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from msc3870.models import Media, MediaState

from .helpers import MatrixClient, media_of, msc3870_settings, mxc_path


def test_missing_token_401_carries_a_bearer_challenge(db: None) -> None:
    response = Client().post("/_matrix/media/v1/create")
    assert response.status_code == 401
    assert response.json()["errcode"] == "M_MISSING_TOKEN"
    assert response["WWW-Authenticate"] == 'Bearer realm="matrix"'


def test_unknown_token_401_says_the_token_was_refused(db: None) -> None:
    for headers in ({"Authorization": "Bearer nope"}, {}):
        path = "/_matrix/client/v1/media/config" + ("" if headers else "?access_token=nope")
        response = Client().get(path, headers=headers)
        assert response.status_code == 401
        assert response.json()["errcode"] == "M_UNKNOWN_TOKEN"
        assert response["WWW-Authenticate"] == 'Bearer realm="matrix", error="invalid_token"'


def test_federation_401_challenges_with_x_matrix(db: None) -> None:
    response = Client().get("/_matrix/federation/v1/media/download/abc")
    assert response.status_code == 401, response.content
    assert response.json()["errcode"] == "M_UNAUTHORIZED"
    assert response["WWW-Authenticate"].startswith("X-Matrix")


def test_other_errors_carry_no_challenge(alice: MatrixClient) -> None:
    response = alice.get("/_matrix/client/v1/media/download/localhost/nope?timeout_ms=0")
    assert response.status_code == 404
    assert "WWW-Authenticate" not in response


def _upload_through_the_url(alice: MatrixClient) -> tuple[str, Any]:
    created = alice.create()
    put = alice.put_to_url(created["upload_url"], b"hello", "text/plain")
    assert put.status_code == 200, put.content
    return created["content_uri"], alice.complete(created["content_uri"])


@pytest.mark.parametrize(
    ("check", "status", "errcode"),
    [
        ("slow_down", 429, "M_LIMIT_EXCEEDED"),
        ("unavailable_for_legal_reasons", 451, "M_FORBIDDEN"),
        # Not a client error: the errcode's usual status, never a 200 for a refusal.
        ("pretend_success", 403, "M_FORBIDDEN"),
    ],
)
def test_a_checks_rejection_status_reaches_the_uploader(
    alice: MatrixClient, check: str, status: int, errcode: str
) -> None:
    with msc3870_settings(CHECKS=[f"tests.checks.{check}"], COMPLETE_WAITS_FOR_CHECKS=True):
        content_uri, complete = _upload_through_the_url(alice)
        assert complete.status_code == status, complete.content
        assert complete.json()["errcode"] == errcode
        # Asked again (idempotent /complete), from the stored row: the same answer.
        again = alice.post(f"/_matrix/media/v1/upload/{mxc_path(content_uri)}/complete")
        assert (again.status_code, again.json()["errcode"]) == (status, errcode)
        # The one-shot upload through this server too.
        one_shot = alice.post("/_matrix/media/v3/upload", b"hi", content_type="text/plain")
        assert one_shot.status_code == status, one_shot.content
    assert media_of(content_uri).state == MediaState.REJECTED


def test_rejection_status_is_stored_with_the_rejection(alice: MatrixClient) -> None:
    with msc3870_settings(CHECKS=["tests.checks.slow_down"], COMPLETE_WAITS_FOR_CHECKS=True):
        content_uri, _ = _upload_through_the_url(alice)
    media = media_of(content_uri)
    assert (media.rejection_errcode, media.rejection_status) == ("M_LIMIT_EXCEEDED", 429)


def test_rejected_rows_without_a_status_keep_the_errcodes_status(alice: MatrixClient) -> None:
    """Rows without a stored status (rejected by a moderator, or before rejections kept
    one) answer with the errcode's usual status."""
    with msc3870_settings(CHECKS=["tests.checks.too_large"], COMPLETE_WAITS_FOR_CHECKS=True):
        content_uri, complete = _upload_through_the_url(alice)
    assert complete.status_code == 413
    Media.objects.filter(pk=media_of(content_uri).pk).update(rejection_status=None)
    again = alice.post(f"/_matrix/media/v1/upload/{mxc_path(content_uri)}/complete")
    assert again.status_code == 413
    assert again.json()["errcode"] == "M_TOO_LARGE"


def test_429_keeps_its_retry_after(alice: MatrixClient) -> None:
    with msc3870_settings(CREATE_RATE="1/min", MAX_PENDING_UPLOADS=0):
        assert alice.post("/_matrix/media/v1/create").status_code == 200
        response = alice.post("/_matrix/media/v1/create")
    assert response.status_code == 429
    assert int(response["Retry-After"]) >= 1
    assert "WWW-Authenticate" not in response
