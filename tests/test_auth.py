"""Token resolvers: local tokens, and the homeserver's /account/whoami over real HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import ThreadingHTTPServer
from io import StringIO
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.utils import timezone

from msc3870.auth import HomeserverTokenResolver, LocalTokenResolver
from msc3870.errors import (
    Forbidden,
    HomeserverUnavailable,
    InvalidParam,
    LimitExceeded,
    UnknownToken,
)
from msc3870.models import AccessToken

from .helpers import JSONHandler, make_token, msc3870_settings


def test_local_token_resolves(db: None) -> None:
    token = make_token("@alice:localhost")
    user = LocalTokenResolver().resolve(token)
    assert user.user_id == "@alice:localhost"
    assert AccessToken.objects.get().last_used_at is not None


@pytest.mark.parametrize(
    "fields",
    [{"revoked": True}, {"expires_at": timezone.now() - timedelta(seconds=1)}],
)
def test_revoked_or_expired_local_token_is_unknown(db: None, fields: dict[str, Any]) -> None:
    token = make_token("@alice:localhost", **fields)
    with pytest.raises(UnknownToken):
        LocalTokenResolver().resolve(token)
    response = Client().post(
        "/_matrix/media/v1/create", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 401
    assert response.json()["errcode"] == "M_UNKNOWN_TOKEN"


def test_tokens_are_stored_as_digests(db: None) -> None:
    token = make_token("@alice:localhost")
    assert not AccessToken.objects.filter(token_digest=token).exists()
    assert token not in AccessToken.objects.get().token_digest


def test_create_access_token_command_prints_token_last(db: None) -> None:
    out = StringIO()
    call_command("create_access_token", "@carol:localhost", stdout=out, stderr=StringIO())
    token = out.getvalue().strip().splitlines()[-1]
    assert LocalTokenResolver().resolve(token).user_id == "@carol:localhost"
    row = AccessToken.objects.get(user_id="@carol:localhost")
    assert row.expires_at is not None and row.expires_at > timezone.now() + timedelta(days=89)


def test_create_access_token_refuses_a_bad_user_id(db: None) -> None:
    with pytest.raises(CommandError):
        call_command("create_access_token", "carol", stdout=StringIO(), stderr=StringIO())


def _mint(*args: str) -> str:
    out = StringIO()
    call_command("create_access_token", *args, stdout=out, stderr=StringIO())
    return out.getvalue().strip().splitlines()[-1]


def _acts_as(token: str, user_id: str) -> bool:
    try:
        return LocalTokenResolver().resolve(token, masquerade_as=user_id).user_id == user_id
    except (Forbidden, InvalidParam):
        return False


def test_appservice_token_without_namespace_acts_only_as_local_users(db: None) -> None:
    """Minted without --namespace, it may act only as this server's users, not as anyone
    on any server."""
    token = _mint("@bridge:localhost", "--appservice")
    assert AccessToken.objects.get().masquerade_regex == r"@[^:]+:localhost"
    assert _acts_as(token, "@tg_1:localhost")
    assert not _acts_as(token, "@root:evil.example")
    # A server part only a lax grammar accepts cannot pass for this server.
    assert not _acts_as(token, "@root:evil.example:localhost")
    response = Client().post(
        "/_matrix/media/v1/create?user_id=@root:evil.example",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 403
    assert response.json()["errcode"] == "M_FORBIDDEN"


def test_appservice_namespace_follows_the_server_name(db: None) -> None:
    with msc3870_settings(SERVER_NAME="media.example.org"):
        token = _mint("@bridge:media.example.org", "--appservice")
        assert _acts_as(token, "@a:media.example.org")
        # The dots are literal: "mediaXexample.org" is another server.
        assert not _acts_as(token, "@a:mediaXexample.org")


@pytest.mark.parametrize("namespace", ["", "   "])
def test_create_access_token_refuses_an_empty_namespace(db: None, namespace: str) -> None:
    with pytest.raises(CommandError, match="empty"):
        _mint("@bridge:localhost", "--appservice", "--namespace", namespace)
    assert not AccessToken.objects.exists()


def test_create_access_token_refuses_a_bad_namespace(db: None) -> None:
    with pytest.raises(CommandError, match="regex"):
        _mint("@bridge:localhost", "--appservice", "--namespace", "@tg_(")
    with pytest.raises(CommandError, match="appservice"):
        _mint("@alice:localhost", "--namespace", "@.*")


def test_stored_empty_namespace_allows_no_masquerading(db: None) -> None:
    """A stored empty pattern (rows minted before namespaces were required) means nobody
    but the token's own user, never anyone."""
    token = make_token("@bridge:localhost", is_appservice=True, masquerade_regex="")
    assert not _acts_as(token, "@tg_1:localhost")
    assert LocalTokenResolver().resolve(token).user_id == "@bridge:localhost"
    assert _acts_as(token, "@bridge:localhost")


def test_namespace_reaches_other_servers_only_when_it_names_them(db: None) -> None:
    anywhere = make_token("@bridge:localhost", is_appservice=True, masquerade_regex=r"@tg_.*")
    assert _acts_as(anywhere, "@tg_1:localhost")
    assert not _acts_as(anywhere, "@tg_1:evil.example")
    assert not _acts_as(anywhere, "@alice:localhost")
    named = make_token(
        "@bridge:localhost", is_appservice=True, masquerade_regex=r"@tg_.*:other\.example"
    )
    assert _acts_as(named, "@tg_1:other.example")
    assert not _acts_as(named, "@tg_1:evil.example")
    broken = make_token("@bridge:localhost", is_appservice=True, masquerade_regex="@tg_(")
    assert not _acts_as(broken, "@tg_1:localhost")


class FakeHomeserver(JSONHandler):
    """A whoami endpoint over real HTTP, answering like Synapse."""

    tokens: dict[str, str] = {
        "good": "@dave:hs.example",
        "as": "@bridge:hs.example",
        "guest": "@123:hs.example",
    }
    refusals: dict[str, tuple[int, dict[str, Any]]] = {
        "expired": (401, {"errcode": "M_UNKNOWN_TOKEN", "error": "expired", "soft_logout": True}),
        "locked": (401, {"errcode": "M_USER_LOCKED", "error": "locked", "soft_logout": True}),
        "lapsed": (403, {"errcode": "M_EXPIRED_ACCOUNT", "error": "account expired"}),
    }
    # The homeserver's own failures: never the token's fault.
    failures: dict[str, tuple[int, dict[str, Any]]] = {
        "broken": (500, {"errcode": "M_UNKNOWN", "error": "Internal server error"}),
        "busy": (429, {"errcode": "M_LIMIT_EXCEEDED", "error": "slow down"}),
    }
    calls: list[dict[str, Any]] = []
    # Tokens starting with "slow" are answered (401) only once this is set.
    gate = threading.Event()

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        FakeHomeserver.calls.append({"path": parts.path, "query": query, "token": token})
        if parts.path != "/_matrix/client/v3/account/whoami":
            return self._send(404, {"errcode": "M_UNRECOGNIZED", "error": "no"})
        if token.startswith("slow"):
            FakeHomeserver.gate.wait(30)
        if token in self.failures:
            status, body = self.failures[token]
            return self._send(status, body)
        if token in self.refusals:
            status, body = self.refusals[token]
            return self._send(status, body)
        user = self.tokens.get(token)
        if user is None:
            return self._send(401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown token"})
        if "user_id" in query:
            if token != "as":
                return self._send(403, {"errcode": "M_FORBIDDEN", "error": "Not an AS"})
            user = query["user_id"]
        device = query.get("device_id", "DEV")
        return self._send(200, {"user_id": user, "device_id": device, "is_guest": token == "guest"})


@pytest.fixture
def homeserver() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHomeserver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeHomeserver.calls = []
    FakeHomeserver.gate = threading.Event()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    FakeHomeserver.gate.set()
    server.shutdown()


def _whoami_tokens() -> list[str]:
    return [call["token"] for call in FakeHomeserver.calls]


def test_whoami_cache_is_keyed_by_token_user_and_device(db: None, homeserver: str) -> None:
    """One appservice token acting as two users is two identities, never the first one's
    cached answer (a key of the token alone would serve @a's identity to a request for @b)."""
    with msc3870_settings(HOMESERVER_URL=homeserver):
        resolver = HomeserverTokenResolver()
        for _ in range(2):
            assert resolver.resolve("as", masquerade_as="@a:hs.example").user_id == "@a:hs.example"
            assert resolver.resolve("as", masquerade_as="@b:hs.example").user_id == "@b:hs.example"
            assert resolver.resolve("as").user_id == "@bridge:hs.example"
            assert resolver.resolve("as", device_id="D2").device_id == "D2"
            assert resolver.resolve("as").device_id == "DEV"
        # Each distinct (token, user_id, device_id) asked once, then cached.
        assert len(FakeHomeserver.calls) == 4


def test_refused_tokens_are_remembered_briefly(db: None, homeserver: str) -> None:
    """A refused token is not asked about again for a while: not a whoami round trip per
    request."""
    with msc3870_settings(HOMESERVER_URL=homeserver):
        resolver = HomeserverTokenResolver()
        for _ in range(3):
            with pytest.raises(UnknownToken):
                resolver.resolve("bad")
        assert _whoami_tokens() == ["bad"]
        # The cached refusal reads as the homeserver's own (errcode, soft_logout).
        answers = []
        for _ in range(2):
            with pytest.raises(UnknownToken) as refused:
                resolver.resolve("locked")
            answers.append((refused.value.status, refused.value.as_dict()))
        assert answers[0] == answers[1]
        assert answers[0][1]["errcode"] == "M_USER_LOCKED"
        assert answers[0][1]["soft_logout"] is True
        assert _whoami_tokens() == ["bad", "locked"]
        # A refusal for one (token, user) pair is not the token's refusal.
        for _ in range(2):
            with pytest.raises(Forbidden):
                resolver.resolve("good", masquerade_as="@a:hs.example")
            assert resolver.resolve("good").user_id == "@dave:hs.example"
        assert _whoami_tokens() == ["bad", "locked", "good", "good"]


@pytest.mark.parametrize(
    ("token", "error"), [("broken", HomeserverUnavailable), ("busy", LimitExceeded)]
)
def test_homeserver_errors_are_not_cached(
    db: None, homeserver: str, token: str, error: type[Exception]
) -> None:
    with msc3870_settings(HOMESERVER_URL=homeserver):
        for _ in range(3):
            with pytest.raises(error):
                HomeserverTokenResolver().resolve(token)
    assert _whoami_tokens() == [token] * 3


def test_unreachable_homeserver_is_not_cached(db: None, homeserver: str) -> None:
    with (
        msc3870_settings(HOMESERVER_URL="http://127.0.0.1:9"),
        pytest.raises(HomeserverUnavailable),
    ):
        HomeserverTokenResolver().resolve("good")
    with msc3870_settings(HOMESERVER_URL=homeserver):
        assert HomeserverTokenResolver().resolve("good").user_id == "@dave:hs.example"


def test_whoami_calls_in_flight_are_capped(
    db: None, homeserver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow homeserver and many new tokens cannot take every thread. Past the cap,
    a request waits a bounded time for a slot, then gets 429 and never reaches the
    homeserver."""
    monkeypatch.setattr(HomeserverTokenResolver, "MAX_CONCURRENT_WHOAMI", 2)
    monkeypatch.setattr(HomeserverTokenResolver, "WHOAMI_SLOT_WAIT_SECONDS", 0.2)
    outcomes: list[BaseException | None] = []

    def resolve(token: str) -> None:
        try:
            HomeserverTokenResolver().resolve(token)
        except BaseException as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)

    # One settings override for every thread (override_settings is process-wide).
    with msc3870_settings(
        HOMESERVER_URL=homeserver, TOKEN_RESOLVER="msc3870.auth.HomeserverTokenResolver"
    ):
        slow = [threading.Thread(target=resolve, args=(f"slow{i}",)) for i in range(2)]
        for thread in slow:
            thread.start()
        try:
            pause = threading.Event()
            for _ in range(400):  # until both are at the homeserver (bounded: a hang fails)
                if len(FakeHomeserver.calls) == 2:
                    break
                pause.wait(0.025)
            assert sorted(_whoami_tokens()) == ["slow0", "slow1"]
            with pytest.raises(LimitExceeded):
                HomeserverTokenResolver().resolve("good")
            response = Client().post(
                "/_matrix/media/v1/create", headers={"Authorization": "Bearer good"}
            )
            assert response.status_code == 429
            assert response.json()["errcode"] == "M_LIMIT_EXCEEDED"
            assert response.json()["retry_after_ms"] > 0
            assert int(response.headers["Retry-After"]) >= 1
            # The refused requests never reached the homeserver.
            assert sorted(_whoami_tokens()) == ["slow0", "slow1"]
        finally:
            FakeHomeserver.gate.set()
            for thread in slow:
                thread.join(30)
        assert [type(o) for o in outcomes] == [UnknownToken, UnknownToken]
        # The slots are free again.
        assert HomeserverTokenResolver().resolve("good").user_id == "@dave:hs.example"


def test_homeserver_resolver_asks_whoami_and_caches(db: None, homeserver: str) -> None:
    with msc3870_settings(HOMESERVER_URL=homeserver):
        resolver = HomeserverTokenResolver()
        assert resolver.resolve("good").user_id == "@dave:hs.example"
        assert resolver.resolve("good").user_id == "@dave:hs.example"
        assert len(FakeHomeserver.calls) == 1
        with pytest.raises(UnknownToken):
            resolver.resolve("bad")


def test_homeserver_resolver_passes_masquerading_through(db: None, homeserver: str) -> None:
    with msc3870_settings(HOMESERVER_URL=homeserver):
        resolver = HomeserverTokenResolver()
        user = resolver.resolve("as", masquerade_as="@tg_1:hs.example")
        assert user.user_id == "@tg_1:hs.example"
        assert FakeHomeserver.calls[-1]["query"] == {"user_id": "@tg_1:hs.example"}
        with pytest.raises(Forbidden):
            resolver.resolve("good", masquerade_as="@someone:hs.example")


def test_homeserver_down_is_502(db: None) -> None:
    with msc3870_settings(
        HOMESERVER_URL="http://127.0.0.1:9",
        TOKEN_RESOLVER="msc3870.auth.HomeserverTokenResolver",
    ):
        with pytest.raises(HomeserverUnavailable):
            HomeserverTokenResolver().resolve("good")
        response = Client().post(
            "/_matrix/media/v1/create", headers={"Authorization": "Bearer good"}
        )
    assert response.status_code == 502
    assert response.json()["errcode"] == "M_UNKNOWN"


def test_create_through_homeserver_tokens(db: None, homeserver: str) -> None:
    with msc3870_settings(
        HOMESERVER_URL=homeserver, TOKEN_RESOLVER="msc3870.auth.HomeserverTokenResolver"
    ):
        ok = Client().post("/_matrix/media/v1/create", headers={"Authorization": "Bearer good"})
        bad = Client().post("/_matrix/media/v1/create", headers={"Authorization": "Bearer bad"})
    assert ok.status_code == 200
    assert bad.status_code == 401
    assert bad.json()["errcode"] == "M_UNKNOWN_TOKEN"


@pytest.mark.parametrize(
    ("token", "status", "body"),
    [
        ("expired", 401, {"errcode": "M_UNKNOWN_TOKEN", "error": "expired", "soft_logout": True}),
        ("locked", 401, {"errcode": "M_USER_LOCKED", "error": "locked", "soft_logout": True}),
        ("lapsed", 403, {"errcode": "M_EXPIRED_ACCOUNT", "error": "account expired"}),
    ],
)
def test_homeserver_refusals_are_passed_on(
    db: None, homeserver: str, token: str, status: int, body: dict[str, Any]
) -> None:
    """soft_logout and the homeserver's errcode reach the client: a soft logout must not
    read as a hard one (the client would drop its session and keys)."""
    with msc3870_settings(
        HOMESERVER_URL=homeserver, TOKEN_RESOLVER="msc3870.auth.HomeserverTokenResolver"
    ):
        response = Client().post(
            "/_matrix/media/v1/create", headers={"Authorization": f"Bearer {token}"}
        )
    assert response.status_code == status
    assert response.json() == body


def test_guests_may_download_but_not_upload(db: None, homeserver: str) -> None:
    from .helpers import make_token

    owner = make_token("@owner:localhost")
    upload = Client().post(
        "/_matrix/media/v3/upload",
        b"for everyone",
        content_type="text/plain",
        headers={"Authorization": f"Bearer {owner}"},
    )
    path = upload.json()["content_uri"][len("mxc://") :]
    with msc3870_settings(
        HOMESERVER_URL=homeserver, TOKEN_RESOLVER="msc3870.auth.HomeserverTokenResolver"
    ):
        guest = {"Authorization": "Bearer guest"}
        created = Client().post("/_matrix/media/v1/create", headers=guest)
        one_shot = Client().post("/_matrix/media/v3/upload", b"x", "text/plain", headers=guest)
        download = Client().get(f"/_matrix/client/v1/media/download/{path}", headers=guest)
    assert created.status_code == one_shot.status_code == 403
    assert created.json()["errcode"] == "M_GUEST_ACCESS_FORBIDDEN"
    assert download.status_code == 200
    assert b"".join(download.streaming_content) == b"for everyone"
