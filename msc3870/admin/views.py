"""What the console's own views answer: a media's preview and bytes for moderators, and
the dashboard's figures.

Moderators see media in the states they judge (quarantined too, which every public path
answers 404 for) through these admin-only views, never through the public download
endpoints nor an unsigned bucket URL: previews are the app's own thumbnails (made once,
kept in storage), streamed; the bytes themselves are a short-lived signed storage URL
where the store has them, else streamed with ranges (video seeks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse

from .. import dashboard, thumbnails
from ..api.headers import add_security_headers, content_disposition, served_content_type
from ..api.responses import Servable, serve
from ..content_types import base_type
from ..errors import MatrixError
from ..models import Media, MediaState
from ..schedule import DEFAULT_SCHEDULE
from ..stores import get_store
from .listing import LARGE_PREVIEW_SIZE, PREVIEW_SIZE, family, icon_kind, icon_svg

# A signed URL of the bytes for a moderator lives this long: enough for the page to load
# it, not to be passed around.
SIGNED_URL_SECONDS = 60
# Previews stay in the moderator's own browser cache a while (not shared caches).
PREVIEW_CACHE = "private, max-age=300"
NO_STORE = "private, no-store"
# Text shown on a media's page at most; the rest is a download.
TEXT_PREVIEW_BYTES = 64 * 1024
TEXT_TYPES = frozenset(
    {"application/json", "application/xml", "application/x-yaml", "application/yaml"}
)


def icon_response(kind: str) -> HttpResponse:
    response = HttpResponse(icon_svg(kind), content_type="image/svg+xml")
    response["Cache-Control"] = PREVIEW_CACHE
    return add_security_headers(response)


def preview(media: Media, *, large: bool) -> HttpResponseBase:
    """The media's stored thumbnail (made on first use), or its type's icon where there
    is none (not an image, too large to thumbnail, bytes gone, storage down)."""
    width, height, method = LARGE_PREVIEW_SIZE if large else PREVIEW_SIZE
    try:
        thumbnail = thumbnails.thumbnail(media, width, height, method)
    except (MatrixError, FileNotFoundError):
        return icon_response(icon_kind(media))
    response = StreamingHttpResponse(
        get_store().iter_bytes(thumbnail.key), content_type=thumbnail.content_type
    )
    response["Content-Length"] = str(thumbnail.size)
    response["Cache-Control"] = PREVIEW_CACHE
    return add_security_headers(response)


def content(media: Media, request: HttpRequest) -> HttpResponseBase:
    """The media's bytes: a signed URL valid ``SIGNED_URL_SECONDS`` where the store signs
    them, else streamed here (with ranges); the download headers of the public paths
    (sandboxed, not sniffed, attachment for types a browser should not render)."""
    store = get_store()
    content_type = served_content_type(media.content_type)
    response: HttpResponseBase
    if store.can_redirect:
        url = store.download_url(
            media.storage_key,
            content_type=content_type,
            disposition=content_disposition(content_type, media.filename or None),
            lifetime=SIGNED_URL_SECONDS,
            cache_control=NO_STORE,
        )
        if url:
            response = HttpResponse(status=307)
            response["Location"] = url
            response["Cache-Control"] = NO_STORE
            return add_security_headers(response)
    response = serve(
        Servable.of_media(media, None),
        range_header=request.headers.get("Range"),
        if_none_match=None,
        allow_redirect=False,
        public_cache=False,
    )
    response["Cache-Control"] = NO_STORE
    return response


@dataclass(frozen=True)
class Showing:
    """How a media's page shows its bytes."""

    kind: str  # "image", "video", "audio", "text", "other", "none"
    text: str = ""
    truncated: bool = False
    error: str = ""


def showing(media: Media, viewable: bool, thumbnailable: bool) -> Showing:
    if not viewable:
        return Showing("none")
    kind = family(media.content_type)
    base = base_type(media.content_type)
    if kind == "image" and not thumbnailable and base != "image/svg+xml":
        return Showing("other")  # too large or not decodable here: a link to the bytes
    if kind == "text" or base in TEXT_TYPES:
        try:
            head = get_store().read_prefix(media.storage_key, TEXT_PREVIEW_BYTES + 1)
        except (MatrixError, FileNotFoundError) as exc:
            return Showing("text", error=f"The bytes cannot be read now ({type(exc).__name__}).")
        return Showing(
            "text",
            text=head[:TEXT_PREVIEW_BYTES].decode("utf-8", errors="replace"),
            truncated=len(head) > TEXT_PREVIEW_BYTES,
        )
    return Showing(kind)


# ---------------------------------------------------------------------- dashboard

ROLLUP_SECONDS = dict(DEFAULT_SCHEDULE.values())["msc3870.rollup_dashboard"]
CHART_DAY_WIDTH = 22
CHART_HEIGHT = 160


def chart(per_day: list[dict[str, Any]]) -> dict[str, Any]:
    """Bars of uploads per day (and the part the checks refused), drawn as SVG by the
    template: thirty bars need no charting library."""
    top = max((day["uploads"] for day in per_day), default=0) or 1
    bars = []
    for index, day in enumerate(per_day):
        height = round(day["uploads"] / top * CHART_HEIGHT)
        rejected = round(day["rejected"] / top * CHART_HEIGHT)
        bars.append(
            {
                **day,
                "x": index * CHART_DAY_WIDTH,
                "y": CHART_HEIGHT - height,
                "height": height,
                "rejected_y": CHART_HEIGHT - rejected,
                "rejected_height": rejected,
            }
        )
    return {
        "bars": bars,
        "width": CHART_DAY_WIDTH * len(per_day),
        "height": CHART_HEIGHT,
        "bar_width": CHART_DAY_WIDTH - 4,
        "top": top,
    }


def dashboard_context() -> dict[str, Any]:
    snapshot = dashboard.snapshot()
    figures = snapshot.figures if snapshot is not None else {}
    states = figures.get("states", {})
    # In the state machine's order (the stored JSON keeps no order).
    rows = [
        {
            "state": state,
            "local": states[state].get("local", {}),
            "remote": states[state].get("remote", {}),
        }
        for state in MediaState.values
        if state in states
    ]
    return {
        "snapshot": snapshot,
        "state_rows": rows,
        "stored_bytes": figures.get("stored_bytes", {}),
        "chart": chart(figures.get("per_day", [])),
        "top_uploaders": figures.get("top_uploaders_week", []),
        "live": dashboard.live(),
        "rollup_minutes": round(ROLLUP_SECONDS / 60),
    }
