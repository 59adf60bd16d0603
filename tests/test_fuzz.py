"""No input produces a 500: random paths, parameters, headers and bodies against every
endpoint. Every answer under /_matrix is a Matrix error or a success, never HTML."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import MatrixClient

ENDPOINTS = [
    ("POST", "/_matrix/media/v1/create"),
    ("PUT", "/_matrix/media/v3/upload/{server}/{media}"),
    ("POST", "/_matrix/media/v1/upload/{server}/{media}/complete"),
    ("POST", "/_matrix/media/unstable/com.beeper.msc3870/upload/{server}/{media}/complete"),
    ("POST", "/_matrix/media/v3/upload"),
    ("PUT", "/_matrix/media/unstable/com.beeper.msc3870/upload_url/{media}"),
    ("GET", "/_matrix/client/v1/media/download/{server}/{media}"),
    ("GET", "/_matrix/client/v1/media/download/{server}/{media}/{media}"),
    ("GET", "/_matrix/media/v3/download/{server}/{media}"),
    ("GET", "/_matrix/client/v1/media/thumbnail/{server}/{media}"),
    ("GET", "/_matrix/media/v3/thumbnail/{server}/{media}"),
    ("GET", "/_matrix/client/v1/media/config"),
    ("GET", "/_matrix/client/versions"),
    ("DELETE", "/_matrix/media/v3/upload/{server}/{media}"),
    ("GET", "/_matrix/{media}"),
]

text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
params = st.dictionaries(
    st.sampled_from(
        [
            "timeout_ms",
            "width",
            "height",
            "method",
            "animated",
            "filename",
            "allow_redirect",
            "user_id",
            "access_token",
            "fi.mau.msc2246.timeout_ms",
        ]
    ),
    st.one_of(text, st.integers(-(2**70), 2**70).map(str)),
    max_size=4,
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "Range": st.one_of(text, st.just("bytes=0-"), st.just("bytes=-0"), st.just("bytes=9-1")),
        "Content-Type": st.one_of(text, st.just("application/json")),
        "If-None-Match": text,
        "Accept": text,
    },
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    server=st.one_of(st.just("localhost"), text),
    media=st.one_of(st.just("abcDEF123_-"), text),
    query=params,
    extra_headers=headers,
    body=st.one_of(st.binary(max_size=64), st.just(b"{}"), st.just(b"[]"), st.just(b"{")),
    authenticated=st.booleans(),
)
def test_no_input_is_a_server_error(
    alice: MatrixClient,
    endpoint: tuple[str, str],
    server: str,
    media: str,
    query: dict[str, str],
    extra_headers: dict[str, str],
    body: bytes,
    authenticated: bool,
) -> None:
    method, template = endpoint
    path = template.format(server=quote(server, safe=""), media=quote(media, safe=""))
    query_string = "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in query.items())
    if query_string:
        path += "?" + query_string
    request_headers: dict[str, Any] = dict(extra_headers)
    content_type = request_headers.pop("Content-Type", "application/octet-stream")
    if authenticated:
        request_headers["Authorization"] = f"Bearer {alice.token}"
    client = Client(raise_request_exception=False)
    response = client.generic(
        method, path, body, content_type=content_type, headers=request_headers
    )
    assert response.status_code < 500 or response.status_code in (502, 503, 504), (
        method,
        path,
        response.status_code,
        getattr(response, "content", b"")[:300],
    )
    if response.status_code >= 400:
        assert response["Content-Type"].startswith("application/json")
        body_json = response.json()
        assert body_json["errcode"].startswith("M_") or body_json["errcode"].startswith("FI.MAU")
        assert isinstance(body_json["error"], str)
