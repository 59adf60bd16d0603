"""The media requests of the two admin web UIs, replayed against the real server: gunicorn
with two workers on PostgreSQL, a celery worker on Redis, SeaweedFS, as deployed.

Neither UI is on a package registry here, so this sends what their sources send, read
from synapse-admin (github.com/Awesome-Technologies/synapse-admin at 9129f3f3b8ba) and
ketesa (github.com/etkecc/ketesa at 85da7bfaccd4). Both are react-admin apps: the
``Authorization: Bearer`` token and ``Accept: application/json`` on every request
(react-admin's ``fetchUtils.fetchJson``), ``Content-Type: application/json`` with a body,
and an ``Origin`` (they run on an origin of their own); list pages are asked for as
``from = (page - 1) * perPage`` and ``limit = perPage``, the UIs never follow
``next_token``, and ``dir`` is ``b`` for a descending sort.

synapse-admin:

- ``GET /_synapse/admin/v1/users/{user_id}/media?from&limit&order_by&dir``: the user's
  media tab (``src/synapse/dataProvider.ts:457``, the ``users_media`` reference; query
  built by ``getManyReference``, lines 742-758; ``src/resources/users.tsx:268-269``:
  50 per page, ``created_ts`` descending; a column's header sorts by its ``source``).
- ``DELETE /_synapse/admin/v1/media/{home_server}/{media_id}``: a row's delete button
  (``dataProvider.ts:462``, sent by ``deleteResource``, lines 659-670, no body).
- ``POST /_synapse/admin/v1/media/protect/{media_id}`` and ``POST .../unprotect/{id}``
  (``dataProvider.ts:468`` and ``:472``; ``createResource``, lines 642-655, no body).
- ``POST /_synapse/admin/v1/media/quarantine/{home_server}/{media_id}`` and
  ``POST .../unquarantine/...`` (``dataProvider.ts:480`` and ``:484``).
- ``GET /_synapse/admin/v1/statistics/users/media?from&limit&order_by&dir[&search_term]``
  (``dataProvider.ts:490``; ``getList``, lines 700-726;
  ``src/resources/user_media_statistics.tsx:41``: ``media_length`` descending; the search
  box is ``search_term``, line 30).
- ``POST /_synapse/admin/v1/media/{home_server}/delete?before_ts&size_gt&keep_profiles``:
  the "delete media" dialog (``dataProvider.ts:690-694``).
- ``GET /_matrix/media/v1/download/{server}/{media_id}?allow_redirect=true``: a media id's
  link, opened by the browser without a token (``src/synapse/synapse.ts:152``).
- ``GET /_matrix/media/r0/thumbnail/{server}/{media_id}?width=24&height=24&method=scale``:
  avatars as ``<img>`` (``dataProvider.ts:258``).

ketesa:

- ``GET /_synapse/admin/v1/users/{user_id}/media?from&limit&order_by&dir``
  (``src/providers/data/synapse.ts:190``; ``getManyReference`` in
  ``src/providers/data/index.ts:528-543``; ``src/resources/users/Edit.tsx:1340-1341``:
  10 per page, ``created_ts`` descending).
- ``DELETE /_synapse/admin/v1/media/{home_server}/{media_id}``: a row's delete button and
  the bulk delete (``synapse.ts:195``), and each of a room's local media, listed by the
  homeserver (``src/providers/data/synapse-actions.ts:473``; ``synapse.ts:154``).
- ``POST .../media/protect/{media_id}``, ``.../unprotect/{id}`` (``synapse.ts:201``,
  ``:206``), ``.../media/quarantine/{home_server}/{media_id}``, ``.../unquarantine/...``
  (``synapse.ts:214``, ``:219``); no body (``index.ts:642-652``).
- ``GET /_synapse/admin/v1/statistics/users/media?from&limit&search_term&order_by&dir``
  (``synapse.ts:247``; ``index.ts:214-230``, ``buildSynapseListQuery``;
  ``src/resources/statistics/UserMedia.tsx:100-101``: ``media_length`` descending, 50 per
  page).
- ``POST /_synapse/admin/v1/media/delete?before_ts&size_gt&keep_profiles``
  (``synapse-actions.ts:28``).
- ``POST /_synapse/admin/v1/purge_media_cache?before_ts`` (``synapse-actions.ts:38``).
- ``POST /_synapse/admin/v1/user/{user_id}/media/quarantine`` with body ``{}``
  (``synapse-actions.ts:502``).
- ``DELETE /_synapse/admin/v1/users/{user_id}/media``, bare: "delete all media"
  (``synapse-actions.ts:547``).
- ``GET /_matrix/client/v1/media/thumbnail/{server}/{id}?width=320&height=240&method=scale``
  and ``GET /_matrix/client/v1/media/download/{server}/{id}?admin_unsafely_bypass_quarantine=true``,
  with the token (``src/utils/fetchMedia.ts:31`` and ``:33``).

User ids in paths are ``encodeURIComponent``-ed (``%40``, ``%3A``). The room requests
(``room/{room_id}/media``, ``.../media/quarantine``) stay with the homeserver.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import pytest
import requests
from django.utils import timezone
from PIL import Image

from msc3870.models import Media, MediaState, ModerationRecord, UploadMethod

from ..helpers import bearer, wait_until
from .conftest import Stack, base_env, make_user_token

pytestmark = pytest.mark.services

S = MediaState
ADMIN = "@admin:localhost"
ORIGIN = "https://admin.example"
# Small, so that bulk actions cross requests and tasks here.
SHARE = 5
OLD = timezone.now() - timedelta(days=400)


@pytest.fixture(scope="module")
def server(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("admin-api")
    running = Stack(
        env=base_env(tmp, MSC3870_ADMINS=ADMIN, MSC3870_ADMIN_API_ITEMS_PER_REQUEST=str(SHARE)),
        logs=tmp,
    )
    try:
        running.start_server(workers=2)
        running.start_worker()
        yield running
    finally:
        running.stop_all()


class UI:
    """What a react-admin UI sends: its headers, on the base URL the admin logged in to."""

    def __init__(self, stack: Stack, token: str) -> None:
        self.base = stack.base_url
        self.token = token

    def headers(self, body: bool = False) -> dict[str, str]:
        headers = {**bearer(self.token), "Accept": "application/json", "Origin": ORIGIN}
        if body:
            headers["Content-Type"] = "application/json"
        return headers

    def send(self, method: str, path: str, body: str | None = None) -> Any:
        response = requests.request(
            method,
            self.base + path,
            data=body,
            headers=self.headers(body is not None),
            timeout=60,
        )
        # The browser reads the answer only with CORS; errors are Matrix JSON.
        assert response.headers.get("Access-Control-Allow-Origin") == "*", (path, response.text)
        assert response.headers["Content-Type"] == "application/json", (path, response.text)
        assert response.status_code == 200, (method, path, response.status_code, response.text)
        return response.json()

    def pages(self, path: str, key: str, per_page: int, field: str, order: str) -> list[str]:
        """Every page as the UI walks them: offsets it computes, the total it is told."""
        seen: list[str] = []
        total = None
        page = 1
        while total is None or page <= math.ceil(total / per_page):
            query = f"from={(page - 1) * per_page}&limit={per_page}&order_by={field}"
            body = self.send("GET", f"{path}?{query}&dir={'b' if order == 'DESC' else 'f'}")
            total = body["total"]
            seen += [item.get("media_id") or item["user_id"] for item in body[key]]
            page += 1
        assert len(seen) == total
        return seen


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (seed % 256, 90, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def upload(stack: Stack, token: str, data: bytes, name: str = "cat.png") -> Media:
    response = requests.post(
        f"{stack.base_url}/_matrix/media/v3/upload?filename={name}",
        data=data,
        headers={**bearer(token), "Content-Type": "image/png"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    server_name, media_id = response.json()["content_uri"][len("mxc://") :].split("/")
    return Media.objects.get(server_name=server_name, media_id=media_id)


def rows(user_id: str, count: int, prefix: str, **fields: Any) -> list[Media]:
    """Media rows beside the uploads, for lists longer than a page (bytes not needed: a
    missing object counts as deleted)."""
    now = timezone.now()
    return Media.objects.bulk_create(
        Media(
            **{
                "server_name": "localhost",
                "media_id": f"{prefix}{n:03d}",
                "user_id": user_id,
                "state": S.COMPLETE,
                "unused_expires_at": now,
                "upload_method": UploadMethod.POST,
                "content_type": "image/png",
                "size": 1000 + n % 4,
                "storage_key": f"media/{prefix}/{n:03d}",
                "created_at": now - timedelta(minutes=n % 7),
                **fields,
            }
        )
        for n in range(count)
    )


def state(media: Media) -> str:
    return Media.objects.get(pk=media.pk).state


def admin_records() -> set[str]:
    return set(ModerationRecord.objects.values_list("actor", flat=True))


def encoded(user_id: str) -> str:
    return quote(user_id, safe="")  # encodeURIComponent


def test_synapse_admin_media_pages(server: Stack, transactional_db: None) -> None:
    ui = UI(server, make_user_token(ADMIN))
    alice = "@alice:localhost"
    token = make_user_token(alice)
    uploaded = [upload(server, token, png(n)) for n in range(4)]
    rows(alice, 57, "sa")  # 61 in all: two pages of 50
    rows("@bob:localhost", 3, "sb")
    media_path = f"/_synapse/admin/v1/users/{encoded(alice)}/media"

    # The media tab, then a sort by each column the table shows: every page, no repeats.
    listed = ui.pages(media_path, "media", 50, "created_ts", "DESC")
    assert len(set(listed)) == 61
    assert set(listed) >= {m.media_id for m in uploaded}
    for field in ("media_id", "last_access_ts", "media_length", "media_type", "upload_name"):
        for order in ("ASC", "DESC"):
            assert sorted(ui.pages(media_path, "media", 50, field, order)) == sorted(listed)
    first = ui.send("GET", f"{media_path}?from=0&limit=50&order_by=created_ts&dir=b")["media"][0]
    assert {"media_id", "created_ts", "last_access_ts", "media_length", "media_type"} <= set(first)
    assert {"upload_name", "quarantined_by", "safe_from_quarantine"} <= set(first)

    # The buttons of one row.
    target = uploaded[0]
    home_server = "localhost"
    assert ui.send("POST", f"/_synapse/admin/v1/media/protect/{target.media_id}") == {}
    assert Media.objects.get(pk=target.pk).protected
    assert ui.send("POST", f"/_synapse/admin/v1/media/unprotect/{target.media_id}") == {}
    path = f"{home_server}/{target.media_id}"
    assert ui.send("POST", f"/_synapse/admin/v1/media/quarantine/{path}") == {}
    assert state(target) == S.QUARANTINED
    link = f"{server.base_url}/_matrix/media/v1/download/{path}?allow_redirect=true"
    assert requests.get(link, timeout=30).status_code == 404  # quarantined, at once
    assert ui.send("POST", f"/_synapse/admin/v1/media/unquarantine/{path}") == {}
    assert state(target) == S.COMPLETE
    # Its link (a browser tab, no token) and an avatar-sized thumbnail.
    opened = requests.get(link, timeout=30)
    assert opened.status_code == 200 and opened.content == png(0)
    thumbnail = requests.get(
        f"{server.base_url}/_matrix/media/r0/thumbnail/{path}?width=24&height=24&method=scale",
        timeout=30,
    )
    assert thumbnail.status_code == 200 and thumbnail.headers["Content-Type"].startswith("image/")
    deleted = ui.send("DELETE", f"/_synapse/admin/v1/media/{path}")
    assert deleted == {"deleted_media": [target.media_id], "total": 1}
    assert requests.get(link, timeout=30).status_code == 404

    # Statistics, as the list opens and with the search box.
    stats = "/_synapse/admin/v1/statistics/users/media"
    users = ui.pages(stats, "users", 50, "media_length", "DESC")
    assert users == [alice, "@bob:localhost"]
    searched = ui.send("GET", f"{stats}?from=0&limit=50&search_term=bo&order_by=media_length&dir=b")
    assert [u["user_id"] for u in searched["users"]] == ["@bob:localhost"]

    # The "delete media" dialog: media not served for a year, any size, keeping avatars.
    stale = rows(alice, 12, "old", created_at=OLD)
    before = int((timezone.now() - timedelta(days=300)).timestamp() * 1000)
    answer = ui.send(
        "POST",
        f"/_synapse/admin/v1/media/{home_server}/delete"
        f"?before_ts={before}&size_gt=0&keep_profiles=true",
    )
    # A share in the request, the rest by the celery worker, a share per task.
    assert answer["total"] == SHARE and len(answer["deleted_media"]) == SHARE
    wait_until(lambda: all(state(m) == S.DELETED for m in stale), 60, "the queued rest")
    assert all(state(m) == S.COMPLETE for m in uploaded[1:])
    assert ADMIN in admin_records()


def test_ketesa_media_pages(server: Stack, transactional_db: None) -> None:
    ui = UI(server, make_user_token(ADMIN))
    carol = "@carol:localhost"
    token = make_user_token(carol)
    uploaded = [upload(server, token, png(100 + n), f"c{n}.png") for n in range(3)]
    copy = upload(server, make_user_token("@dan:localhost"), png(100))  # the same bytes
    rows(carol, 24, "kc")  # 27 in all: three pages of 10
    media_path = f"/_synapse/admin/v1/users/{encoded(carol)}/media"

    listed = ui.pages(media_path, "media", 10, "created_ts", "DESC")
    assert len(set(listed)) == 27

    # Media previews: a thumbnail, and the original despite a quarantine (admins only).
    target = uploaded[1]
    path = f"localhost/{target.media_id}"
    assert ui.send("POST", f"/_synapse/admin/v1/media/quarantine/{path}") == {}
    thumbnail = requests.get(
        f"{server.base_url}/_matrix/client/v1/media/thumbnail/{path}"
        "?width=320&height=240&method=scale",
        headers=bearer(ui.token),
        timeout=30,
    )
    assert thumbnail.status_code == 404  # quarantined: only the original is bypassed
    original = f"{server.base_url}/_matrix/client/v1/media/download/{path}"
    bypass = original + "?admin_unsafely_bypass_quarantine=true"
    shown = requests.get(bypass, headers=bearer(ui.token), timeout=30)
    assert shown.status_code == 200 and shown.content == png(101)
    refused = requests.get(bypass, headers=bearer(token), timeout=30)
    assert (refused.status_code, refused.json()["errcode"]) == (400, "M_UNKNOWN")
    assert ui.send("POST", f"/_synapse/admin/v1/media/unquarantine/{path}") == {}
    assert requests.get(original, headers=bearer(token), timeout=30).status_code == 200
    assert ui.send("POST", f"/_synapse/admin/v1/media/protect/{uploaded[2].media_id}") == {}

    stats = ui.pages(
        "/_synapse/admin/v1/statistics/users/media", "users", 50, "media_length", "DESC"
    )
    assert stats[0] == carol and "@dan:localhost" in stats

    # "Quarantine all media" of the user (body {}), a share per request and task, and the
    # other user's copy of the same bytes too, as Synapse.
    quarantined = ui.send(
        "POST", f"/_synapse/admin/v1/user/{encoded(carol)}/media/quarantine", "{}"
    )
    assert quarantined["num_quarantined"] >= SHARE
    wait_until(
        lambda: not Media.objects.filter(user_id=carol, state=S.COMPLETE, protected=False).exists(),
        60,
        "the queued rest of the quarantine",
    )
    assert state(uploaded[2]) == S.COMPLETE  # protected
    assert state(copy) == S.QUARANTINED

    # "Delete all media": a bare DELETE, the 100 newest (here a share of them).
    answer = ui.send("DELETE", f"/_synapse/admin/v1/users/{encoded(carol)}/media")
    assert answer["total"] == SHARE
    newest = [item for item in listed[:SHARE]]
    assert answer["deleted_media"] == newest
    # A row's delete button, and the bulk delete (one DELETE each).
    for media_id in listed[SHARE : SHARE + 3]:
        assert ui.send("DELETE", f"/_synapse/admin/v1/media/localhost/{media_id}")["total"] == 1

    # Server maintenance: delete old local media, purge the remote cache.
    stale = rows(carol, 7, "ko", created_at=OLD)
    before = int((timezone.now() - timedelta(days=300)).timestamp() * 1000)
    answer = ui.send(
        "POST", f"/_synapse/admin/v1/media/delete?before_ts={before}&size_gt=0&keep_profiles=true"
    )
    assert answer["total"] == SHARE
    wait_until(lambda: all(state(m) == S.DELETED for m in stale), 60, "the queued rest")
    cached = Media.objects.bulk_create(
        Media(
            server_name="remote.example",
            media_id=f"r{n:03d}",
            user_id="",
            state=S.COMPLETE,
            unused_expires_at=OLD,
            upload_method=UploadMethod.REMOTE,
            size=10,
            storage_key=f"remote/remote.example/r{n:03d}",
            created_at=OLD,
            last_accessed_at=OLD,
        )
        for n in range(8)
    )
    answer = ui.send("POST", f"/_synapse/admin/v1/purge_media_cache?before_ts={before}")
    assert answer == {"deleted": SHARE}
    wait_until(
        lambda: not Media.objects.filter(pk__in=[m.pk for m in cached]).exists(),
        60,
        "the queued rest of the purge",
    )
    assert ADMIN in admin_records()


def test_only_admins_and_errors_in_matrix_json(server: Stack, transactional_db: None) -> None:
    user = make_user_token("@eve:localhost")
    path = f"{server.base_url}/_synapse/admin/v1/users/{encoded('@eve:localhost')}/media"
    anonymous = requests.get(path, headers={"Origin": ORIGIN}, timeout=30)
    assert (anonymous.status_code, anonymous.json()["errcode"]) == (401, "M_MISSING_TOKEN")
    assert anonymous.headers["Access-Control-Allow-Origin"] == "*"
    refused = requests.get(path, headers=bearer(user), timeout=30)
    assert (refused.status_code, refused.json()["errcode"]) == (403, "M_FORBIDDEN")
    preflight = requests.options(
        path,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "DELETE",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
        timeout=30,
    )
    assert preflight.status_code == 200
    assert "DELETE" in preflight.headers["Access-Control-Allow-Methods"]
    admin = make_user_token(ADMIN)
    for bad in ("users/eve/media", "media/localhost/a%24b", "media/delete"):
        response = requests.get(
            f"{server.base_url}/_synapse/admin/v1/{bad}", headers=bearer(admin), timeout=30
        )
        assert response.status_code in (400, 405), (bad, response.text)
        assert response.json()["errcode"] in ("M_INVALID_PARAM", "M_UNRECOGNIZED")
