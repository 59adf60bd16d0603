"""The type of some bytes, from their magic numbers (puremagic's signature table).

puremagic compares every one of its ~1,400 header signatures with the bytes, in Python,
most of the time on bytes that match none. The signatures are indexed here by offset and
first byte, so bytes that match no signature are told so in a few dictionary lookups;
bytes that match one are identified by puremagic itself, so the answer is always
puremagic's.
"""

from __future__ import annotations

from collections import defaultdict
from functools import cache

import puremagic
from puremagic.main import PureMagic

# puremagic looks at the first and last bytes; 8 KiB covers every signature it knows.
SNIFF_BYTES = 8192


@cache
def _header_index() -> dict[int, dict[int, list[PureMagic]]]:
    """Header signatures by offset, then by their first byte."""
    index: dict[int, dict[int, list[PureMagic]]] = defaultdict(lambda: defaultdict(list))
    for row in puremagic.magic_header_array:
        if row.byte_match:
            index[row.offset][row.byte_match[0]].append(row)
    return {offset: dict(by_byte) for offset, by_byte in index.items()}


@cache
def _has_empty_signature() -> bool:
    """An empty signature matches anything (puremagic ships none; checked, not assumed)."""
    return any(not row.byte_match for row in puremagic.magic_header_array)


def _footer_matches(data: bytes) -> bool:
    foot = data[-puremagic.main.max_foot :]
    for row in puremagic.magic_footer_array:
        end = row.offset + len(row.byte_match)
        if (foot[row.offset : end] if end != 0 else foot[row.offset :]) == row.byte_match:
            return True
    return False


def matches_a_signature(data: bytes) -> bool:
    """Whether any of puremagic's header or footer signatures matches ``data`` (multi-part
    signatures extend a header match, so they need one)."""
    if _has_empty_signature():
        return True
    for offset, by_first_byte in _header_index().items():
        if offset >= len(data):
            continue
        for row in by_first_byte.get(data[offset], ()):
            if data[offset : offset + len(row.byte_match)] == row.byte_match:
                return True
    return _footer_matches(data)


def sniff(data: bytes) -> list[str]:
    """Candidate types for ``data``, most likely first; empty if unrecognised."""
    if not data or not matches_a_signature(data):
        return []
    return puremagic_types(data)


def puremagic_types(data: bytes) -> list[str]:
    """What puremagic's full scan says of ``data`` (``sniff`` without the index)."""
    try:
        matches = puremagic.magic_string(data)
    except (puremagic.PureError, ValueError):
        return []
    seen: list[str] = []
    for match in matches:
        if match.mime_type and match.mime_type.lower() not in seen:
            seen.append(match.mime_type.lower())
    return seen
