"""Thumbnails of images, made on first request and kept in storage.

Requests are answered from a fixed set of sizes (as Synapse does), so a client asking for
every width cannot fill the storage. Sources larger than ``THUMBNAIL_MAX_SOURCE_BYTES`` or
``THUMBNAIL_MAX_PIXELS`` are refused before any decoding (decompression bombs).

Memory (a small file can decode to gigabytes: a 135 KB PNG of 32 Mpx, several at once):

- what a render would decode into is computed from the header, after JPEG's reduced-scale
  decoding (``draft``) is set up and before anything is decoded, and refused past
  ``THUMBNAIL_MAX_DECODED_BYTES``;
- the decoded image is never copied: Pillow reduces the wanted region straight from it,
  or, where the pixels need converting first (alpha, palettes), strip by strip;
- one render per thumbnail key at a time in a process: other requests for that key wait
  for it and serve what it stored;
- at most ``THUMBNAIL_CONCURRENT_RENDERS`` renders at once per process. A request that
  cannot start within ``THUMBNAIL_RENDER_WAIT_SECONDS`` gets 429 ``M_LIMIT_EXCEEDED``
  with ``retry_after_ms``: the Matrix answer clients already back off and retry on (a 503
  reads as a broken server). The views are synchronous and run on threads, so these are
  threading primitives.

So one process holds at most about CONCURRENT_RENDERS x (MAX_DECODED_BYTES +
MAX_SOURCE_BYTES) for thumbnails. ``bench/thumbnail_memory.py`` measures it.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageMode, UnidentifiedImageError

from . import storage_keys
from .conf import app_settings
from .content_types import base_type
from .errors import Codes, InvalidParam, LimitExceeded, MatrixError
from .models import Media
from .stores import get_store

# (width, height, method): Synapse's default thumbnail_sizes.
SIZES: list[tuple[int, int, str]] = [
    (32, 32, "crop"),
    (96, 96, "crop"),
    (320, 240, "scale"),
    (640, 480, "scale"),
    (800, 600, "scale"),
]
METHODS = ("crop", "scale")
THUMBNAILABLE = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp", "image/apng"})
# The only decoders Pillow may use (APNG is PNG): the declared type can lie (TYPE_MISMATCH
# "declared"), and other formats bring other parsers (EPS runs Ghostscript) and memory
# costs that DECODER_COPIES has not measured.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP")
ANIMATABLE = frozenset({"image/gif", "image/webp", "image/png", "image/apng"})

# The last resize step shrinks at most this much after the integer reduction (Pillow's
# thumbnail() default): sharp enough, and the reduced intermediate stays small.
REDUCING_GAP = 2.0
# Rows converted at a time when the pixels must change mode before reducing (~4 MiB).
STRIP_BYTES = 4 * 1024 * 1024
# What a busy process tells clients to wait before asking again.
RETRY_AFTER_MS = 1000
# Decoded copies of the image a format's decoder holds at its peak (Pillow 13): WebP goes
# through libwebp's canvas, a bytes object and the image (16 bytes a pixel).
DECODER_COPIES = {"WEBP": 4}
# EXIF orientation -> the transpose that makes the image upright (ImageOps.exif_transpose).
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class CannotThumbnail(MatrixError):
    status, errcode, default_message = (
        400,
        Codes.UNKNOWN,
        "Cannot generate a thumbnail for this media",
    )


@dataclass(frozen=True)
class Thumbnail:
    key: str
    content_type: str
    size: int


def parse_request(
    width: str | None, height: str | None, method: str | None
) -> tuple[int, int, str]:
    try:
        w, h = int(width or ""), int(height or "")
    except ValueError as exc:
        raise InvalidParam("width and height must be integers") from exc
    if w <= 0 or h <= 0:
        raise InvalidParam("width and height must be positive")
    method = method or "scale"
    if method not in METHODS:
        raise InvalidParam("method must be crop or scale")
    return w, h, method


def choose_size(width: int, height: int, method: str) -> tuple[int, int, str]:
    """The smallest configured size of that method that covers the request, else the
    largest of that method (others if that method has none)."""
    same = [s for s in SIZES if s[2] == method] or SIZES
    covering = [s for s in same if s[0] >= width and s[1] >= height]
    if covering:
        return min(covering, key=lambda s: s[0] * s[1])
    return max(same, key=lambda s: s[0] * s[1])


def serves_original(media: Media, animated: bool) -> bool:
    """Animated images asked for as animated are served as they are (the spec allows it)."""
    return animated and base_type(media.content_type) in ANIMATABLE and _is_animated(media)


def _is_animated(media: Media) -> bool:
    # The whole source is read (a GIF's frames are found by walking it): under a render
    # slot, so concurrent requests cannot each hold a copy of a source of up to 20 MiB.
    with _render_slot(app_settings.THUMBNAIL_RENDER_WAIT_SECONDS):
        try:
            with Image.open(io.BytesIO(_read_source(media)), formats=FORMATS) as image:
                return bool(getattr(image, "is_animated", False))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            return False


def _read_source(media: Media) -> bytes:
    if (media.size or 0) > app_settings.THUMBNAIL_MAX_SOURCE_BYTES:
        raise CannotThumbnail("Media is too large to thumbnail")
    return b"".join(get_store().iter_bytes(media.storage_key))


def thumbnail(media: Media, width: int, height: int, method: str) -> Thumbnail:
    """The thumbnail of ``media`` for a request, made and stored on first use."""
    source_type = base_type(media.content_type)
    if source_type not in THUMBNAILABLE:
        raise CannotThumbnail()
    w, h, method = choose_size(width, height, method)
    output_type = "image/jpeg" if source_type == "image/jpeg" else "image/png"
    key = storage_keys.thumbnail(media.thumbnail_prefix, w, h, method)
    store = get_store()
    existing = store.head(key)
    if existing is not None:
        return Thumbnail(key, output_type, existing.size)
    wait = app_settings.THUMBNAIL_RENDER_WAIT_SECONDS
    with _one_render_per_key(key, wait):
        # Whoever held the key before us may have stored it: serve that.
        existing = store.head(key)
        if existing is not None:
            return Thumbnail(key, output_type, existing.size)
        with _render_slot(wait):
            data = _render(_read_source(media), w, h, method, output_type)
        store.write_stream(key, io.BytesIO(data), max_size=len(data), content_type=output_type)
    return Thumbnail(key, output_type, len(data))


# --- One render per key, a few per process ----------------------------------------------


class _KeyLock:
    """A lock for one thumbnail key and how many requests hold or wait for it (the entry
    is dropped when none do, so the table does not grow with every key ever asked)."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


_guard = threading.Lock()  # guards the two tables below, never held while rendering
_key_locks: dict[str, _KeyLock] = {}
_slots: tuple[int, threading.BoundedSemaphore] | None = None


def _busy() -> LimitExceeded:
    return LimitExceeded("Too many thumbnails are being made; retry", retry_after_ms=RETRY_AFTER_MS)


@contextmanager
def _one_render_per_key(key: str, wait: float) -> Iterator[None]:
    with _guard:
        entry = _key_locks.get(key)
        if entry is None:
            entry = _key_locks[key] = _KeyLock()
        entry.users += 1
    try:
        if not entry.lock.acquire(timeout=wait):
            raise _busy()
        try:
            yield
        finally:
            entry.lock.release()
    finally:
        with _guard:
            entry.users -= 1
            if entry.users == 0:
                del _key_locks[key]


def _render_slots() -> threading.BoundedSemaphore:
    """The process's render slots, remade when the setting changes (settings are read on
    every access; renders holding an old semaphore release that one)."""
    global _slots
    size = app_settings.THUMBNAIL_CONCURRENT_RENDERS
    with _guard:
        if _slots is None or _slots[0] != size:
            _slots = (size, threading.BoundedSemaphore(size))
        return _slots[1]


@contextmanager
def _render_slot(wait: float) -> Iterator[None]:
    slots = _render_slots()
    if not slots.acquire(timeout=wait):
        raise _busy()
    try:
        yield
    finally:
        slots.release()


# --- Rendering -------------------------------------------------------------------------


def _render(source: bytes, width: int, height: int, method: str, output_type: str) -> bytes:
    try:
        with Image.open(io.BytesIO(source), formats=FORMATS) as image:
            declared = image.size
            if declared[0] * declared[1] > app_settings.THUMBNAIL_MAX_PIXELS:
                raise CannotThumbnail("Image has too many pixels to thumbnail")
            orientation = _orientation(image)
            if orientation in (5, 6, 7, 8):  # stored sideways: so is the box, until the end
                width, height = height, width
            box, size = _plan(image.size, width, height, method)
            # JPEG: decode at 1/2, 1/4 or 1/8 scale, still REDUCING_GAP times the output.
            scale = size[0] / (box[2] - box[0])
            image.draft(
                "RGB",
                (
                    math.ceil(image.width * scale * REDUCING_GAP),
                    math.ceil(image.height * scale * REDUCING_GAP),
                ),
            )
            if image.size != declared:
                box, size = _plan(image.size, width, height, method)
            if _decoded_bytes(image, declared) > app_settings.THUMBNAIL_MAX_DECODED_BYTES:
                raise CannotThumbnail("Image would take too much memory to thumbnail")
            image.load()
            result = _shrink(image, box, size, _work_mode(image))
        if orientation in TRANSPOSE:
            result = result.transpose(TRANSPOSE[orientation])
        out = io.BytesIO()
        if output_type == "image/jpeg":
            result.convert("RGB").save(out, "JPEG", quality=80, optimize=True)
        else:
            if result.mode not in ("RGB", "RGBA", "L", "LA", "P"):  # RGBa, I, F
                result = result.convert("RGBA")
            result.save(out, "PNG", optimize=True)
        return out.getvalue()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CannotThumbnail(f"Cannot thumbnail this image: {type(exc).__name__}") from exc


def _orientation(image: Image.Image) -> int:
    """EXIF orientation from the header (image.getexif() would decode a PNG first)."""
    raw = image.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(ExifTags.Base.Orientation, 1))
    except Exception:  # EXIF parsers raise anything on junk: treat it as upright
        return 1


def _plan(
    source: tuple[int, int], width: int, height: int, method: str
) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """The region of the source to use and the output size.

    crop: the centred region with the output's aspect ratio, scaled to exactly the size
    asked (as ImageOps.fit). scale: the whole image within the box, aspect kept, never
    enlarged (as Image.thumbnail).
    """
    sw, sh = source
    if method == "crop":
        if sw * height > sh * width:  # wider than the box: trim the sides
            cw, ch = max(1, min(sw, round(sh * width / height))), sh
        else:
            cw, ch = sw, max(1, min(sh, round(sw * height / width)))
        left, top = (sw - cw) // 2, (sh - ch) // 2
        return (left, top, left + cw, top + ch), (width, height)
    if sw <= width and sh <= height:
        return (0, 0, sw, sh), (sw, sh)
    ratio = min(width / sw, height / sh)
    size = (max(1, min(width, round(sw * ratio))), max(1, min(height, round(sh * ratio))))
    return (0, 0, sw, sh), size


def _decoded_bytes(image: Image.Image, declared: tuple[int, int]) -> int:
    """Memory decoding will take, from the header alone (measured, Pillow 13)."""
    try:
        mode = ImageMode.getmode(image.mode)
        # Pillow stores pixels of several 8-bit bands in 4 bytes (RGB too).
        pixel = 4 if len(mode.bands) > 1 else int(mode.typestr[-1])
    except KeyError:  # a mode ImageMode does not describe: count the widest pixel
        mode, pixel = ImageMode.getmode("RGBA"), 4
    total = image.width * image.height * pixel * DECODER_COPIES.get(image.format or "", 1)
    if image.format == "JPEG" and image.info.get("progressive"):
        # libjpeg keeps every DCT coefficient (2 bytes) of a progressive JPEG at full
        # scale until the last scan, whatever scale draft() chose.
        layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * len(mode.bands)
        h_max = max(layer[1] for layer in layers)
        v_max = max(layer[2] for layer in layers)
        for _, h, v, _ in layers:
            blocks_x = math.ceil(math.ceil(declared[0] * h / h_max) / 8)
            blocks_y = math.ceil(math.ceil(declared[1] * v / v_max) / 8)
            total += blocks_x * blocks_y * 64 * 2
    return total


def _work_mode(image: Image.Image) -> str:
    """The mode pixels are resampled in: premultiplied alpha where there is transparency
    (no dark fringes), colour for palettes (resampling a palette is nearest-neighbour)."""
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return "RGBa"
    if mode in ("1", "L"):
        return "L"
    if mode in ("I", "F"):
        return mode
    if mode.startswith("I;16"):
        return "I"
    return "RGB"


def _shrink(
    image: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int], work_mode: str
) -> Image.Image:
    """``box`` of the decoded ``image`` resized to ``size``, without copying the image."""
    if image.mode == work_mode:
        # Pillow reduces the region by an integer factor straight from the decoded image
        # (the only copy is the reduced one), then resamples that.
        return image.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)
    # Converting first (what resize() does for RGBA, and what a palette needs) would copy
    # the whole image in the new mode: convert and reduce a strip of rows at a time.
    bw, bh = box[2] - box[0], box[3] - box[1]
    fx = max(1, int(bw / size[0] / REDUCING_GAP))
    fy = max(1, int(bh / size[1] / REDUCING_GAP))
    reduced = Image.new(work_mode, (-(-bw // fx), -(-bh // fy)))
    rows = max(1, STRIP_BYTES // (bw * 4) // fy) * fy  # a multiple of fy: blocks stay whole
    for top in range(box[1], box[3], rows):
        strip = _convert(image.crop((box[0], top, box[2], min(top + rows, box[3]))), work_mode)
        if (fx, fy) != (1, 1):
            strip = strip.reduce((fx, fy))
        reduced.paste(strip, (0, (top - box[1]) // fy))
    return reduced.resize(size, Image.Resampling.LANCZOS, box=(0, 0, bw / fx, bh / fy))


def _convert(strip: Image.Image, work_mode: str) -> Image.Image:
    if work_mode == "RGBa":
        # Palettes and grey with transparency reach premultiplied alpha through RGBA.
        if strip.mode != "RGBA":
            strip = strip.convert("RGBA")
        return strip.convert("RGBa")
    return strip.convert(work_mode)


def thumbnail_keys(media: Media) -> list[str]:
    """Every key a thumbnail of this media can have (for deletion)."""
    return [storage_keys.thumbnail(media.thumbnail_prefix, w, h, m) for w, h, m in SIZES]
