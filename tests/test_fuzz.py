"""No input produces a 500: random paths, parameters, headers and bodies against every
endpoint. Every answer under /_matrix is a Matrix error or a success, never HTML (but for
the bytes of an HTML upload, served as an attachment under the sandbox CSP), and a body
is never cut short (the Django test client's equivalent of a dropped connection).

Real media are made before the run and hypothesis picks among their ids, so that the
bytes of existing media are served too (``serve``, ranges, thumbnails): the run asserts
it reached 200s, 206s, 304s, 416s and thumbnails of them.
"""

from __future__ import annotations

import socket
from collections import Counter
from typing import Any
from urllib.parse import quote

import pytest
from django.test import Client
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from msc3870.api.headers import SECURITY_HEADERS
from msc3870.federation import discovery

from .federation_helpers import undelegated
from .helpers import MatrixClient, animated_gif, body_of, media_of, mxc_path, png_bytes

ENDPOINTS = [
    ("POST", "/_matrix/media/v1/create"),
    ("POST", "/_matrix/media/unstable/fi.mau.msc2246/create"),
    ("PUT", "/_matrix/media/v3/upload/{server}/{media}"),
    ("POST", "/_matrix/media/v1/upload/{server}/{media}/complete"),
    ("POST", "/_matrix/media/unstable/com.beeper.msc3870/upload/{server}/{media}/complete"),
    ("POST", "/_matrix/media/v3/upload"),
    ("PUT", "/_matrix/media/unstable/com.beeper.msc3870/upload_url/{media}"),
    ("GET", "/_matrix/client/v1/media/download/{server}/{media}"),
    ("GET", "/_matrix/client/v1/media/download/{server}/{media}/{filename}"),
    ("GET", "/_matrix/media/v3/download/{server}/{media}"),
    ("GET", "/_matrix/media/r0/download/{server}/{media}/{filename}"),
    ("HEAD", "/_matrix/client/v1/media/download/{server}/{media}"),
    ("GET", "/_matrix/client/v1/media/thumbnail/{server}/{media}"),
    ("GET", "/_matrix/media/v3/thumbnail/{server}/{media}"),
    ("GET", "/_matrix/federation/v1/media/download/{media}"),
    ("GET", "/_matrix/federation/v1/media/thumbnail/{media}"),
    ("GET", "/_matrix/client/v1/media/config"),
    ("GET", "/_matrix/media/v3/config"),
    ("GET", "/_matrix/client/versions"),
    ("GET", "/_matrix/key/v2/server"),
    ("DELETE", "/_matrix/media/v3/upload/{server}/{media}"),
    ("OPTIONS", "/_matrix/client/v1/media/download/{server}/{media}"),
    ("GET", "/_matrix/{media}"),
]
DOWNLOADS = ("/download/", "/thumbnail/")
# Half the examples go to a download or thumbnail endpoint (of existing media, mostly).
DOWNLOAD_ENDPOINTS = [
    e
    for e in ENDPOINTS
    if e[0] == "GET" and any(d in e[1] for d in DOWNLOADS) and "{server}" in e[1]
]
thumbnail_size = st.sampled_from(
    [
        {"width": "32", "height": "32"},
        {"width": "96", "height": "96", "method": "crop"},
        {"width": "640", "height": "480", "method": "scale", "animated": "true"},
        {"animated": "true", "width": "32", "height": "32"},
        {},
    ]
)

text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
latin1 = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60)
big_number = st.integers(-(2**70), 2**70).map(str)
params = st.dictionaries(
    st.one_of(
        st.sampled_from(
            [
                "timeout_ms",
                "width",
                "height",
                "method",
                "animated",
                "filename",
                "allow_redirect",
                "allow_remote",
                "user_id",
                "access_token",
                "fi.mau.msc2246.timeout_ms",
            ]
        ),
        text,
    ),
    st.one_of(
        text,
        big_number,
        st.sampled_from(["0", "32", "96", "640", "crop", "scale", "true", "false", ""]),
    ),
    max_size=5,
)
small_int = st.integers(0, 2000).map(str)
range_header = st.one_of(
    latin1,
    st.builds(lambda a, b: f"bytes={a}-{b}", small_int, small_int),
    st.builds(lambda a: f"bytes={a}-", small_int),
    st.builds(lambda b: f"bytes=-{b}", small_int),
    st.builds(lambda a, b: f"bytes={a}-{b}", big_number, big_number),
    st.sampled_from(
        ["bytes=0-", "bytes=-0", "bytes=9-1", "bytes=0-1,3-4", "bytes=" + "9" * 5000 + "-"]
    ),
)


def authorization(token: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(f"Bearer {token}"),
        st.just(f"Bearer  {token} "),
        st.just(f"bearer {token}"),
        st.builds(lambda t: f"Bearer {t}", latin1),
        st.just("Bearer"),
        st.just("Basic dXNlcjpwYXNz"),
        st.builds(lambda t: f"X-Matrix {t}", latin1),
        st.just('X-Matrix origin="evil.example",key="ed25519:x",sig="AAAA"'),
        latin1,
    )


# Bodies: small binary, JSON and not-quite-JSON, deeply nested, large (well under the
# upload limit of 50 MiB).
bodies = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"{}",
            b"[]",
            b"{",
            b'{"a": ' * 50 + b"1" + b"}" * 50,
            b"[" * 200_000,
            b"[" * 5_000 + b"]" * 5_000,
            b'{"a":' * 100_000,
            b"\x00\xff" * 500_000,
            b"A" * (4 * 1024 * 1024),
            "\u202e\U0001f600".encode() * 1000,
        ]
    ),
)


def existing_media(client: MatrixClient) -> list[tuple[str, bytes]]:
    """Completed media of several kinds: (media id, bytes)."""
    made = []
    for data, content_type, filename in [
        (png_bytes(64, 48), "image/png", "red.png"),
        (animated_gif(), "image/gif", "moving.gif"),
        (b"just text, and some more of it", "text/plain", "notes.txt"),
        (b"<!doctype html><script>alert(1)</script>", "text/html", "page.html"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml", ""),
        (b"", "application/octet-stream", "empty.bin"),
    ]:
        query = f"?filename={filename}" if filename else ""
        response = client.post("/_matrix/media/v3/upload" + query, data, content_type)
        assert response.status_code == 200, response.content
        made.append((mxc_path(response.json()["content_uri"]).split("/", 1)[1], data))
    return made


def test_no_input_is_a_server_error(alice: MatrixClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "the fuzz test resolves no name")

    # Fuzzed X-Matrix headers name origins whose keys would be fetched: stay offline, DNS
    # included (server discovery's SRV queries go out through dnspython, not getaddrinfo).
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(discovery, "resolve", undelegated)
    media = existing_media(alice)
    by_id = dict(media)
    images = [m for m, _ in media[:2]]  # the PNG and the GIF
    pending = media_of(alice.create()["content_uri"]).media_id
    reached: Counter[str] = Counter()

    png_id, gif_id, text_id, html_id = (m for m, _ in media[:4])
    v1 = ("GET", "/_matrix/client/v1/media/download/{server}/{media}")
    v3 = ("GET", "/_matrix/media/v3/download/{server}/{media}")
    thumb = ("GET", "/_matrix/client/v1/media/thumbnail/{server}/{media}")

    def reaching(endpoint: tuple[str, str], media_id: str, **given: Any) -> Any:
        """An example run every time, so that the run reaches each kind of answer (the
        random ones add to them)."""
        values: dict[str, Any] = {
            "endpoint": endpoint,
            "server": "localhost",
            "media_id": media_id,
            "filename": "x.png",
            "size": {"width": "32", "height": "32"},
            "range_value": None,
            "authorization_value": f"Bearer {alice.token}",
            "query": {},
            "extra_headers": {},
            "body": b"",
            "content_length": None,
            "matching_etag": False,
            **given,
        }
        return example(**values)

    @reaching(v1, png_id)
    @reaching(v3, html_id, range_value="bytes=3-9")
    @reaching(v1, text_id, matching_etag=True)
    @reaching(v3, text_id, range_value="bytes=1000-")
    @reaching(thumb, png_id)
    @reaching(thumb, gif_id, size={"width": "32", "height": "32", "animated": "true"})
    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        endpoint=st.one_of(st.sampled_from(ENDPOINTS), st.sampled_from(DOWNLOAD_ENDPOINTS)),
        server=st.one_of(st.just("localhost"), st.just("localhost"), text),
        media_id=st.one_of(
            st.sampled_from([m for m, _ in media]),
            st.sampled_from([m for m, _ in media]),
            st.sampled_from(images),  # thumbnails need them
            st.sampled_from(images),
            st.just("abcDEF123_-"),
            st.just(pending),
            text,
        ),
        size=thumbnail_size,
        range_value=st.one_of(st.none(), range_header),
        authorization_value=st.one_of(
            st.just(f"Bearer {alice.token}"),
            st.just(f"Bearer {alice.token}"),
            st.none(),
            authorization(alice.token),
        ),
        filename=st.one_of(st.just("x.png"), text),
        query=st.one_of(st.just({}), params),
        extra_headers=st.fixed_dictionaries(
            {},
            optional={
                "Content-Type": st.one_of(latin1, st.just("application/json")),
                "If-None-Match": st.one_of(latin1, st.just("*")),
                "Accept": latin1,
            },
        ),
        body=bodies,
        # Numbers only: HTTP servers (h11, httptools, gunicorn) refuse a non-numeric
        # Content-Length before the app sees it (Django's request.body would raise on one).
        content_length=st.one_of(st.none(), st.just("-1"), st.integers(0, 64)),
        matching_etag=st.booleans(),
    )
    def run(
        endpoint: tuple[str, str],
        server: str,
        media_id: str,
        filename: str,
        size: dict[str, str],
        range_value: str | None,
        authorization_value: str | None,
        query: dict[str, str],
        extra_headers: dict[str, str],
        body: bytes,
        content_length: int | str | None,
        matching_etag: bool,
    ) -> None:
        method, template = endpoint
        path = template.format(
            server=quote(server, safe=""),
            media=quote(media_id, safe=""),
            filename=quote(filename, safe=""),
        )
        if "/thumbnail/" in path:
            query = {**size, **query}
        if media_id == pending and method in ("GET", "HEAD"):
            query = {**query, "timeout_ms": "0", "fi.mau.msc2246.timeout_ms": "0"}
        query_string = "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in query.items())
        if query_string:
            path += "?" + query_string
        request_headers: dict[str, Any] = dict(extra_headers)
        if range_value is not None:
            request_headers["Range"] = range_value
        if authorization_value is not None:
            request_headers["Authorization"] = authorization_value
        content_type = request_headers.pop("Content-Type", "application/octet-stream")
        if content_length is not None:
            # Never more than the body: the test client cannot send a short body (a real
            # server sees the connection end; here it would be an AssertionError).
            if isinstance(content_length, int):
                content_length = min(content_length, len(body))
            request_headers["Content-Length"] = str(content_length)
        if matching_etag and media_id in by_id:
            request_headers["If-None-Match"] = f'"{media_id}"'  # the ETag: the id
        client = Client(raise_request_exception=False)
        response = client.generic(
            method, path, body, content_type=content_type, headers=request_headers
        )
        content = body_of(response)
        status = response.status_code
        assert status < 500 or status in (502, 503, 504), (method, path, status, content[:300])
        if status >= 400:
            assert response["Content-Type"].startswith("application/json"), (path, status)
            if method != "HEAD":
                body_json = response.json()
                errcode = body_json["errcode"]
                assert errcode.startswith("M_") or errcode.startswith("FI.MAU"), body_json
                assert isinstance(body_json["error"], str)
        served = (
            method in ("GET", "HEAD")
            and any(part in path for part in DOWNLOADS)
            and "/federation/" not in path
        )
        if served and status in (200, 206, 304, 416):
            for name, value in SECURITY_HEADERS.items():
                assert response.get(name) == value, (path, status, name)
        elif status < 400 and "Content-Type" in response:
            assert not response["Content-Type"].startswith("text/html"), (path, status)
        if served and status in (200, 206) and media_id in by_id and "thumbnail" not in path:
            data = by_id[media_id]
            if method == "GET":
                assert content == (
                    data
                    if status == 200
                    else data[int(response["Content-Range"].split()[1].split("-")[0]) :][
                        : len(content)
                    ]
                )
                assert int(response["Content-Length"]) == len(content)
            if response["Content-Type"].startswith("text/html"):
                assert response["Content-Disposition"].startswith("attachment")
        if served and media_id in by_id:
            kind = "thumbnail" if "thumbnail" in path else "download"
            reached[f"{kind} {status}"] += 1

    run()
    # The run reached the bytes of existing media, not only errors.
    assert reached["download 200"], reached
    assert reached["download 206"], reached
    assert reached["download 304"], reached
    assert reached["download 416"], reached
    assert reached["thumbnail 200"], reached
