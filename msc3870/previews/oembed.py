"""oEmbed (oembed.com): which URLs a provider answers for, and its answer as Open Graph.

Providers are ``URL_PREVIEW_OEMBED_PROVIDERS``, in oembed.com's providers.json format (as
Synapse's ``oembed`` config). An endpoint's URL schemes are globs: ``*`` in the host
stands for one DNS label (``https://*.x.com/`` never matches ``https://evil.test/.x.com``),
elsewhere for anything. Only JSON is spoken.
"""

from __future__ import annotations

import html
import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlencode, urlsplit

from ..conf import app_settings
from .html import describe, media_source, parse_fragment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OEmbed:
    """An oEmbed answer as Open Graph fields, and its author (a title of last resort)."""

    og: dict[str, Any]
    author_name: str | None = None


def endpoint_for(url: str) -> str | None:
    """The oEmbed URL to ask instead of fetching ``url``, if a provider answers for it."""
    for pattern, endpoint in _patterns(json.dumps(app_settings.URL_PREVIEW_OEMBED_PROVIDERS)):
        if pattern.fullmatch(url):
            endpoint = endpoint.replace("{format}", "json")
            separator = "&" if "?" in endpoint else "?"
            return f"{endpoint}{separator}{urlencode({'url': url, 'format': 'json'})}"
    return None


@lru_cache(maxsize=4)
def _patterns(providers_json: str) -> tuple[tuple[re.Pattern[str], str], ...]:
    """(scheme pattern, endpoint URL) of every JSON endpoint (compiled once per list)."""
    found: list[tuple[re.Pattern[str], str]] = []
    for provider in json.loads(providers_json):
        for endpoint in provider.get("endpoints", []):
            url = endpoint.get("url", "")
            formats = endpoint.get("formats")
            if (formats and "json" not in formats) or url.endswith(".xml"):
                continue  # XML only
            for scheme in endpoint.get("schemes", []):
                pattern = _glob(scheme)
                if pattern is not None:
                    found.append((pattern, url))
    return tuple(found)


def _glob(scheme: str) -> re.Pattern[str] | None:
    parts = urlsplit(scheme)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        log.warning("Ignoring the oEmbed URL scheme %r: not an http(s) URL", scheme)
        return None
    host = re.escape(parts.netloc).replace(r"\*", "[A-Za-z0-9_-]+")
    rest = re.escape(scheme[len(parts.scheme) + 3 + len(parts.netloc) :]).replace(r"\*", ".+")
    return re.compile(f"{parts.scheme}://{host}{rest}")


def parse(url: str, body: bytes) -> OEmbed:
    """An oEmbed answer (``body``, JSON: UTF-8 by its spec) for the page ``url`` as Open
    Graph, as Synapse reads it; nothing if it is not an oEmbed 1.0 answer."""
    try:
        answer = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return OEmbed({})
    if not isinstance(answer, dict) or answer.get("version", "1.0") not in ("1.0", 1, 1.0):
        return OEmbed({})
    og: dict[str, Any] = {"og:url": url}
    title = _text(answer, "title")
    if title:
        # A common WordPress plug-in escapes entities in its answers.
        og["og:title"] = html.unescape(title)
    site = _text(answer, "provider_name")
    if site:
        og["og:site_name"] = site
    thumbnail = _text(answer, "thumbnail_url")
    if thumbnail:
        og["og:image"] = thumbnail
    kind = answer.get("type")
    if kind in ("rich", "video"):
        markup = _text(answer, "html")
        if markup:
            _from_markup(og, markup)
        if kind == "video":
            og["og:type"] = "video.other"
            for size in ("width", "height"):
                value = answer.get(size)
                if isinstance(value, int) and not isinstance(value, bool):
                    og[f"og:video:{size}"] = value
    elif kind == "photo":
        # The photo itself rather than its thumbnail.
        photo = _text(answer, "url")
        if photo:
            og["og:image"] = photo
    elif kind == "link":
        og["og:type"] = "website"
    return OEmbed(og, _text(answer, "author_name"))


def _text(answer: dict[str, Any], key: str) -> str | None:
    value = answer.get(key)
    return value.strip() or None if isinstance(value, str) else None


def _from_markup(og: dict[str, Any], markup: str) -> None:
    """What the embed's HTML shows: its first image (if the answer has no thumbnail), its
    video or embed, and its text."""
    fragment = parse_fragment(markup)
    if fragment is None:
        return
    if "og:image" not in og:
        image = media_source(fragment, "img")
        if image:
            og["og:image"] = image
    video = media_source(fragment, "video") or media_source(fragment, "embed")
    if video:
        og["og:video"] = video
    description = describe(fragment)
    if description:
        og["og:description"] = description
