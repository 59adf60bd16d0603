"""URL previews (issue 21): ``/_matrix/client/v1/media/preview_url`` and the legacy one.

Every page, image and oEmbed answer is served by a real HTTP server on 127.0.0.1; the
previews' allowlist opens 127.0.0.1 only, so every other address (127.0.0.2, ::1, the
IPv6 forms of other addresses) stays denied as it would in production. No test names a
host that needs DNS."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

import pytest
from django.utils import timezone

from msc3870 import maintenance
from msc3870.models import Media, MediaState, UploadMethod, URLPreview
from msc3870.stores import get_store

from .asgi_driver import parked, request, run, until
from .conftest import MatrixClient, make_token, msc3870_settings, png_bytes
from .federation_helpers import LocalServer, local_server, send

PREVIEW = "/_matrix/client/v1/media/preview_url"
LEGACY_PREVIEW = "/_matrix/media/v3/preview_url"

OPEN_LOOPBACK = {
    "URL_PREVIEW_ENABLED": True,
    "URL_PREVIEW_IP_RANGE_ALLOWLIST": ["127.0.0.1/32"],
    "URL_PREVIEW_TIMEOUT_SECONDS": 5,
}


@pytest.fixture(autouse=True)
def _previews_on() -> Iterator[None]:
    with msc3870_settings(**OPEN_LOOPBACK):
        yield


Route = Callable[[BaseHTTPRequestHandler], None]
Site = tuple[LocalServer, dict[str, Route]]


def html_page(markup: str | bytes, content_type: str = "text/html; charset=utf-8") -> Route:
    body = markup.encode("utf-8") if isinstance(markup, str) else markup

    def route(handler: BaseHTTPRequestHandler) -> None:
        send(handler, 200, body, {"Content-Type": content_type})

    return route


def image(body: bytes, content_type: str = "image/png") -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        send(handler, 200, body, {"Content-Type": content_type})

    return route


def redirect(location: str, status: int = 302) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        send(handler, status, b"", {"Location": location, "Content-Type": "text/plain"})

    return route


@pytest.fixture
def site() -> Iterator[Site]:
    routes: dict[str, Route] = {}
    with local_server(routes) as server:
        yield server, routes


def preview(client: MatrixClient, url: str, path: str = PREVIEW, **params: str) -> Any:
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in {"url": url, **params}.items())
    return client.get(f"{path}?{query}")


def hits(server: LocalServer, path: str) -> int:
    return sum(1 for hit in server.hits if hit.split("?", 1)[0] == path)


def media_of(mxc: str) -> Media:
    server_name, media_id = mxc.removeprefix("mxc://").split("/")
    return Media.objects.get(server_name=server_name, media_id=media_id)


# --- what a preview says ----------------------------------------------------------------


def test_open_graph_and_the_image_stored_as_our_mxc(alice: MatrixClient, site: Site) -> None:
    server, routes = site
    picture = png_bytes(40, 30)
    routes["/article"] = html_page(
        """<html><head><title>Not this</title>
        <meta property="og:title" content="The title">
        <meta property="og:description" content="What it is about">
        <meta property="og:type" content="article">
        <meta property="og:image" content="/pictures/a.png">
        <meta property="og:image:width" content="9999">
        </head><body><p>Body text</p></body></html>"""
    )
    routes["/pictures/a.png"] = image(picture)

    response = preview(alice, f"{server.url}/article")

    assert response.status_code == 200, response.content
    og = response.json()
    assert og["og:title"] == "The title"
    assert og["og:description"] == "What it is about"
    assert og["og:type"] == "article"
    assert og["og:image:type"] == "image/png"
    assert og["matrix:image:size"] == len(picture)
    # The page's own dimensions described its image, not the one kept.
    assert (og["og:image:width"], og["og:image:height"]) == (40, 30)
    assert og["og:image"].startswith("mxc://localhost/")
    media = media_of(og["og:image"])
    assert media.upload_method == UploadMethod.PREVIEW and media.state == MediaState.COMPLETE
    assert media.storage_key.startswith("preview/")
    download = alice.get("/_matrix/client/v1/media/download/" + og["og:image"][6:])
    assert download.status_code == 200
    assert b"".join(download.streaming_content) == picture
    assert hits(server, "/pictures/a.png") == 1


def test_title_and_meta_description_when_there_is_no_open_graph(
    alice: MatrixClient, site: Site
) -> None:
    server, routes = site
    routes["/plain"] = html_page(
        "<html><head><title>  Plain   page </title>"
        '<meta name="Description" content="Described here"></head>'
        "<body><nav>Menu</nav><p>Text</p></body></html>"
    )
    og = preview(alice, f"{server.url}/plain").json()
    assert og["og:title"] == "Plain page"
    assert og["og:description"] == "Described here"
    assert "og:image" not in og
    # Without an image the row it was waited on keeps nothing.
    row = URLPreview.objects.get()
    assert row.media.state == MediaState.DELETED and not row.media.storage_key


def test_a_direct_image_url(alice: MatrixClient, site: Site) -> None:
    server, routes = site
    picture = png_bytes(12, 10)
    routes["/cat.png"] = image(picture)
    og = preview(alice, f"{server.url}/cat.png").json()
    assert og["og:image"].startswith("mxc://localhost/")
    assert og["matrix:image:size"] == len(picture)
    assert (og["og:image:width"], og["og:image:height"]) == (12, 10)


@pytest.mark.parametrize(
    ("body", "content_type", "title"),
    [
        # The header's charset.
        ("<title>Привет</title>".encode("cp1251"), "text/html; charset=windows-1251", "Привет"),
        # A <meta charset> when the header says none.
        (
            '<meta charset="iso-8859-1"><title>café</title>'.encode("latin-1"),
            "text/html",
            "café",
        ),
        # http-equiv, as old pages say it.
        (
            '<meta http-equiv="Content-Type" content="text/html; charset=koi8-r">'
            "<title>Мир</title>".encode("koi8-r"),
            "text/html",
            "Мир",
        ),
        # The header wins over the page (the HTML standard's order).
        (
            '<meta charset="utf-8"><title>naïve</title>'.encode("cp1252"),
            "text/html; charset=windows-1252",
            "naïve",
        ),
        # Nothing declared: UTF-8 when it is UTF-8, else windows-1252.
        ("<title>日本語</title>".encode(), "text/html", "日本語"),
        ("<title>façade</title>".encode("cp1252"), "text/html", "façade"),
        # A byte order mark beats everything.
        (b"\xef\xbb\xbf<title>\xc3\xa9t\xc3\xa9</title>", "text/html; charset=koi8-r", "été"),
    ],
)
def test_the_right_charset(
    alice: MatrixClient,
    site: Site,
    body: bytes,
    content_type: str,
    title: str,
) -> None:
    server, routes = site
    routes["/page"] = html_page(body, content_type)
    assert preview(alice, f"{server.url}/page").json()["og:title"] == title


# --- oEmbed -----------------------------------------------------------------------------


def test_an_oembed_title_is_never_replaced_by_the_authors_name(
    alice: MatrixClient, site: Site
) -> None:
    """Synapse 1.163 answers the author's name as og:title here: the page's missing
    title (None) overwrote oEmbed's, and the author's name filled the gap."""
    server, routes = site
    routes["/post"] = html_page(
        '<html><head><link rel="alternate" type="application/json+oembed" '
        'href="/oembed?url=post"></head><body></body></html>'
    )
    routes["/oembed"] = html_page(
        json.dumps(
            {
                "version": "1.0",
                "type": "rich",
                "title": "The post&#39;s title",
                "author_name": "Somebody",
                "provider_name": "Provider",
                "html": "<blockquote><p>What the post says.</p></blockquote>",
            }
        ),
        "application/json",
    )
    og = preview(alice, f"{server.url}/post").json()
    assert og["og:title"] == "The post's title"
    assert og["og:site_name"] == "Provider"
    assert og["og:description"] == "What the post says."


def test_the_authors_name_is_a_title_of_last_resort(alice: MatrixClient, site: Site) -> None:
    server, routes = site
    routes["/post"] = html_page(
        '<link rel="alternate" type="application/json+oembed" href="/oembed">'
    )
    routes["/oembed"] = html_page(
        json.dumps({"version": "1.0", "type": "link", "author_name": "Somebody"}),
        "application/json",
    )
    og = preview(alice, f"{server.url}/post").json()
    assert og["og:title"] == "Somebody"
    assert og["og:type"] == "website"


def test_open_graph_then_title_then_oembed(alice: MatrixClient, site: Site) -> None:
    server, routes = site
    routes["/page"] = html_page(
        '<head><meta property="og:title" content="From Open Graph">'
        "<title>From the title</title>"
        '<link rel="alternate" type="application/json+oembed" href="/oembed"></head>'
        "<body><p>From the text of the page</p></body>"
    )
    routes["/oembed"] = html_page(
        json.dumps(
            {
                "version": "1.0",
                "type": "video",
                "title": "From oEmbed",
                "html": "<p>From oEmbed's html</p>",
                "width": 640,
                "height": 360,
            }
        ),
        "application/json",
    )
    og = preview(alice, f"{server.url}/page").json()
    assert og["og:title"] == "From Open Graph"
    assert og["og:description"] == "From oEmbed's html"  # above the page's own text
    assert (og["og:type"], og["og:video:width"], og["og:video:height"]) == (
        "video.other",
        640,
        360,
    )


def test_a_provider_in_the_list_is_asked_instead_of_the_page(
    alice: MatrixClient, site: Site
) -> None:
    server, routes = site
    routes["/watch/42"] = html_page("<title>The page itself</title>")
    routes["/oembed"] = html_page(
        json.dumps(
            {
                "version": "1.0",
                "type": "photo",
                "title": "A photo",
                "url": f"{server.url}/photo.png",
            }
        ),
        "application/json",
    )
    routes["/photo.png"] = image(png_bytes(20, 20))
    providers = [
        {
            "provider_name": "Local",
            "endpoints": [{"schemes": [f"{server.url}/watch/*"], "url": f"{server.url}/oembed"}],
        }
    ]
    with msc3870_settings(**OPEN_LOOPBACK, URL_PREVIEW_OEMBED_PROVIDERS=providers):
        og = preview(alice, f"{server.url}/watch/42").json()
    assert og["og:title"] == "A photo"
    assert og["og:url"] == f"{server.url}/watch/42"
    assert og["og:image"].startswith("mxc://localhost/")
    assert hits(server, "/watch/42") == 0
    (asked,) = [hit for hit in server.hits if hit.startswith("/oembed")]
    assert f"url={quote(server.url + '/watch/42', safe='')}" in asked and "format=json" in asked


# --- the guard: every failure Synapse answers with 500 is a 4xx or a 502 here -----------


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/_GET",
        "ftp://127.0.0.1/file",
        "data:text/html,<title>inline</title>",
        "javascript:alert(1)",
        "//127.0.0.1/no-scheme",
        "http:///no-host",
        "http://127.0.0.1:0/",
        "http://127.0.0.1:99999/",
    ],
)
def test_urls_that_are_not_http_are_400(alice: MatrixClient, url: str) -> None:
    response = preview(alice, url)
    assert (response.status_code, response.json()["errcode"]) == (400, "M_INVALID_PARAM")
    assert not URLPreview.objects.exists()


def test_a_missing_url_is_400(alice: MatrixClient) -> None:
    response = alice.get(PREVIEW)
    assert (response.status_code, response.json()["errcode"]) == (400, "M_MISSING_PARAM")
    bad_ts = preview(alice, "http://127.0.0.1:1/", ts="yesterday")
    assert (bad_ts.status_code, bad_ts.json()["errcode"]) == (400, "M_INVALID_PARAM")


@pytest.mark.parametrize(
    "host",
    [
        "[::1]",  # IPv6 loopback: denied by default
        "[::ffff:127.0.0.2]",  # IPv4-mapped form of a denied IPv4 address
        "127.0.0.2",
        "2130706434",  # 127.0.0.2 as one number
        "0x7f.0.0.2",  # and in hexadecimal
        "[fe80::1%25eth0]",  # link-local with a zone
        "169.254.169.254",  # cloud metadata
    ],
)
def test_ip_literals_in_denied_ranges_are_403_before_any_fetch(
    alice: MatrixClient, host: str
) -> None:
    response = preview(alice, f"http://{host}:8080/")
    assert (response.status_code, response.json()["errcode"]) == (403, "M_FORBIDDEN")
    assert not URLPreview.objects.exists()


def test_the_allowlisted_ipv4_address_in_its_ipv6_form_is_previewed(
    alice: MatrixClient, site: Site
) -> None:
    """Synapse 1.163 answers 500 to any IPv6 literal; here the mapped form of the one
    allowed address reaches it, as the outbound guard allows it in every form."""
    server, routes = site
    routes["/page"] = html_page("<title>Reached over ::ffff:127.0.0.1</title>")
    response = preview(alice, f"http://[::ffff:127.0.0.1]:{server.port}/page")
    assert response.status_code == 200, response.content
    assert response.json()["og:title"] == "Reached over ::ffff:127.0.0.1"


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


@contextmanager
def ipv6_server(body: bytes) -> Iterator[int]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            send(self, 200, body, {"Content-Type": "text/html"})

    server = _IPv6Server(("::1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_an_ipv6_literal_is_previewed_where_allowed(alice: MatrixClient) -> None:
    with ipv6_server(b"<title>Over IPv6</title>") as port:
        denied = preview(alice, f"http://[::1]:{port}/")
        assert denied.status_code == 403
        with msc3870_settings(**{**OPEN_LOOPBACK, "URL_PREVIEW_IP_RANGE_ALLOWLIST": ["::1/128"]}):
            allowed = preview(alice, f"http://[::1]:{port}/")
    assert allowed.status_code == 200, allowed.content
    assert allowed.json()["og:title"] == "Over IPv6"


def test_a_redirect_loop_is_502(alice: MatrixClient, site: Site) -> None:
    server, routes = site
    routes["/loop"] = redirect("/loop")
    response = preview(alice, f"{server.url}/loop")
    assert response.status_code == 502
    assert response.json() == {"errcode": "M_UNKNOWN", "error": "Could not fetch the URL"}
    assert hits(server, "/loop") == 6  # the URL and five redirects, no more


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.2:{port}/internal",
        "http://[::1]:{port}/internal",
        "http://169.254.169.254/latest/meta-data/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:{port}/",
    ],
)
def test_redirects_to_denied_addresses_or_other_schemes_are_refused(
    alice: MatrixClient, site: Site, target: str
) -> None:
    server, routes = site
    routes["/go"] = redirect(target.format(port=server.port))
    response = preview(alice, f"{server.url}/go")
    assert response.status_code == 502
    # The same words as for an unreachable server: nothing to probe the network with.
    assert response.json() == {"errcode": "M_UNKNOWN", "error": "Could not fetch the URL"}
    assert server.hits == ["/go"]
    row = URLPreview.objects.get()
    assert "go" in row.last_error  # the detail is kept for moderators


def test_an_image_on_a_denied_address_is_left_out(alice: MatrixClient, site: Site) -> None:
    server, routes = site
    routes["/page"] = html_page(
        f'<title>T</title><meta property="og:image" content="http://127.0.0.2:{server.port}/x">'
    )
    og = preview(alice, f"{server.url}/page").json()
    assert og == {"og:title": "T"}


@contextmanager
def slow_server(first: bytes, *, every: float = 0.1) -> Iterator[tuple[int, list[float]]]:
    """A server that sends ``first`` (a status line and headers), then a byte every
    ``every`` seconds for a minute; ``closed`` gets how long after the request the
    connection was found closed by the client."""
    closed: list[float] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            started = time.monotonic()
            connection.settimeout(5)
            try:
                connection.recv(65536)
                connection.sendall(first)
                for _ in range(600):
                    if stop.is_set():
                        break
                    time.sleep(every)
                    connection.sendall(b"x")
            except OSError:
                closed.append(time.monotonic() - started)
            finally:
                connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], closed
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 100000\r\n\r\n<title>",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/ht",  # a head that never ends
    ],
)
def test_a_slow_page_is_502_at_the_deadline_and_its_connection_closed(
    alice: MatrixClient, head: bytes
) -> None:
    """Synapse 1.163 answers 502 at 30 s, but leaves the origin's connection open for
    minutes: one held connection per slow URL."""
    with (
        slow_server(head) as (port, closed),
        msc3870_settings(**{**OPEN_LOOPBACK, "URL_PREVIEW_TIMEOUT_SECONDS": 1.5}),
    ):
        started = time.monotonic()
        response = preview(alice, f"http://127.0.0.1:{port}/slow")
        took = time.monotonic() - started
        assert response.status_code == 502
        assert response.json() == {
            "errcode": "M_UNKNOWN",
            "error": "The URL took too long to answer",
        }
        assert took < 4
        deadline = time.monotonic() + 3
        while not closed and time.monotonic() < deadline:
            time.sleep(0.05)
        # The origin found the connection closed within a byte or two of the deadline.
        assert closed and closed[0] < 2.5, closed


def test_bodies_are_capped(alice: MatrixClient, site: Site) -> None:
    server, routes = site
    big = png_bytes(8, 8) + b"\0" * 200_000
    routes["/big.png"] = image(big)
    routes["/page"] = html_page(
        '<title>Has a big image</title><meta property="og:image" content="/big.png">'
    )
    with msc3870_settings(**{**OPEN_LOOPBACK, "URL_PREVIEW_MAX_BYTES": 100_000}):
        direct = preview(alice, f"{server.url}/big.png")
        page = preview(alice, f"{server.url}/page")
    assert (direct.status_code, direct.json()["errcode"]) == (502, "M_TOO_LARGE")
    assert page.json() == {"og:title": "Has a big image"}  # the page, without the image
    assert not list(get_store().list_keys("preview/"))


def test_only_the_first_bytes_of_a_page_are_parsed(alice: MatrixClient, site: Site) -> None:
    server, routes = site
    routes["/long"] = html_page(
        "<title>Head first</title><body>" + "<p>filler</p>" * 20_000 + "<h1>never</h1></body>"
    )
    with msc3870_settings(**{**OPEN_LOOPBACK, "URL_PREVIEW_MAX_HTML_BYTES": 10_000}):
        og = preview(alice, f"{server.url}/long").json()
    assert og["og:title"] == "Head first"


@pytest.mark.parametrize(
    "content_type", ["application/pdf", "application/octet-stream", "image/svg+xml", ""]
)
def test_content_types_outside_the_allowlist_are_not_read(
    alice: MatrixClient, site: Site, content_type: str
) -> None:
    server, routes = site
    routes["/file"] = html_page(b"%PDF-1.4 ...", content_type)
    response = preview(alice, f"{server.url}/file")
    assert response.status_code == 502
    assert response.json()["error"] == "The URL's content type cannot be previewed"


def test_an_error_page_is_502(alice: MatrixClient, site: Site) -> None:
    server, _routes = site
    response = preview(alice, f"{server.url}/missing")
    assert response.status_code == 502
    assert response.json() == {"errcode": "M_UNKNOWN", "error": "The URL answered HTTP 404"}


def test_an_unreachable_server_is_502(alice: MatrixClient) -> None:
    with local_server({}) as closed:
        url = closed.url
    response = preview(alice, f"{url}/")
    assert response.json() == {"errcode": "M_UNKNOWN", "error": "Could not fetch the URL"}


# --- the image is screened like an upload ----------------------------------------------


def test_the_image_is_screened_and_left_out_once_refused_or_quarantined(
    alice: MatrixClient, site: Site
) -> None:
    from msc3870 import moderation

    server, routes = site
    routes["/a"] = html_page('<title>A</title><meta property="og:image" content="/a.png">')
    routes["/b"] = html_page('<title>B</title><meta property="og:image" content="/b.png">')
    routes["/a.png"] = image(png_bytes(9, 9))
    routes["/b.png"] = image(png_bytes(10, 10))
    with msc3870_settings(**OPEN_LOOPBACK, DENIED_CONTENT_TYPES=["image/png"]):
        refused = preview(alice, f"{server.url}/a").json()
    assert refused == {"og:title": "A"}
    assert URLPreview.objects.get(url=f"{server.url}/a").media.state == MediaState.REJECTED

    kept = preview(alice, f"{server.url}/b").json()
    media = media_of(kept["og:image"])
    moderation.quarantine(media, by="@mod:localhost", reason="test")
    assert preview(alice, f"{server.url}/b").json() == {"og:title": "B"}  # cached, imageless
    assert hits(server, "/b") == 1


# --- cached per URL and time bucket, one fetch however many ask -------------------------


def test_answers_are_cached_for_the_bucket_then_fetched_again(
    alice: MatrixClient, bob: MatrixClient, site: Site
) -> None:
    server, routes = site
    routes["/page"] = html_page("<title>Cached</title>")
    url = f"{server.url}/page"
    assert preview(alice, url).json() == preview(bob, url, LEGACY_PREVIEW).json()
    assert preview(alice, url, ts=str(int(time.time() * 1000))).status_code == 200
    assert hits(server, "/page") == 1
    row = URLPreview.objects.get()
    assert row.expires_at - row.created_at == timedelta(hours=1)
    # An hour later the answer is fetched again, in a new bucket.
    URLPreview.objects.update(bucket=row.bucket - 1, expires_at=timezone.now())
    assert preview(alice, url).json() == {"og:title": "Cached"}
    assert hits(server, "/page") == 2


def test_failures_are_answered_from_the_row_then_fetched_again(
    alice: MatrixClient, site: Site
) -> None:
    server, routes = site
    url = f"{server.url}/later"
    assert preview(alice, url).status_code == 502
    assert preview(alice, url).status_code == 502
    assert hits(server, "/later") == 1
    routes["/later"] = html_page("<title>Now there</title>")
    URLPreview.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert preview(alice, url).json() == {"og:title": "Now there"}
    assert hits(server, "/later") == 2
    # The failure's rows went; the new ones stand.
    assert URLPreview.objects.count() == 1
    assert Media.objects.filter(upload_method=UploadMethod.PREVIEW).count() == 1


def test_concurrent_requests_cause_one_fetch_and_wait_on_the_loop(app: Any) -> None:
    gate = threading.Event()

    def slow_page(handler: BaseHTTPRequestHandler) -> None:
        gate.wait(20)
        send(handler, 200, b"<title>Shared</title>", {"Content-Type": "text/html"})

    token = make_token("@alice:localhost")
    headers = {"Authorization": f"Bearer {token}"}
    with local_server({"/shared": slow_page}) as server:
        path = f"{PREVIEW}?url={quote(server.url + '/shared', safe='')}"

        async def scenario() -> None:
            exchanges = [request(app, "GET", path, headers=headers) for _ in range(6)]
            await until(lambda: parked() == 6, "six parked requests")
            await until(lambda: len(server.hits) > 0, "the fetch")
            gate.set()
            replies = await asyncio.gather(*(e.reply() for e in exchanges))
            assert [r.status for r in replies] == [200] * 6
            assert [r.json() for r in replies] == [{"og:title": "Shared"}] * 6

        run(scenario)
        assert server.hits == ["/shared"]


def test_the_rate_counts_fetches_not_cached_answers(alice: MatrixClient, site: Site) -> None:
    server, routes = site
    for name in ("a", "b", "c"):
        routes[f"/{name}"] = html_page(f"<title>{name}</title>")
    with msc3870_settings(**OPEN_LOOPBACK, URL_PREVIEW_RATE="2/min"):
        assert preview(alice, f"{server.url}/a").status_code == 200
        assert preview(alice, f"{server.url}/b").status_code == 200
        for _ in range(5):
            assert preview(alice, f"{server.url}/a").status_code == 200  # cached: free
        refused = preview(alice, f"{server.url}/c")
    assert (refused.status_code, refused.json()["errcode"]) == (429, "M_LIMIT_EXCEEDED")
    assert refused.json()["retry_after_ms"] > 0 and "Retry-After" in refused
    assert hits(server, "/c") == 0


# --- who may ask ------------------------------------------------------------------------


def test_previews_are_off_by_default_and_with_an_empty_deny_list(alice: MatrixClient) -> None:
    with msc3870_settings(URL_PREVIEW_ENABLED=False):
        off = preview(alice, "http://127.0.0.1:1/")
    with msc3870_settings(URL_PREVIEW_ENABLED=True, URL_PREVIEW_IP_RANGE_DENYLIST=[]):
        open_to_all = preview(alice, "http://127.0.0.1:1/")
    for response in (off, open_to_all):
        assert (response.status_code, response.json()["errcode"]) == (404, "M_UNRECOGNIZED")


@pytest.mark.parametrize("path", [PREVIEW, LEGACY_PREVIEW])
def test_previews_need_a_token(client: Any, path: str) -> None:
    response = client.get(f"{path}?url=http%3A%2F%2F127.0.0.1%3A1%2F")
    assert (response.status_code, response.json()["errcode"]) == (401, "M_MISSING_TOKEN")


def test_guests_cannot_make_the_server_fetch(matrix_client: Callable[[str], MatrixClient]) -> None:
    from msc3870.auth import MatrixUser

    guest = matrix_client("@guest:localhost")
    original = MatrixUser.__init__

    with pytest.MonkeyPatch.context() as patch:

        def as_guest(self: MatrixUser, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            object.__setattr__(self, "is_guest", True)

        patch.setattr(MatrixUser, "__init__", as_guest)
        response = preview(guest, "http://127.0.0.1:1/")
    assert (response.status_code, response.json()["errcode"]) == (403, "M_GUEST_ACCESS_FORBIDDEN")


# --- the cache's sweep ------------------------------------------------------------------


def test_the_sweep_deletes_expired_previews_and_old_images(alice: MatrixClient, site: Site) -> None:
    server, routes = site
    routes["/with"] = html_page('<title>W</title><meta property="og:image" content="/i.png">')
    routes["/without"] = html_page("<title>N</title>")
    routes["/i.png"] = image(png_bytes(9, 9))
    image_mxc = preview(alice, f"{server.url}/with").json()["og:image"]
    preview(alice, f"{server.url}/without")
    assert maintenance.expire_url_previews().rows_deleted == 0  # all fresh

    URLPreview.objects.update(expires_at=timezone.now())
    swept = maintenance.expire_url_previews()
    assert not URLPreview.objects.exists()
    # The imageless row went with its preview; the image stays, downloadable, for now.
    assert swept.rows_deleted == 3
    image_row = media_of(image_mxc)
    assert image_row.state == MediaState.COMPLETE
    assert Media.objects.filter(upload_method=UploadMethod.PREVIEW).count() == 1

    Media.objects.filter(pk=image_row.pk).update(completed_at=timezone.now() - timedelta(days=3))
    assert maintenance.expire_url_previews().moved == 1
    image_row.refresh_from_db()
    assert image_row.state == MediaState.DELETED
    maintenance.delete_dead_objects()
    assert not list(get_store().list_keys("preview/"))


# --- with a broker: the fetch is a task; waiting is bounded ------------------------------


def test_with_a_broker_the_fetch_is_a_task_and_an_abandoned_one_is_claimed_again(
    alice: MatrixClient,
    site: Site,
    broker_sends: list[tuple[str, tuple[Any, ...], Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from msc3870.previews import fetch, service

    monkeypatch.setattr(service, "SCREENING_GRACE_SECONDS", 0.0)
    # One time bucket throughout: a test that runs across the hour would claim the next
    # bucket's row beside the abandoned one.
    bucket = service.current_bucket()
    monkeypatch.setattr(service, "current_bucket", lambda now=None: bucket)
    server, routes = site
    routes["/page"] = html_page("<title>From the worker</title>")
    url = f"{server.url}/page"
    with msc3870_settings(**{**OPEN_LOOPBACK, "URL_PREVIEW_TIMEOUT_SECONDS": 1}):
        started = time.monotonic()
        waited = preview(alice, url)
        assert time.monotonic() - started < 3
        assert (waited.status_code, waited.json()["errcode"]) == (504, "M_UNKNOWN")
        row = URLPreview.objects.get()
        assert broker_sends == [("msc3870.fetch_url_preview", (row.pk,), None)]

        # The worker died with it: once well past the deadline, the next request claims
        # the URL again (one row, a new fetch).
        Media.objects.filter(pk=row.media_id).update(
            processing_started_at=timezone.now() - timedelta(minutes=5)
        )
        assert preview(alice, url).status_code == 504
        again = URLPreview.objects.get()
        assert again.pk != row.pk and len(broker_sends) == 2
        assert not Media.objects.filter(pk=row.media_id).exists()

        # The task's body, as a worker runs it.
        assert fetch.fetch_url_preview(again.pk) == "answered"
        assert fetch.fetch_url_preview(again.pk) == "skipped"  # redelivered: nothing twice
        assert preview(alice, url).json() == {"og:title": "From the worker"}
    assert hits(server, "/page") == 1


def test_a_broker_that_refuses_the_task_fails_the_preview_at_once(
    alice: MatrixClient, site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery import current_app

    from msc3870 import queue

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(queue, "has_broker", lambda: True)
    monkeypatch.setattr(current_app, "send_task", refuse)
    server, _routes = site
    started = time.monotonic()
    response = preview(alice, f"{server.url}/page")
    assert time.monotonic() - started < 2
    assert response.json() == {"errcode": "M_UNKNOWN", "error": "Could not preview the URL"}
    assert "broker down" in URLPreview.objects.get().last_error


def test_a_cached_preview_costs_one_query(alice: MatrixClient, site: Site) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from .helpers import data_queries

    server, routes = site
    routes["/page"] = html_page('<title>T</title><meta property="og:image" content="/i.png">')
    routes["/i.png"] = image(png_bytes(9, 9))
    url = f"{server.url}/page"
    preview(alice, url)  # fetched; the token is resolved (and cached) once
    with CaptureQueriesContext(connection) as captured:
        assert preview(alice, url).json()["og:title"] == "T"
    # The preview and its image's row together.
    assert len(data_queries(captured)) == 1, data_queries(captured)


def test_operators_see_previews_and_why_one_failed_in_the_admin(
    admin_client: Any, alice: MatrixClient, site: Site
) -> None:
    server, _routes = site
    preview(alice, f"{server.url}/gone")
    row = URLPreview.objects.get()
    listing = admin_client.get("/admin/msc3870/urlpreview/")
    assert listing.status_code == 200 and f"{server.url}/gone".encode() in listing.content
    page = admin_client.get(f"/admin/msc3870/urlpreview/{row.pk}/change/")
    assert page.status_code == 200 and b"answered 404" in page.content
