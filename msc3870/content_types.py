"""Content types: the vocabulary screening, thumbnails and download headers share."""

from __future__ import annotations

UNKNOWN_TYPE = "application/octet-stream"
# What clients and stores say when they do not know the type.
UNDECLARED_TYPES = frozenset({"", UNKNOWN_TYPE, "binary/octet-stream"})

# Types that name the same bytes (containers the sniffer cannot tell apart, aliases).
EQUIVALENT_TYPES: list[frozenset[str]] = [
    frozenset(
        {
            "application/zip",
            "application/x-zip-compressed",
            "application/java-archive",
            "application/epub+zip",
            "application/vnd.android.package-archive",
            "application/vnd.oasis.opendocument.text",
            "application/vnd.oasis.opendocument.spreadsheet",
            "application/vnd.oasis.opendocument.presentation",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        }
    ),
    frozenset({"application/ogg", "audio/ogg", "video/ogg", "audio/opus", "audio/vorbis"}),
    frozenset({"audio/wav", "audio/wave", "audio/x-wav", "audio/x-pn-wav", "audio/vnd.wave"}),
    frozenset({"audio/flac", "audio/x-flac"}),
    frozenset({"audio/mpeg", "audio/mp3", "audio/x-mpeg"}),
    frozenset({"video/mp4", "audio/mp4", "video/quicktime", "audio/x-m4a", "video/x-m4v"}),
    frozenset({"video/webm", "audio/webm", "video/x-matroska", "audio/x-matroska"}),
    frozenset({"image/jpeg", "image/pjpeg", "image/jpg"}),
    frozenset({"image/png", "image/apng"}),
    frozenset({"application/xml", "text/xml"}),
    frozenset({"application/json", "text/json", "application/ld+json"}),
    frozenset({"application/x-tar", "application/tar"}),
    frozenset({"application/gzip", "application/x-gzip"}),
]


def base_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


# Generic containers the sniffer reports for many specific formats: a declaration of one
# of those formats (by structured suffix, RFC 6839) agrees with them.
GENERIC_CONTAINERS = {"application/xml": "+xml", "text/xml": "+xml", "application/zip": "+zip"}


def types_agree(declared: str, candidates: list[str]) -> bool:
    declared = base_type(declared)
    if declared in candidates:
        return True
    if any(declared.endswith(GENERIC_CONTAINERS.get(c, "\0")) for c in candidates):
        return True
    return any(declared in group and group.intersection(candidates) for group in EQUIVALENT_TYPES)
