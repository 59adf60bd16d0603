"""On PostgreSQL: every query the console's list, search and dashboard make reads an
index, never the whole media table (EXPLAIN of the admin's own querysets, on 20,000
rows seeded with generate_series and analysed, as ``bench/console_bench.py`` seeds)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.admin.sites import site
from django.contrib.auth.models import User
from django.db import connection
from django.test import RequestFactory

from msc3870 import dashboard
from msc3870.models import Media, MediaState, ModerationRecord

pytestmark = pytest.mark.services

S = MediaState
ROWS = 20_000
USERS = 200

SEED = f"""
INSERT INTO msc3870_media (
    server_name, media_id, user_id, state, created_at, state_changed_at, unused_expires_at,
    upload_method, declared_content_type, sniffed_content_type, content_type, filename,
    size, sha256, prefix_sha256, storage_key, attempts, rejection_errcode, rejection_reason,
    last_error, moderated_by, protected
)
SELECT
    'localhost',
    'm' || lpad(n::text, 8, '0'),
    '@user' || (n % {USERS}) || ':localhost',
    CASE WHEN n % 500 = 0 THEN 'quarantined' WHEN n % 250 = 0 THEN 'rejected'
         ELSE 'complete' END,
    now() - (n || ' seconds')::interval,
    now() - (n || ' seconds')::interval,
    now() + interval '1 day',
    'post', 'image/png', 'image/png', 'image/png',
    CASE WHEN n % 1000 = 7 THEN 'holiday-beach-' || n || '.png' ELSE 'photo-' || n || '.png' END,
    1000 + n,
    md5(n::text) || md5((n + 1)::text),
    '',
    'local/m' || n,
    0, '', '', '', '', false
FROM generate_series(1, {ROWS}) AS n
"""
# Moderation records of a quarter of them (inserts: the table is append-only).
SEED_RECORDS = """
INSERT INTO msc3870_moderationrecord (
    media_id, mxc_uri, actor, action, reason, state_before, state_after, at
)
SELECT id, 'mxc://localhost/' || media_id, 'mod', CASE WHEN id % 8 = 0 THEN 'reject'
       ELSE 'quarantine' END, 'seeded', 'complete', 'quarantined', created_at
FROM msc3870_media WHERE id % 4 = 0
"""


@pytest.fixture
def seeded(transactional_db: None) -> Iterator[None]:
    with connection.cursor() as cursor:
        cursor.execute(SEED)
        cursor.execute(SEED_RECORDS)
        cursor.execute("ANALYZE msc3870_media")
        cursor.execute("ANALYZE msc3870_moderationrecord")
    yield


def changelist(query: dict[str, str]) -> Any:
    """The admin's change list for this query string, as a moderator's request makes it."""
    # A superuser: transactional tests empty the tables, the Moderators group with them.
    user = User.objects.create_superuser(f"mod{User.objects.count()}", "", "pw")
    request = RequestFactory().get("/admin/msc3870/media/", query)
    request.user = user
    return site._registry[Media].get_changelist_instance(request)


def plan_nodes(queryset: Any) -> list[dict[str, Any]]:
    plan = json.loads(queryset.explain(format="json"))[0]["Plan"]
    nodes = []

    def walk(node: dict[str, Any]) -> None:
        nodes.append(node)
        for child in node.get("Plans", []):
            walk(child)

    walk(plan)
    return nodes


def assert_reads_by_index(queryset: Any, *indexes: str) -> None:
    """No sequential scan anywhere in the plan, and one of ``indexes`` read."""
    nodes = plan_nodes(queryset)
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], nodes
    used = {n["Index Name"] for n in nodes if "Index Name" in n}
    assert used & set(indexes), (indexes, used)


def page_and_count(cl: Any) -> list[Any]:
    """The page's query and the count's (a LIMIT the paginator counts up to)."""
    return [cl.paginator.page(1).object_list, cl.paginator.object_list[: cl.paginator.count_limit]]


@pytest.mark.parametrize(
    "query, index",
    [
        ({}, "msc3870_created"),
        ({"q": "mxc://localhost/m00012345"}, "msc3870_unique_mxc"),
        ({"q": "@user7:localhost"}, ("msc3870_user_created", "msc3870_user_state")),
        ({"uploader": "@user7:localhost"}, ("msc3870_user_created", "msc3870_user_state")),
        ({"q": "{sha256 of m00000005}"}, "msc3870_sha256"),
        ({"q": "beach"}, "msc3870_filename_trgm"),
        ({"state__exact": "quarantined"}, "msc3870_state_created"),
        ({"type": "image"}, "msc3870_created"),
    ],
    ids=[
        "list",
        "mxc",
        "uploader-search",
        "uploader-filter",
        "sha256",
        "filename",
        "state",
        "type",
    ],
)
def test_the_list_and_its_searches_read_indexes(
    seeded: None, query: dict[str, str], index: str | tuple[str, ...]
) -> None:
    if query.get("q") == "{sha256 of m00000005}":
        query = {"q": Media.objects.get(media_id="m00000005").sha256}
    cl = changelist(query)
    assert cl.result_count > 0
    for queryset in page_and_count(cl):
        assert_reads_by_index(queryset, *([index] if isinstance(index, str) else index))


def test_the_filename_search_finds_by_trigrams(seeded: None) -> None:
    cl = changelist({"q": "BEACH"})
    names = [media.filename for media in cl.paginator.page(1).object_list]
    assert names and all("beach" in name for name in names)
    assert len(names) == ROWS // 1000


def test_the_dashboards_live_queries_read_indexes(seeded: None) -> None:
    assert_reads_by_index(
        Media.objects.filter(state=S.REJECTED, moderated_by="").order_by("-created_at", "-id")[
            : dashboard.RECENT
        ],
        "msc3870_state_created",
    )
    assert_reads_by_index(
        Media.objects.filter(state=S.PROCESSING).order_by()[: dashboard.BACKLOG_CAP + 1],
        "msc3870_state_expiry",
        "msc3870_state_created",
    )
    assert_reads_by_index(
        ModerationRecord.objects.filter(action="reject").order_by("-at", "-pk")[: dashboard.RECENT],
        "msc3870_modrec_action",
        "msc3870_modrec_at",
    )
    live = dashboard.live()
    assert len(live.check_rejections) == dashboard.RECENT
