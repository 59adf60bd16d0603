"""What an HTML page says about itself, for a URL preview: Open Graph first, then its
title and meta description, then what can be gleaned from its text and images.

The page is decoded as the HTML standard says (a byte order mark, then the charset of
the ``Content-Type`` header, then a ``<meta charset>`` or ``http-equiv`` declaration;
w3lib's ``html_to_unicode``, as Scrapy decodes pages), else as UTF-8 if it is valid
UTF-8, else windows-1252. It is parsed by lxml (libxml2's HTML parser, which recovers
from broken markup as browsers do) and read with XPath: never a regular expression over
markup. The caller caps the bytes parsed (``URL_PREVIEW_MAX_HTML_BYTES``).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lxml import etree
from lxml import html as lxml_html
from w3lib.encoding import html_to_unicode

# Meta tags of one prefix beyond this many: the page is taking liberties, and none are
# kept (as Synapse).
MAX_TAGS_PER_PREFIX = 50
# A description is whole paragraphs up to MIN, then cut at a word boundary by MAX.
DESCRIPTION_MIN_CHARS = 200
DESCRIPTION_MAX_CHARS = 500
# Elements whose text is not the page's content.
NOT_CONTENT = frozenset(
    {
        "head",
        "header",
        "nav",
        "aside",
        "footer",
        "script",
        "noscript",
        "style",
        "svg",
        "iframe",
        "video",
        "canvas",
        "img",
        "picture",
        "template",
    }
)
ROLES_NOT_CONTENT = frozenset({"directory", "menu", "menubar", "toolbar"})
# Elements within a line of text: they do not break a paragraph.
INLINE = frozenset(
    {"a", "abbr", "b", "bdi", "bdo", "cite", "code", "data", "dfn", "em", "i", "kbd", "mark"}
    | {"q", "s", "samp", "small", "span", "strong", "sub", "sup", "time", "u", "var", "wbr"}
)
# Paragraphs looked at for a description: DESCRIPTION_MIN_CHARS many times over.
MAX_PARAGRAPHS = 2000
OEMBED_LINK_TYPE = "application/json+oembed"


@dataclass
class Page:
    """What a page says, by how much it is to be believed.

    ``tags``: its Open Graph (``og:``, ``article:``, ``profile:``) and Twitter card meta
    tags (as ``og:`` where Open Graph did not say it); ``declared``: its ``<title>`` (or
    first heading) and meta description; ``gleaned``: a description from its text and an
    image from its ``<img>`` tags or icon; ``oembed_url``: an oEmbed discovery link."""

    tags: dict[str, str] = field(default_factory=dict)
    declared: dict[str, str] = field(default_factory=dict)
    gleaned: dict[str, str] = field(default_factory=dict)
    oembed_url: str | None = None


def parse_page(body: bytes, content_type: str | None) -> Page:
    """The preview fields of an HTML document (``body``: its first bytes, as capped by
    the caller; ``content_type``: the response's header, for its charset)."""
    document = parse_document(body, content_type)
    if document is None:
        return Page()
    page = Page(tags=_open_graph(document), oembed_url=_oembed_link(document))
    title = _title(document)
    if title:
        page.declared["og:title"] = title
    description = _meta_description(document)
    if description:
        page.declared["og:description"] = description
    text = describe(document)
    if text:
        page.gleaned["og:description"] = text
    image = _image(document)
    if image:
        page.gleaned["og:image"] = image
    if "og:description" in page.tags:
        # A page's own description can be as long as an article: summarised as one.
        summary = summarize([page.tags["og:description"]])
        if summary:
            page.tags["og:description"] = summary
        else:
            del page.tags["og:description"]
    return page


def parse_document(body: bytes, content_type: str | None) -> Any:
    """The lxml document of ``body`` decoded as a browser would; None if empty."""
    if not body.strip():
        return None
    _encoding, text = html_to_unicode(content_type, body, auto_detect_fun=_utf8_or_windows_1252)
    # Decoded here, so libxml2 must not decode again by a <meta charset> or an XML
    # declaration: given UTF-8 with the encoding named, it ignores both.
    parser = lxml_html.HTMLParser(encoding="utf-8", remove_comments=True, no_network=True)
    try:
        return lxml_html.document_fromstring(text.encode("utf-8"), parser=parser)
    except (etree.ParserError, ValueError):
        return None


def parse_fragment(markup: str) -> Any:
    """An HTML fragment (an oEmbed answer's ``html``), inside a ``<div>``; None if empty."""
    if not markup.strip():
        return None
    parser = lxml_html.HTMLParser(encoding="utf-8", remove_comments=True, no_network=True)
    try:
        return lxml_html.fragment_fromstring(
            markup.encode("utf-8"), create_parent="div", parser=parser
        )
    except (etree.ParserError, ValueError):
        return None


def _utf8_or_windows_1252(body: bytes) -> str:
    """A page that declares nothing: UTF-8 if it is UTF-8 (its end may be cut by the cap,
    mid-character), else windows-1252, what browsers fall back to for western pages."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(body, final=False)
    except UnicodeDecodeError:
        return "cp1252"
    return "utf-8"


# ---------------------------------------------------------------------- meta tags


def _meta(document: Any) -> Iterator[Any]:
    return iter(document.iter("meta"))


def _content(element: Any) -> str:
    return (element.get("content") or "").strip()


def _open_graph(document: Any) -> dict[str, str]:
    found: dict[str, dict[str, str]] = {"og": {}, "article": {}, "profile": {}, "twitter": {}}
    for meta in _meta(document):
        content = _content(meta)
        if not content:
            continue
        key = (meta.get("property") or "").strip()
        prefix = key.split(":", 1)[0]
        if prefix not in ("og", "article", "profile") or ":" not in key:
            key = (meta.get("name") or "").strip()
            prefix = key.split(":", 1)[0]
            if prefix != "twitter" or ":" not in key:
                continue
        tags = found[prefix]
        if key in tags:
            continue  # the first of repeated tags (og:image for one, the main image)
        tags[key] = content
    og: dict[str, str] = {}
    for prefix in ("og", "article", "profile"):
        if len(found[prefix]) <= MAX_TAGS_PER_PREFIX:
            og.update(found[prefix])
    if len(found["twitter"]) <= MAX_TAGS_PER_PREFIX:
        for key, value in found["twitter"].items():
            mapped = _twitter_to_open_graph(key)
            if mapped is not None and mapped not in og:
                og[mapped] = value
    return og


def _twitter_to_open_graph(key: str) -> str | None:
    """A Twitter card property as Open Graph's (None: Open Graph has no such thing)."""
    if key in ("twitter:card", "twitter:creator"):
        return None
    if key == "twitter:site":
        return "og:site_name"
    return "og:" + key.split(":", 1)[1]


def _title(document: Any) -> str | None:
    for tag in ("title", "h1", "h2", "h3"):
        for element in document.iter(tag):
            text = _squash(element.text_content())
            if text:
                return text
    return None


def _meta_description(document: Any) -> str | None:
    for meta in _meta(document):
        if (meta.get("name") or "").strip().lower() == "description":
            content = _content(meta)
            if content:
                return summarize([content])
    return None


def _oembed_link(document: Any) -> str | None:
    """An oEmbed discovery link (``rel="alternate"``; Flickr writes ``alternative``)."""
    for link in document.iter("link"):
        rel = set((link.get("rel") or "").lower().split())
        if rel & {"alternate", "alternative"} and (
            (link.get("type") or "").strip().lower() == OEMBED_LINK_TYPE
        ):
            href = (link.get("href") or "").strip()
            if href:
                return href
    return None


# ---------------------------------------------------------------------- gleaned


def _image(document: Any) -> str | None:
    """An image to show: microdata's, else the largest ``<img>`` over 10x10 px by its
    attributes, else the first ``<img>``, else the page's icon."""
    for meta in _meta(document):
        if "image" in (meta.get("itemprop") or "").lower() and _content(meta):
            return _content(meta)
    best: tuple[float, str] | None = None
    first: str | None = None
    for image in document.iter("img"):
        src = (image.get("src") or "").strip()
        if not src:
            continue
        first = first or src
        width, height = _number(image.get("width")), _number(image.get("height"))
        if width > 10 and height > 10 and (best is None or width * height > best[0]):
            best = (width * height, src)
    if best is not None:
        return best[1]
    if first is not None:
        return first
    for link in document.iter("link"):
        if "icon" in (link.get("rel") or "").lower().split():
            href = (link.get("href") or "").strip()
            if href:
                return href
    return None


def media_source(root: Any, tag: str) -> str | None:
    """The ``src`` of the first ``tag`` element that has one."""
    for element in root.iter(tag):
        src = (element.get("src") or "").strip()
        if src:
            return src
    return None


def _number(value: str | None) -> float:
    try:
        return float(value or 0)
    except ValueError:
        return 0.0


def describe(root: Any) -> str | None:
    """A description from the text of ``root`` (the body of a page, or an oEmbed
    fragment): its content's text nodes, depth first, leaving out what is not content
    (navigation, scripts, styles, embedded media)."""
    body = root.find("body") if root.tag == "html" else root
    if body is None:
        return None
    return summarize(_text_nodes(body))


def _text_nodes(root: Any) -> Iterator[str]:
    """The paragraphs of ``root``'s content, in document order: text runs through inline
    elements (``<b>``, ``<a>``, ...) and is broken by any other element."""
    # An element's text is its .text (before its first child) and, after each child, that
    # child's .tail. A subtree that is not content is skipped on the way in; its tail is
    # still its parent's text.
    paragraph: list[str] = []
    given = 0
    walker = etree.iterwalk(root, events=("start", "end"))
    for event, element in walker:
        if not isinstance(element.tag, str):
            continue  # comments and processing instructions
        breaks = element.tag not in INLINE
        if event == "start":
            skipped = element.tag in NOT_CONTENT or element.get("role") in ROLES_NOT_CONTENT
            if skipped:
                walker.skip_subtree()
            text = None if skipped else element.text
        else:
            text = element.tail if element is not root else None
        if breaks and paragraph:
            whole = _squash("".join(paragraph))
            paragraph.clear()
            if whole:
                given += 1
                if given > MAX_PARAGRAPHS:
                    return
                yield whole
        if text:
            paragraph.append(text)
    if whole := _squash("".join(paragraph)):
        yield whole


def _squash(text: str) -> str:
    """Runs of whitespace as one space, control characters dropped."""
    return " ".join("".join(c for c in text if c.isprintable() or c.isspace()).split())


def summarize(paragraphs: Iterable[str]) -> str | None:
    """Whole paragraphs while under ``DESCRIPTION_MIN_CHARS``; past
    ``DESCRIPTION_MAX_CHARS``, cut at a word boundary with an ellipsis (as Synapse)."""
    taken: list[str] = []
    length = 0
    for paragraph in paragraphs:
        if length >= DESCRIPTION_MIN_CHARS:
            break
        paragraph = _squash(paragraph)
        if paragraph:
            taken.append(paragraph)
            length += len(paragraph) + 2
    description = "\n\n".join(taken)
    if len(description) <= DESCRIPTION_MAX_CHARS:
        return description or None
    cut = ""
    for word in _words_with_spacing(description):
        if len(cut) + len(word) < DESCRIPTION_MAX_CHARS or len(cut) < DESCRIPTION_MIN_CHARS:
            cut += word
        else:
            break
    return cut[:DESCRIPTION_MAX_CHARS].strip() + "…"


def _words_with_spacing(text: str) -> Iterator[str]:
    """Each word with the spacing before it, so that joining them gives the text back."""
    start = 0
    index = 0
    length = len(text)
    while index < length:
        while index < length and text[index].isspace():
            index += 1
        while index < length and not text[index].isspace():
            index += 1
        yield text[start:index]
        start = index
