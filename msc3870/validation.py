"""What clients may name: media ids, server names (``msc3870.server_names``), file names
and content types, checked before anything touches the database or storage."""

from __future__ import annotations

import re
import secrets
import unicodedata

from .conf import app_settings
from .errors import InvalidParam, NotFound
from .server_names import is_valid_server_name

MEDIA_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_FILENAME_LENGTH = 255


def new_media_id() -> str:
    """192 random bits in the URL-safe alphabet ``[A-Za-z0-9_-]``."""
    return secrets.token_urlsafe(24)


def validate_mxc(server_name: str, media_id: str) -> None:
    if not is_valid_server_name(server_name):
        raise InvalidParam("Invalid server name")
    if not MEDIA_ID_RE.fullmatch(media_id):
        raise InvalidParam("Invalid media id")


# Format characters that are not needed to spell a name: joiners (emoji sequences, Persian
# and Indic scripts) and tag characters (subdivision flags) are.
_ALLOWED_FORMAT_CHARACTERS = frozenset({"\u200c", "\u200d"}) | frozenset(
    chr(c) for c in range(0xE0020, 0xE0080)
)


def _refused_in_filename(char: str) -> bool:
    """Control characters, line separators and invisible format characters: a right-to-
    left override (U+202E) makes "invoice\u202efdp.exe" display as "invoiceexe.pdf", and
    other bidi controls, zero-width spaces and the like hide what a name says."""
    category = unicodedata.category(char)
    if category in ("Cc", "Cs", "Zl", "Zp"):
        return True
    return category == "Cf" and char not in _ALLOWED_FORMAT_CHARACTERS


def clean_filename(filename: str | None) -> str:
    if not filename:
        return ""
    if len(filename) > MAX_FILENAME_LENGTH or any(_refused_in_filename(c) for c in filename):
        raise InvalidParam("Invalid filename")
    return filename


def clean_content_type(content_type: str | None) -> str:
    content_type = (content_type or "").strip()
    if len(content_type) > 255 or any(ord(c) < 0x20 for c in content_type):
        raise InvalidParam("Invalid Content-Type")
    return content_type


def check_local(server_name: str, media_id: str) -> None:
    validate_mxc(server_name, media_id)
    if server_name != app_settings.SERVER_NAME:
        raise NotFound("This server only holds media of " + app_settings.SERVER_NAME)
