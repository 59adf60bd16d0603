"""Crafted inputs (ranges, ids, parameters, bodies): each gets a 4xx Matrix error or a
416, never a 500."""

from __future__ import annotations

import pytest

from msc3870.api.errors import parse_json_object
from msc3870.api.responses import parse_range
from msc3870.errors import NotJson, RangeNotSatisfiable, TooLarge

from .helpers import MatrixClient, body_of, mxc_path

DOWNLOAD = "/_matrix/client/v1/media/download/"
CREATE = "/_matrix/media/v1/create"
# Python refuses int() of more than 4300 digits (CVE-2020-10735): one more than that.
HUGE = "9" * 4301


# --- Range ---------------------------------------------------------------------------


def test_range_starting_at_a_huge_number_is_416(alice: MatrixClient) -> None:
    path = mxc_path(alice.uploaded(b"0123456789"))
    response = alice.get(DOWNLOAD + path, headers={"Range": f"bytes={HUGE}-"})
    assert response.status_code == 416
    assert response["Content-Range"] == "bytes */10"
    assert response.json()["errcode"] == "M_UNKNOWN"


@pytest.mark.parametrize(
    ("header", "content_range", "expected"),
    [
        # An end past the object is clamped to the last byte (RFC 9110 14.1.2).
        (f"bytes=2-{HUGE}", "bytes 2-9/10", b"23456789"),
        # A suffix longer than the object is the whole object.
        (f"bytes=-{HUGE}", "bytes 0-9/10", b"0123456789"),
        # Leading zeros do not make a number big.
        (f"bytes={'0' * 5000}3-{'0' * 5000}4", "bytes 3-4/10", b"34"),
    ],
)
def test_huge_range_numbers_are_clamped(
    alice: MatrixClient, header: str, content_range: str, expected: bytes
) -> None:
    path = mxc_path(alice.uploaded(b"0123456789"))
    response = alice.get(DOWNLOAD + path, headers={"Range": header})
    assert response.status_code == 206
    assert response["Content-Range"] == content_range
    assert body_of(response) == expected


@pytest.mark.parametrize("header", ["bytes=-5", "bytes=0-", "bytes=0-0", f"bytes=-{HUGE}"])
def test_any_range_on_an_empty_object_is_416(alice: MatrixClient, header: str) -> None:
    path = mxc_path(alice.uploaded(b""))
    response = alice.get(DOWNLOAD + path, headers={"Range": header})
    assert response.status_code == 416
    assert response["Content-Range"] == "bytes */0"
    # Without a Range the empty object is served as it is.
    plain = alice.get(DOWNLOAD + path)
    assert plain.status_code == 200
    assert body_of(plain) == b""


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-3", 10, (0, 3)),
        ("bytes=-3", 10, (7, 9)),
        (f"bytes=1-{HUGE}", 10, (1, 9)),
        (f"bytes=-{HUGE}", 10, (0, 9)),
        ("bytes=5-2", 10, None),  # invalid: ignored
        (f"bytes={HUGE}-1", 10, None),  # last < first: invalid, ignored
    ],
)
def test_parse_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [(f"bytes={HUGE}-", 10), ("bytes=-0", 10), ("bytes=-5", 0), ("bytes=0-", 0)],
)
def test_parse_range_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)


# --- JSON bodies ---------------------------------------------------------------------


def test_deeply_nested_json_is_400_not_json(alice: MatrixClient) -> None:
    # Under the body cap, but far deeper than the parser's recursion limit.
    response = alice.post(CREATE, b"[" * 50_000)
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_NOT_JSON"


def test_200000_brackets_are_a_4xx(alice: MatrixClient) -> None:
    response = alice.post(CREATE, b"[" * 200_000)
    assert response.status_code == 413
    assert response.json()["errcode"] == "M_TOO_LARGE"


def test_deep_json_on_complete_is_400(alice: MatrixClient) -> None:
    created = alice.create()
    response = alice.post(
        f"/_matrix/media/v1/upload/{mxc_path(created['content_uri'])}/complete",
        b'{"a":' * 12_000,
    )
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_NOT_JSON"


def test_json_number_with_too_many_digits_is_400(alice: MatrixClient) -> None:
    response = alice.post(CREATE, b'{"n": ' + HUGE.encode() + b"}")
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_NOT_JSON"


def test_json_body_cap() -> None:
    # The endpoints' bodies are "{}": 64 KiB is generous, and bounds the parser's work.
    padding = b" " * (64 * 1024 - 2)
    assert parse_json_object(b"{" + padding + b"}") == {}
    with pytest.raises(TooLarge):
        parse_json_object(b"{ " + padding + b"}")
    with pytest.raises(NotJson):
        parse_json_object(b"[" * 10_000)
