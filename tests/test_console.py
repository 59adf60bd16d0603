"""The moderation console in the admin: previews, the media's page, search and filters
by index, counts that stop early, every action with a reason, the dashboard from its
rollup, the block list; who may see and who may act."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.admin.models import ADDITION, LogEntry
from django.contrib.auth.models import Group, Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from PIL import Image

import msc3870.admin.actions
import msc3870.admin.views
from msc3870 import dashboard, moderation, storage_keys, tasks
from msc3870.admin import OPERATIONS
from msc3870.admin.listing import COUNT_LOOKAHEAD_PAGES
from msc3870.models import (
    BlockedHash,
    DashboardSnapshot,
    Media,
    MediaState,
    ModerationAction,
    ModerationRecord,
    UploadMethod,
)
from msc3870.schedule import DEFAULT_SCHEDULE
from msc3870.stores import get_store

from .conftest import MatrixClient, media_of, msc3870_settings

S = MediaState
A = ModerationAction
CHANGELIST = "/admin/msc3870/media/"
DASHBOARD = f"{CHANGELIST}dashboard/"
BLOCKS = "/admin/msc3870/blockedhash/"
CONFIRMATION_TEMPLATE = "admin/msc3870/media/moderation_confirmation.html"


def upload(
    client: MatrixClient,
    data: bytes = b"content",
    content_type: str = "text/plain",
    filename: str = "",
) -> Media:
    path = "/_matrix/media/v3/upload" + (f"?filename={filename}" if filename else "")
    response = client.post(path, data, content_type)
    assert response.status_code == 200, response.content
    return media_of(response.json()["content_uri"])


def staff(username: str, *codenames: str, group: str = "", csrf: bool = False) -> Client:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    for codename in codenames:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    if group:
        user.groups.add(Group.objects.get(name=group))
    client = Client(enforce_csrf_checks=csrf)
    client.force_login(user)
    return client


@pytest.fixture
def moderator(db: None) -> Client:
    return staff("mod", group="Moderators")


@pytest.fixture
def viewer(db: None) -> Client:
    return staff("viewer", "view_media", "view_blockedhash")


def image(colour: tuple[int, int, int] = (200, 30, 30), size: int = 300) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "PNG")
    return buffer.getvalue()


def listed(client: Client, query: str = "") -> list[int]:
    response = client.get(f"{CHANGELIST}?{query}")
    assert response.status_code == 200, response
    return [media.pk for media in response.context["cl"].result_list]


def public_paths(media: Media) -> list[str]:
    path = f"{media.server_name}/{media.media_id}"
    size = "width=32&height=32"
    return [
        f"/_matrix/client/v1/media/download/{path}?timeout_ms=0",
        f"/_matrix/media/v3/download/{path}?timeout_ms=0",
        f"/_matrix/client/v1/media/thumbnail/{path}?{size}&timeout_ms=0",
        f"/_matrix/media/v3/thumbnail/{path}?{size}&timeout_ms=0",
    ]


def streamed(response: Any) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


# ------------------------------------------------------------------ previews and bytes


def test_the_list_previews_images_with_stored_thumbnails_and_shows_icons_for_the_rest(
    moderator: Client, alice: MatrixClient
) -> None:
    picture = upload(alice, image(), "image/png")
    text = upload(alice, b"hello", "text/plain")
    page = moderator.get(CHANGELIST).content.decode()
    preview_url = f"{CHANGELIST}{picture.pk}/preview/"
    assert f'src="{preview_url}" loading="lazy"' in page
    assert f"{CHANGELIST}{text.pk}/preview/" not in page
    assert 'aria-label="text"' in page

    response = moderator.get(preview_url)
    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"
    assert "sandbox" in response["Content-Security-Policy"]
    thumbnail = Image.open(io.BytesIO(streamed(response)))
    assert thumbnail.size == (96, 96)  # the list's crop, not the 300 px original
    # Made once and kept: the next preview reads it from storage, not the original.
    key = storage_keys.thumbnail(picture.thumbnail_prefix, 96, 96, "crop")
    assert get_store().head(key) is not None


def test_quarantined_media_stays_visible_to_moderators_while_every_public_path_is_404(
    moderator: Client, alice: MatrixClient
) -> None:
    data = image((10, 120, 200))
    media = upload(alice, data, "image/png")
    assert moderation.quarantine(media, by="setup", reason="reported")
    for path in public_paths(media):
        assert alice.get(path).status_code == 404, path
        if "/v3/" in path:  # the legacy paths answer without a token too
            assert Client().get(path).status_code == 404, path
    preview = moderator.get(f"{CHANGELIST}{media.pk}/preview/?size=large")
    assert preview["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(streamed(preview))).size == (300, 300)  # never enlarged
    content = moderator.get(f"{CHANGELIST}{media.pk}/content/")
    assert content.status_code == 200
    assert streamed(content) == data
    assert content["Cache-Control"] == "private, no-store"
    assert "sandbox" in content["Content-Security-Policy"]


def test_media_too_large_to_thumbnail_gets_an_icon_never_its_original(
    moderator: Client, alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    media = upload(alice, image(size=400), "image/png")
    read: list[str] = []
    from msc3870.stores.local import LocalMediaStore

    original = LocalMediaStore.iter_bytes

    def spy(self: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        read.append(key)
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalMediaStore, "iter_bytes", spy)
    with msc3870_settings(THUMBNAIL_MAX_SOURCE_BYTES=100):
        page = moderator.get(CHANGELIST).content.decode()
        assert f"{CHANGELIST}{media.pk}/preview/" not in page
        assert 'aria-label="image"' in page
        response = moderator.get(f"{CHANGELIST}{media.pk}/preview/")
    assert response["Content-Type"] == "image/svg+xml"
    assert media.storage_key not in read


def test_previews_and_bytes_need_view_permission_and_only_answer_reads(
    db: None, alice: MatrixClient, moderator: Client
) -> None:
    media = upload(alice, image(), "image/png")
    nobody = staff("nobody")
    for suffix in ("preview/", "content/"):
        url = f"{CHANGELIST}{media.pk}/{suffix}"
        assert nobody.get(url).status_code == 403
        anonymous = Client().get(url)
        assert anonymous.status_code == 302
        assert "/admin/login/" in anonymous["Location"]
        assert moderator.post(url).status_code in (403, 405)
    assert nobody.get(DASHBOARD).status_code == 403


def test_purged_media_has_no_bytes_for_moderators_either(
    moderator: Client, alice: MatrixClient
) -> None:
    media = upload(alice, image(), "image/png")
    assert moderation.purge(media, by="setup", reason="gone")
    assert moderator.get(f"{CHANGELIST}{media.pk}/content/").status_code == 404
    response = moderator.get(f"{CHANGELIST}{media.pk}/preview/")
    assert response["Content-Type"] == "image/svg+xml"
    assert 'aria-label="no bytes"' in response.content.decode()


def test_bytes_stream_with_ranges_where_the_store_cannot_sign(
    moderator: Client, alice: MatrixClient
) -> None:
    media = upload(alice, b"0123456789", "text/plain")
    response = moderator.get(f"{CHANGELIST}{media.pk}/content/", headers={"Range": "bytes=2-5"})
    assert response.status_code == 206
    assert streamed(response) == b"2345"
    assert response["Content-Range"] == "bytes 2-5/10"


def test_bytes_are_a_short_lived_signed_url_where_the_store_signs(
    moderator: Client, alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    media = upload(alice, image(), "image/png")
    asked: list[dict[str, Any]] = []

    class Signing:
        can_redirect = True

        def download_url(self, key: str, **kwargs: Any) -> str:
            asked.append({"key": key, **kwargs})
            return f"http://127.0.0.1:9/bucket/{key}?X-Amz-Signature=abc"

    monkeypatch.setattr(msc3870.admin.views, "get_store", Signing)
    response = moderator.get(f"{CHANGELIST}{media.pk}/content/")
    assert response.status_code == 307
    assert response["Location"].startswith("http://127.0.0.1:9/bucket/")
    assert response["Cache-Control"] == "private, no-store"
    (call,) = asked
    assert call["key"] == media.storage_key
    assert call["lifetime"] == msc3870.admin.views.SIGNED_URL_SECONDS <= 60


# ------------------------------------------------------------------ the media's page


def test_the_media_page_shows_the_media_the_facts_the_twins_and_the_history_without_save(
    moderator: Client, alice: MatrixClient, bob: MatrixClient
) -> None:
    data = image((30, 200, 30))
    media = upload(alice, data, "image/png", filename="cat.png")
    twin = upload(bob, data, "image/png", filename="same.png")
    assert moderation.quarantine(twin, by="setup", reason="reported by a room")
    response = moderator.get(f"{CHANGELIST}{media.pk}/change/")
    page = response.content.decode()
    # The media itself, through the console's own view.
    assert f'src="{CHANGELIST}{media.pk}/preview/?size=large"' in page
    assert "/_matrix/" not in page  # never a public download URL
    # The facts first.
    assert "declared image/png, sniffed image/png" in page
    assert "@alice:localhost" in page
    assert "This server (localhost)" in page
    assert "cat.png" in page
    # The rest folded.
    assert re.search(r"<details[^>]*>\s*<summary>[^<]*<h2[^>]*>[^<]*Everything else", page)
    # Items with the same bytes, in their states.
    assert response.context["twins"] == [Media.objects.get(pk=twin.pk)]
    assert twin.mxc_uri in page
    # Nothing to save: no form field, no Save button; the change form refuses a POST.
    assert 'name="_save"' not in page
    assert 'name="_continue"' not in page
    assert response.context["has_change_permission"] is False
    edited = moderator.post(f"{CHANGELIST}{media.pk}/change/", {"state": "complete"})
    assert edited.status_code == 403


def test_the_twins_page_shows_the_history_of_the_item(
    moderator: Client, alice: MatrixClient
) -> None:
    media = upload(alice, image(), "image/png")
    assert moderation.quarantine(media, by="mod-a", reason="first look")
    assert moderation.approve(media, by="mod-b", reason="second look")
    page = moderator.get(f"{CHANGELIST}{media.pk}/change/").content.decode()
    assert "first look" in page and "second look" in page
    assert "moderation history" in page.lower()


def test_text_is_shown_as_text_up_to_a_cap(moderator: Client, alice: MatrixClient) -> None:
    body = "".join(f"line {n}: a moderator reads this\n" for n in range(3000)).encode()
    media = upload(alice, body, "text/plain")
    assert media.content_type.startswith("text/plain"), media.content_type
    response = moderator.get(f"{CHANGELIST}{media.pk}/change/")
    showing = response.context["showing"]
    assert showing.kind == "text"
    assert showing.truncated
    assert len(showing.text) == msc3870.admin.views.TEXT_PREVIEW_BYTES
    assert "Only the first 64 KiB are shown" in response.content.decode()


def test_a_button_on_the_media_page_comes_back_to_it_after_acting(
    moderator: Client, alice: MatrixClient
) -> None:
    media = upload(alice)
    form = {
        "action": "quarantine_media",
        "_selected_action": media.pk,
        msc3870.admin.actions.RETURN_TO_ITEM: "1",
    }
    page = moderator.post(CHANGELIST, form)
    assert CONFIRMATION_TEMPLATE in [t.name for t in page.templates]
    response = moderator.post(CHANGELIST, {**form, "confirmed": "yes", "reason": "reported"})
    assert response.status_code == 302
    assert response["Location"] == f"{CHANGELIST}{media.pk}/change/"
    assert Media.objects.get(pk=media.pk).state == S.QUARANTINED


# ------------------------------------------------------------------ search and filters


def test_search_by_mxc_url_uploader_sha256_filename_and_id(
    moderator: Client, alice: MatrixClient, bob: MatrixClient
) -> None:
    first = upload(alice, b"one", filename="holiday-beach.txt")
    second = upload(bob, b"two", filename="invoice.txt")
    remote = Media.objects.create(
        server_name="other.example",
        media_id="remoteid",
        user_id="",
        state=S.COMPLETE,
        upload_method=UploadMethod.REMOTE,
        unused_expires_at=timezone.now(),
        sha256="ab" * 32,
    )

    def found(term: str) -> set[int]:
        return set(listed(moderator, f"q={term}"))

    assert found(first.mxc_uri) == {first.pk}
    pasted = f"https://matrix.example/_matrix/media/v3/download/localhost/{second.media_id}"
    assert found(pasted) == {second.pk}
    assert found("@bob:localhost") == {second.pk}
    assert found("AB" * 32) == {remote.pk}
    assert found("BEACH") == {first.pk}
    assert found(first.media_id) == {first.pk}
    assert found(f"other.example/{remote.media_id}") == {remote.pk}
    assert found("@nobody:localhost") == set()
    assert found("ab") == set()  # too short for a filename search, and no such id


@pytest.mark.parametrize(
    "term",
    [
        "mxc://localhost/abcdef",
        "@alice:localhost",
        "a" * 64,
        "https://example.org/_matrix/media/v3/download/localhost/abcdef",
    ],
)
def test_exact_searches_are_equality_lookups(moderator: Client, term: str) -> None:
    with CaptureQueriesContext(connection) as queries:
        listed(moderator, f"q={term}")
    media_queries = [q["sql"] for q in queries.captured_queries if '"msc3870_media"' in q["sql"]]
    assert media_queries
    assert not [sql for sql in media_queries if " LIKE " in sql]


def test_filters_by_state_type_origin_uploader_date_and_protection(
    moderator: Client, alice: MatrixClient, bob: MatrixClient
) -> None:
    picture = upload(alice, image(), "image/png")
    text = upload(bob, b"words", "text/plain")
    held = upload(bob, b"held", "text/plain")
    assert moderation.quarantine(held, by="setup")
    assert moderation.protect(text, by="setup")
    remote = Media.objects.create(
        server_name="other.example",
        media_id="r1",
        state=S.COMPLETE,
        upload_method=UploadMethod.REMOTE,
        content_type="video/mp4",
        unused_expires_at=timezone.now(),
        created_at=timezone.now() - timedelta(days=40),
    )
    assert set(listed(moderator, "state__exact=quarantined")) == {held.pk}
    shouted = Media.objects.create(
        server_name="localhost",
        media_id="shouted",
        state=S.COMPLETE,
        content_type="Image/PNG",  # a declared type is kept as the client wrote it
        unused_expires_at=timezone.now(),
        created_at=timezone.now() - timedelta(days=40),
    )
    assert set(listed(moderator, "type=image")) == {picture.pk, shouted.pk}
    assert shouted.pk not in listed(moderator, "type=other")
    assert set(listed(moderator, "type=video")) == {remote.pk}
    assert set(listed(moderator, "type=text")) == {text.pk, held.pk}
    assert set(listed(moderator, "origin=remote")) == {remote.pk}
    assert set(listed(moderator, "origin=local")) == {picture.pk, text.pk, held.pk, shouted.pk}
    assert set(listed(moderator, "uploader=@bob:localhost")) == {text.pk, held.pk}
    assert set(listed(moderator, "protected__exact=1")) == {text.pk}
    week_ago = (timezone.now() - timedelta(days=7)).date().isoformat()
    recent = listed(moderator, f"created_at__gte={week_ago}")
    assert remote.pk not in recent and shouted.pk not in recent and picture.pk in recent


def test_the_list_never_counts_the_whole_table(
    moderator: Client, alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = timezone.now()
    Media.objects.bulk_create(
        Media(
            server_name="localhost",
            media_id=f"m{n:04d}",
            user_id="@alice:localhost",
            state=S.COMPLETE,
            unused_expires_at=now,
            created_at=now - timedelta(seconds=n),
        )
        for n in range(40)
    )
    from msc3870.admin.media import MediaAdmin

    monkeypatch.setattr(MediaAdmin, "list_per_page", 2)
    with CaptureQueriesContext(connection) as queries:
        response = moderator.get(CHANGELIST)
    counts = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
    assert counts  # the paginator's
    assert all("LIMIT" in sql.upper() for sql in counts), counts
    limit = (1 + COUNT_LOOKAHEAD_PAGES) * 2 + 1
    assert response.context["cl"].result_count == limit  # stopped there
    page = response.content.decode()
    assert f"more than {limit - 1} media" in page
    assert "Select all matching media" in page
    # The newest first, a page of them.
    assert [m.media_id for m in response.context["cl"].result_list] == ["m0000", "m0001"]


def test_facet_counts_are_never_computed(moderator: Client, alice: MatrixClient) -> None:
    upload(alice)
    response = moderator.get(f"{CHANGELIST}?_facets=True")
    assert response.status_code == 200
    assert response.context["cl"].add_facets is False


# ------------------------------------------------------------------ actions


def confirm(client: Client, action: str, media: list[Media], reason: str = "why") -> Any:
    return client.post(
        CHANGELIST,
        {
            "action": action,
            "_selected_action": [m.pk for m in media],
            "confirmed": "yes",
            "reason": reason,
        },
    )


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda operation: operation.name)
def test_every_action_asks_for_a_reason_first(
    moderator: Client, alice: MatrixClient, operation: Any
) -> None:
    media = upload(alice)
    if operation.name == "approve_media":
        assert moderation.quarantine(media, by="setup")
    if operation.name == "unprotect_media":
        assert moderation.protect(media, by="setup")
    before = ModerationRecord.objects.count()
    response = moderator.post(CHANGELIST, {"action": operation.name, "_selected_action": media.pk})
    assert CONFIRMATION_TEMPLATE in [t.name for t in response.templates]
    assert 'name="reason"' in response.content.decode()
    refused = confirm(moderator, operation.name, [media], reason="  ")
    assert refused.context["form"].errors["reason"]
    assert ModerationRecord.objects.count() == before


def test_protect_and_unprotect_are_recorded_with_their_reason(
    moderator: Client, alice: MatrixClient
) -> None:
    media = upload(alice)
    confirm(moderator, "protect_media", [media], reason="the server's logo")
    assert Media.objects.get(pk=media.pk).protected
    confirm(moderator, "unprotect_media", [media], reason="logo changed")
    assert not Media.objects.get(pk=media.pk).protected
    assert list(
        ModerationRecord.objects.filter(media=media)
        .order_by("at", "pk")
        .values_list("action", "actor", "reason")
    ) == [(A.PROTECT, "mod", "the server's logo"), (A.UNPROTECT, "mod", "logo changed")]


def refuse_everything(ctx: Any) -> None:
    from msc3870.screening import Rejection

    raise Rejection("matches a new signature")


def test_rescreen_runs_the_checks_again_from_the_console(
    moderator: Client, alice: MatrixClient
) -> None:
    media = upload(alice)
    with msc3870_settings(CHECKS=["tests.test_console.refuse_everything"]):
        response = confirm(moderator, "rescreen_media", [media], reason="signatures updated")
    assert response.status_code == 302
    assert Media.objects.get(pk=media.pk).state == S.QUARANTINED
    record = ModerationRecord.objects.get(media=media)
    assert record.action == A.RESCREEN
    assert "matches a new signature" in record.reason
    assert "signatures updated" in record.reason


def test_rescreen_of_too_many_items_at_once_is_refused(
    moderator: Client, alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(msc3870.admin.actions, "READING_LIMIT", 1)
    media = [upload(alice, bytes([n])) for n in range(2)]
    response = moderator.post(
        CHANGELIST,
        {"action": "rescreen_media", "_selected_action": [m.pk for m in media]},
        follow=True,
    )
    assert "select at most 1" in " ".join(str(m) for m in response.context["messages"])
    assert not ModerationRecord.objects.exists()


def test_quarantine_everything_of_the_uploader(
    moderator: Client, alice: MatrixClient, bob: MatrixClient
) -> None:
    chosen = upload(alice, b"one")
    other = upload(alice, b"two")
    kept = upload(alice, b"three")
    assert moderation.protect(kept, by="setup")
    bobs = upload(bob, b"four")
    page = moderator.post(
        CHANGELIST, {"action": "quarantine_uploaders_media", "_selected_action": chosen.pk}
    )
    assert "@alice:localhost: 2 media served now, not protected" in page.content.decode()
    confirm(moderator, "quarantine_uploaders_media", [chosen], reason="spam wave")
    states = {m.pk: m.state for m in Media.objects.all()}
    assert states == {
        chosen.pk: S.QUARANTINED,
        other.pk: S.QUARANTINED,
        kept.pk: S.COMPLETE,
        bobs.pk: S.COMPLETE,
    }
    records = ModerationRecord.objects.filter(actor="mod")
    assert set(records.values_list("media_id", "reason")) == {
        (chosen.pk, "spam wave"),
        (other.pk, "spam wave"),
    }


def test_quarantine_these_bytes_and_block_the_hash(
    moderator: Client, alice: MatrixClient, bob: MatrixClient
) -> None:
    data = image((1, 2, 3))
    chosen = upload(alice, data, "image/png")
    copy = upload(bob, data, "image/png")
    confirm(moderator, "quarantine_content", [chosen], reason="known abuse")
    assert {Media.objects.get(pk=m.pk).state for m in (chosen, copy)} == {S.QUARANTINED}
    blocked = BlockedHash.objects.get()
    assert (blocked.actor, blocked.reason, blocked.unblocked_at) == ("mod", "known abuse", None)
    # A new upload of the same bytes is refused.
    response = alice.post("/_matrix/media/v3/upload", data, "image/png")
    assert response.status_code in (400, 403), response.content


def test_every_selected_item_is_acted_on_not_only_those_listed(
    moderator: Client, alice: MatrixClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(msc3870.admin.actions, "CONFIRMATION_PREVIEW_LIMIT", 1)
    media = [upload(alice, bytes([n])) for n in range(3)]
    selection = {"action": "purge_media", "_selected_action": [m.pk for m in media]}
    page = moderator.post(CHANGELIST, selection)
    # The page lists one, and sends every selected id back.
    hidden = re.findall(r'name="_selected_action" value="(\d+)"', page.content.decode())
    assert sorted(int(pk) for pk in hidden) == sorted(m.pk for m in media)
    moderator.post(CHANGELIST, {**selection, "confirmed": "yes", "reason": "raid"})
    assert set(Media.objects.values_list("state", flat=True)) == {S.DELETED}


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda operation: operation.name)
def test_view_only_staff_sees_no_control_and_a_forged_post_changes_nothing(
    viewer: Client, alice: MatrixClient, operation: Any
) -> None:
    media = upload(alice)
    listing = viewer.get(CHANGELIST)
    assert listing.context["action_form"] is None
    page = viewer.get(f"{CHANGELIST}{media.pk}/change/")
    assert page.context["moderation_operations"] == []
    assert f'value="{operation.name}"' not in page.content.decode()
    before = list(Media.objects.values_list("pk", "state", "protected"))
    response = confirm(viewer, operation.name, [media], reason="forged")
    assert response.status_code in (200, 302, 403)
    assert list(Media.objects.values_list("pk", "state", "protected")) == before
    assert not ModerationRecord.objects.exists()
    assert not BlockedHash.objects.exists()


def test_actions_need_the_csrf_token(db: None, alice: MatrixClient) -> None:
    media = upload(alice)
    client = staff("csrf-mod", group="Moderators", csrf=True)
    response = confirm(client, "purge_media", [media], reason="no token")
    assert response.status_code == 403
    assert Media.objects.get(pk=media.pk).state == S.COMPLETE
    response = client.post(f"{BLOCKS}add/", {"sha256": "a" * 64, "reason": "no token"})
    assert response.status_code == 403
    assert not BlockedHash.objects.exists()


# ------------------------------------------------------------------ the dashboard


def test_the_rollup_counts_states_bytes_days_and_uploaders(
    alice: MatrixClient, bob: MatrixClient
) -> None:
    for n in range(3):
        upload(alice, b"x" * (10 + n))
    held = upload(bob, b"y" * 100)
    assert moderation.quarantine(held, by="setup")
    Media.objects.create(
        server_name="other.example",
        media_id="r1",
        state=S.COMPLETE,
        upload_method=UploadMethod.REMOTE,
        size=1000,
        unused_expires_at=timezone.now(),
    )
    assert tasks.rollup_dashboard_task.apply().get() == 5
    figures = dashboard.snapshot().figures
    assert figures["states"][S.COMPLETE]["local"] == {"count": 3, "bytes": 33}
    assert figures["states"][S.QUARANTINED]["local"] == {"count": 1, "bytes": 100}
    assert figures["states"][S.COMPLETE]["remote"] == {"count": 1, "bytes": 1000}
    assert figures["stored_bytes"] == {"local": 133, "remote": 1000}
    assert len(figures["per_day"]) == dashboard.DAYS
    assert figures["per_day"][-1]["uploads"] == 4
    assert figures["top_uploaders_week"] == [
        {"user_id": "@alice:localhost", "count": 3, "bytes": 33},
        {"user_id": "@bob:localhost", "count": 1, "bytes": 100},
    ]
    assert ("msc3870.rollup_dashboard", 300.0) in DEFAULT_SCHEDULE.values()


def test_the_dashboard_reads_the_rollup_and_counts_nothing_over_the_table(
    viewer: Client, alice: MatrixClient
) -> None:
    upload(alice, b"a" * 42)
    rejected = upload(alice, b"bad")
    assert moderation.reject(rejected, by="setup", reason="spam")
    dashboard.rollup()
    with CaptureQueriesContext(connection) as queries:
        response = viewer.get(DASHBOARD)
    assert response.status_code == 200
    for query in queries.captured_queries:
        sql = query["sql"].upper()
        if '"MSC3870_MEDIA"' in sql and ("COUNT(" in sql or "SUM(" in sql):
            assert "LIMIT" in sql, sql  # bounded, never the table
    page = response.content.decode()
    assert "Uploads per day (30 days)" in page
    assert "<svg" in page
    assert "@alice:localhost" in page  # top uploaders
    assert "spam" in page  # recent rejections


def test_the_first_view_of_the_dashboard_starts_a_rollup(
    viewer: Client, alice: MatrixClient
) -> None:
    upload(alice)
    assert not DashboardSnapshot.objects.exists()
    response = viewer.get(DASHBOARD)
    assert response.status_code == 200
    assert response.context["snapshot"] is not None  # run here: no broker


def test_the_admin_index_links_the_dashboard_for_those_who_may_view_media(
    viewer: Client, db: None
) -> None:
    assert DASHBOARD in viewer.get("/admin/").content.decode()
    other = staff("tokens-only", "view_accesstoken")
    assert DASHBOARD not in other.get("/admin/").content.decode()


# ------------------------------------------------------------------ the block list


@pytest.fixture
def superuser(db: None) -> Iterator[Client]:
    user = User.objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(user)
    yield client


def test_moderators_block_a_hash_with_a_reason_through_moderation(moderator: Client) -> None:
    sha256 = "c" * 64
    response = moderator.post(f"{BLOCKS}add/", {"sha256": sha256.upper(), "reason": "CSAM list"})
    assert response.status_code == 302, response.content
    blocked = BlockedHash.objects.get()
    assert (blocked.sha256, blocked.actor, blocked.reason) == (sha256, "mod", "CSAM list")
    assert moderation.is_hash_blocked(sha256)
    assert LogEntry.objects.filter(action_flag=ADDITION).count() == 1
    again = moderator.post(f"{BLOCKS}add/", {"sha256": sha256, "reason": "again"})
    assert again.status_code == 200
    assert "blocked already" in again.content.decode()
    bad = moderator.post(f"{BLOCKS}add/", {"sha256": "not-a-hash", "reason": "x"})
    assert "Not a SHA-256" in bad.content.decode()
    assert BlockedHash.objects.count() == 1


def test_blocks_are_lifted_with_a_reason_and_stay_as_history(moderator: Client) -> None:
    sha256 = "d" * 64
    assert moderation.block_hash(sha256, by="setup", reason="list")
    blocked = BlockedHash.objects.get()
    page = moderator.post(BLOCKS, {"action": "unblock_hashes", "_selected_action": blocked.pk})
    assert sha256 in page.content.decode()
    moderator.post(
        BLOCKS,
        {
            "action": "unblock_hashes",
            "_selected_action": blocked.pk,
            "confirmed": "yes",
            "reason": "false positive",
        },
    )
    lifted = BlockedHash.objects.get()
    assert (lifted.unblocked_by, lifted.unblock_reason) == ("mod", "false positive")
    assert not moderation.is_hash_blocked(sha256)


def test_the_block_list_is_read_only_without_moderate_permission(
    viewer: Client, superuser: Client
) -> None:
    assert moderation.block_hash("e" * 64, by="setup", reason="list")
    blocked = BlockedHash.objects.get()
    assert viewer.get(BLOCKS).status_code == 200
    assert viewer.get(f"{BLOCKS}add/").status_code == 403
    assert viewer.post(f"{BLOCKS}add/", {"sha256": "f" * 64, "reason": "x"}).status_code == 403
    viewer.post(
        BLOCKS,
        {
            "action": "unblock_hashes",
            "_selected_action": blocked.pk,
            "confirmed": "yes",
            "reason": "forged",
        },
    )
    assert moderation.is_hash_blocked("e" * 64)
    assert BlockedHash.objects.count() == 1
    # Nobody edits or deletes a block, superusers included.
    page = superuser.get(f"{BLOCKS}{blocked.pk}/change/")
    assert page.context["has_change_permission"] is False
    assert superuser.post(f"{BLOCKS}{blocked.pk}/delete/", {"post": "yes"}).status_code == 403
    assert BlockedHash.objects.count() == 1
