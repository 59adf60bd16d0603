"""The download headers of protocol.md section 4 on every kind of
download response, not on one 200 PNG only: HTML and SVG (attachments), 206, 304, 416,
thumbnails (made, ranged, served as the original), through the authenticated v1 and the
legacy v3 endpoints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from django.test import Client

from msc3870.api.headers import CONTENT_SECURITY_POLICY

from .helpers import MatrixClient, animated_gif, mxc_path, png_bytes

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Security-Policy": "sandbox;",
    "Cross-Origin-Resource-Policy": "cross-origin",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow, noarchive, noimageindex",
}

HTML = b"<!doctype html><html><body><script>alert(document.cookie)</script></body></html>"
SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
)
TEXT = b"just text, 0123456789"  # digits alone are sniffed as "text/ascii" (an attachment)


UPLOADS: dict[str, tuple[Callable[[], bytes], str, str]] = {
    # name: (bytes, declared type, filename)
    "png": (lambda: png_bytes(64, 64), "image/png", "red.png"),
    "html": (lambda: HTML, "text/html", "page.html"),
    "svg": (lambda: SVG, "image/svg+xml", "logo.svg"),
    "text": (lambda: TEXT, "text/plain", "digits.txt"),
    "gif": (animated_gif, "image/gif", "moving.gif"),
}


@dataclass(frozen=True)
class Kind:
    upload: str
    status: int
    # None: no Content-Disposition is expected (an answer without the media's body).
    disposition: str | None
    suffix: str = ""
    range_header: str | None = None
    if_none_match: bool = False
    thumbnail: bool = False


KINDS = {
    "png-200": Kind("png", 200, "inline; filename=red.png"),
    "html-200": Kind("html", 200, "attachment; filename=page.html"),
    "svg-200": Kind("svg", 200, "attachment; filename=logo.svg"),
    "text-200": Kind("text", 200, "inline; filename=digits.txt"),
    "html-named-in-path": Kind("html", 200, "attachment; filename=other.html", "/other.html"),
    "svg-named-in-path": Kind("svg", 200, "attachment; filename=x.svg", "/x.svg"),
    "text-206": Kind("text", 206, "inline; filename=digits.txt", range_header="bytes=2-5"),
    "html-206": Kind("html", 206, "attachment; filename=page.html", range_header="bytes=0-4"),
    "svg-206-suffix": Kind("svg", 206, "attachment; filename=logo.svg", range_header="bytes=-3"),
    "png-304": Kind("png", 304, None, if_none_match=True),
    "html-304": Kind("html", 304, None, if_none_match=True),
    "text-416": Kind("text", 416, None, range_header="bytes=100-"),
    "svg-416": Kind("svg", 416, None, range_header="bytes=100-"),
    "thumbnail-200": Kind("png", 200, "inline", thumbnail=True),
    "thumbnail-206": Kind("png", 206, "inline", range_header="bytes=0-9", thumbnail=True),
    "thumbnail-416": Kind("png", 416, None, range_header="bytes=99999999-", thumbnail=True),
    "thumbnail-as-original": Kind("gif", 200, "inline; filename=moving.gif", thumbnail=True),
}

ENDPOINTS = {
    ("v1", False): "/_matrix/client/v1/media/download/",
    ("v3", False): "/_matrix/media/v3/download/",
    ("v1", True): "/_matrix/client/v1/media/thumbnail/",
    ("v3", True): "/_matrix/media/v3/thumbnail/",
}


@pytest.mark.parametrize("version", ["v1", "v3"])
@pytest.mark.parametrize("kind_name", list(KINDS))
def test_every_download_answer_carries_the_download_headers(
    alice: MatrixClient, version: str, kind_name: str
) -> None:
    kind = KINDS[kind_name]
    make, content_type, filename = UPLOADS[kind.upload]
    uploaded = alice.post(f"/_matrix/media/v3/upload?filename={filename}", make(), content_type)
    assert uploaded.status_code == 200, uploaded.content
    path = ENDPOINTS[(version, kind.thumbnail)] + mxc_path(uploaded.json()["content_uri"])
    path += kind.suffix
    if kind.thumbnail:
        animated = "&animated=true" if kind.upload == "gif" else ""
        path += f"?width=32&height=32&method=scale{animated}"
    headers: dict[str, str] = {}
    if kind.range_header:
        headers["Range"] = kind.range_header
    if kind.if_none_match:
        first = alice.get(path)
        assert first.status_code == 200
        headers["If-None-Match"] = first["ETag"]

    client = alice if version == "v1" else Client()
    response = client.get(path, headers=headers)

    assert response.status_code == kind.status, getattr(response, "content", b"")[:300]
    missing = {
        name: (response.get(name), value)
        for name, value in SECURITY_HEADERS.items()
        if response.get(name) != value
    }
    assert not missing, missing
    if kind.disposition is not None:
        assert response["Content-Disposition"] == kind.disposition
        if kind.thumbnail and kind.upload != "gif":
            assert response["Content-Type"] in ("image/png", "image/jpeg")
        else:
            assert response["Content-Type"] == content_type
    else:
        # 304 and 416 carry no body of the media: nothing to render, never "inline".
        assert "inline" not in response.get("Content-Disposition", "")
    if kind.status == 416:
        assert response["Content-Range"].startswith("bytes */")
        assert response["Content-Type"].startswith("application/json")
    if kind.status == 206:
        assert response["Content-Range"].startswith("bytes ")
