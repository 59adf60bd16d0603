"""Thumbnails: sizes, methods, formats, caching, refusals."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client
from PIL import Image

from msc3870 import moderation, thumbnails

from .conftest import MatrixClient, files_under, media_of, msc3870_settings, mxc_path

V1 = "/_matrix/client/v1/media/thumbnail/"
V3 = "/_matrix/media/v3/thumbnail/"


def image_bytes(size: tuple[int, int], fmt: str, **save: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, fmt, **save)
    return buffer.getvalue()


def upload(client: MatrixClient, data: bytes, content_type: str) -> str:
    response = client.post("/_matrix/media/v3/upload", data, content_type)
    assert response.status_code == 200, response.content
    return mxc_path(response.json()["content_uri"])


def open_image(response: Any) -> Image.Image:
    return Image.open(io.BytesIO(b"".join(response.streaming_content)))


def test_scale_keeps_aspect_within_the_chosen_size(alice: MatrixClient) -> None:
    path = upload(alice, image_bytes((1000, 500), "PNG"), "image/png")
    response = alice.get(V1 + path + "?width=300&height=200&method=scale")
    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"
    assert response["Content-Disposition"] == "inline"
    assert response["X-Content-Type-Options"] == "nosniff"
    image = open_image(response)
    assert image.format == "PNG"
    assert image.size == (320, 160)  # the 320x240 box, aspect kept


def test_crop_and_jpeg_stays_jpeg(alice: MatrixClient) -> None:
    path = upload(alice, image_bytes((640, 480), "JPEG"), "image/jpeg")
    response = alice.get(V1 + path + "?width=64&height=64&method=crop")
    assert response["Content-Type"] == "image/jpeg"
    image = open_image(response)
    assert (image.format, image.size) == ("JPEG", (96, 96))


def test_thumbnail_is_made_once_and_deleted_with_its_media(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = upload(alice, image_bytes((800, 800), "PNG"), "image/png")
    renders = []
    real_render = thumbnails._render

    def counting(*args: Any) -> bytes:
        renders.append(args[1:])
        return real_render(*args)

    monkeypatch.setattr(thumbnails, "_render", counting)
    for _ in range(3):
        assert alice.get(V1 + path + "?width=32&height=32&method=crop").status_code == 200
    assert len(renders) == 1
    media = media_of("mxc://" + path)
    assert f"thumbnails/{media.media_id}/32x32-crop" in files_under(Path(settings.MEDIA_DIR))
    moderation.purge(media, by="mod")
    assert files_under(Path(settings.MEDIA_DIR)) == []


def test_legacy_thumbnail_is_unauthenticated(alice: MatrixClient) -> None:
    path = upload(alice, image_bytes((100, 100), "PNG"), "image/png")
    assert Client().get(V3 + path + "?width=32&height=32").status_code == 200
    assert Client().get(V1 + path + "?width=32&height=32").status_code == 401


@pytest.mark.parametrize(
    "query",
    ["", "?width=32", "?width=0&height=32", "?width=a&height=b", "?width=32&height=32&method=zoom"],
)
def test_bad_parameters_are_400(alice: MatrixClient, query: str) -> None:
    path = upload(alice, image_bytes((100, 100), "PNG"), "image/png")
    response = alice.get(V1 + path + query)
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_INVALID_PARAM"


def test_non_images_cannot_be_thumbnailed(alice: MatrixClient) -> None:
    path = upload(alice, b"%PDF-1.4 not an image", "application/pdf")
    response = alice.get(V1 + path + "?width=32&height=32")
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_UNKNOWN"


def test_decompression_bomb_is_refused_before_decoding(alice: MatrixClient) -> None:
    bomb = image_bytes((6000, 6000), "PNG")  # 36 Mpx of one colour: a few KiB on the wire
    assert len(bomb) < 200_000
    path = upload(alice, bomb, "image/png")
    with msc3870_settings(THUMBNAIL_MAX_PIXELS=1_000_000):
        response = alice.get(V1 + path + "?width=32&height=32")
    assert response.status_code == 400
    assert "too many pixels" in response.json()["error"]


def test_bytes_that_lie_about_being_an_image(alice: MatrixClient) -> None:
    path = upload(alice, b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "image/png")
    response = alice.get(V1 + path + "?width=32&height=32")
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_UNKNOWN"


def test_animated_gif_asked_as_animated_is_served_as_is(alice: MatrixClient) -> None:
    frames = [Image.new("RGB", (50, 50), colour) for colour in ("red", "blue", "green")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    path = upload(alice, buffer.getvalue(), "image/gif")
    animated = alice.get(V1 + path + "?width=32&height=32&animated=true")
    assert animated["Content-Type"] == "image/gif"
    assert b"".join(animated.streaming_content) == buffer.getvalue()
    still = alice.get(V1 + path + "?width=32&height=32")
    assert still["Content-Type"] == "image/png"


def test_thumbnail_of_pending_media_waits_then_504(alice: MatrixClient) -> None:
    created = alice.create()
    response = alice.get(V1 + mxc_path(created["content_uri"]) + "?width=32&height=32&timeout_ms=0")
    assert response.status_code == 504
    assert response.json()["errcode"] == "M_NOT_YET_UPLOADED"
