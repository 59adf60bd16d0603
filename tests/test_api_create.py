from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from msc3870.models import Media, MediaState
from msc3870.validation import MEDIA_ID_RE

from .helpers import MatrixClient, media_of, msc3870_settings


def test_create_without_body_returns_mxc_and_upload_url(alice: MatrixClient) -> None:
    response = alice.client.post(
        "/_matrix/media/v1/create", headers={"Authorization": f"Bearer {alice.token}"}
    )
    assert response.status_code == 200
    body = response.json()
    server_name, media_id = body["content_uri"][len("mxc://") :].split("/")
    assert server_name == "localhost"
    assert MEDIA_ID_RE.fullmatch(media_id)
    assert len(media_id) >= 32  # 192 random bits
    assert body["upload_method"] == "PUT"
    assert body["upload_url"] == body["com.beeper.msc3870.upload_url"]
    assert body["upload_url"].startswith("http://127.0.0.1:8008/_matrix/media/")
    now_ms = time.time() * 1000
    assert now_ms + 86_390_000 < body["unused_expires_at"] < now_ms + 86_410_000
    media = media_of(body["content_uri"])
    assert media.state == MediaState.PENDING
    assert media.user_id == "@alice:localhost"


def test_create_on_unstable_path_with_empty_object(alice: MatrixClient) -> None:
    response = alice.post("/_matrix/media/unstable/fi.mau.msc2246/create", b"{}")
    assert response.status_code == 200
    assert response.json()["content_uri"].startswith("mxc://localhost/")


def test_media_ids_are_unique(alice: MatrixClient) -> None:
    with msc3870_settings(MAX_PENDING_UPLOADS=0):
        ids = {alice.create()["content_uri"] for _ in range(20)}
    assert len(ids) == 20


@pytest.mark.parametrize(
    ("body", "errcode"),
    [(b"{not json", "M_NOT_JSON"), (b"[1, 2]", "M_BAD_JSON"), (b'"text"', "M_BAD_JSON")],
)
def test_create_with_bad_json_is_400(alice: MatrixClient, body: bytes, errcode: str) -> None:
    response = alice.post("/_matrix/media/v1/create", body)
    assert response.status_code == 400
    assert response.json()["errcode"] == errcode
    assert not Media.objects.exists()


def test_create_without_token_is_401_missing_token(db: None) -> None:
    response = Client().post("/_matrix/media/v1/create")
    assert response.status_code == 401
    assert response.json()["errcode"] == "M_MISSING_TOKEN"


def test_create_with_unknown_token_is_401_unknown_token(db: None) -> None:
    response = Client().post("/_matrix/media/v1/create", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert response.json()["errcode"] == "M_UNKNOWN_TOKEN"


def test_too_many_pending_uploads_is_429_with_retry_after(alice: MatrixClient) -> None:
    for _ in range(5):
        alice.create()
    oldest = Media.objects.order_by("unused_expires_at").first()
    assert oldest is not None
    response = alice.post("/_matrix/media/v1/create")
    assert response.status_code == 429
    body = response.json()
    assert body["errcode"] == "M_LIMIT_EXCEEDED"
    expected = (oldest.unused_expires_at - timezone.now()).total_seconds() * 1000
    assert abs(body["retry_after_ms"] - expected) < 5000
    assert Media.objects.count() == 5


def test_pending_limit_is_per_user_and_ignores_expired(
    alice: MatrixClient, bob: MatrixClient
) -> None:
    for _ in range(5):
        alice.create()
    assert bob.post("/_matrix/media/v1/create").status_code == 200
    Media.objects.filter(user_id=alice.user_id).update(
        unused_expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert alice.post("/_matrix/media/v1/create").status_code == 200


def test_create_is_rate_limited(alice: MatrixClient) -> None:
    with msc3870_settings(CREATE_RATE="2/min", MAX_PENDING_UPLOADS=0):
        assert alice.post("/_matrix/media/v1/create").status_code == 200
        assert alice.post("/_matrix/media/v1/create").status_code == 200
        response = alice.post("/_matrix/media/v1/create")
    assert response.status_code == 429
    assert response.json()["errcode"] == "M_LIMIT_EXCEEDED"
    assert 0 < response.json()["retry_after_ms"] <= 60_000


def test_appservice_masquerade_creates_for_the_masqueraded_user(db: None) -> None:
    from .helpers import make_token

    token = make_token("@bridge:localhost", is_appservice=True, masquerade_regex=r"@tg_.*")
    response = Client().post(
        "/_matrix/media/v1/create?user_id=@tg_123:localhost",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 200
    assert media_of(response.json()["content_uri"]).user_id == "@tg_123:localhost"
    outside = Client().post(
        "/_matrix/media/v1/create?user_id=@alice:localhost",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert outside.status_code == 403
    assert outside.json()["errcode"] == "M_FORBIDDEN"


def test_plain_user_cannot_masquerade(alice: MatrixClient) -> None:
    response = alice.post("/_matrix/media/v1/create?user_id=@bob:localhost")
    assert response.status_code == 403
    assert response.json()["errcode"] == "M_FORBIDDEN"
    # Naming oneself is fine.
    assert alice.post(f"/_matrix/media/v1/create?user_id={alice.user_id}").status_code == 200


def test_oversized_json_body_is_413(alice: MatrixClient) -> None:
    response = alice.post("/_matrix/media/v1/create", b'{"pad": "' + b"x" * 3_000_000 + b'"}')
    assert response.status_code == 413
    assert response.json()["errcode"] == "M_TOO_LARGE"
    assert not Media.objects.exists()


def test_a_malformed_content_length_is_the_clients_error(alice: MatrixClient) -> None:
    response = alice.post("/_matrix/media/v1/create", b"{}", headers={"Content-Length": "abc"})
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_INVALID_PARAM"


@pytest.mark.django_db(transaction=True)
def test_racing_creates_never_pass_the_pending_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten creates of one user at once, each on its own thread and connection, all let
    through to their INSERT together (on SQLite, where the count is that one statement
    and nothing else serialises them): exactly the limit of 5 get an id."""
    import threading

    from django.db import connection

    from msc3870 import sql, uploads
    from msc3870.auth import MatrixUser
    from msc3870.errors import LimitExceeded

    user = MatrixUser("@racer:localhost")
    at_the_insert = threading.Barrier(10, timeout=60)
    real_insert = sql.insert_media

    def insert_together(*args: object, **kwargs: object) -> bool:
        if connection.vendor == "sqlite":  # (elsewhere the user's lock is held here)
            at_the_insert.wait()
        return real_insert(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sql, "insert_media", insert_together)
    outcomes: list[str] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            uploads.create_media(user)
            outcomes.append("created")
        except LimitExceeded:
            outcomes.append("refused")
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
            at_the_insert.abort()
        finally:
            connection.close()

    threads = [threading.Thread(target=create) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert sorted(outcomes) == ["created"] * 5 + ["refused"] * 5
    assert Media.objects.filter(user_id=user.user_id, state=MediaState.PENDING).count() == 5
