from __future__ import annotations

import pytest

from msc3870.screening import sniff, types_agree

from .conftest import png_bytes


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
