from __future__ import annotations

import random

import puremagic
import pytest

from msc3870.content_types import types_agree
from msc3870.sniffing import matches_a_signature, puremagic_types, sniff

from .helpers import png_bytes


def test_sniff_png_and_unknown() -> None:
    assert sniff(png_bytes())[0] == "image/png"
    assert sniff(b"") == []
    assert sniff(bytes(range(256))) == []


@pytest.mark.parametrize(
    ("declared", "data", "agree"),
    [
        ("image/png", png_bytes(), True),
        ("image/png; charset=binary", png_bytes(), True),
        ("image/jpeg", png_bytes(), False),
        ("image/svg+xml", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', True),
        ("audio/ogg", b"OggS\x00\x02" + b"\0" * 30, True),
        ("application/zip", b"PK\x03\x04" + b"\0" * 30, True),
        ("text/plain", b"<!DOCTYPE html><html></html>", False),
    ],
)
def test_types_agree(declared: str, data: bytes, agree: bool) -> None:
    assert types_agree(declared, sniff(data)) is agree


def _signature_samples() -> list[bytes]:
    """Every header and footer signature puremagic knows, planted in random bytes, and
    near misses of each (its last byte changed), plus plain random bytes."""
    rng = random.Random(3870)
    samples = [rng.randbytes(n) for n in (1, 7, 64, 1024, 8192) for _ in range(20)]
    for row in puremagic.magic_header_array:
        for match in (row.byte_match, row.byte_match[:-1] + bytes([row.byte_match[-1] ^ 1])):
            body = bytearray(rng.randbytes(row.offset + len(match) + rng.randrange(64)))
            body[row.offset : row.offset + len(match)] = match
            samples.append(bytes(body))
    for row in puremagic.magic_footer_array:
        tail = rng.randbytes(-row.offset - len(row.byte_match))
        samples.append(rng.randbytes(200) + row.byte_match + tail)
    return samples


def test_sniff_answers_what_puremagic_answers() -> None:
    samples = _signature_samples()
    assert len(samples) > 2 * len(puremagic.magic_header_array)
    recognised = 0
    for data in samples:
        expected = puremagic_types(data)
        assert sniff(data) == expected, data[:64]
        assert matches_a_signature(data) or not expected
        recognised += bool(expected)
    assert recognised >= len(puremagic.magic_header_array) // 2  # the planted ones, mostly
