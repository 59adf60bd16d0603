"""Downloads: waiting for uploads, errors, headers, ranges."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from msc3870 import moderation, waiting
from msc3870.api.headers import CONTENT_SECURITY_POLICY
from msc3870.models import Media

from .helpers import MatrixClient, body_of, media_of, mxc_path, png_bytes

V1 = "/_matrix/client/v1/media/download/"
V3 = "/_matrix/media/v3/download/"


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[waiting.MediaWait[object]]:
    """Every wait a request parks on (a MediaWait raised by the service)."""
    parked: list[waiting.MediaWait[object]] = []
    real_init = waiting.MediaWait.__init__

    def init(self: waiting.MediaWait[object], *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        parked.append(self)

    monkeypatch.setattr(waiting.MediaWait, "__init__", init)
    return parked


def test_pending_download_waits_then_504(
    alice: MatrixClient, waits: list[waiting.MediaWait[object]]
) -> None:
    created = alice.create()
    asked = time.monotonic()
    response = alice.get(V1 + mxc_path(created["content_uri"]) + "?timeout_ms=300")
    answered = time.monotonic()
    assert response.status_code == 504
    assert response.json()["errcode"] == "M_NOT_YET_UPLOADED"
    # It parked on the pending row with the deadline it asked for, and answered 504 only
    # once that deadline had passed (outcomes, not a measured duration).
    assert waits, "the download did not wait"
    media = media_of(created["content_uri"])
    assert {w.pk for w in waits} == {media.pk}
    deadline = waits[0].deadline
    assert asked + 0.3 <= deadline.at <= answered + 0.3
    assert all(w.deadline.passed for w in waits)


def test_pending_download_on_v3_with_unstable_timeout_param(db: None, alice: MatrixClient) -> None:
    created = alice.create()
    path = V3 + mxc_path(created["content_uri"]) + "?fi.mau.msc2246.timeout_ms=0"
    response = Client().get(path)
    assert response.status_code == 504
    assert response.json()["errcode"] == "M_NOT_YET_UPLOADED"


def test_timeout_is_capped(alice: MatrixClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from msc3870 import downloads

    assert downloads.download_timeout_ms("999999999") == 60_000
    assert downloads.download_timeout_ms(None) == 20_000
    response = alice.get(V1 + "localhost/abc?timeout_ms=soon")
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_INVALID_PARAM"


def test_unknown_expired_rejected_quarantined_are_404_at_once(
    alice: MatrixClient, waits: list[waiting.MediaWait[object]]
) -> None:
    assert alice.get(V1 + "localhost/nothingHere").status_code == 404
    expired = alice.create()
    Media.objects.update(unused_expires_at=timezone.now() - timedelta(seconds=1))
    response = alice.get(V1 + mxc_path(expired["content_uri"]) + "?timeout_ms=5000")
    assert response.status_code == 404
    assert response.json()["errcode"] == "M_NOT_FOUND"
    assert waits == []  # answered at once: it never parked
    quarantined = mxc_path(alice.uploaded(b"hello", "text/plain"))
    moderation.quarantine(media_of("mxc://" + quarantined), by="mod")
    assert alice.get(V1 + quarantined).status_code == 404
    moderation.approve(media_of("mxc://" + quarantined), by="mod")
    assert alice.get(V1 + quarantined).status_code == 200


def test_remote_media_is_404(alice: MatrixClient) -> None:
    response = alice.get(V1 + "matrix.org/abcdef")
    assert response.status_code == 404
    assert response.json()["errcode"] == "M_NOT_FOUND"


def test_v1_download_needs_a_token(alice: MatrixClient) -> None:
    path = mxc_path(alice.uploaded(b"hello", "text/plain"))
    response = Client().get(V1 + path)
    assert response.status_code == 401
    assert response.json()["errcode"] == "M_MISSING_TOKEN"


def test_download_headers(alice: MatrixClient) -> None:
    path = mxc_path(alice.uploaded(png_bytes(), "image/png", filename="red.png"))
    response = alice.get(V1 + path)
    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"
    assert response["Content-Disposition"] == "inline; filename=red.png"
    assert response["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert response["X-Content-Security-Policy"] == "sandbox;"
    assert response["Cross-Origin-Resource-Policy"] == "cross-origin"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "no-referrer"
    assert response["X-Robots-Tag"] == "noindex, nofollow, noarchive, noimageindex"
    assert response["Accept-Ranges"] == "bytes"
    assert response["Cache-Control"].startswith("private")
    assert Client().get(V3 + path)["Cache-Control"].startswith("public")


@pytest.mark.parametrize(
    ("content_type", "data", "disposition"),
    [
        ("text/plain", b"just text", "inline"),
        ("application/pdf", b"%PDF-1.4\n%binary", "attachment"),
        (
            "image/svg+xml",
            b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>',
            "attachment",
        ),
        ("application/octet-stream", b"\x00\x01\x02", "attachment"),
    ],
)
def test_disposition_allowlist(
    alice: MatrixClient, content_type: str, data: bytes, disposition: str
) -> None:
    response = alice.get(V1 + mxc_path(alice.uploaded(data, content_type)))
    assert response["Content-Disposition"] == disposition
    assert response["Content-Type"] == content_type


def test_filename_from_path_segment_and_non_ascii(alice: MatrixClient) -> None:
    path = mxc_path(alice.uploaded(b"hello", "text/plain", filename="upload.txt"))
    response = alice.get(V1 + path + "/my%20r%C3%A9sum%C3%A9.txt")
    assert response["Content-Disposition"] == ("inline; filename*=utf-8''my%20r%C3%A9sum%C3%A9.txt")


@pytest.mark.parametrize(
    ("header", "status", "content_range", "expected"),
    [
        ("bytes=0-3", 206, "bytes 0-3/10", b"0123"),
        ("bytes=7-", 206, "bytes 7-9/10", b"789"),
        ("bytes=-2", 206, "bytes 8-9/10", b"89"),
        ("bytes=5-100", 206, "bytes 5-9/10", b"56789"),
        ("bytes=0-1,4-5", 200, None, b"0123456789"),
        ("pages=1", 200, None, b"0123456789"),
    ],
)
def test_ranges(
    alice: MatrixClient, header: str, status: int, content_range: str | None, expected: bytes
) -> None:
    path = mxc_path(alice.uploaded(b"0123456789", "text/plain"))
    response = alice.get(V1 + path, headers={"Range": header})
    assert response.status_code == status
    assert body_of(response) == expected
    assert response.get("Content-Range") == content_range
    assert response["Content-Length"] == str(len(expected))


def test_unsatisfiable_range_is_416(alice: MatrixClient) -> None:
    path = mxc_path(alice.uploaded(b"0123456789", "text/plain"))
    response = alice.get(V1 + path, headers={"Range": "bytes=10-"})
    assert response.status_code == 416
    assert response["Content-Range"] == "bytes */10"


def test_etag_and_if_none_match(alice: MatrixClient) -> None:
    path = mxc_path(alice.uploaded(b"cache me", "text/plain"))
    first = alice.get(V1 + path)
    again = alice.get(V1 + path, headers={"If-None-Match": first["ETag"]})
    assert again.status_code == 304


def test_legacy_download_streams_even_with_allow_redirect_on_local_disk(
    alice: MatrixClient,
) -> None:
    path = mxc_path(alice.uploaded(b"local bytes", "text/plain"))
    response = Client().get(V3 + path + "?allow_redirect=true")
    assert response.status_code == 200
    assert body_of(response) == b"local bytes"
