"""Thumbnails: sizes, methods, formats, caching, refusals."""

from __future__ import annotations

import io
import threading
from typing import Any

import pytest
from django.test import Client
from PIL import Image, ImageFile

from msc3870 import moderation, thumbnails

from .helpers import (
    MatrixClient,
    media_files,
    media_of,
    msc3870_settings,
    mxc_path,
    wait_until,
)

V1 = "/_matrix/client/v1/media/thumbnail/"
V3 = "/_matrix/media/v3/thumbnail/"


def image_bytes(size: tuple[int, int], fmt: str, **save: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, fmt, **save)
    return buffer.getvalue()


def open_image(response: Any) -> Image.Image:
    return Image.open(io.BytesIO(b"".join(response.streaming_content)))


def test_scale_keeps_aspect_within_the_chosen_size(alice: MatrixClient) -> None:
    path = mxc_path(alice.uploaded(image_bytes((1000, 500), "PNG"), "image/png"))
    response = alice.get(V1 + path + "?width=300&height=200&method=scale")
    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"
    assert response["Content-Disposition"] == "inline"
    assert response["X-Content-Type-Options"] == "nosniff"
    image = open_image(response)
    assert image.format == "PNG"
    assert image.size == (320, 160)  # the 320x240 box, aspect kept


def test_crop_and_jpeg_stays_jpeg(alice: MatrixClient) -> None:
    path = mxc_path(alice.uploaded(image_bytes((640, 480), "JPEG"), "image/jpeg"))
    response = alice.get(V1 + path + "?width=64&height=64&method=crop")
    assert response["Content-Type"] == "image/jpeg"
    image = open_image(response)
    assert (image.format, image.size) == ("JPEG", (96, 96))


def test_thumbnail_is_made_once_and_deleted_with_its_media(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = mxc_path(alice.uploaded(image_bytes((800, 800), "PNG"), "image/png"))
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
    assert f"thumbnails/{media.media_id}/32x32-crop" in media_files()
    moderation.purge(media, by="mod")
    assert media_files() == []


def test_legacy_thumbnail_is_unauthenticated(alice: MatrixClient) -> None:
    path = mxc_path(alice.uploaded(image_bytes((100, 100), "PNG"), "image/png"))
    assert Client().get(V3 + path + "?width=32&height=32").status_code == 200
    assert Client().get(V1 + path + "?width=32&height=32").status_code == 401


@pytest.mark.parametrize(
    "query",
    ["", "?width=32", "?width=0&height=32", "?width=a&height=b", "?width=32&height=32&method=zoom"],
)
def test_bad_parameters_are_400(alice: MatrixClient, query: str) -> None:
    path = mxc_path(alice.uploaded(image_bytes((100, 100), "PNG"), "image/png"))
    response = alice.get(V1 + path + query)
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_INVALID_PARAM"


def test_non_images_cannot_be_thumbnailed(alice: MatrixClient) -> None:
    path = mxc_path(alice.uploaded(b"%PDF-1.4 not an image", "application/pdf"))
    response = alice.get(V1 + path + "?width=32&height=32")
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_UNKNOWN"


def test_decompression_bomb_is_refused_before_decoding(alice: MatrixClient) -> None:
    bomb = image_bytes((6000, 6000), "PNG")  # 36 Mpx of one colour: a few KiB on the wire
    assert len(bomb) < 200_000
    path = mxc_path(alice.uploaded(bomb, "image/png"))
    with msc3870_settings(THUMBNAIL_MAX_PIXELS=1_000_000):
        response = alice.get(V1 + path + "?width=32&height=32")
    assert response.status_code == 400
    assert "too many pixels" in response.json()["error"]


def test_bytes_that_lie_about_being_an_image(alice: MatrixClient) -> None:
    path = mxc_path(alice.uploaded(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "image/png"))
    response = alice.get(V1 + path + "?width=32&height=32")
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_UNKNOWN"


def test_animated_gif_asked_as_animated_is_served_as_is(alice: MatrixClient) -> None:
    frames = [Image.new("RGB", (50, 50), colour) for colour in ("red", "blue", "green")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    path = mxc_path(alice.uploaded(buffer.getvalue(), "image/gif"))
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


# --- Memory and concurrency ----------------------------------------------------------


def test_decoded_memory_limit_refuses_before_decoding(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = mxc_path(alice.uploaded(image_bytes((2000, 1000), "PNG"), "image/png"))  # 8 MB decoded
    decoded = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self: ImageFile.ImageFile) -> Any:
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    with msc3870_settings(THUMBNAIL_MAX_DECODED_BYTES=4_000_000):
        response = alice.get(V3 + path + "?width=32&height=32")
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_UNKNOWN"
    assert "too much memory" in response.json()["error"]
    assert decoded == []
    with msc3870_settings(THUMBNAIL_MAX_DECODED_BYTES=8_000_000):
        assert alice.get(V3 + path + "?width=32&height=32").status_code == 200


def test_jpeg_limit_counts_the_reduced_decode_and_progressive_coefficients(
    alice: MatrixClient,
) -> None:
    # 4000x2000 is 32 MB decoded; draft() decodes it at 1/8 scale (0.5 MB) for a 32x32 crop.
    baseline = mxc_path(alice.uploaded(image_bytes((4000, 2000), "JPEG"), "image/jpeg"))
    # A progressive JPEG keeps its DCT coefficients at full scale: 12 M of 2 bytes (4:2:0).
    progressive = mxc_path(
        alice.uploaded(image_bytes((4000, 2000), "JPEG", progressive=True), "image/jpeg")
    )
    with msc3870_settings(THUMBNAIL_MAX_DECODED_BYTES=2_000_000):
        assert alice.get(V1 + baseline + "?width=32&height=32&method=crop").status_code == 200
        refused = alice.get(V1 + progressive + "?width=32&height=32&method=crop")
    assert refused.status_code == 400
    assert "too much memory" in refused.json()["error"]


@pytest.mark.parametrize(
    ("mode", "fmt", "expected"),
    [("RGB", "PNG", 4), ("L", "PNG", 1), ("RGBA", "PNG", 4), ("P", "GIF", 1), ("RGB", "WEBP", 16)],
)
def test_decoded_bytes_per_pixel(mode: str, fmt: str, expected: int) -> None:
    buffer = io.BytesIO()
    Image.new(mode, (100, 50)).save(buffer, fmt)
    with Image.open(buffer) as image:
        assert thumbnails._decoded_bytes(image, image.size) == 100 * 50 * expected


def source_image(mode: str, size: tuple[int, int]) -> bytes:
    colour: Any = {"RGB": (10, 120, 200), "RGBA": (10, 120, 200, 128), "LA": (90, 200)}
    image = Image.new(mode, size, colour.get(mode, 3))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **({"transparency": 3} if mode == "L" else {}))
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA", "L"])
@pytest.mark.parametrize("size", [(32, 32, "crop"), (800, 600, "scale")])
def test_render_never_copies_the_decoded_image(
    monkeypatch: pytest.MonkeyPatch, mode: str, size: tuple[int, int, str]
) -> None:
    source_pixels = 3000 * 3000
    source = source_image(mode, (3000, 3000))
    made: list[int] = []
    real_new = Image.Image._new

    def recording_new(self: Image.Image, im: Any) -> Image.Image:
        made.append(im.size[0] * im.size[1])
        return real_new(self, im)

    monkeypatch.setattr(Image.Image, "_new", recording_new)
    data = thumbnails._render(source, *size, "image/png")
    assert Image.open(io.BytesIO(data)).size in ((32, 32), (600, 600))
    # Every image made on the way (strips, the reduced image, the output) is far smaller.
    assert made
    assert max(made) < source_pixels / 2


def test_transparent_edges_have_no_dark_fringe() -> None:
    # Left half transparent black, right half opaque white: resampling without
    # premultiplied alpha would blend black into the white edge.
    image = Image.new("RGBA", (2000, 1000), (0, 0, 0, 0))
    image.paste((255, 255, 255, 255), (1000, 0, 2000, 1000))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    result = Image.open(io.BytesIO(thumbnails._render(buffer.getvalue(), 96, 96, "crop", "")))
    assert result.mode == "RGBA"
    pixels = [result.getpixel((x, y)) for x in range(96) for y in range(96)]
    visible = [p for p in pixels if isinstance(p, tuple) and p[3] > 0]
    assert visible
    assert min(min(p[:3]) for p in visible) >= 250


@pytest.mark.parametrize(
    ("orientation", "method", "expected"),
    [(1, "scale", (320, 160)), (6, "scale", (120, 240)), (8, "crop", (96, 96))],
)
def test_exif_orientation_is_applied(
    orientation: int, method: str, expected: tuple[int, int]
) -> None:
    image = Image.new("RGB", (400, 200), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 200, 200))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    width, height = (320, 240) if method == "scale" else (96, 96)
    data = thumbnails._render(buffer.getvalue(), width, height, method, "image/jpeg")
    result = Image.open(io.BytesIO(data)).convert("RGB")
    assert result.size == expected
    if orientation == 6:  # rotated 90 degrees clockwise: the blue half is now on top
        top, bottom = result.getpixel((60, 10)), result.getpixel((60, 230))
        assert top[2] > 200 and top[0] < 60
        assert bottom[0] > 200 and bottom[2] < 60


class BlockingRender:
    """Stands in for ``_render``: counts calls; the first blocks until released."""

    def __init__(self) -> None:
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, source: bytes, width: int, height: int, *args: Any) -> bytes:
        with self.lock:
            self.calls += 1
            first = self.calls == 1
        if first:
            self.entered.set()
            assert self.release.wait(30), "test never released the render"
        return image_bytes((width, height), "PNG")


def waiting_for_key(key: str) -> int:
    """Requests waiting for the render of ``key``."""
    entry = thumbnails._key_locks.get(key)
    return 0 if entry is None else entry.users - 1


def test_one_render_per_key_the_others_serve_its_result(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    media = media_of(alice.uploaded(image_bytes((800, 800), "PNG"), "image/png"))
    render = BlockingRender()
    monkeypatch.setattr(thumbnails, "_render", render)
    key = f"thumbnails/{media.media_id}/32x32-crop"
    results: list[Any] = []

    def request() -> None:
        results.append(thumbnails.thumbnail(media, 32, 32, "crop"))

    first = threading.Thread(target=request)
    second = threading.Thread(target=request)
    try:
        with msc3870_settings(THUMBNAIL_RENDER_WAIT_SECONDS=30):
            first.start()
            assert render.entered.wait(30)
            second.start()
            # The second request either waits for the key or (without the lock) renders.
            wait_until(
                lambda: render.calls > 1 or waiting_for_key(key) == 1,
                30,
                "the other thread",
                interval=0.01,
            )
            render.release.set()
            first.join()
            second.join()
    finally:
        render.release.set()
    assert render.calls == 1
    assert len(results) == 2
    assert results[0] == results[1]
    assert results[0].key == key
    assert getattr(thumbnails, "_key_locks", {}) == {}  # no entry left behind


@pytest.mark.parametrize("slots", [1, 2])
def test_renders_past_the_per_process_cap_get_429(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch, slots: int
) -> None:
    path = mxc_path(alice.uploaded(image_bytes((800, 800), "PNG"), "image/png"))
    media = media_of("mxc://" + path)
    renders = [BlockingRender() for _ in range(slots)]
    for render in renders[1:]:
        render.calls = 1  # only the first call of each blocks: mark these as "not first"
    busy = threading.Event()

    def blocking(source: bytes, width: int, height: int, *args: Any) -> bytes:
        for render in renders:
            if not render.entered.is_set():
                render.calls = 0
                return render(source, width, height)
        busy.set()  # a render past the cap got through
        return image_bytes((width, height), "PNG")

    monkeypatch.setattr(thumbnails, "_render", blocking)
    sizes = [(32, 32, "crop"), (96, 96, "crop")][:slots]
    threads = [threading.Thread(target=thumbnails.thumbnail, args=(media, *s)) for s in sizes]
    try:
        with msc3870_settings(THUMBNAIL_CONCURRENT_RENDERS=slots, THUMBNAIL_RENDER_WAIT_SECONDS=0):
            for thread, render in zip(threads, renders, strict=True):
                thread.start()
                assert render.entered.wait(30)
            # Every slot is taken: another size is refused at once, and so is a second
            # request for a size being rendered (it may not wait at all either).
            for query in ("?width=320&height=240", "?width=32&height=32&method=crop"):
                response = Client().get(V3 + path + query)
                assert response.status_code == 429
                assert response.json()["errcode"] == "M_LIMIT_EXCEEDED"
                assert response.json()["retry_after_ms"] > 0
            assert not busy.is_set()
            for render in renders:
                render.release.set()
            for thread in threads:
                thread.join()
            # Slots free again: the refused size renders now.
            assert Client().get(V3 + path + "?width=320&height=240").status_code == 200
    finally:
        for render in renders:
            render.release.set()


def test_animated_check_reads_the_source_under_a_render_slot(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = [Image.new("RGB", (50, 50), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    gif = mxc_path(alice.uploaded(buffer.getvalue(), "image/gif"))
    png = media_of(alice.uploaded(image_bytes((800, 800), "PNG"), "image/png"))
    render = BlockingRender()
    monkeypatch.setattr(thumbnails, "_render", render)
    thread = threading.Thread(target=thumbnails.thumbnail, args=(png, 32, 32, "crop"))
    try:
        with msc3870_settings(THUMBNAIL_CONCURRENT_RENDERS=1, THUMBNAIL_RENDER_WAIT_SECONDS=0):
            thread.start()
            assert render.entered.wait(30)
            # Reading the whole source to see whether it is animated takes a slot too.
            busy = Client().get(V3 + gif + "?width=32&height=32&animated=true")
            assert busy.status_code == 429
            assert busy.json()["errcode"] == "M_LIMIT_EXCEEDED"
            render.release.set()
            thread.join()
            served = Client().get(V3 + gif + "?width=32&height=32&animated=true")
            assert served.status_code == 200
            assert served["Content-Type"] == "image/gif"
    finally:
        render.release.set()


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "PPM"])
def test_only_the_thumbnailable_formats_are_decoded(fmt: str) -> None:
    # With TYPE_MISMATCH = "declared" the bytes behind "image/png" can be anything.
    with pytest.raises(thumbnails.CannotThumbnail):
        thumbnails._render(image_bytes((64, 64), fmt), 32, 32, "crop", "image/png")
