"""The moderation console in a real browser: headless Chromium (Debian's ``chromium``,
driven by Playwright's Python package with ``executable_path``: no browser download)
against the deployed server (gunicorn, PostgreSQL, a celery worker, SeaweedFS).

A moderator logs in, sees the list's previews load, opens an image and sees it,
quarantines it with a reason (every download path then answers 404), quarantines two
items at once from the list and opens the dashboard; a view-only user finds no control,
and a POST forged with that user's own session and CSRF token changes nothing. Every
request the browser makes goes to 127.0.0.1: anything else is aborted and fails the test.

With ``CONSOLE_SCREENSHOTS_DIR`` set, the pages are saved there as PNG (the README's
screenshots: ``CONSOLE_SCREENSHOTS_DIR=docs scripts/services-test -k console_browser``).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.contrib.auth.models import Permission, User
from django.db import connections
from django.utils import timezone
from PIL import Image, ImageDraw

from msc3870 import dashboard, moderation
from msc3870.models import Media, MediaState, ModerationRecord

from ..helpers import bearer, media_of, mxc_path
from .conftest import ROOT, Stack, base_env, make_user_token

pytestmark = pytest.mark.services

S = MediaState
CHROMIUM = "/usr/bin/chromium"
PASSWORD = "console-test-password"
LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}
# Several clients' uploads, as a moderator would find them.
COLOURS = [(214, 69, 65), (46, 134, 193), (39, 174, 96), (243, 156, 18), (142, 68, 173)]


def picture(colour: tuple[int, int, int], n: int) -> bytes:
    image = Image.new("RGB", (640, 420), colour)
    draw = ImageDraw.Draw(image)
    for k in range(6):
        box = (60 + k * 70, 70 + n * 12 + k * 18, 220 + k * 70, 230 + n * 12 + k * 18)
        draw.ellipse(box, outline=(255, 255, 255), width=8)
    buffer = io.BytesIO()
    image.save(buffer, "PNG" if n % 2 else "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def console_stack(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/ensure-services installs Debian's chromium")
    tmp = tmp_path_factory.mktemp("console")
    running = Stack(env=base_env(tmp), logs=tmp)
    # The admin's own static files, as `make run` and the container collect them.
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=running.env,
        check=True,
    )
    try:
        running.start_server(workers=2)
        running.start_worker()
        yield running
    finally:
        running.stop_all()


def upload(stack: Stack, token: str, data: bytes, content_type: str, name: str) -> Media:
    response = requests.post(
        f"{stack.base_url}/_matrix/media/v3/upload?filename={name}",
        data=data,
        headers={**bearer(token), "Content-Type": content_type},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return media_of(response.json()["content_uri"])


def download_paths(stack: Stack, media: Media) -> dict[str, str]:
    path = mxc_path(media.mxc_uri)
    size = "width=96&height=96&method=crop"
    return {
        "v1 download": f"{stack.base_url}/_matrix/client/v1/media/download/{path}",
        "legacy download": f"{stack.base_url}/_matrix/media/v3/download/{path}",
        "v1 thumbnail": f"{stack.base_url}/_matrix/client/v1/media/thumbnail/{path}?{size}",
        "legacy thumbnail": f"{stack.base_url}/_matrix/media/v3/thumbnail/{path}?{size}",
    }


def statuses(stack: Stack, media: Media, token: str) -> dict[str, int]:
    return {
        name: requests.get(
            url, headers=bearer(token), timeout=30, allow_redirects=False
        ).status_code
        for name, url in download_paths(stack, media).items()
    }


class Browser:
    """Headless Chromium whose every request must go to this machine."""

    def __init__(self) -> None:
        from playwright.sync_api import sync_playwright

        self.refused: list[str] = []
        self._playwright = sync_playwright().start()
        self.browser = self._playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",  # root in CI
                # Nothing of Chromium's own reaches out (updates, metrics, safe browsing).
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-pings",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
            ],
        )

    def page(self) -> Any:
        context = self.browser.new_context(viewport={"width": 1500, "height": 1000})
        context.route("**/*", self._only_loopback)
        return context.new_page()

    def _only_loopback(self, route: Any) -> None:
        host = urlsplit(route.request.url).hostname or ""
        if route.request.url.startswith(("data:", "blob:")) or host in LOOPBACK:
            route.continue_()
        else:
            self.refused.append(route.request.url)
            route.abort()

    def close(self) -> None:
        self.browser.close()
        self._playwright.stop()


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Browser]:
    # Playwright's sync API runs an event loop in this thread; the test's own ORM calls
    # stay synchronous (Django's documented switch for such callers).
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    running = Browser()
    yield running
    # While Playwright's loop runs, this thread's ORM calls get connections of their own
    # (Django keeps them per context when a loop is running): closed before it stops.
    connections.close_all()
    running.close()
    assert running.refused == [], f"the browser asked for other hosts: {running.refused}"


def log_in(page: Any, stack: Stack, username: str) -> None:
    page.goto(f"{stack.base_url}/admin/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_load_state()
    assert page.url == f"{stack.base_url}/admin/", page.inner_text("body")[:2000]


def screenshot(page: Any, name: str, *, full_page: bool = True) -> None:
    directory = os.environ.get("CONSOLE_SCREENSHOTS_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        path = Path(directory) / f"console-{name}.png"
        page.screenshot(path=str(path), full_page=full_page)


def user(username: str, *codenames: str, group: str = "") -> User:
    # Hashed as the server hashes (the test settings' fast hasher is not the server's).
    hasher = PBKDF2PasswordHasher()
    made = User.objects.create_user(username, is_staff=True)
    made.password = hasher.encode(PASSWORD, hasher.salt())
    made.save(update_fields=["password"])
    for codename in codenames:
        made.user_permissions.add(Permission.objects.get(codename=codename))
    if group:
        from django.contrib.auth.models import Group

        made.groups.add(Group.objects.get_or_create(name=group)[0])
    return made


def earlier_uploads(uploaders: list[str]) -> int:
    """Rows of uploads of the 29 days before, long gone (tombstones, some refused by the
    checks): what the dashboard's 30 days are made of."""
    now = timezone.now()
    rows = []
    for day in range(1, 30):
        for n in range(8 + (day * 7) % 23):
            created = now - timedelta(days=day, minutes=n * 17)
            refused = n % 9 == 0
            rows.append(
                Media(
                    server_name="localhost",
                    media_id=f"old{day:02d}x{n:03d}",
                    user_id=uploaders[(day + n) % len(uploaders)],
                    state=S.REJECTED if refused else S.DELETED,
                    created_at=created,
                    state_changed_at=created,
                    unused_expires_at=created,
                    upload_method="post",
                    content_type="image/jpeg",
                    size=20_000 + n * 1000,
                    rejection_reason="Content type not allowed" if refused else "",
                    objects_deleted_at=created,
                )
            )
    Media.objects.bulk_create(rows)
    return len(rows)


def test_a_moderator_judges_and_acts_and_a_viewer_cannot(
    console_stack: Stack, transactional_db: None, browser: Browser
) -> None:
    stack = console_stack
    moderator = user("moderator")
    for codename in ("view_media", "moderate_media", "view_moderationrecord"):
        moderator.user_permissions.add(Permission.objects.get(codename=codename))
    user("viewer", "view_media")
    uploaders = [f"@{name}:localhost" for name in ("alice", "bob", "carol")]
    tokens = {user_id: make_user_token(user_id) for user_id in uploaders}
    images = [
        upload(
            stack,
            tokens[uploaders[n % 3]],
            picture(colour, n),
            "image/png" if n % 2 else "image/jpeg",
            f"photo-{n}.{'png' if n % 2 else 'jpg'}",
        )
        for n, colour in enumerate(COLOURS)
    ]
    history = earlier_uploads(uploaders)
    notes = upload(stack, tokens[uploaders[0]], b"Meeting notes\n" * 40, "text/plain", "notes.txt")
    rejected = upload(stack, tokens[uploaders[2]], b"spam spam spam\n", "text/plain", "spam.txt")
    assert moderation.reject(rejected, by="earlier-mod", reason="spam wave")
    dashboard.rollup()
    target, *others = images
    alice_token = tokens[target.user_id]
    assert set(statuses(stack, target, alice_token).values()) <= {200, 307}

    page = browser.page()
    log_in(page, stack, "moderator")

    # The list: every image's preview loads (decoded: naturalWidth > 0).
    page.goto(f"{stack.base_url}/admin/msc3870/media/")
    page.wait_for_function(
        """n => {
            const images = [...document.querySelectorAll('img.msc3870-preview')];
            return images.length === n && images.every(i => i.complete && i.naturalWidth > 0);
        }""",
        arg=len(images),
        timeout=30_000,
    )
    assert page.locator("svg.msc3870-icon").count() >= 2  # the text items: icons
    if page.locator("#toggle-nav-sidebar").is_visible():
        page.click("#toggle-nav-sidebar")  # more room for the columns (kept for the session)
    page.evaluate("window.scrollTo(0, 0)")
    screenshot(page, "list", full_page=False)

    # An image's page shows the image itself.
    page.click(f"text={target.mxc_uri}")
    page.wait_for_function(
        "() => { const i = document.querySelector('#msc3870-image');"
        " return i && i.complete && i.naturalWidth > 0; }",
        timeout=30_000,
    )
    assert page.locator("input[name=_save]").count() == 0
    assert "/_matrix/" not in page.content()
    screenshot(page, "item")

    # Quarantine it with a reason: the confirmation page, then back to the media's page.
    page.click("#msc3870-actions input[value=Quarantine]")
    page.wait_for_selector("textarea[name=reason]")
    page.fill("textarea[name=reason]", "Reported in #general as abuse")
    screenshot(page, "confirmation")
    page.click("input[type=submit][value=Quarantine]")
    page.wait_for_url(f"{stack.base_url}/admin/msc3870/media/{target.pk}/change/")
    assert "Quarantined 1 media." in page.content()
    assert Media.objects.get(pk=target.pk).state == S.QUARANTINED
    record = ModerationRecord.objects.get(media_id=target.pk)
    assert (record.actor, record.reason) == ("moderator", "Reported in #general as abuse")
    assert statuses(stack, target, alice_token) == dict.fromkeys(download_paths(stack, target), 404)
    # ... and the moderator still sees it.
    page.reload()
    page.wait_for_function(
        "() => { const i = document.querySelector('#msc3870-image');"
        " return i && i.complete && i.naturalWidth > 0; }",
        timeout=30_000,
    )

    # Two at once from the list.
    chosen = others[:2]
    page.goto(f"{stack.base_url}/admin/msc3870/media/")
    for media in chosen:
        page.check(f"input[name=_selected_action][value='{media.pk}']")
    page.select_option("select[name=action]", "quarantine_media")
    page.click("button[name=index]")
    page.wait_for_selector("textarea[name=reason]")
    page.fill("textarea[name=reason]", "Same raid")
    page.click("input[type=submit][value=Quarantine]")
    page.wait_for_selector("text=Quarantined 2 media.")
    assert {Media.objects.get(pk=m.pk).state for m in chosen} == {S.QUARANTINED}
    for media in chosen:
        token = tokens[media.user_id]
        assert set(statuses(stack, media, token).values()) == {404}

    # The dashboard, from the list.
    dashboard.rollup()
    page.click("#msc3870-dashboard-link")
    page.wait_for_selector("svg.msc3870-chart")
    # Today's bar: the uploads of this test.
    assert int(page.locator("svg.msc3870-chart rect.uploads").last.get_attribute("height")) > 0
    text = page.inner_text("#content-main")
    assert "spam wave" in text  # recent rejections
    assert "Same raid" in text  # latest moderation
    assert "@alice:localhost" in page.inner_text("#msc3870-top-uploaders")
    bars = page.locator("svg.msc3870-chart rect.uploads")
    assert sum(int(bars.nth(n).get_attribute("height")) > 0 for n in range(30)) == 30
    assert history > 0
    screenshot(page, "dashboard")

    # A view-only user: no control anywhere, and a forged POST changes nothing.
    viewer_page = browser.page()
    log_in(viewer_page, stack, "viewer")
    viewer_page.goto(f"{stack.base_url}/admin/msc3870/media/")
    viewer_page.wait_for_selector("#result_list")
    assert viewer_page.locator("select[name=action]").count() == 0
    assert viewer_page.locator("input[name=_selected_action]").count() == 0
    viewer_page.goto(f"{stack.base_url}/admin/msc3870/media/{notes.pk}/change/")
    assert viewer_page.locator("#msc3870-actions").count() == 0
    assert viewer_page.locator("input[type=submit]").count() == 0
    csrf = next(c["value"] for c in viewer_page.context.cookies() if c["name"] == "csrftoken")
    before = list(Media.objects.order_by("pk").values_list("pk", "state"))
    forged = viewer_page.request.post(
        f"{stack.base_url}/admin/msc3870/media/",
        form={
            "csrfmiddlewaretoken": csrf,
            "action": "purge_media",
            "_selected_action": str(notes.pk),
            "confirmed": "yes",
            "reason": "forged",
        },
        headers={"Referer": f"{stack.base_url}/admin/msc3870/media/"},
        max_redirects=0,
    )
    assert forged.status in (200, 302, 403)  # the list again, a redirect or a refusal
    assert list(Media.objects.order_by("pk").values_list("pk", "state")) == before
    assert not ModerationRecord.objects.filter(actor="viewer").exists()
