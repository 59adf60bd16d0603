"""Reading what a preview fetched: HTML pages (lxml) and oEmbed answers, no network."""

from __future__ import annotations

import json

import pytest

from msc3870.previews import oembed
from msc3870.previews.html import DESCRIPTION_MAX_CHARS, parse_page, summarize

from .conftest import msc3870_settings


def page(markup: str, content_type: str = "text/html; charset=utf-8") -> dict[str, dict[str, str]]:
    parsed = parse_page(markup.encode(), content_type)
    return {"tags": parsed.tags, "declared": parsed.declared, "gleaned": parsed.gleaned}


def test_open_graph_wins_over_twitter_cards_which_fill_the_gaps() -> None:
    found = page(
        '<meta property="og:title" content="OG">'
        '<meta name="twitter:title" content="Twitter">'
        '<meta name="twitter:description" content="From the card">'
        '<meta name="twitter:site" content="@site">'
        '<meta name="twitter:card" content="summary">'
        '<meta property="og:image" content="first.png">'
        '<meta property="og:image" content="second.png">'
        '<meta property="article:author" content="A. Writer">'
    )["tags"]
    assert found == {
        "og:title": "OG",
        "og:image": "first.png",
        "article:author": "A. Writer",
        "og:description": "From the card",
        "og:site_name": "@site",
    }


def test_a_page_with_too_many_tags_of_a_prefix_keeps_none_of_them() -> None:
    tags = "".join(f'<meta property="og:x{n}" content="{n}">' for n in range(51))
    found = page(tags + '<meta property="article:tag" content="kept"><title>T</title>')
    assert found["tags"] == {"article:tag": "kept"}
    assert found["declared"] == {"og:title": "T"}


def test_text_and_images_are_gleaned_from_content_only() -> None:
    found = page(
        "<html><head><style>p {}</style><title>T</title></head><body>"
        "<nav>Home | About</nav><header>Site header</header>"
        '<div role="menu">menu item</div>'
        "<script>var secret = 1;</script><noscript>enable js</noscript>"
        "<p>The <em>first</em> paragraph.</p><footer>(c) me</footer>"
        '<img src="/tiny.gif" width="1" height="1">'
        '<img src="/small.jpg" width="20" height="20">'
        '<img src="/large.jpg" width="300" height="200">'
        "</body></html>"
    )["gleaned"]
    assert found == {"og:description": "The first paragraph.", "og:image": "/large.jpg"}


def test_an_icon_is_the_image_of_last_resort() -> None:
    assert page('<link rel="shortcut icon" href="/favicon.ico"><p>x</p>')["gleaned"] == {
        "og:description": "x",
        "og:image": "/favicon.ico",
    }


def test_descriptions_are_summarised() -> None:
    paragraphs = [f"Paragraph {n} " + "word " * 120 for n in range(10)]
    summary = summarize(paragraphs)
    assert summary is not None
    assert len(summary) <= DESCRIPTION_MAX_CHARS + 1 and summary.endswith("…")
    assert summary.startswith("Paragraph 0 word")
    assert summarize(["short"]) == "short"
    assert summarize([" ", ""]) is None
    long_og = page(f'<meta property="og:description" content="{"word " * 300}">')["tags"]
    assert long_og["og:description"].endswith("…")


def test_an_oembed_discovery_link() -> None:
    parsed = parse_page(
        b'<link rel="alternative" type="application/json+oembed" href="/o?u=1">'
        b'<link rel="alternate" type="text/xml+oembed" href="/xml">',
        "text/html",
    )
    assert parsed.oembed_url == "/o?u=1"


@pytest.mark.parametrize("body", [b"", b"   \n", b"<!-- a comment only -->", b"\x01\x02"])
def test_nothing_to_read_is_an_empty_preview(body: bytes) -> None:
    parsed = parse_page(body, "text/html")
    assert (parsed.tags, parsed.declared, parsed.gleaned, parsed.oembed_url) == ({}, {}, {}, None)


def test_broken_markup_is_read_as_browsers_read_it() -> None:
    found = page("<title>Unclosed<meta property=og:title content='Still'><p>text")
    assert found["tags"] == {"og:title": "Still"} or found["declared"]["og:title"]


def test_an_xml_declaration_does_not_change_the_decoding() -> None:
    body = '<?xml version="1.0" encoding="utf-16"?><title>café</title>'.encode()
    assert parse_page(body, "application/xhtml+xml; charset=utf-8").declared == {"og:title": "café"}


# --- oEmbed ---------------------------------------------------------------------------


PROVIDERS = [
    {
        "provider_name": "Example",
        "endpoints": [
            {
                "schemes": ["https://*.example.com/watch/*", "https://example.com/v/*"],
                "url": "https://example.com/oembed.{format}",
            },
            {"schemes": ["https://example.com/xml/*"], "url": "https://example.com/o.xml"},
            {
                "schemes": ["https://example.com/json-not-offered/*"],
                "url": "https://example.com/o",
                "formats": ["xml"],
            },
            {"schemes": ["ftp://example.com/*"], "url": "https://example.com/o"},
        ],
    }
]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://www.example.com/watch/1",
            "https://example.com/oembed.json?url=https%3A%2F%2Fwww.example.com%2Fwatch%2F1"
            "&format=json",
        ),
        ("https://example.com/v/2", "https://example.com/oembed.json?url="),
        # A host wildcard is one DNS label: never a path, never two labels.
        ("https://evil.test/.example.com/watch/1", None),
        ("https://a.b.example.com/watch/1", None),
        ("http://www.example.com/watch/1", None),  # the scheme is part of the pattern
        ("https://example.com/xml/1", None),  # XML-only endpoints are not asked
        ("https://example.com/json-not-offered/1", None),
        ("ftp://example.com/x", None),
    ],
)
def test_provider_schemes(url: str, expected: str | None) -> None:
    with msc3870_settings(URL_PREVIEW_OEMBED_PROVIDERS=PROVIDERS):
        found = oembed.endpoint_for(url)
    if expected is None:
        assert found is None
    else:
        assert found is not None and found.startswith(expected)


def test_the_default_providers_are_synapses() -> None:
    assert oembed.endpoint_for("https://x.com/someone/status/1") is not None
    assert oembed.endpoint_for("https://www.youtube.com/shorts/abc") is not None
    assert oembed.endpoint_for("https://www.youtube.com/watch?v=abc") is None


def answer(**fields: object) -> bytes:
    return json.dumps({"version": "1.0", **fields}).encode()


def test_oembed_answers_as_open_graph() -> None:
    photo = oembed.parse(
        "https://p.test/1",
        answer(type="photo", url="https://p.test/full.jpg", thumbnail_url="https://p.test/t.jpg"),
    )
    assert photo.og == {"og:url": "https://p.test/1", "og:image": "https://p.test/full.jpg"}
    rich = oembed.parse(
        "https://p.test/2",
        answer(
            type="rich",
            title="Fish &amp; chips",
            author_name="Cook",
            html='<div><img src="https://p.test/i.png"><video src="https://p.test/v.mp4">'
            "</video><p>Crispy.</p></div>",
        ),
    )
    assert rich.og == {
        "og:url": "https://p.test/2",
        "og:title": "Fish & chips",
        "og:image": "https://p.test/i.png",
        "og:video": "https://p.test/v.mp4",
        "og:description": "Crispy.",
    }
    assert rich.author_name == "Cook"


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", answer(version="2.0", title="x"), b"\xff\xfe", b'"a string"'],
)
def test_what_is_not_an_oembed_answer_says_nothing(body: bytes) -> None:
    assert oembed.parse("https://p.test/", body).og == {}
