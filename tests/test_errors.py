"""msc3870.errors: one owner of the errcodes (``Codes``), one rejection shape, and errors
that carry their own headers, rendered alike by every path that answers."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from django.test import Client, override_settings
from rest_framework.renderers import JSONRenderer

from mediarepo.server import matrix_error_bytes
from msc3870 import lifecycle, moderation, screening
from msc3870.api.errors import exception_handler, json_error
from msc3870.errors import (
    Codes,
    HeadersTooLarge,
    InvalidHttpRequest,
    LimitExceeded,
    MatrixError,
    MissingToken,
    Rejection,
    Unauthorized,
    UnknownToken,
    URITooLong,
)
from msc3870.federation.remote_media import GENERIC_MESSAGE, FetchFailed
from msc3870.models import MediaState

from .helpers import MatrixClient, media_of, msc3870_settings, mxc_path, s3_storages

ROOT = Path(__file__).resolve().parent.parent
# A string literal that spells an errcode: the spec's M_ namespace, MSC2246's unstable one.
ERRCODE_LITERAL = re.compile(r"""["'](?:M_[A-Z_]*|FI\.MAU\.[A-Z0-9_]*)["']""")


def test_every_errcode_in_the_app_and_the_project_is_taken_from_codes() -> None:
    found = []
    for package in ("msc3870", "mediarepo"):
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            if path == ROOT / "msc3870/errors.py":  # all but the enum's own lines
                start = text.index("class Codes(")
                text = text[:start] + "\n" * text.count("\n", start, text.index("\n\n\n", start))
            for match in ERRCODE_LITERAL.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(ROOT)}:{line}: {match.group()}")
    assert not found, "errcodes spelled outside msc3870.errors.Codes:\n" + "\n".join(found)


@pytest.mark.parametrize("code", list(Codes))
def test_a_code_is_its_value_wherever_a_string_goes(code: Codes) -> None:
    assert re.fullmatch(r"M_[A-Z_]+|FI\.MAU\.MSC2246_[A-Z_]+", code.value)
    assert (str(code), f"{code}", "%s" % code) == (code.value,) * 3  # noqa: UP031
    assert json.dumps({"errcode": code}) == json.dumps({"errcode": code.value})
    assert JSONRenderer().render({"errcode": code}) == JSONRenderer().render(
        {"errcode": code.value}
    )
    assert {code.value: 1}.get(code) == 1
    assert type(str(code)) is str


def test_only_spec_errcodes_pass_for_a_homeservers_own() -> None:
    assert Codes.in_spec_namespace("M_USER_LOCKED")
    assert Codes.in_spec_namespace(Codes.FORBIDDEN)
    assert not Codes.in_spec_namespace("ORG.EXAMPLE_OOPS")
    assert not Codes.in_spec_namespace(None)
    assert not Codes.in_spec_namespace(401)


@pytest.mark.parametrize(
    ("error", "headers"),
    [
        (MissingToken(), {"WWW-Authenticate": 'Bearer realm="matrix"'}),
        (UnknownToken(), {"WWW-Authenticate": 'Bearer realm="matrix", error="invalid_token"'}),
        (Unauthorized(), {"WWW-Authenticate": 'X-Matrix realm="matrix"'}),
        (LimitExceeded(retry_after_ms=1500), {"Retry-After": "2"}),
        (LimitExceeded(retry_after_ms=0), {"Retry-After": "1"}),
        # A check's 429 names no time to wait: no Retry-After is made up.
        (Rejection("Slow down", errcode=Codes.LIMIT_EXCEEDED, status=429), {}),
        (MatrixError(), {}),
    ],
)
def test_errors_carry_their_own_headers_on_every_path(
    error: MatrixError, headers: dict[str, str]
) -> None:
    assert error.headers() == headers
    response = json_error(error)
    drf_response: Any = exception_handler(error, {})
    for rendered in (response, drf_response):
        assert rendered.status_code == error.status
        assert {name: rendered[name] for name in headers} == headers
        for absent in {"WWW-Authenticate", "Retry-After"} - set(headers):
            assert absent not in rendered
    assert json.loads(response.content) == error.as_dict() == drf_response.data
    raw = matrix_error_bytes(error) if error.status in (400, 414, 431) else None
    assert raw is None or all(name.lower().encode() in raw for name in headers)


def test_protocol_level_errors_are_the_apps_matrix_errors_byte_for_byte() -> None:
    assert matrix_error_bytes(URITooLong()) == (
        b"HTTP/1.1 414 URI Too Long\r\ncontent-type: application/json\r\n"
        b"content-length: 60\r\nconnection: close\r\n\r\n"
        b'{"errcode": "M_UNKNOWN", "error": "Request URI is too long"}'
    )
    for error in (HeadersTooLarge(), InvalidHttpRequest()):
        head, body = matrix_error_bytes(error).split(b"\r\n\r\n")
        assert body == json_error(error).content
        assert head.startswith(b"HTTP/1.1 %d " % error.status)


@pytest.mark.parametrize(
    ("errcode", "status", "heard"),
    [
        (Codes.LIMIT_EXCEEDED, 429, (429, "M_LIMIT_EXCEEDED")),
        (Codes.FORBIDDEN, 451, (451, "M_FORBIDDEN")),
        # Not a client error: the errcode's usual status.
        (Codes.FORBIDDEN, 200, (403, "M_FORBIDDEN")),
        (Codes.TOO_LARGE, None, (413, "M_TOO_LARGE")),
        (Codes.INVALID_PARAM, 302, (400, "M_INVALID_PARAM")),
        ("M_NOT_YET_UPLOADED", 500, (400, "M_NOT_YET_UPLOADED")),
        # A code with no usual status of its own (a host project's, M_UNKNOWN): 403.
        ("ORG.EXAMPLE_NOPE", None, (403, "ORG.EXAMPLE_NOPE")),
        (Codes.UNKNOWN, None, (403, "M_UNKNOWN")),
        ("", None, (403, "M_FORBIDDEN")),
    ],
)
def test_an_uploaders_rejection_status_is_a_client_error(
    errcode: str, status: int | None, heard: tuple[int, str]
) -> None:
    rejection = Rejection.for_uploader("Nope", errcode, status)
    assert (rejection.status, rejection.as_dict()["errcode"]) == heard
    assert Rejection.for_uploader("", errcode, status).as_dict()["error"] == "Upload rejected"


def test_one_rejection_shape_for_checks_uploads_and_fetches() -> None:
    # The name the README gives third-party checks is the one class.
    assert screening.Rejection is Rejection
    check = Rejection("Found something nasty")
    assert (check.reason, check.errcode, check.status) == (
        "Found something nasty",
        "M_FORBIDDEN",
        403,
    )
    fetch = FetchFailed("Could not reach other.example (10.1.2.3:8448): refused")
    assert isinstance(fetch, Rejection)
    assert (fetch.errcode, fetch.status) == ("M_UNKNOWN", 502)
    # The reason names addresses: it is for the log and moderators, never for clients.
    assert fetch.reason.startswith("Could not reach")
    assert fetch.as_dict() == {"errcode": "M_UNKNOWN", "error": GENERIC_MESSAGE}
    gone = FetchFailed(
        "other.example does not have this media", errcode=Codes.NOT_FOUND, status=404
    )
    assert (gone.status, gone.message) == (404, "Remote media not found")


def test_rejections_are_stored_as_plain_strings(
    alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[Any] = []
    transition = lifecycle.transition

    def spy(*args: Any, **fields: Any) -> bool:
        if "rejection_errcode" in fields:
            written.append(fields["rejection_errcode"])
        return transition(*args, **fields)

    monkeypatch.setattr(lifecycle, "transition", spy)
    with msc3870_settings(CHECKS=["tests.checks.too_large"]):
        refused = alice.post("/_matrix/media/v3/upload", b"hi", content_type="text/plain")
    assert (refused.status_code, refused.json()["errcode"]) == (413, "M_TOO_LARGE")
    created = alice.create()
    path = mxc_path(created["content_uri"])
    uploaded = alice.put(f"/_matrix/media/v3/upload/{path}", b"ok", content_type="text/plain")
    assert uploaded.status_code == 200, uploaded.content
    media = media_of(created["content_uri"])
    assert media.state == MediaState.COMPLETE
    assert moderation.reject(media, by="@mod:localhost", reason="spam")
    assert written == ["M_TOO_LARGE", "M_FORBIDDEN"]
    assert all(type(value) is str for value in written)
    assert type(media.rejection_errcode) is str
    # And the row answers as before.
    assert Client().get(f"/_matrix/media/v3/download/{path}").status_code == 404


def test_storage_errors_do_not_reach_clients(
    alice: MatrixClient, caplog: pytest.LogCaptureFixture
) -> None:
    """botocore's message names the endpoint, bucket and key: the operator's log gets
    it, the client a fixed 503."""
    unreachable = s3_storages(endpoint_url="http://127.0.0.1:9")
    with override_settings(STORAGES=unreachable), caplog.at_level(logging.WARNING):
        created = alice.create()
        response = alice.complete(created["content_uri"])
    assert response.status_code == 503
    assert response.json() == {"errcode": "M_UNKNOWN", "error": "Media storage is unavailable"}
    assert "127.0.0.1:9" in caplog.text  # logged for the operator
    assert "127.0.0.1:9" not in response.content.decode()
