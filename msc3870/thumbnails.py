"""Thumbnails of images, made on first request and kept in storage.

Requests are answered from a fixed set of sizes (as Synapse does), so a client asking for
every width cannot fill the storage. Sources larger than ``THUMBNAIL_MAX_SOURCE_BYTES`` or
``THUMBNAIL_MAX_PIXELS`` are refused before any decoding (decompression bombs).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from .conf import app_settings
from .errors import InvalidParam, MatrixError
from .models import Media
from .screening import base_type
from .storage import get_store

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
ANIMATABLE = frozenset({"image/gif", "image/webp", "image/png", "image/apng"})


class CannotThumbnail(MatrixError):
    status, errcode, default_message = (
        400,
        "M_UNKNOWN",
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
    try:
        with Image.open(io.BytesIO(_read_source(media))) as image:
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
    key = f"thumbnails/{media.media_id}/{w}x{h}-{method}"
    store = get_store()
    existing = store.head(key)
    if existing is not None:
        return Thumbnail(key, output_type, existing.size)
    data = _render(_read_source(media), w, h, method, output_type)
    store.write_stream(key, io.BytesIO(data), max_size=len(data), content_type=output_type)
    return Thumbnail(key, output_type, len(data))


def _render(source: bytes, width: int, height: int, method: str, output_type: str) -> bytes:
    try:
        with Image.open(io.BytesIO(source)) as image:
            if image.width * image.height > app_settings.THUMBNAIL_MAX_PIXELS:
                raise CannotThumbnail("Image has too many pixels to thumbnail")
            image.draft("RGB", (width, height))  # JPEG: decode at a reduced scale
            image = ImageOps.exif_transpose(image)
            if method == "crop":
                result = ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
            else:
                result = image.copy()
                result.thumbnail((width, height), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            if output_type == "image/jpeg":
                result.convert("RGB").save(out, "JPEG", quality=80, optimize=True)
            else:
                if result.mode not in ("RGB", "RGBA", "L", "LA", "P"):
                    result = result.convert("RGBA")
                result.save(out, "PNG", optimize=True)
            return out.getvalue()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CannotThumbnail(f"Cannot thumbnail this image: {type(exc).__name__}") from exc


def thumbnail_keys(media_id: str) -> list[str]:
    """Every key a thumbnail of this media can have (for deletion)."""
    return [f"thumbnails/{media_id}/{w}x{h}-{m}" for w, h, m in SIZES]
