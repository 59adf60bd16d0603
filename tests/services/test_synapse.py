"""The media server beside a real Synapse (PyPI ``matrix-synapse``, ``scripts/synapse``).

With ``MATRIX_HOMESERVER_URL`` set, every access token is Synapse's: users registered and
logged in through Synapse's own APIs, and an application service whose ``as_token`` may
act as the users of its namespace (``?user_id=``). Who the caller is, and whether it may
masquerade, is what Synapse's ``/account/whoami`` answers.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from msc3870.models import MediaState

from ..helpers import bearer, free_port, media_of, mxc_path, wait_until
from .conftest import PrivateRedis, Stack
from .synapse_helpers import register, synapse_script

pytestmark = pytest.mark.services

# Access tokens of logins that ask for a refresh token expire this soon (Synapse's
# refreshable_access_token_lifetime), for the soft-logout test.
REFRESHABLE_LIFETIME_SECONDS = 2


@dataclass(frozen=True)
class Session:
    user_id: str
    access_token: str
    device_id: str | None = None
    refresh_token: str | None = None


@dataclass(frozen=True)
class Synapse:
    """A running Synapse, and what the tests do with it as a client and as its admin."""

    url: str
    directory: Path

    def secret(self, name: str) -> str:
        return (self.directory / name).read_text().strip()

    @property
    def as_token(self) -> str:
        return self.secret("as_token")

    def register(self, localpart: str, password: str, *, admin: bool = False) -> Session:
        """Shared-secret registration (``POST /_synapse/admin/v1/register``)."""
        body = register(self.url, self.directory, localpart, password, admin=admin)
        return Session(body["user_id"], body["access_token"], body.get("device_id"))

    def login(self, localpart: str, password: str, *, refresh_token: bool = False) -> Session:
        response = requests.post(
            f"{self.url}/_matrix/client/v3/login",
            json={
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": localpart},
                "password": password,
                "refresh_token": refresh_token,
            },
            timeout=30,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        return Session(
            body["user_id"], body["access_token"], body["device_id"], body.get("refresh_token")
        )

    def register_guest(self) -> Session:
        response = requests.post(
            f"{self.url}/_matrix/client/v3/register", params={"kind": "guest"}, json={}, timeout=30
        )
        assert response.status_code == 200, response.text
        body = response.json()
        return Session(body["user_id"], body["access_token"], body.get("device_id"))

    def register_appservice_user(self, localpart: str) -> str:
        """Register a user of the application service's namespace, as a bridge does."""
        response = requests.post(
            f"{self.url}/_matrix/client/v3/register",
            json={
                "type": "m.login.application_service",
                "username": localpart,
                "inhibit_login": True,
            },
            headers=bearer(self.as_token),
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return response.json()["user_id"]

    def logout(self, token: str) -> None:
        response = requests.post(
            f"{self.url}/_matrix/client/v3/logout", json={}, headers=bearer(token), timeout=30
        )
        assert response.status_code == 200, response.text

    def whoami(self, token: str, **params: str) -> requests.Response:
        return requests.get(
            f"{self.url}/_matrix/client/v3/account/whoami",
            headers=bearer(token),
            params=params,
            timeout=10,
        )

    def admin_update_user(self, admin_token: str, user_id: str, **fields: Any) -> None:
        response = requests.put(
            f"{self.url}/_synapse/admin/v2/users/{user_id}",
            json=fields,
            headers=bearer(admin_token),
            timeout=30,
        )
        assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synapse]:
    """A fresh Synapse of this module's own (own data dir, free port), stopped at the end."""
    directory = tmp_path_factory.mktemp("synapse")
    port = free_port()
    env = {
        **os.environ,
        "SYNAPSE_DIR": str(directory),
        "SYNAPSE_PORT": str(port),
        "SYNAPSE_REFRESHABLE_TOKEN_LIFETIME": f"{REFRESHABLE_LIFETIME_SECONDS}s",
    }
    synapse_script("install", env, timeout=900)
    synapse_script("start --fresh", env, timeout=120)
    try:
        yield Synapse(url=f"http://127.0.0.1:{port}", directory=directory)
    finally:
        synapse_script("stop", env, timeout=60)


@dataclass(frozen=True)
class Account:
    localpart: str
    password: str
    user_id: str


@pytest.fixture(scope="module")
def alice(synapse: Synapse) -> Account:
    password = secrets.token_urlsafe(12)
    return Account("alice", password, synapse.register("alice", password).user_id)


@pytest.fixture(scope="module")
def bob(synapse: Synapse) -> Account:
    password = secrets.token_urlsafe(12)
    return Account("bob", password, synapse.register("bob", password).user_id)


@pytest.fixture(scope="module")
def admin(synapse: Synapse) -> Session:
    return synapse.register("admin", secrets.token_urlsafe(12), admin=True)


@pytest.fixture
def media_server(make_stack: Any, private_redis: PrivateRedis, synapse: Synapse) -> Stack:
    """gunicorn + a worker that ask Synapse about tokens. The broker and the cache (the
    whoami answers) are a redis-server of the test's own: no other worker takes the tasks,
    and no answer cached by an earlier test is seen."""
    stack: Stack = make_stack(
        MATRIX_HOMESERVER_URL=synapse.url,
        CELERY_BROKER_URL=private_redis.url,
        REDIS_URL=f"redis://127.0.0.1:{private_redis.port}/1",
    )
    stack.start_server()
    stack.start_worker()
    return stack


def authenticated_download(
    stack: Stack, token: str | None, content_uri: str, query: str = ""
) -> requests.Response:
    return requests.get(
        f"{stack.base_url}/_matrix/client/v1/media/download/{mxc_path(content_uri)}{query}",
        headers=bearer(token) if token else {},
        timeout=60,
    )


def error_of(response: requests.Response) -> tuple[int, str]:
    return response.status_code, response.json().get("errcode", "")


def test_full_flow_with_a_synapse_login(
    media_server: Stack, synapse: Synapse, alice: Account
) -> None:
    session = synapse.login(alice.localpart, alice.password)
    data = os.urandom(64 * 1024)
    content_uri = media_server.client(session.access_token).upload_through_url(
        data, content_type="application/octet-stream"
    )
    media = media_of(content_uri)
    assert media.user_id == alice.user_id == "@alice:localhost"
    assert media.upload_method == "url"
    # /complete answers before the full-object checks: the download waits.
    got = authenticated_download(media_server, session.access_token, content_uri)
    assert got.status_code == 200, got.text
    assert got.content == data
    assert media_of(content_uri).state == MediaState.COMPLETE


def test_unknown_and_missing_tokens_are_refused(
    media_server: Stack, synapse: Synapse, alice: Account
) -> None:
    content_uri = media_server.client(
        synapse.login(alice.localpart, alice.password).access_token
    ).upload_through_url(b"hello", content_type="text/plain")
    bogus = "syt_" + secrets.token_urlsafe(24)
    assert error_of(synapse.whoami(bogus)) == (401, "M_UNKNOWN_TOKEN")  # Synapse's verdict
    created = requests.post(
        f"{media_server.base_url}/_matrix/media/v1/create", headers=bearer(bogus), timeout=30
    )
    assert error_of(created) == (401, "M_UNKNOWN_TOKEN")
    assert error_of(authenticated_download(media_server, bogus, content_uri)) == (
        401,
        "M_UNKNOWN_TOKEN",
    )
    anonymous = requests.post(f"{media_server.base_url}/_matrix/media/v1/create", timeout=30)
    assert error_of(anonymous) == (401, "M_MISSING_TOKEN")
    assert error_of(authenticated_download(media_server, None, content_uri)) == (
        401,
        "M_MISSING_TOKEN",
    )


def test_token_is_refused_after_logout(
    media_server: Stack, synapse: Synapse, alice: Account
) -> None:
    # The media server caches whoami answers (MSC3870["WHOAMI_CACHE_SECONDS"], 60 s, not
    # settable in mediarepo), so this token is first shown to it after the logout.
    session = synapse.login(alice.localpart, alice.password)
    assert synapse.whoami(session.access_token).status_code == 200
    synapse.logout(session.access_token)
    assert error_of(synapse.whoami(session.access_token)) == (401, "M_UNKNOWN_TOKEN")
    created = requests.post(
        f"{media_server.base_url}/_matrix/media/v1/create",
        headers=bearer(session.access_token),
        timeout=30,
    )
    assert error_of(created) == (401, "M_UNKNOWN_TOKEN")
    # Another device of the same user is not logged out.
    other = synapse.login(alice.localpart, alice.password)
    assert media_of(media_server.client(other.access_token).create()["content_uri"]).user_id == (
        alice.user_id
    )


def test_appservice_masquerades_as_synapse_decides(
    media_server: Stack, synapse: Synapse, alice: Account
) -> None:
    bridge_user = synapse.register_appservice_user("bridge_1")
    assert bridge_user == "@bridge_1:localhost"
    as_token = synapse.as_token
    data = b"bridged " + os.urandom(1024)
    as_bridge_user = f"?user_id={bridge_user}"
    content_uri = media_server.client(as_token).upload_through_url(data, query=as_bridge_user)
    assert media_of(content_uri).user_id == bridge_user
    got = authenticated_download(media_server, as_token, content_uri, as_bridge_user)
    assert got.status_code == 200, got.text
    assert got.content == data

    def create_as(token: str, user_id: str | None) -> requests.Response:
        return requests.post(
            f"{media_server.base_url}/_matrix/media/v1/create",
            params={"user_id": user_id} if user_id else {},
            headers=bearer(token),
            timeout=30,
        )

    # Outside the namespace, and in it but never registered: Synapse says 403, so do we.
    for user_id in ("@someone_else:localhost", alice.user_id, "@bridge_unregistered:localhost"):
        assert error_of(synapse.whoami(as_token, user_id=user_id)) == (403, "M_FORBIDDEN")
        assert error_of(create_as(as_token, user_id)) == (403, "M_FORBIDDEN"), user_id
    # No user_id: the application service's own sender.
    own = create_as(as_token, None)
    assert own.status_code == 200, own.text
    assert media_of(own.json()["content_uri"]).user_id == "@bridgebot:localhost"
    # Synapse ignores user_id on a user's token: alice stays alice.
    not_masquerading = create_as(
        synapse.login(alice.localpart, alice.password).access_token, bridge_user
    )
    assert not_masquerading.status_code == 200, not_masquerading.text
    assert media_of(not_masquerading.json()["content_uri"]).user_id == alice.user_id
    # The sender is not the bridge user: it cannot complete the bridge user's media.
    pending = create_as(as_token, bridge_user).json()
    requests.put(pending["upload_url"], data=b"x", timeout=30)
    assert error_of(media_server.client(as_token).complete(pending["content_uri"])) == (
        403,
        "M_FORBIDDEN",
    )


def test_another_user_cannot_upload_into_alices_media(
    media_server: Stack, synapse: Synapse, alice: Account, bob: Account
) -> None:
    alice_token = synapse.login(alice.localpart, alice.password).access_token
    bob_token = synapse.login(bob.localpart, bob.password).access_token
    created = media_server.client(alice_token).create()
    path = mxc_path(created["content_uri"])
    put = requests.put(
        f"{media_server.base_url}/_matrix/media/v3/upload/{path}",
        data=b"bob's bytes",
        headers={**bearer(bob_token), "Content-Type": "text/plain"},
        timeout=30,
    )
    assert error_of(put) == (403, "M_FORBIDDEN")
    requests.put(created["upload_url"], data=b"alice's bytes", timeout=30)
    assert error_of(media_server.client(bob_token).complete(created["content_uri"])) == (
        403,
        "M_FORBIDDEN",
    )
    assert media_of(created["content_uri"]).state == MediaState.PENDING
    done = media_server.client(alice_token).complete(created["content_uri"])
    assert done.status_code == 200, done.text
    # Downloads are for every user of the homeserver.
    got = authenticated_download(media_server, bob_token, created["content_uri"])
    assert got.content == b"alice's bytes"


def test_mautrix_logs_in_to_synapse_and_uploads_to_the_media_server(
    media_server: Stack, synapse: Synapse, alice: Account
) -> None:
    from mautrix.api import HTTPAPI
    from mautrix.client import ClientAPI
    from mautrix.types import UserID

    bridge_user = UserID(synapse.register_appservice_user("bridge_2"))
    data = os.urandom(200 * 1024)
    bridged = os.urandom(100 * 1024)

    async def scenario() -> tuple[str, bytes, str, bytes]:
        # A client logs in to Synapse, then talks to the media server with that token.
        homeserver = ClientAPI(api=HTTPAPI(base_url=synapse.url, default_retry_count=0))
        media_api = HTTPAPI(base_url=media_server.base_url, default_retry_count=0)
        # A bridge: the as_token, acting as a user of its namespace.
        bridge_api = HTTPAPI(
            base_url=media_server.base_url,
            token=synapse.as_token,
            as_user_id=bridge_user,
            default_retry_count=0,
        )
        try:
            await homeserver.login(
                identifier=alice.localpart, password=alice.password, store_access_token=True
            )
            media_api.token = homeserver.api.token
            client = ClientAPI(homeserver.mxid, api=media_api)
            mxc = await client.upload_media(
                data, mime_type="application/x-test", filename="a.bin", async_upload=True
            )
            downloaded = await client.download_media(mxc, timeout_ms=30_000)
            bridge = ClientAPI(bridge_user, api=bridge_api)
            bridged_mxc = await bridge.upload_media(
                bridged, mime_type="application/x-test", filename="b.bin", async_upload=True
            )
            bridged_downloaded = await bridge.download_media(bridged_mxc, timeout_ms=30_000)
            await homeserver.logout()
            return mxc, downloaded, bridged_mxc, bridged_downloaded
        finally:
            for api in (homeserver.api, media_api, bridge_api):
                await api.session.close()

    mxc, downloaded, bridged_mxc, bridged_downloaded = asyncio.run(scenario())
    assert downloaded == data
    assert media_of(mxc).user_id == alice.user_id
    assert media_of(mxc).upload_method == "url"
    assert bridged_downloaded == bridged
    assert media_of(bridged_mxc).user_id == bridge_user


# Whoami says more than "who": is_guest, soft_logout, errcodes other than M_UNKNOWN_TOKEN.
# The media server passes them on as Synapse would answer.


def test_guest_may_download_but_not_upload(
    media_server: Stack, synapse: Synapse, alice: Account
) -> None:
    content_uri = media_server.client(
        synapse.login(alice.localpart, alice.password).access_token
    ).upload_through_url(b"public", content_type="text/plain")
    guest = synapse.register_guest()
    assert synapse.whoami(guest.access_token).json()["is_guest"] is True
    on_synapse = requests.post(
        f"{synapse.url}/_matrix/media/v1/create", headers=bearer(guest.access_token), timeout=30
    )
    assert error_of(on_synapse) == (403, "M_GUEST_ACCESS_FORBIDDEN")
    assert authenticated_download(media_server, guest.access_token, content_uri).content == (
        b"public"
    )
    created = requests.post(
        f"{media_server.base_url}/_matrix/media/v1/create",
        headers=bearer(guest.access_token),
        timeout=30,
    )
    assert error_of(created) == (403, "M_GUEST_ACCESS_FORBIDDEN")


def test_expired_refreshable_token_is_a_soft_logout(
    media_server: Stack, synapse: Synapse, alice: Account
) -> None:
    session = synapse.login(alice.localpart, alice.password, refresh_token=True)
    assert session.refresh_token
    time.sleep(REFRESHABLE_LIFETIME_SECONDS + 1)
    on_synapse = synapse.whoami(session.access_token)
    assert error_of(on_synapse) == (401, "M_UNKNOWN_TOKEN")
    assert on_synapse.json()["soft_logout"] is True
    created = requests.post(
        f"{media_server.base_url}/_matrix/media/v1/create",
        headers=bearer(session.access_token),
        timeout=30,
    )
    assert error_of(created) == (401, "M_UNKNOWN_TOKEN")
    assert created.json().get("soft_logout") is True


def test_locked_account_gets_m_user_locked(
    media_server: Stack, synapse: Synapse, admin: Session
) -> None:
    password = secrets.token_urlsafe(12)
    carol = synapse.register("carol", password)
    synapse.admin_update_user(admin.access_token, carol.user_id, locked=True)
    on_synapse = synapse.whoami(carol.access_token)
    assert error_of(on_synapse) == (401, "M_USER_LOCKED")
    created = requests.post(
        f"{media_server.base_url}/_matrix/media/v1/create",
        headers=bearer(carol.access_token),
        timeout=30,
    )
    assert error_of(created) == (401, "M_USER_LOCKED")
    assert created.json().get("soft_logout") is True


def test_synapse_admins_use_the_media_admin_api(
    media_server: Stack, synapse: Synapse, admin: Session, alice: Account
) -> None:
    """An admin is whom Synapse says is one: its own ``GET /_synapse/admin/v1/users/
    {user_id}/admin``, asked with the caller's token, which Synapse answers to its admins
    only."""
    from urllib.parse import quote

    from msc3870.models import ModerationRecord

    session = synapse.login(alice.localpart, alice.password)
    content_uri = media_server.client(session.access_token).upload_through_url(b"held for review")
    media_id = mxc_path(content_uri).split("/")[1]
    wait_until(lambda: media_of(content_uri).state == MediaState.COMPLETE, 30, "the checks to pass")
    admin_api = f"{media_server.base_url}/_synapse/admin/v1"
    listing = f"{admin_api}/users/{quote(alice.user_id, safe='')}/media"

    listed = requests.get(listing, headers=bearer(admin.access_token), timeout=30)
    assert listed.status_code == 200, listed.text
    assert [m["media_id"] for m in listed.json()["media"]] == [media_id]
    assert error_of(requests.get(listing, headers=bearer(session.access_token), timeout=30)) == (
        403,
        "M_FORBIDDEN",
    )

    quarantined = requests.post(
        f"{admin_api}/media/quarantine/{mxc_path(content_uri)}",
        headers=bearer(admin.access_token),
        timeout=30,
    )
    assert (quarantined.status_code, quarantined.json()) == (200, {})
    assert media_of(content_uri).state == MediaState.QUARANTINED
    assert ModerationRecord.objects.get(mxc_uri=content_uri).actor == admin.user_id
    query = "?admin_unsafely_bypass_quarantine=true"
    shown = authenticated_download(media_server, admin.access_token, content_uri, query)
    assert (shown.status_code, shown.content) == (200, b"held for review")
    refused = authenticated_download(media_server, session.access_token, content_uri, query)
    assert error_of(refused) == (400, "M_UNKNOWN")
