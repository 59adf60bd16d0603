"""Users deleting their own media (MSC4322, ``POST /_matrix/client/v1/media/redact/...``):
only the uploader or a server admin, a Matrix error for everyone else, and the media 404
on every read path at once after. (With SeaweedFS, PostgreSQL and celery:
``services/test_retention.py``.)"""

from __future__ import annotations

from typing import Any

import pytest

from msc3870 import moderation
from msc3870.auth import MatrixUser
from msc3870.models import Media, MediaState, ModerationAction, ModerationRecord
from msc3870.stores import get_store
from msc3870.thumbnails import thumbnail_keys

from .federation_helpers import FakeRemote
from .helpers import (
    MatrixClient,
    assert_all_not_found,
    every_read,
    media_of,
    msc3870_settings,
    mxc_path,
    png_bytes,
)

S = MediaState
REDACT = "/_matrix/client/v1/media/redact/"
UNSTABLE_REDACT = "/_matrix/client/unstable/uk.timedout.msc4322/media/redact/"


def redact(client: MatrixClient, content_uri: str, body: Any = b"", **options: Any) -> Any:
    return client.post(REDACT + mxc_path(content_uri), body, **options)


def assert_error(response: Any, status: int, errcode: str) -> None:
    assert response.status_code == status, response.content
    assert response.json()["errcode"] == errcode, response.content


def test_the_uploader_redacts_and_every_read_path_is_404_at_once(
    alice: MatrixClient, bob: MatrixClient, peer: FakeRemote
) -> None:
    content_uri = alice.uploaded(png_bytes(64, 64), "image/png")
    media = media_of(content_uri)
    every_read(bob, media.media_id, peer)  # thumbnails made, answers warm
    store = get_store()
    made = [key for key in thumbnail_keys(media) if store.head(key)]
    assert made and store.head(media.storage_key)

    response = redact(alice, content_uri, b'{"reason": "wrong file"}')
    assert response.status_code == 200, response.content
    assert response.json() == {}
    for client in (alice, bob):
        assert_all_not_found(every_read(client, media.media_id, peer))
    # The bytes and the thumbnails are gone (tasks run in-process in the unit suite); the
    # row stays as a tombstone, so the id is never reused.
    row = Media.objects.get(pk=media.pk)
    assert row.state == S.DELETED and row.objects_deleted_at is not None
    assert store.head(media.storage_key) is None
    assert [key for key in made if store.head(key)] == []
    record = ModerationRecord.objects.get(media=media)
    assert (record.action, record.actor) == (ModerationAction.PURGE, "@alice:localhost")
    assert "wrong file" in record.reason


def test_redacting_again_is_a_no_op_and_the_unstable_path_answers_too(
    alice: MatrixClient,
) -> None:
    content_uri = alice.uploaded(b"twice")
    response = alice.post(UNSTABLE_REDACT + mxc_path(content_uri))
    assert response.status_code == 200, response.content
    again = redact(alice, content_uri)
    assert again.status_code == 200 and again.json() == {}
    assert ModerationRecord.objects.filter(media=media_of(content_uri)).count() == 1


def test_versions_advertise_the_proposal(alice: MatrixClient) -> None:
    assert alice.get("/_matrix/client/versions").json()["unstable_features"]["uk.timedout.msc4322"]


def test_only_the_uploader_or_an_admin(alice: MatrixClient, bob: MatrixClient) -> None:
    content_uri = alice.uploaded(b"alice's")
    refused = redact(bob, content_uri)
    assert_error(refused, 403, "M_FORBIDDEN")
    assert media_of(content_uri).state == S.COMPLETE
    assert alice.download(content_uri).status_code == 200

    with msc3870_settings(ADMINS=["@bob:localhost"]):
        assert redact(bob, content_uri).status_code == 200
    assert media_of(content_uri).state == S.DELETED
    record = ModerationRecord.objects.get(media=media_of(content_uri))
    assert record.actor == "@bob:localhost" and "admin" in record.reason


def test_ids_still_uploading_can_be_redacted(alice: MatrixClient) -> None:
    created = alice.create()
    assert redact(alice, created["content_uri"]).status_code == 200
    assert media_of(created["content_uri"]).state == S.DELETED
    # Its upload URL and the PUT are dead: the id is never reused.
    put = alice.put_upload(created["content_uri"], b"late")
    assert put.status_code in (404, 409), put.content
    assert alice.download(created["content_uri"], "?timeout_ms=0").status_code == 404


def test_the_uploader_cannot_redact_what_a_moderator_holds(alice: MatrixClient) -> None:
    content_uri = alice.uploaded(b"held")
    moderation.quarantine(media_of(content_uri), by="mod", reason="look")
    assert_error(redact(alice, content_uri), 403, "M_FORBIDDEN")
    assert media_of(content_uri).state == S.QUARANTINED
    with msc3870_settings(ADMINS=["@alice:localhost"]):
        assert redact(alice, content_uri).status_code == 200
    assert media_of(content_uri).state == S.DELETED


def test_a_quarantine_racing_the_redaction_wins(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The media is quarantined between the uploader's request reading it and its purge:
    the purge (a compare-and-set that leaves quarantined media out) loses, 403."""
    content_uri = alice.uploaded(b"racing")
    media = media_of(content_uri)
    real_purge = moderation.purge

    def quarantined_first(row: Media, **kwargs: Any) -> bool:
        moderation.quarantine(Media.objects.get(pk=row.pk), by="mod", reason="now")
        return real_purge(row, **kwargs)

    monkeypatch.setattr(moderation, "purge", quarantined_first)
    assert_error(redact(alice, content_uri), 403, "M_FORBIDDEN")
    assert Media.objects.get(pk=media.pk).state == S.QUARANTINED


def test_other_servers_media_only_by_an_admin(alice: MatrixClient, bob: MatrixClient) -> None:
    remote = Media.objects.create(
        server_name="remote.example",
        media_id="fetched",
        user_id="@alice:localhost",  # who asked for it first: not its uploader
        upload_method="remote",
        state=S.COMPLETE,
        unused_expires_at="2030-01-01T00:00:00Z",
    )
    assert_error(redact(alice, remote.mxc_uri), 403, "M_FORBIDDEN")
    with msc3870_settings(ADMINS=["@bob:localhost"]):
        assert redact(bob, remote.mxc_uri).status_code == 200
    assert Media.objects.get(pk=remote.pk).state == S.DELETED


@pytest.mark.parametrize(
    ("path", "body", "status", "errcode"),
    [
        ("localhost/doesnotexist", b"", 404, "M_NOT_FOUND"),
        ("other.example/doesnotexist", b"", 404, "M_NOT_FOUND"),
        ("localhost/bad%20id", b"", 400, "M_INVALID_PARAM"),
        ("not a server/abc", b"", 400, "M_INVALID_PARAM"),
        ("localhost/abc", b"{not json", 400, "M_NOT_JSON"),
        ("localhost/abc", b"[]", 400, "M_BAD_JSON"),
        ("localhost/abc", b'{"reason": null}', 400, "M_INVALID_PARAM"),
        ("localhost/abc", b'{"reason": 12}', 400, "M_INVALID_PARAM"),
    ],
)
def test_bad_requests_get_matrix_errors(
    alice: MatrixClient, path: str, body: bytes, status: int, errcode: str
) -> None:
    assert_error(alice.post(REDACT + path, body), status, errcode)


def test_without_a_token_or_with_the_wrong_method(alice: MatrixClient) -> None:
    content_uri = alice.uploaded(b"mine")
    anonymous = MatrixClient.in_process()
    assert_error(redact(anonymous, content_uri), 401, "M_MISSING_TOKEN")
    assert_error(alice.get(REDACT + mxc_path(content_uri)), 405, "M_UNRECOGNIZED")
    assert media_of(content_uri).state == S.COMPLETE


def test_guests_cannot_redact(alice: MatrixClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from msc3870.auth import MatrixTokenAuthentication

    content_uri = alice.uploaded(b"mine")
    guest = MatrixUser(user_id="@alice:localhost", is_guest=True)
    monkeypatch.setattr(
        MatrixTokenAuthentication, "authenticate", lambda self, request: (guest, "t")
    )
    assert_error(redact(alice, content_uri), 403, "M_GUEST_ACCESS_FORBIDDEN")
    assert media_of(content_uri).state == S.COMPLETE


def test_identical_bytes_of_another_upload_stay(alice: MatrixClient, bob: MatrixClient) -> None:
    """Identical content is stored once: redacting one copy keeps the object the other
    serves."""
    first = alice.uploaded(b"the same bytes", "text/plain")
    second = bob.uploaded(b"the same bytes", "text/plain")
    assert media_of(first).storage_key == media_of(second).storage_key
    assert redact(alice, first).status_code == 200
    assert alice.download(first, "?timeout_ms=0").status_code == 404
    kept = bob.download(second)
    assert kept.status_code == 200 and b"".join(kept.streaming_content) == b"the same bytes"
