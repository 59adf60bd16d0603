"""Synapse's media admin API (``/_synapse/admin/v1``): who may call it, each endpoint's
parameters, fields, pagination and errors as Synapse has them, every change through the
moderation service layer with the admin as actor, bulk work bounded per request, and
``admin_unsafely_bypass_quarantine`` on downloads. The requests the synapse-admin and
ketesa web UIs send are replayed on the real server in
``tests/services/test_admin_api_uis.py``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from django.test import Client
from django.utils import timezone

from msc3870 import moderation, synapse_admin
from msc3870.models import Media, MediaState, ModerationAction, ModerationRecord, UploadMethod
from msc3870.tasks import admin_bulk_task

from .conftest import MatrixClient, make_token, media_of, msc3870_settings, mxc_path, png_bytes
from .helpers import JSONHandler

S = MediaState
A = ModerationAction
ADMIN_ID = "@admin:localhost"
V1 = "/_synapse/admin/v1/"
OLD = 1_600_000_000_000  # 2020, in ms
LATER = 4_000_000_000_000  # 2096


@pytest.fixture
def admin(matrix_client: Callable[[str], MatrixClient]) -> Iterator[MatrixClient]:
    with msc3870_settings(ADMINS=[ADMIN_ID]):
        yield matrix_client(ADMIN_ID)


def upload(
    client: MatrixClient, data: bytes = b"content", content_type: str = "text/plain"
) -> Media:
    response = client.post("/_matrix/media/v3/upload?filename=a.txt", data, content_type)
    assert response.status_code == 200, response.content
    return media_of(response.json()["content_uri"])


def make_media(user_id: str, n: int, **fields: Any) -> Media:
    """A complete local media row (bytes not needed: a missing object counts as deleted)."""
    now = timezone.now()
    values: dict[str, Any] = {
        "server_name": "localhost",
        "media_id": f"m{n:04d}",
        "user_id": user_id,
        "state": S.COMPLETE,
        "unused_expires_at": now,
        "upload_method": UploadMethod.POST,
        "content_type": "image/png",
        "size": 100,
        "storage_key": f"media/x/m{n:04d}",
        "created_at": now,
        **fields,
    }
    return Media.objects.create(**values)


def make_remote(n: int, **fields: Any) -> Media:
    return make_media(
        "",
        n,
        server_name="remote.example",
        upload_method=UploadMethod.REMOTE,
        storage_key=f"remote/remote.example/m{n:04d}",
        **fields,
    )


def state(media: Media) -> str:
    return Media.objects.get(pk=media.pk).state


def records(media: Media) -> list[tuple[str, str, str]]:
    return [
        (r.action, r.state_after, r.actor)
        for r in ModerationRecord.objects.filter(media_id=media.pk).order_by("pk")
    ]


def call(client: MatrixClient, method: str, path: str) -> Any:
    return client.client.generic(
        method, V1 + path, b"", headers={"Authorization": f"Bearer {client.token}"}
    )


def error(response: Any) -> tuple[int, str]:
    return response.status_code, response.json()["errcode"]


# Every endpoint, as (method, path): each must refuse anyone but an admin.
ENDPOINTS = [
    ("GET", "users/@alice:localhost/media"),
    ("DELETE", "users/@alice:localhost/media"),
    ("GET", "media/localhost/abc"),
    ("DELETE", "media/localhost/abc"),
    ("POST", "media/quarantine/localhost/abc"),
    ("POST", "media/unquarantine/localhost/abc"),
    ("POST", "user/@alice:localhost/media/quarantine"),
    ("POST", "media/protect/abc"),
    ("POST", "media/unprotect/abc"),
    ("POST", f"media/delete?before_ts={OLD}"),
    ("POST", f"media/localhost/delete?before_ts={OLD}"),
    ("POST", f"purge_media_cache?before_ts={OLD}"),
    ("GET", "statistics/users/media"),
    # Malformed ids too: the caller learns nothing before it is known to be an admin.
    ("GET", "users/not-a-user/media"),
    ("GET", "media/bad_server/a$b"),
]


# ---------------------------------------------------------------------- who


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_every_endpoint_needs_a_token_then_an_admin(
    alice: MatrixClient, admin: MatrixClient, method: str, path: str
) -> None:
    anonymous = Client().generic(method, V1 + path)
    assert error(anonymous) == (401, "M_MISSING_TOKEN")
    assert anonymous["WWW-Authenticate"] == 'Bearer realm="matrix"'
    refused = call(alice, method, path)
    assert error(refused) == (403, "M_FORBIDDEN")
    assert refused.json()["error"] == "You are not a server admin"
    assert call(admin, method, path).status_code != 403


def test_application_services_and_guests_are_never_admins(db: None) -> None:
    """A bridge whose namespace matched an admin would otherwise be one."""
    bridge = make_token("@bridge:localhost", is_appservice=True, masquerade_regex="@.*:localhost")
    with msc3870_settings(ADMINS=[ADMIN_ID, "@bridge:localhost"]):
        for query in ("", f"?user_id={quote(ADMIN_ID)}"):
            response = Client().get(
                V1 + "statistics/users/media" + query,
                headers={"Authorization": f"Bearer {bridge}"},
            )
            assert error(response) == (403, "M_FORBIDDEN"), query


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "users/alice/media", (400, "M_INVALID_PARAM")),
        ("GET", "users/@alice:bad_server/media", (400, "M_INVALID_PARAM")),
        ("GET", "users/@alice:other.example/media", (400, "M_UNKNOWN")),  # not ours
        ("DELETE", "users/@alice:other.example/media", (400, "M_UNKNOWN")),
        ("POST", "user/alice/media/quarantine", (400, "M_INVALID_PARAM")),
        ("GET", "media/localhost/a$b", (400, "M_INVALID_PARAM")),
        ("GET", "media/bad_server/abc", (400, "M_INVALID_PARAM")),
        ("DELETE", "media/localhost/" + "x" * 65, (400, "M_INVALID_PARAM")),
        ("DELETE", "media/other.example/abc", (400, "M_UNKNOWN")),  # "Can only delete local"
        ("POST", "media/quarantine/localhost/a%20b", (400, "M_INVALID_PARAM")),
        ("POST", "media/unquarantine/a:b:c/abc", (400, "M_INVALID_PARAM")),
        ("POST", "media/protect/a.b", (400, "M_INVALID_PARAM")),
        ("GET", "media/localhost/unknown", (404, "M_NOT_FOUND")),
        ("GET", "media/other.example/unknown", (404, "M_NOT_FOUND")),
        ("DELETE", "media/localhost/unknown", (404, "M_NOT_FOUND")),
        ("POST", "media/localhost/abc", (405, "M_UNRECOGNIZED")),
        ("PUT", "media/localhost/abc", (405, "M_UNRECOGNIZED")),
        ("GET", "media/delete", (405, "M_UNRECOGNIZED")),
        ("GET", "rooms/!room:localhost/media", (404, "M_UNRECOGNIZED")),  # the homeserver's
        ("GET", "nothing/here", (404, "M_UNRECOGNIZED")),
    ],
)
def test_bad_ids_and_requests_are_matrix_errors_never_500(
    admin: MatrixClient, method: str, path: str, expected: tuple[int, str]
) -> None:
    response = call(admin, method, path)
    assert response["Content-Type"] == "application/json"
    assert error(response) == expected, response.content


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "users/@alice:localhost/media?from=-1", "M_INVALID_PARAM"),
        ("GET", "users/@alice:localhost/media?limit=ten", "M_INVALID_PARAM"),
        ("GET", "users/@alice:localhost/media?from=", "M_INVALID_PARAM"),
        ("GET", "users/@alice:localhost/media?order_by=size", "M_INVALID_PARAM"),
        ("GET", "users/@alice:localhost/media?dir=down", "M_INVALID_PARAM"),
        ("DELETE", "users/@alice:localhost/media?limit=-5", "M_INVALID_PARAM"),
        ("POST", "media/delete", "M_MISSING_PARAM"),
        ("POST", "media/delete?before_ts=1700000000", "M_INVALID_PARAM"),  # seconds, not ms
        ("POST", f"media/delete?before_ts={OLD}&size_gt=-1", "M_INVALID_PARAM"),
        ("POST", f"media/delete?before_ts={OLD}&keep_profiles=yes", "M_INVALID_PARAM"),
        ("POST", "media/localhost/delete", "M_MISSING_PARAM"),
        ("POST", f"media/other.example/delete?before_ts={OLD}", "M_UNKNOWN"),
        ("POST", "purge_media_cache", "M_MISSING_PARAM"),
        ("POST", "purge_media_cache?before_ts=-1", "M_INVALID_PARAM"),
        ("POST", "purge_media_cache?before_ts=1000", "M_INVALID_PARAM"),
        ("GET", "statistics/users/media?order_by=name", "M_INVALID_PARAM"),
        ("GET", "statistics/users/media?from_ts=10&until_ts=10", "M_INVALID_PARAM"),
        ("GET", "statistics/users/media?search_term=", "M_INVALID_PARAM"),
        ("GET", "statistics/users/media?dir=up", "M_INVALID_PARAM"),
    ],
)
def test_parameters_are_read_as_synapse_reads_them(
    admin: MatrixClient, method: str, path: str, expected: str
) -> None:
    assert error(call(admin, method, path)) == (400, expected)


# ---------------------------------------------------------------------- reading


LOCAL_MEDIA_FIELDS = {
    "media_id",
    "media_type",
    "media_length",
    "upload_name",
    "created_ts",
    "url_cache",
    "last_access_ts",
    "quarantined_by",
    "safe_from_quarantine",
    "user_id",
    "authenticated",
    "sha256",
}


def test_a_users_media_as_synapse_lists_it(alice: MatrixClient, admin: MatrixClient) -> None:
    first = upload(alice, b"first")
    second = upload(alice, b"second")
    pending = media_of(alice.create()["content_uri"])
    gone = upload(alice, b"gone")
    moderation.purge(gone, by=ADMIN_ID)  # Synapse has no row for deleted media
    moderation.quarantine(first, by="@mod:localhost")
    moderation.protect(second, by="@mod:localhost")
    Media.objects.filter(pk=first.pk).update(created_at=timezone.now() - timedelta(days=2))
    Media.objects.filter(pk=second.pk).update(created_at=timezone.now() - timedelta(days=1))

    body = call(admin, "GET", "users/@alice:localhost/media").json()

    assert body["total"] == 3 and "next_token" not in body
    # Newest first when neither order_by nor dir is given.
    assert [m["media_id"] for m in body["media"]] == [
        pending.media_id,
        second.media_id,
        first.media_id,
    ]
    assert all(set(m) == LOCAL_MEDIA_FIELDS for m in body["media"])
    listed = {m["media_id"]: m for m in body["media"]}
    fresh = Media.objects.get(pk=second.pk)
    assert fresh.sha256  # uploads through this server are hashed as they stream
    assert listed[second.media_id] == {
        "media_id": second.media_id,
        "media_type": "text/plain",
        "media_length": 6,
        "upload_name": "a.txt",
        "created_ts": int(fresh.created_at.timestamp() * 1000),
        "url_cache": None,
        "last_access_ts": None,
        "quarantined_by": None,
        "safe_from_quarantine": True,
        "user_id": "@alice:localhost",
        "authenticated": False,
        "sha256": fresh.sha256,
    }
    assert listed[first.media_id]["quarantined_by"] == "@mod:localhost"
    assert listed[pending.media_id]["media_length"] is None
    # Someone who never uploaded: an empty list (this server knows users by their media).
    assert call(admin, "GET", "users/@nobody:localhost/media").json() == {"media": [], "total": 0}


def fetch_all(admin: MatrixClient, path: str, key: str, limit: int, query: str = "") -> list[str]:
    """Every page, following next_token as the UIs do."""
    seen: list[str] = []
    start = 0
    for _ in range(100):
        body = call(admin, "GET", f"{path}?from={start}&limit={limit}{query}").json()
        seen += [item.get("media_id") or item["user_id"] for item in body[key]]
        if "next_token" not in body:
            return seen
        start = body["next_token"]
    raise AssertionError("pagination never ended")


@pytest.mark.parametrize("order_by", list(synapse_admin.USER_MEDIA_ORDERS))
@pytest.mark.parametrize("direction", ["f", "b"])
def test_pages_of_a_users_media_neither_repeat_nor_miss(
    admin: MatrixClient, order_by: str, direction: str
) -> None:
    """Over more items than a page, in every order: equal values (the same size, time,
    type, name, no access yet) are ordered by media id."""
    moment = timezone.now() - timedelta(days=1)
    for n in range(23):
        media = make_media(
            "@alice:localhost",
            n,
            size=100 + n % 3,
            created_at=moment + timedelta(seconds=n % 4),
            filename="same" if n % 2 else "",
            protected=n % 5 == 0,
        )
        if n % 6 == 0:
            moderation.quarantine(media, by=f"@mod{n % 2}:localhost")
    listed = fetch_all(
        admin, "users/@alice:localhost/media", "media", 5, f"&order_by={order_by}&dir={direction}"
    )
    assert len(listed) == 23 and len(set(listed)) == 23
    one_page = call(
        admin, "GET", f"users/@alice:localhost/media?limit=100&order_by={order_by}&dir={direction}"
    ).json()["media"]
    assert listed == [m["media_id"] for m in one_page]


def test_pages_are_the_size_asked_for_as_the_uis_count_on(admin: MatrixClient) -> None:
    """The UIs compute page offsets themselves (from = (page - 1) * perPage, pages of up
    to 1000): a page cut short would hide media. Only changes are bounded per request."""
    for n in range(7):
        make_media("@alice:localhost", n)
    with msc3870_settings(ADMINS=[ADMIN_ID], ADMIN_API_ITEMS_PER_REQUEST=3):
        body = call(admin, "GET", "users/@alice:localhost/media?limit=5").json()
        assert (len(body["media"]), body["total"], body["next_token"]) == (5, 7, 5)
        assert len(call(admin, "GET", "statistics/users/media?limit=1000").json()["users"]) == 1
        deleted = call(admin, "DELETE", "users/@alice:localhost/media?limit=5").json()
        assert deleted["total"] == 3
    # limit=0 answers an empty page that points at itself, as Synapse's does.
    body = call(admin, "GET", "users/@alice:localhost/media?limit=0&from=2").json()
    assert (body["media"], body["next_token"]) == ([], 2)


def test_media_info_of_local_and_remote_media(alice: MatrixClient, admin: MatrixClient) -> None:
    media = upload(alice, b"info")
    body = call(admin, "GET", f"media/{mxc_path(media.mxc_uri)}").json()
    assert set(body) == {"media_info"}
    info = body["media_info"]
    assert set(info) == LOCAL_MEDIA_FIELDS | {"media_origin", "filesystem_id"}
    assert (info["media_origin"], info["user_id"], info["media_length"]) == (
        None,
        "@alice:localhost",
        4,
    )
    remote = make_remote(1, last_accessed_at=timezone.now())
    info = call(admin, "GET", "media/remote.example/m0001").json()["media_info"]
    assert (info["media_origin"], info["user_id"], info["safe_from_quarantine"]) == (
        "remote.example",
        None,
        None,
    )
    assert info["media_length"] == 100 and info["last_access_ts"] is not None
    # A fetch that failed is not cached media.
    Media.objects.filter(pk=remote.pk).update(state=S.REJECTED, storage_key="")
    assert error(call(admin, "GET", "media/remote.example/m0001")) == (404, "M_NOT_FOUND")


def test_media_statistics_as_synapse_counts_them(db: None, admin: MatrixClient) -> None:
    day = timezone.now() - timedelta(days=10)
    n = 0
    for user, count, size in (
        ("@carol:localhost", 3, 10),
        ("@alice:localhost", 1, 500),
        ("@bob:localhost", 2, 50),
        ("@dave:localhost", 1, 7),
    ):
        for i in range(count):
            make_media(user, n, size=size, created_at=day + timedelta(days=i))
            n += 1
    make_media("@carol:localhost", 99, state=S.DELETED)  # no row in Synapse
    make_remote(98)  # other servers' media is nobody's upload here

    body = call(admin, "GET", "statistics/users/media").json()
    assert body == {
        "users": [
            {"user_id": u, "displayname": None, "media_count": c, "media_length": b}
            for u, c, b in (
                ("@alice:localhost", 1, 500),
                ("@bob:localhost", 2, 100),
                ("@carol:localhost", 3, 30),
                ("@dave:localhost", 1, 7),
            )
        ],
        "total": 4,
    }
    by_length = call(admin, "GET", "statistics/users/media?order_by=media_length&dir=b").json()
    assert [u["user_id"][1] for u in by_length["users"]] == ["a", "b", "c", "d"]
    searched = call(admin, "GET", "statistics/users/media?search_term=AR").json()
    assert [u["user_id"] for u in searched["users"]] == ["@carol:localhost"]
    # Only the server part matches: not found (the term is searched in the localpart).
    assert call(admin, "GET", "statistics/users/media?search_term=localhost").json()["total"] == 0
    since = int((day + timedelta(days=1)).timestamp() * 1000)
    windowed = call(admin, "GET", f"statistics/users/media?from_ts={since}").json()
    assert [(u["user_id"], u["media_count"]) for u in windowed["users"]] == [
        ("@bob:localhost", 1),
        ("@carol:localhost", 2),
    ]
    until = call(admin, "GET", f"statistics/users/media?until_ts={since - 1}").json()
    assert until["total"] == 4 and sum(u["media_count"] for u in until["users"]) == 4


@pytest.mark.parametrize("order_by", list(synapse_admin.STATISTICS_ORDERS))
@pytest.mark.parametrize("direction", ["f", "b"])
def test_pages_of_statistics_neither_repeat_nor_miss(
    admin: MatrixClient, order_by: str, direction: str
) -> None:
    """Many users with equal counts and sizes: Synapse orders by the column alone, and its
    pages can repeat and miss users; here equal values are ordered by user id."""
    n = 0
    for u in range(17):
        for _ in range(1 + u % 2):
            make_media(f"@user{u:02d}:localhost", n, size=10)
            n += 1
    users = fetch_all(
        admin, "statistics/users/media", "users", 4, f"&order_by={order_by}&dir={direction}"
    )
    assert len(users) == 17 and len(set(users)) == 17


# ---------------------------------------------------------------------- one item


def test_quarantine_by_id_quarantines_every_copy_and_unquarantine_releases_them(
    alice: MatrixClient, bob: MatrixClient, admin: MatrixClient
) -> None:
    """As Synapse since 1.128: by SHA-256, local and remote copies; protected media stays."""
    mine = upload(alice, b"the same bytes")
    theirs = upload(bob, b"the same bytes")
    protected = upload(bob, b"the same bytes")
    other = upload(alice, b"other bytes")
    moderation.protect(protected, by="@mod:localhost")
    sha256 = Media.objects.get(pk=mine.pk).sha256
    assert sha256 and Media.objects.get(pk=theirs.pk).sha256 == sha256
    remote = make_remote(1, sha256=sha256)

    response = call(admin, "POST", f"media/quarantine/{mxc_path(mine.mxc_uri)}")

    assert (response.status_code, response.json()) == (200, {})
    assert [state(m) for m in (mine, theirs, remote, protected, other)] == [
        S.QUARANTINED,
        S.QUARANTINED,
        S.QUARANTINED,
        S.COMPLETE,
        S.COMPLETE,
    ]
    assert records(theirs) == [(A.QUARANTINE, S.QUARANTINED, ADMIN_ID)]
    assert (
        alice.get(f"/_matrix/client/v1/media/download/{mxc_path(mine.mxc_uri)}").status_code == 404
    )
    # The same bytes uploaded again are refused while a copy is quarantined.
    again = alice.post("/_matrix/media/v3/upload", b"the same bytes", "text/plain")
    assert again.status_code == 403

    response = call(admin, "POST", f"media/unquarantine/{mxc_path(theirs.mxc_uri)}")
    assert (response.status_code, response.json()) == (200, {})
    assert [state(m) for m in (mine, theirs, remote)] == [S.COMPLETE] * 3
    assert records(theirs)[-1] == (A.APPROVE, S.COMPLETE, ADMIN_ID)


def test_quarantine_of_unknown_or_protected_media_answers_and_changes_nothing(
    alice: MatrixClient, admin: MatrixClient
) -> None:
    media = upload(alice, b"keep")
    assert call(admin, "POST", f"media/protect/{media.media_id}").json() == {}
    for path in (
        "media/quarantine/localhost/unknown",
        f"media/quarantine/{mxc_path(media.mxc_uri)}",
    ):
        response = call(admin, "POST", path)
        assert (response.status_code, response.json()) == (200, {})
    assert state(media) == S.COMPLETE
    assert call(admin, "POST", "media/unquarantine/localhost/unknown").json() == {}
    # Bytes never hashed (a URL upload with no possible twin) are quarantined alone.
    unique = make_media("@alice:localhost", 1)
    call(admin, "POST", f"media/quarantine/{mxc_path(unique.mxc_uri)}")
    assert state(unique) == S.QUARANTINED
    assert call(admin, "POST", f"media/unquarantine/{mxc_path(unique.mxc_uri)}").json() == {}
    assert state(unique) == S.COMPLETE


def test_protect_and_unprotect_local_media(alice: MatrixClient, admin: MatrixClient) -> None:
    media = upload(alice, b"sticker")
    assert call(admin, "POST", f"media/protect/{media.media_id}").json() == {}
    assert Media.objects.get(pk=media.pk).protected
    assert call(admin, "POST", f"media/unprotect/{media.media_id}").json() == {}
    assert not Media.objects.get(pk=media.pk).protected
    assert [r[0] for r in records(media)] == [A.PROTECT, A.UNPROTECT]
    assert all(r[2] == ADMIN_ID for r in records(media))
    assert call(admin, "POST", "media/protect/unknown").json() == {}
    # Remote media cannot be protected this way (Synapse's flag is local media's).
    remote = make_remote(2, media_id="abc")
    call(admin, "POST", "media/protect/abc")
    assert not Media.objects.get(pk=remote.pk).protected


def test_delete_one_media(alice: MatrixClient, admin: MatrixClient) -> None:
    media = upload(alice, b"delete me")
    response = call(admin, "DELETE", f"media/{mxc_path(media.mxc_uri)}")
    assert response.json() == {"deleted_media": [media.media_id], "total": 1}
    assert state(media) == S.DELETED
    assert records(media) == [(A.PURGE, S.DELETED, ADMIN_ID)]
    assert (
        alice.get(f"/_matrix/client/v1/media/download/{mxc_path(media.mxc_uri)}").status_code == 404
    )
    assert error(call(admin, "DELETE", f"media/{mxc_path(media.mxc_uri)}")) == (404, "M_NOT_FOUND")


# ---------------------------------------------------------------------- many items


def test_deleting_a_users_media_deletes_the_newest_page_by_default(admin: MatrixClient) -> None:
    """A bare DELETE deletes the 100 newest, as Synapse; the parameters pick another page."""
    moment = timezone.now() - timedelta(days=1)
    items = [
        make_media("@alice:localhost", n, created_at=moment + timedelta(minutes=n), size=n)
        for n in range(6)
    ]
    other = make_media("@bob:localhost", 50)
    response = call(admin, "DELETE", "users/@alice:localhost/media?limit=2")
    assert response.json() == {"deleted_media": ["m0005", "m0004"], "total": 2}
    response = call(admin, "DELETE", "users/@alice:localhost/media?order_by=media_length&limit=1")
    assert response.json() == {"deleted_media": ["m0000"], "total": 1}
    assert call(admin, "DELETE", "users/@alice:localhost/media").json()["total"] == 3
    assert {state(m) for m in items} == {S.DELETED}
    assert state(other) == S.COMPLETE
    assert all(records(m) == [(A.PURGE, S.DELETED, ADMIN_ID)] for m in items)


@pytest.mark.parametrize("path", ["media/delete", "media/localhost/delete"])
def test_delete_by_date_and_size(admin: MatrixClient, path: str) -> None:
    old = timezone.now() - timedelta(days=30)
    stale_big = make_media("@alice:localhost", 1, created_at=old, size=5000)
    stale_small = make_media("@alice:localhost", 2, created_at=old, size=10)
    served = make_media("@alice:localhost", 3, created_at=old, size=5000)
    served.last_accessed_at = timezone.now()
    served.save()
    protected = make_media("@alice:localhost", 4, created_at=old, size=5000, protected=True)
    quarantined = make_media("@alice:localhost", 5, created_at=old, size=5000)
    moderation.quarantine(quarantined, by="@mod:localhost")
    remote = make_remote(6, created_at=old, size=5000)
    before = int((timezone.now() - timedelta(days=1)).timestamp() * 1000)

    response = call(admin, "POST", f"{path}?before_ts={before}&size_gt=100&keep_profiles=false")

    assert response.json() == {"deleted_media": [stale_big.media_id], "total": 1}
    assert [state(m) for m in (stale_big, stale_small, served, protected, quarantined, remote)] == [
        S.DELETED,
        S.COMPLETE,
        S.COMPLETE,
        S.COMPLETE,
        S.QUARANTINED,
        S.COMPLETE,
    ]
    assert records(stale_big) == [(A.PURGE, S.DELETED, ADMIN_ID)]


def test_bulk_deletion_is_bounded_per_request_and_the_rest_is_queued(
    admin: MatrixClient, broker_sends: list[tuple[str, tuple[Any, ...], Any]]
) -> None:
    old = timezone.now() - timedelta(days=30)
    items = [make_media("@alice:localhost", n, created_at=old) for n in range(8)]
    with msc3870_settings(ADMINS=[ADMIN_ID], ADMIN_API_ITEMS_PER_REQUEST=3):
        body = call(admin, "POST", f"media/delete?before_ts={LATER}").json()
        # This request did its share, and queued the rest by task name.
        assert body["total"] == 3 and len(body["deleted_media"]) == 3
        assert sum(state(m) == S.DELETED for m in items) == 3
        runs = 0
        while broker_sends:
            name, args, kwargs = broker_sends.pop(0)
            if name == "msc3870.delete_objects_many":
                continue  # each share's objects, as for any purge
            assert name == "msc3870.admin_bulk" and kwargs is None
            assert args == ("delete_before", {"before_ts": LATER, "size_gt": 0, "by": ADMIN_ID})
            admin_bulk_task.apply(args=args)  # each run a share, queueing the next
            runs += 1
    assert {state(m) for m in items} == {S.DELETED}
    # 3 + 3 + 2: the third run found less than a share and stopped.
    assert runs == 2
    assert all(records(m) == [(A.PURGE, S.DELETED, ADMIN_ID)] for m in items)


def test_without_a_broker_the_rest_is_done_in_the_process(admin: MatrixClient) -> None:
    old = timezone.now() - timedelta(days=30)
    items = [make_remote(n, created_at=old, last_accessed_at=old) for n in range(5)]
    with msc3870_settings(ADMINS=[ADMIN_ID], ADMIN_API_ITEMS_PER_REQUEST=2):
        body = call(admin, "POST", f"purge_media_cache?before_ts={LATER}").json()
    assert body == {"deleted": 2}
    # The queued rest ran on this process's background work (here, at once).
    assert not Media.objects.filter(pk__in=[m.pk for m in items]).exists()


def test_purge_remote_cache(admin: MatrixClient) -> None:
    old = timezone.now() - timedelta(days=30)
    stale = make_remote(1, last_accessed_at=old)
    fresh = make_remote(2, last_accessed_at=timezone.now())
    held = make_remote(3, last_accessed_at=old)
    moderation.quarantine(held, by="@mod:localhost")
    local = make_media("@alice:localhost", 4, created_at=old)
    before = int((timezone.now() - timedelta(days=1)).timestamp() * 1000)
    assert call(admin, "POST", f"purge_media_cache?before_ts={before}").json() == {"deleted": 1}
    assert not Media.objects.filter(pk=stale.pk).exists()  # fetched again on the next request
    assert [state(m) for m in (fresh, held, local)] == [S.COMPLETE, S.QUARANTINED, S.COMPLETE]


def test_quarantine_a_users_media(
    alice: MatrixClient, bob: MatrixClient, admin: MatrixClient
) -> None:
    """Protected media stays; other users' copies of the same bytes go too, as Synapse."""
    mine = [upload(alice, f"mine {n}".encode()) for n in range(3)]
    shared = upload(alice, b"shared bytes")
    copy = upload(bob, b"shared bytes")
    kept = upload(alice, b"kept")
    moderation.protect(kept, by="@mod:localhost")
    bobs_own = upload(bob, b"bob's own")

    response = call(admin, "POST", "user/@alice:localhost/media/quarantine")

    assert response.json() == {"num_quarantined": 5}
    assert {state(m) for m in (*mine, shared, copy)} == {S.QUARANTINED}
    assert [state(kept), state(bobs_own)] == [S.COMPLETE, S.COMPLETE]
    assert records(copy) == [(A.QUARANTINE, S.QUARANTINED, ADMIN_ID)]
    assert call(admin, "POST", "user/@alice:localhost/media/quarantine").json() == {
        "num_quarantined": 0
    }


def test_quarantining_a_users_media_is_bounded_per_request(
    admin: MatrixClient, broker_sends: list[tuple[str, tuple[Any, ...], Any]]
) -> None:
    items = [make_media("@alice:localhost", n) for n in range(5)]
    with msc3870_settings(ADMINS=[ADMIN_ID], ADMIN_API_ITEMS_PER_REQUEST=2):
        assert call(admin, "POST", "user/@alice:localhost/media/quarantine").json() == {
            "num_quarantined": 2
        }
        while broker_sends:
            name, args, _ = broker_sends.pop(0)
            assert name == "msc3870.admin_bulk"
            admin_bulk_task.apply(args=args)
    assert {state(m) for m in items} == {S.QUARANTINED}


# ---------------------------------------------------------------------- downloads


def test_admins_may_download_quarantined_media_others_are_told_400(
    alice: MatrixClient, admin: MatrixClient
) -> None:
    image = png_bytes(32, 32)
    media = upload(alice, image, "image/png")
    moderation.quarantine(media, by="@mod:localhost")
    path = f"/_matrix/client/v1/media/download/{mxc_path(media.mxc_uri)}"
    bypass = path + "?admin_unsafely_bypass_quarantine=true"

    served = admin.get(bypass)
    assert served.status_code == 200
    assert b"".join(served.streaming_content) == image
    assert served["Content-Security-Policy"].startswith("sandbox")
    # Without asking, quarantined media is not found, for admins too.
    assert error(admin.get(path)) == (404, "M_NOT_FOUND")
    # Anyone else asking is refused, as Synapse does.
    refused = alice.get(bypass)
    assert error(refused) == (400, "M_UNKNOWN")
    assert refused.json()["error"] == "Must be a server admin to bypass quarantine"
    assert error(alice.get(path + "?admin_unsafely_bypass_quarantine=false")) == (
        404,
        "M_NOT_FOUND",
    )
    # Only the authenticated download honours it (as Synapse): not thumbnails, not legacy.
    thumbnail = f"/_matrix/client/v1/media/thumbnail/{mxc_path(media.mxc_uri)}"
    query = "?width=32&height=32&admin_unsafely_bypass_quarantine=true"
    assert error(admin.get(thumbnail + query)) == (404, "M_NOT_FOUND")
    legacy = f"/_matrix/media/v3/download/{mxc_path(media.mxc_uri)}"
    assert error(admin.get(legacy + "?admin_unsafely_bypass_quarantine=true")) == (
        404,
        "M_NOT_FOUND",
    )
    # Purged media is gone for admins too.
    moderation.purge(media, by="@mod:localhost")
    assert error(admin.get(bypass)) == (404, "M_NOT_FOUND")


def test_media_downloads_under_v1_as_synapse_serves_them(alice: MatrixClient) -> None:
    """synapse-admin links media at /_matrix/media/v1/download (getMediaUrl)."""
    media = upload(alice, b"linked")
    response = Client().get(f"/_matrix/media/v1/download/{mxc_path(media.mxc_uri)}")
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == b"linked"


def test_the_admin_api_speaks_cors_to_the_web_uis(admin: MatrixClient) -> None:
    """synapse-admin and ketesa run on another origin: preflights and answers carry CORS."""
    preflight = Client().options(
        V1 + "users/@alice:localhost/media",
        headers={
            "Origin": "https://admin.example",
            "Access-Control-Request-Method": "DELETE",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 200
    assert preflight["Access-Control-Allow-Origin"] == "*"
    answer = admin.get(V1 + "statistics/users/media", headers={"Origin": "https://admin.example"})
    assert answer["Access-Control-Allow-Origin"] == "*"


def test_the_asgi_handler_serves_the_admin_api_as_an_api(app: Any) -> None:
    """Small JSON bodies and Matrix errors, as under /_matrix (not the admin site's
    middleware and its 10 MiB forms)."""
    from .asgi_driver import call as asgi_call
    from .asgi_driver import run

    token = make_token(ADMIN_ID)
    headers = {"Authorization": f"Bearer {token}"}
    with msc3870_settings(ADMINS=[ADMIN_ID]):
        big = run(
            lambda: asgi_call(
                app,
                "POST",
                V1 + "user/@alice:localhost/media/quarantine",
                body=b" " * 70_000,
                headers=headers,
            )
        )
        unknown = run(lambda: asgi_call(app, "GET", V1 + "nothing/here", headers=headers))
        done = run(
            lambda: asgi_call(
                app,
                "POST",
                V1 + "user/@alice:localhost/media/quarantine",
                body=b"{}",
                headers=headers,
            )
        )
    assert (big.status, big.json()["errcode"]) == (413, "M_TOO_LARGE")
    assert (unknown.status, unknown.json()["errcode"]) == (404, "M_UNRECOGNIZED")
    assert (done.status, done.json()) == (200, {"num_quarantined": 0})


# ---------------------------------------------------------------------- the homeserver


class Homeserver(JSONHandler):
    """Synapse's whoami and its admin check, over real HTTP on 127.0.0.1."""

    users = {
        "admin-token": "@root:localhost",
        "user-token": "@eve:localhost",
        "guest-token": "@123:localhost",
    }
    admins = {"@root:localhost"}
    calls: list[str] = []
    broken = False

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        Homeserver.calls.append(path)
        user = self.users.get(token)
        if user is None:
            return self._send(401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown token"})
        if path == "/_matrix/client/v3/account/whoami":
            guest = token == "guest-token"
            return self._send(200, {"user_id": user, "device_id": "D", "is_guest": guest})
        if path.startswith("/_synapse/admin/v1/users/") and path.endswith("/admin"):
            if Homeserver.broken:
                return self._send(500, {"errcode": "M_UNKNOWN", "error": "oops"})
            if user not in self.admins:
                return self._send(
                    403, {"errcode": "M_FORBIDDEN", "error": "You are not a server admin"}
                )
            return self._send(200, {"admin": True})
        return self._send(404, {"errcode": "M_UNRECOGNIZED", "error": "no"})


@pytest.fixture
def homeserver(db: None) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Homeserver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Homeserver.calls = []
    Homeserver.broken = False
    url = f"http://127.0.0.1:{server.server_address[1]}"
    with msc3870_settings(
        TOKEN_RESOLVER="msc3870.auth.HomeserverTokenResolver", HOMESERVER_URL=url
    ):
        yield url
    server.shutdown()


def admin_checks() -> list[str]:
    return [p for p in Homeserver.calls if p.endswith("/admin")]


def as_homeserver_user(token: str, path: str = "statistics/users/media") -> Any:
    return Client().get(V1 + path, headers={"Authorization": f"Bearer {token}"})


def test_the_homeserver_says_who_its_admins_are(homeserver: str) -> None:
    assert as_homeserver_user("admin-token").status_code == 200
    assert admin_checks() == ["/_synapse/admin/v1/users/@root:localhost/admin"]
    assert as_homeserver_user("admin-token").status_code == 200
    assert len(admin_checks()) == 1  # cached (ADMIN_CACHE_SECONDS)
    assert error(as_homeserver_user("user-token")) == (403, "M_FORBIDDEN")
    assert error(as_homeserver_user("user-token")) == (403, "M_FORBIDDEN")
    assert len(admin_checks()) == 2  # the refusal is cached too
    with msc3870_settings(
        TOKEN_RESOLVER="msc3870.auth.HomeserverTokenResolver",
        HOMESERVER_URL=homeserver,
        HOMESERVER_ADMINS=False,
        ADMINS=["@eve:localhost"],
    ):
        # Not asked: only the list counts.
        assert as_homeserver_user("user-token").status_code == 200
        assert as_homeserver_user("admin-token", "users/@root:localhost/media").status_code == 403


def test_guests_are_never_admins(homeserver: str) -> None:
    with msc3870_settings(
        TOKEN_RESOLVER="msc3870.auth.HomeserverTokenResolver",
        HOMESERVER_URL=homeserver,
        ADMINS=["@123:localhost"],
    ):
        assert error(as_homeserver_user("guest-token")) == (403, "M_FORBIDDEN")
    assert admin_checks() == []


def test_the_homeserver_failing_is_not_a_decision(homeserver: str) -> None:
    """Neither a 403 (an admin would be locked out by an outage) nor cached."""
    Homeserver.broken = True
    response = as_homeserver_user("admin-token")
    assert error(response) == (502, "M_UNKNOWN")
    Homeserver.broken = False
    assert as_homeserver_user("admin-token").status_code == 200
    assert len(admin_checks()) == 2


def test_the_homeserver_decides_the_quarantine_bypass(homeserver: str) -> None:
    uploaded = Client().generic(
        "POST",
        "/_matrix/media/v3/upload",
        b"held",
        content_type="text/plain",
        headers={"Authorization": "Bearer user-token"},
    )
    media = media_of(uploaded.json()["content_uri"])
    moderation.quarantine(media, by="@mod:localhost")
    path = f"/_matrix/client/v1/media/download/{mxc_path(media.mxc_uri)}"
    path += "?admin_unsafely_bypass_quarantine=true"
    assert Client().get(path, headers={"Authorization": "Bearer admin-token"}).status_code == 200
    refused = Client().get(path, headers={"Authorization": "Bearer user-token"})
    assert error(refused) == (400, "M_UNKNOWN")
