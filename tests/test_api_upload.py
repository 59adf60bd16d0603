"""MSC2246 PUT /upload/{serverName}/{mediaId} and the one-shot POST /upload."""

from __future__ import annotations

import hashlib
import io
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone

from msc3870.models import Media, MediaState

from .helpers import (
    LyingBody,
    MatrixClient,
    media_files,
    media_of,
    msc3870_settings,
    mxc_path,
    png_bytes,
)


def test_put_then_download_round_trip(alice: MatrixClient) -> None:
    created = alice.create()
    data = png_bytes()
    response = alice.put_upload(created["content_uri"], data, "image/png", "?filename=red.png")
    assert response.status_code == 200
    # The spec's {} plus content_uri, which mautrix-python reads (test_mautrix_client.py).
    assert response.json() == {"content_uri": created["content_uri"]}
    media = media_of(created["content_uri"])
    assert media.state == MediaState.COMPLETE
    assert media.size == len(data)
    assert media.sha256 == hashlib.sha256(data).hexdigest()
    assert media.sniffed_content_type == "image/png"
    assert media.filename == "red.png"
    download = alice.get(f"/_matrix/client/v1/media/download/{mxc_path(created['content_uri'])}")
    assert download.status_code == 200
    assert b"".join(download.streaming_content) == data
    assert download["Content-Type"] == "image/png"
    assert download["Content-Disposition"] == "inline; filename=red.png"


def test_put_on_unstable_path(alice: MatrixClient) -> None:
    created = alice.create()
    path = f"/_matrix/media/unstable/fi.mau.msc2246/upload/{mxc_path(created['content_uri'])}"
    assert alice.put(path, b"hello", "text/plain").status_code == 200


def test_put_to_unknown_id_is_404(alice: MatrixClient) -> None:
    response = alice.put("/_matrix/media/v3/upload/localhost/doesNotExist", b"x")
    assert response.status_code == 404
    assert response.json()["errcode"] == "M_NOT_FOUND"


def test_put_to_other_server_is_404(alice: MatrixClient) -> None:
    response = alice.put("/_matrix/media/v3/upload/example.org/abcdef", b"x")
    assert response.status_code == 404
    assert response.json()["errcode"] == "M_NOT_FOUND"


def test_put_to_someone_elses_id_is_403(alice: MatrixClient, bob: MatrixClient) -> None:
    created = alice.create()
    response = bob.put_upload(created["content_uri"], b"x")
    assert response.status_code == 403
    assert response.json()["errcode"] == "M_FORBIDDEN"
    assert media_of(created["content_uri"]).state == MediaState.PENDING


def test_put_to_filled_id_is_409_even_with_empty_body(alice: MatrixClient) -> None:
    created = alice.create()
    assert alice.put_upload(created["content_uri"], b"first").status_code == 200
    response = alice.put_upload(created["content_uri"], b"")
    assert response.status_code == 409
    assert response.json()["errcode"] == "M_CANNOT_OVERWRITE_MEDIA"
    download = alice.get(f"/_matrix/client/v1/media/download/{mxc_path(created['content_uri'])}")
    assert b"".join(download.streaming_content) == b"first"


def test_put_to_expired_id_is_404(alice: MatrixClient) -> None:
    created = alice.create()
    Media.objects.update(unused_expires_at=timezone.now() - timedelta(seconds=1))
    response = alice.put_upload(created["content_uri"], b"x")
    assert response.status_code == 404
    assert response.json()["errcode"] == "M_NOT_FOUND"


def test_put_too_large_by_content_length_is_413_and_id_stays_usable(alice: MatrixClient) -> None:
    created = alice.create()
    with msc3870_settings(MAX_UPLOAD_SIZE=10):
        response = alice.put_upload(created["content_uri"], b"x" * 11)
        assert response.status_code == 413
        assert response.json()["errcode"] == "M_TOO_LARGE"
        assert media_of(created["content_uri"]).state == MediaState.PENDING
        assert media_files() == []
        assert alice.put_upload(created["content_uri"], b"x" * 10).status_code == 200


def test_limit_holds_while_streaming(alice: MatrixClient) -> None:
    """No Content-Length to trust: the bytes are counted as they arrive."""
    from msc3870.errors import TooLarge
    from msc3870.stores import get_store

    store = get_store()
    try:
        store.write_stream("media/xx/streamed", LyingBody(5000), max_size=4096)
    except TooLarge:
        pass
    else:  # pragma: no cover - the assertion below reports it
        raise AssertionError("TooLarge was not raised")
    assert store.head("media/xx/streamed") is None
    assert media_files() == []


def test_truncated_body_is_refused_and_nothing_is_kept(alice: MatrixClient) -> None:
    """Announce 100 bytes, send 10: what a client that lost its connection looks like.
    (The same over a real socket is in test_live_server.py.)"""
    from msc3870.errors import InvalidParam
    from msc3870.stores import get_store

    store = get_store()
    try:
        store.write_stream(
            "media/xx/short", io.BytesIO(b"0123456789"), max_size=1000, expected_size=100
        )
    except InvalidParam as exc:
        assert "10 of the 100" in exc.message
    else:  # pragma: no cover
        raise AssertionError("InvalidParam was not raised")
    assert media_files() == []


def test_invalid_media_id_and_server_name_are_400(alice: MatrixClient) -> None:
    for path in (
        "/_matrix/media/v3/upload/localhost/bad%20id",
        "/_matrix/media/v3/upload/localhost/" + "a" * 65,
        "/_matrix/media/v3/upload/bad_server!/abc",
        "/_matrix/media/v3/upload/..%2F..%2Fetc/passwd",
    ):
        response = alice.put(path, b"x")
        assert response.status_code in (400, 404), path
        assert response.json()["errcode"] in ("M_INVALID_PARAM", "M_UNRECOGNIZED"), path


def test_bad_filename_is_400(alice: MatrixClient) -> None:
    created = alice.create()
    response = alice.put_upload(created["content_uri"], b"x", query="?filename=a%0Ab")
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_INVALID_PARAM"


def test_one_shot_upload(alice: MatrixClient) -> None:
    data = png_bytes()
    response = alice.post("/_matrix/media/v3/upload?filename=one.png", data, "image/png")
    assert response.status_code == 200
    media = media_of(response.json()["content_uri"])
    assert media.state == MediaState.COMPLETE
    assert media.upload_method == "post"
    download = alice.get(f"/_matrix/media/v3/download/{mxc_path(media.mxc_uri)}")
    assert b"".join(download.streaming_content) == data


def test_one_shot_upload_too_large(alice: MatrixClient) -> None:
    with msc3870_settings(MAX_UPLOAD_SIZE=4):
        response = alice.post("/_matrix/media/v3/upload", b"12345", "text/plain")
    assert response.status_code == 413
    assert response.json()["errcode"] == "M_TOO_LARGE"
    assert media_files() == []


def test_upload_without_token_is_401(alice: MatrixClient) -> None:
    response = alice.client.generic("POST", "/_matrix/media/v3/upload", b"x")
    assert response.status_code == 401
    assert response.json()["errcode"] == "M_MISSING_TOKEN"


def test_denied_type_is_rejected_and_deleted(alice: MatrixClient) -> None:
    created = alice.create()
    with msc3870_settings(DENIED_CONTENT_TYPES=["text/html"]):
        response = alice.put_upload(
            created["content_uri"],
            b"<!DOCTYPE html><html><script>alert(1)</script></html>",
            "text/plain",
        )
    assert response.status_code == 403
    assert response.json()["errcode"] == "M_FORBIDDEN"
    assert "text/html" in response.json()["error"]
    media = media_of(created["content_uri"])
    assert media.state == MediaState.REJECTED
    assert media.objects_deleted_at is not None
    assert media_files() == []
    download = alice.get(f"/_matrix/client/v1/media/download/{mxc_path(created['content_uri'])}")
    # Rejected media is not found; only the uploader hears why.
    assert download.status_code == 404
    assert download.json()["errcode"] == "M_NOT_FOUND"


def test_rejected_bytes_are_gone_before_the_rejection_is_recorded(
    alice: MatrixClient, monkeypatch: Any
) -> None:
    """By the time anyone can read REJECTED (the uploader's answer, a waiting recipient),
    the bytes are deleted: the transition sees an empty media directory."""
    from msc3870 import lifecycle

    seen_at_rejection: list[list[str]] = []
    real_transition = lifecycle.transition

    def watching(media: Any, from_states: Any, to_state: str, **kwargs: Any) -> bool:
        if to_state == MediaState.REJECTED:
            seen_at_rejection.append(media_files())
        return real_transition(media, from_states, to_state, **kwargs)

    monkeypatch.setattr(lifecycle, "transition", watching)
    created = alice.create()
    with msc3870_settings(DENIED_CONTENT_TYPES=["text/html"]):
        response = alice.put_upload(
            created["content_uri"], b"<!DOCTYPE html><html></html>", "text/html"
        )
    assert response.status_code == 403
    assert seen_at_rejection == [[]]


def test_a_rejection_is_not_recorded_while_its_bytes_cannot_be_deleted(
    alice: MatrixClient, monkeypatch: Any
) -> None:
    """The store fails to delete: the row stays PROCESSING (never served, retried by the
    sweep), not REJECTED with its bytes still stored."""
    from msc3870.errors import StorageUnavailable
    from msc3870.stores.local import LocalMediaStore

    def failing(self: Any, keys: list[str]) -> None:
        raise StorageUnavailable("disk gone")

    monkeypatch.setattr(LocalMediaStore, "delete_many", failing)
    monkeypatch.setattr(LocalMediaStore, "delete", lambda self, key: failing(self, [key]))
    created = alice.create()
    with msc3870_settings(DENIED_CONTENT_TYPES=["text/html"]):
        alice.put_upload(created["content_uri"], b"<!DOCTYPE html><html></html>", "text/html")
    media = media_of(created["content_uri"])
    assert media.state == MediaState.PROCESSING
    assert media.last_error  # the failure is on the row
    assert media_files() != []
    # The bytes are recorded even though the verdict was not (the UPDATE that decides
    # would have recorded them): the stuck sweep screens them again, never as "receiving".
    body = b"<!DOCTYPE html><html></html>"
    assert (media.size, media.sha256) == (len(body), hashlib.sha256(body).hexdigest())
    assert (Path(settings.MEDIA_DIR) / media.storage_key).read_bytes() == body


def test_a_put_screened_in_its_request_sniffs_the_bytes_as_they_passed(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The object a PUT has just stored is not read back for its first bytes: they were
    kept as they streamed to the store (one store request fewer per upload)."""
    from msc3870.stores import MediaStore
    from msc3870.stores.local import LocalMediaStore

    def no_read_back(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the stored object was read back")

    for store_class in (LocalMediaStore, MediaStore):
        monkeypatch.setattr(store_class, "head_with_prefix", no_read_back, raising=False)
        monkeypatch.setattr(store_class, "read_prefix", no_read_back, raising=False)
    created = alice.create()
    data = png_bytes()
    response = alice.put_upload(created["content_uri"], data, "application/octet-stream")
    assert response.status_code == 200, response.content
    media = media_of(created["content_uri"])
    assert media.state == MediaState.COMPLETE
    assert media.sniffed_content_type == "image/png"  # from the kept bytes, not the header
    assert media.size == len(data) and media.sha256 == hashlib.sha256(data).hexdigest()


def test_the_metered_reader_keeps_exactly_the_first_bytes_asked() -> None:
    from msc3870.stores import MeteredReader

    body = bytes(range(256)) * 100  # 25,600 bytes, read in uneven chunks
    reader = MeteredReader(io.BytesIO(body), max_size=len(body), keep_first=8192)
    while reader.read(1000):
        pass
    written = reader.result()
    assert written.first_bytes == body[:8192]
    assert written.size == len(body)

    short = MeteredReader(io.BytesIO(b"tiny"), max_size=100, keep_first=8192)
    while short.read(3):
        pass
    assert short.result().first_bytes == b"tiny"
    unasked = MeteredReader(io.BytesIO(body), max_size=len(body))
    while unasked.read():
        pass
    assert unasked.result().first_bytes == b""
