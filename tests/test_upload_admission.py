"""Upload admission (msc3870.admission, the body path of msc3870.asgi): credentials before
a byte of the body, bodies in flight capped per process and per address, and a minimum
rate. Driven in process; tests/test_upload_admission_server.py runs the real server."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.utils import timezone

import msc3870.asgi
from msc3870.admission import BodyPace, client_address
from msc3870.asgi import MediaASGIHandler
from msc3870.auth import token_cache
from msc3870.models import Media, MediaState
from msc3870.upload_tokens import make_upload_token

from .asgi_driver import Feed, Reply, call, create, feed, run, until
from .helpers import bearer, make_token, msc3870_settings, mxc_path

MiB = 1024 * 1024
UPLOAD_URL_PREFIX = "/_matrix/media/unstable/com.beeper.msc3870/upload_url/"


@pytest.fixture
def spools(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every spool file the handler opens for a body."""
    opened: list[Any] = []
    real = tempfile.SpooledTemporaryFile

    def spy(*args: Any, **kwargs: Any) -> Any:
        spool = real(*args, **kwargs)
        opened.append(spool)
        return spool

    monkeypatch.setattr(msc3870.asgi.tempfile, "SpooledTemporaryFile", spy)
    return opened


def upload_url_path(created: dict[str, Any]) -> str:
    return urlsplit(created["upload_url"]).path


def assert_no_body_in_flight(app: MediaASGIHandler) -> None:
    assert app.bodies.total == 0
    assert not app.bodies.per_address


@pytest.fixture(autouse=True)
def _large_uploads_allowed() -> Iterator[None]:
    with msc3870_settings(MAX_UPLOAD_SIZE=50 * MiB):
        yield


# ------------------------------------------------------------------ credentials first


@pytest.mark.parametrize(
    "upload_token",
    ["not-a-token", "expired"],
)
def test_a_bogus_upload_url_is_refused_before_a_byte_is_read(
    app: MediaASGIHandler, token: str, spools: list[Any], upload_token: str
) -> None:
    if upload_token == "expired":  # signed by this server, but dead
        upload_token = make_upload_token("someid", timezone.now() - timedelta(seconds=1))

    async def scenario() -> Feed:
        exchange = feed(app, "PUT", UPLOAD_URL_PREFIX + upload_token, length=40 * MiB)
        exchange.send(b"x" * 4096)  # there to be read, if the handler wanted it
        await exchange.reply()
        return exchange

    exchange = run(scenario)
    reply = exchange.task.result()
    assert reply.status == 403
    assert reply.json() == {"errcode": "M_FORBIDDEN", "error": "Invalid or expired upload URL"}
    assert exchange.pulled == []  # not a byte received
    assert spools == []  # nothing spooled
    assert reply.headers["connection"] == "close"  # 40 MiB are not drained
    assert_no_body_in_flight(app)


UPLOAD_TARGETS = ["put", "post", "post_r0", "put_unstable"]


def upload_target(name: str, path: str) -> tuple[str, str]:
    return {
        "put": ("PUT", f"/_matrix/media/v3/upload/{path}"),
        "post": ("POST", "/_matrix/media/v3/upload"),
        "post_r0": ("POST", "/_matrix/media/r0/upload"),
        "put_unstable": ("PUT", f"/_matrix/media/unstable/fi.mau.msc2246/upload/{path}"),
    }[name]


@pytest.mark.parametrize("target", UPLOAD_TARGETS)
@pytest.mark.parametrize(
    ("credential", "errcode"),
    [
        ("none", "M_MISSING_TOKEN"),
        ("unknown", "M_UNKNOWN_TOKEN"),
        ("unknown_query", "M_UNKNOWN_TOKEN"),
    ],
)
def test_uploads_without_a_token_that_resolves_get_401_before_reading(
    app: MediaASGIHandler,
    token: str,
    spools: list[Any],
    target: str,
    credential: str,
    errcode: str,
) -> None:
    headers = {"Authorization": "Bearer mr_nobody"} if credential == "unknown" else {}
    query = "?access_token=mr_nobody" if credential == "unknown_query" else ""

    async def scenario() -> Feed:
        path = mxc_path((await create(app, token))["content_uri"])
        method, url = upload_target(target, path)
        exchange = feed(app, method, url + query, headers=headers, length=40 * MiB)
        exchange.send(b"x" * 4096)
        await exchange.reply()
        return exchange

    exchange = run(scenario)
    reply = exchange.task.result()
    assert reply.status == 401
    assert reply.json()["errcode"] == errcode
    expected = 'Bearer realm="matrix"'
    if errcode == "M_UNKNOWN_TOKEN":
        expected += ', error="invalid_token"'
    assert reply.headers["www-authenticate"] == expected
    assert exchange.pulled == []
    assert spools == []
    assert reply.headers["connection"] == "close"
    assert_no_body_in_flight(app)


def test_a_small_refused_body_keeps_its_connection(app: MediaASGIHandler, token: str) -> None:
    """Under REFUSED_BODY_DRAIN_BYTES the server drains the body after the answer: the
    client reads it on a connection it keeps."""

    async def scenario() -> tuple[Reply, Reply]:
        bogus = feed(app, "PUT", UPLOAD_URL_PREFIX + "not-a-token", length=1024)
        anonymous = feed(app, "POST", "/_matrix/media/v3/upload", length=1024)
        return await bogus.reply(), await anonymous.reply()

    for reply in run(scenario):
        assert reply.status in (401, 403)
        assert "connection" not in reply.headers


def test_a_masquerade_outside_the_namespace_is_refused_before_reading(
    app: MediaASGIHandler, transactional_db: None
) -> None:
    appservice = make_token("@bridge:localhost", is_appservice=True, masquerade_regex="@b_.*")

    async def scenario() -> Feed:
        exchange = feed(
            app,
            "POST",
            "/_matrix/media/v3/upload?user_id=@alice:localhost",
            headers=bearer(appservice),
            length=40 * MiB,
        )
        await exchange.reply()
        return exchange

    # Twice: the token is then in the process's cache, and the masquerade is judged on
    # the loop, as it is on a pool thread.
    for _ in range(2):
        exchange = run(scenario)
        assert exchange.task.result().status == 403
        assert exchange.task.result().json()["errcode"] == "M_FORBIDDEN"
        assert exchange.pulled == []


def test_a_token_this_process_resolved_lately_is_judged_without_a_thread(
    app: MediaASGIHandler, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hot path: an upload's access token is resolved once per cache period on a pool
    thread; the upload after it is admitted on the loop (and the view's check is a hit)."""
    resolved_on_a_thread: list[str] = []
    check = MediaASGIHandler._check_access_token

    def counting(self: MediaASGIHandler, scope: Any, credential: Any) -> Any:
        resolved_on_a_thread.append(credential.token)
        return check(self, scope, credential)

    monkeypatch.setattr(MediaASGIHandler, "_check_access_token", counting)

    async def upload() -> Reply:
        exchange = feed(app, "POST", "/_matrix/media/v3/upload", headers=bearer(token), length=3)
        exchange.send(b"abc", more=False)
        return await exchange.reply()

    token_cache.clear()
    assert run(upload).status == 200
    assert resolved_on_a_thread == [token]
    assert run(upload).status == 200
    assert resolved_on_a_thread == [token]  # the second was judged from the cache


def test_resolvers_answer_from_the_process_cache_only() -> None:
    from msc3870.auth import HomeserverTokenResolver, LocalTokenResolver
    from msc3870.errors import UnknownToken

    assert LocalTokenResolver().resolve_cached("mr_never_seen") is None
    homeserver = HomeserverTokenResolver()
    assert homeserver.resolve_cached("syt_never_seen") is None
    key = homeserver._cache_key("syt_refused", None, None)
    token_cache.set(key, {"refused": 401, "body": {"errcode": "M_UNKNOWN_TOKEN", "error": "x"}})
    with pytest.raises(UnknownToken):
        homeserver.resolve_cached("syt_refused")
    key = homeserver._cache_key("syt_known", None, "DEV")
    user = {"user_id": "@a:hs", "device_id": "DEV", "is_appservice": False, "is_guest": False}
    token_cache.set(key, user)
    assert homeserver.resolve_cached("syt_known", device_id="DEV").user_id == "@a:hs"  # type: ignore[union-attr]
    token_cache.clear()


def test_refusals_before_the_view_carry_the_middleware_headers(
    app: MediaASGIHandler, token: str
) -> None:
    """A browser client reads the 401 (and so refreshes its token) only with CORS headers."""

    async def scenario() -> list[Reply]:
        origin = {"Origin": "https://app.element.io"}
        return [
            await feed(app, "POST", "/_matrix/media/v3/upload", headers=origin, length=10).reply(),
            await feed(
                app, "PUT", UPLOAD_URL_PREFIX + "not-a-token", headers=origin, length=10
            ).reply(),
        ]

    for reply in run(scenario):
        assert reply.status in (401, 403)
        assert reply.headers["access-control-allow-origin"] == "*"
        assert reply.headers["x-content-type-options"] == "nosniff"


# ------------------------------------------------------------------ bodies in flight


def test_uploads_past_the_per_process_cap_get_429_and_it_recovers(
    app: MediaASGIHandler, token: str
) -> None:
    async def scenario() -> None:
        url_a = upload_url_path(await create(app, token))
        url_b = upload_url_path(await create(app, token))
        # Two bodies arriving from two addresses: the process's two places are taken.
        first = feed(app, "PUT", url_a, length=20, client=("10.0.0.1", 1))
        second = feed(app, "PUT", url_b, length=20, client=("10.0.0.2", 1))
        first.send(b"0123456789")
        second.send(b"0123456789")
        await until(lambda: app.bodies.total == 2, "two bodies in flight")
        third = feed(app, "POST", "/_matrix/media/v3/upload", headers=bearer(token), length=20)
        third.send(b"x" * 20, more=False)
        refused = await third.reply()
        assert refused.status == 429
        assert refused.json()["errcode"] == "M_LIMIT_EXCEEDED"
        assert refused.json()["retry_after_ms"] == 1000
        assert refused.headers["retry-after"] == "1"
        assert third.pulled == []
        # One ends: its place frees, and the next upload is admitted.
        first.send(b"0123456789", more=False)
        assert (await first.reply()).status == 200
        again = feed(app, "POST", "/_matrix/media/v3/upload", headers=bearer(token), length=20)
        again.send(b"x" * 20, more=False)
        assert (await again.reply()).status == 200
        second.send(b"0123456789", more=False)
        assert (await second.reply()).status == 200
        assert_no_body_in_flight(app)

    with msc3870_settings(UPLOAD_BODIES_MAX=2, UPLOAD_BODIES_PER_ADDRESS_MAX=10):
        run(scenario)


def test_uploads_past_the_per_address_cap_get_429_and_it_recovers(
    app: MediaASGIHandler, token: str
) -> None:
    async def scenario() -> None:
        url_a = upload_url_path(await create(app, token))
        first = feed(app, "PUT", url_a, length=20, client=("10.0.0.1", 1))
        first.send(b"0123456789")
        await until(lambda: app.bodies.total == 1, "a body in flight")
        # The same address again, even from another port: refused before reading.
        same = feed(
            app,
            "POST",
            "/_matrix/media/v3/upload",
            headers=bearer(token),
            length=20,
            client=("10.0.0.1", 2),
        )
        refused = await same.reply()
        assert refused.status == 429
        assert refused.json()["errcode"] == "M_LIMIT_EXCEEDED"
        assert "retry-after" in refused.headers
        assert same.pulled == []
        # Another address is not held up.
        other = feed(
            app,
            "POST",
            "/_matrix/media/v3/upload",
            headers=bearer(token),
            length=20,
            client=("10.0.0.2", 1),
        )
        other.send(b"y" * 20, more=False)
        assert (await other.reply()).status == 200
        first.send(b"0123456789", more=False)
        assert (await first.reply()).status == 200
        again = feed(
            app,
            "POST",
            "/_matrix/media/v3/upload",
            headers=bearer(token),
            length=20,
            client=("10.0.0.1", 3),
        )
        again.send(b"z" * 20, more=False)
        assert (await again.reply()).status == 200
        assert_no_body_in_flight(app)

    with msc3870_settings(UPLOAD_BODIES_MAX=10, UPLOAD_BODIES_PER_ADDRESS_MAX=1):
        run(scenario)


def test_an_ipv6_client_is_counted_by_its_64() -> None:
    def address(host: str) -> str | None:
        return client_address({"client": (host, 1)})

    assert address("2001:db8:1:2::1") == address("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address("2001:db8:1:3::1") != address("2001:db8:1:2::1")
    assert address("::ffff:192.0.2.7") == address("192.0.2.7") == "192.0.2.7"
    assert client_address({"client": None}) is None  # a Unix socket: the process cap only


@pytest.mark.parametrize("way_out", ["spooled", "too_large", "hang_up", "too_slow", "refused"])
def test_a_body_in_flight_is_counted_until_it_ends_whichever_way(
    app: MediaASGIHandler, token: str, spools: list[Any], way_out: str
) -> None:
    async def scenario() -> None:
        headers = {} if way_out == "refused" else bearer(token)
        exchange = feed(app, "POST", "/_matrix/media/v3/upload", headers=headers, length=None)
        if way_out != "refused":
            exchange.send(b"x" * 1000)
            await until(lambda: app.bodies.total == 1, "the body counted")
            assert app.bodies.per_address == {"127.0.0.1": 1}
        if way_out == "spooled":
            exchange.send(b"x" * 1000, more=False)
            assert (await exchange.reply()).status == 200
        elif way_out == "too_large":
            exchange.send(b"x" * 5000)
            assert (await exchange.reply()).status == 413
        elif way_out == "hang_up":
            exchange.hang_up()
            assert (await exchange.reply()).status == 0  # nobody to answer
        elif way_out == "too_slow":
            assert (await exchange.reply()).status == 408
        else:
            assert (await exchange.reply()).status == 401
        assert_no_body_in_flight(app)
        assert all(spool.closed for spool in spools)

    with msc3870_settings(
        MAX_UPLOAD_SIZE=4000, UPLOAD_IDLE_TIMEOUT_SECONDS=0.5, UPLOAD_MIN_BYTES_PER_SECOND=0
    ):
        run(scenario)


# ------------------------------------------------------------------ a minimum rate


def test_a_trickling_body_is_cut_with_408_at_the_rate_bound(
    app: MediaASGIHandler, token: str, spools: list[Any]
) -> None:
    """1 byte/s against a minimum of 2 bytes/s after a grace of 1 s: the deadline is
    1 + n/2 s for n bytes received, so the body is cut at about 2 s."""

    async def scenario() -> tuple[Reply, float]:
        exchange = feed(app, "POST", "/_matrix/media/v3/upload", headers=bearer(token), length=1000)
        started = time.monotonic()

        async def trickle() -> None:
            while not exchange.task.done():
                exchange.send(b"x")
                await asyncio.sleep(1)

        trickling = asyncio.ensure_future(trickle())
        try:
            reply = await exchange.reply(timeout=15)
        finally:
            trickling.cancel()
        return reply, time.monotonic() - started

    with msc3870_settings(
        UPLOAD_MIN_BYTES_PER_SECOND=2, UPLOAD_RATE_GRACE_SECONDS=1, UPLOAD_IDLE_TIMEOUT_SECONDS=10
    ):
        reply, elapsed = run(scenario)
    assert reply.status == 408
    assert reply.json()["errcode"] == "M_UNKNOWN"
    assert "2 bytes/s" in reply.json()["error"]
    assert reply.headers["connection"] == "close"
    assert 1.5 <= elapsed < 6, elapsed
    assert spools == []  # an upload's body is never spooled: held in memory, then streamed
    assert_no_body_in_flight(app)


@pytest.mark.parametrize("sent_first", [0, 100])
def test_a_stalled_body_is_cut_with_408_at_the_idle_timeout(
    app: MediaASGIHandler, token: str, sent_first: int
) -> None:
    async def scenario() -> tuple[Reply, float]:
        exchange = feed(app, "POST", "/_matrix/media/v3/upload", headers=bearer(token), length=1000)
        if sent_first:
            exchange.send(b"x" * sent_first)
        started = time.monotonic()
        reply = await exchange.reply(timeout=15)
        return reply, time.monotonic() - started

    with msc3870_settings(UPLOAD_MIN_BYTES_PER_SECOND=0, UPLOAD_IDLE_TIMEOUT_SECONDS=0.5):
        reply, elapsed = run(scenario)
    assert reply.status == 408
    assert reply.json() == {
        "errcode": "M_UNKNOWN",
        "error": "No bytes of the request body arrived for 0.5 s; send it again",
    }
    assert reply.headers["connection"] == "close"
    assert 0.4 <= elapsed < 5, elapsed
    assert_no_body_in_flight(app)


def test_a_json_body_that_stalls_is_cut_too(app: MediaASGIHandler, token: str) -> None:
    async def scenario() -> Reply:
        exchange = feed(app, "POST", "/_matrix/media/v1/create", headers=bearer(token), length=100)
        exchange.send(b"{")
        return await exchange.reply(timeout=15)

    with msc3870_settings(UPLOAD_IDLE_TIMEOUT_SECONDS=0.3):
        assert run(scenario).status == 408


def test_bytes_that_came_fast_earn_time_for_a_stall() -> None:
    """The rate deadline grows with what arrived; the idle timeout still bounds a stall."""
    with msc3870_settings(
        UPLOAD_MIN_BYTES_PER_SECOND=1000,
        UPLOAD_RATE_GRACE_SECONDS=10,
        UPLOAD_IDLE_TIMEOUT_SECONDS=60,
    ):
        pace = BodyPace(0.0)
        assert pace.deadline() == 10.0  # nothing yet: the grace period
        pace.arrived(1_000_000, 5.0)
        assert pace.deadline() == 65.0  # the idle timeout, before 10 + 1000 s
        assert "No bytes" in pace.error(65.0).message
        pace = BodyPace(0.0)
        pace.arrived(2_000, 11.0)
        assert pace.deadline() == 12.0
        assert "bytes/s" in pace.error(12.0).message


def test_a_slow_upload_above_the_minimum_rate_is_received(
    app: MediaASGIHandler, token: str
) -> None:
    async def scenario() -> Reply:
        exchange = feed(app, "POST", "/_matrix/media/v3/upload", headers=bearer(token), length=2000)
        for _ in range(9):  # 200 bytes every 0.1 s: 2,000 bytes/s against 1,000
            exchange.send(b"x" * 200)
            await asyncio.sleep(0.1)
        exchange.send(b"x" * 200, more=False)
        return await exchange.reply()

    with msc3870_settings(
        UPLOAD_MIN_BYTES_PER_SECOND=1000,
        UPLOAD_RATE_GRACE_SECONDS=0.2,
        UPLOAD_IDLE_TIMEOUT_SECONDS=1,
    ):
        reply = run(scenario)
    assert reply.status == 200, reply.body


# ------------------------------------------------------------------ uploads still work


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("target", [*UPLOAD_TARGETS, "upload_url"])
def test_a_normal_upload_works_through_every_path(
    app: MediaASGIHandler, token: str, target: str, chunked: bool
) -> None:
    data = os.urandom(300 * 1024 + 5)

    async def scenario() -> bytes:
        media = await create(app, token)
        path = mxc_path(media["content_uri"])
        if target == "upload_url":
            method, url, headers = "PUT", upload_url_path(media), {}
        else:
            method, url = upload_target(target, path)
            headers = bearer(token)
        exchange = feed(app, method, url, headers=headers, length=None if chunked else len(data))
        for start in range(0, len(data), 64 * 1024):
            exchange.send(data[start : start + 64 * 1024])
        exchange.send(b"", more=False)
        reply = await exchange.reply()
        assert reply.status == 200, reply.body
        if target.startswith("post"):
            path = mxc_path(reply.json()["content_uri"])
        elif target == "upload_url":
            done = await call(
                app,
                "POST",
                f"/_matrix/media/v1/upload/{path}/complete",
                headers=bearer(token),
            )
            assert done.status == 200, done.body
        got = await call(
            app,
            "GET",
            f"/_matrix/client/v1/media/download/{path}?timeout_ms=20000",
            headers=bearer(token),
        )
        assert got.status == 200, got.body
        return got.body

    assert run(scenario) == data
    assert Media.objects.filter(state=MediaState.COMPLETE).count() == 1


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("name", "value", "check_id"),
    [
        ("UPLOAD_BODIES_MAX", 0, "msc3870.E006"),
        ("UPLOAD_BODIES_PER_ADDRESS_MAX", -1, "msc3870.E006"),
        ("UPLOAD_IDLE_TIMEOUT_SECONDS", 0, "msc3870.E006"),
        ("UPLOAD_MIN_BYTES_PER_SECOND", -1, "msc3870.E006"),
        ("UPLOAD_RATE_GRACE_SECONDS", -5, "msc3870.E006"),
        ("UPLOAD_BODIES_MAX", "64", "msc3870.E012"),
        ("UPLOAD_IDLE_TIMEOUT_SECONDS", "60", "msc3870.E013"),
    ],
)
def test_upload_admission_settings_are_checked(name: str, value: Any, check_id: str) -> None:
    from django.core.checks import run_checks

    with msc3870_settings(**{name: value}):
        found = {message.id for message in run_checks(include_deployment_checks=True)}
    assert check_id in found


def test_a_media_body_to_no_upload_route_takes_a_place_too(
    app: MediaASGIHandler, token: str
) -> None:
    """A PUT where only POST uploads (405 from the view, after the body) still counts."""

    async def scenario() -> None:
        exchange = feed(app, "PUT", "/_matrix/media/v3/upload", headers=bearer(token), length=20)
        exchange.send(b"x" * 10)
        await until(lambda: app.bodies.total == 1, "the body counted")
        exchange.send(b"x" * 10, more=False)
        assert (await exchange.reply()).status == 405
        assert_no_body_in_flight(app)

    run(scenario)
