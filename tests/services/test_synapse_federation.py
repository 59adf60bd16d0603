"""Serving media to a real Synapse over federation.

Two servers on loopback, each under an IP-literal server name with its port, each over
TLS with a certificate of a test CA made by ``trustme``: this media server (gunicorn, as
deployed, with a celery worker, PostgreSQL and the S3 server of the services suite) and a
Synapse (``scripts/synapse`` with its federation options: no certificate verification,
127.0.0.1 allowed, no key servers). A Synapse user downloads media uploaded here through
Synapse's client API; Synapse signs its request with its own key, which this server
fetches from Synapse itself.

Synapse falls back silently to the legacy ``/_matrix/media/v3/download`` when the
federation endpoint is refused, so the bytes arriving prove nothing alone: this server's
access log must show the federation endpoint answering 200 and no legacy download. The
endpoint is also called directly, signed with Synapse's own key (read from its data dir),
and refused when the signature is tampered with, the destination is another server or
the key is unknown to Synapse.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from signedjson.key import generate_signing_key

from msc3870.federation.xmatrix import sign_request

from ..federation_helpers import FED_DOWNLOAD
from ..helpers import bearer, mxc_path
from .conftest import Stack, base_env
from .synapse_helpers import Certificates, Peer, TLSServer, start_tls_server

pytestmark = pytest.mark.services


@pytest.fixture
def ours(
    django_db_setup: None,
    transactional_db: None,
    tmp_path: Path,
    certificates: Certificates,
    request: pytest.FixtureRequest,
) -> Iterator[TLSServer]:
    redirect = getattr(request, "param", False)
    stack = Stack(env=base_env(tmp_path), logs=tmp_path)
    try:
        stack.start_worker()
        yield start_tls_server(
            stack, certificates, MSC3870_REDIRECT_DOWNLOADS="1" if redirect else "0"
        )
    finally:
        stack.stop_all()


def requests_for(server: TLSServer, media_id: str) -> list[tuple[str, int]]:
    """(path, status) of every request for ``media_id`` in the server's access log."""
    found = []
    for line in server.access_log().splitlines():
        match = re.search(r'"GET (\S+) HTTP/[\d.]+" (\d{3})', line)
        if match and media_id in match.group(1):
            found.append((match.group(1), int(match.group(2))))
    return found


# --- the tests -----------------------------------------------------------------------


@pytest.mark.parametrize("ours", [False, True], ids=["inline", "location"], indirect=True)
def test_a_synapse_user_downloads_media_served_by_the_federation_endpoint(
    ours: TLSServer, synapse_peer: Peer, token: str, request: pytest.FixtureRequest
) -> None:
    redirected = request.node.callspec.params["ours"]
    data = os.urandom(70_000)
    content_uri = ours.client(token).upload_through_url(
        data, "application/octet-stream", query="?filename=blob.bin"
    )
    media_id = mxc_path(content_uri).split("/")[1]
    user_token = synapse_peer.register(f"u{secrets.token_hex(4)}")

    response = requests.get(
        f"{synapse_peer.url}/_matrix/client/v1/media/download/{ours.server_name}/{media_id}",
        headers=bearer(user_token),
        timeout=60,
        verify=str(synapse_peer.ca),
    )
    assert response.status_code == 200, response.text
    assert response.content == data
    assert "blob.bin" in response.headers.get("Content-Disposition", "")

    # What Synapse asked us: the federation endpoint, answered, and never the legacy one.
    asked = requests_for(ours, media_id)
    assert any(
        path.startswith(FED_DOWNLOAD + media_id) and status == 200 for path, status in asked
    ), asked
    assert not [path for path, _ in asked if path.startswith("/_matrix/media/")], asked
    # With redirects on, Synapse got the bytes from storage through the Location part.
    followed = [
        line
        for line in (synapse_peer.directory / "synapse.log")
        .read_text(errors="replace")
        .splitlines()
        if "File download redirected" in line and media_id in line
    ]
    assert bool(followed) == redirected, followed


def signed_get(
    ours: TLSServer,
    synapse_peer: Peer,
    uri: str,
    *,
    destination: str | None = None,
    key: Any = None,
) -> requests.Response:
    header = sign_request(
        "GET",
        uri,
        destination or ours.server_name,
        origin=synapse_peer.server_name,
        signing_key=key or synapse_peer.signing_key(),
    )
    return requests.get(
        ours.url + uri, headers={"Authorization": header}, timeout=60, verify=str(ours.ca)
    )


def test_requests_signed_with_the_peers_own_key(
    ours: TLSServer, synapse_peer: Peer, token: str
) -> None:
    data = b"signed by synapse"
    content_uri = ours.client(token).upload_through_url(
        data, "text/plain", query="?filename=note.txt"
    )
    media_id = mxc_path(content_uri).split("/")[1]
    uri = FED_DOWNLOAD + media_id
    accepted = signed_get(ours, synapse_peer, uri)
    assert accepted.status_code == 200, accepted.text
    assert accepted.headers["Content-Type"].startswith("multipart/mixed; boundary=")
    assert data in accepted.content

    def refused(response: requests.Response) -> None:
        assert response.status_code == 401, response.text
        assert response.json()["errcode"] == "M_UNAUTHORIZED"

    # Tampered: a signature over another request.
    header = sign_request(
        "GET",
        uri + "?x=1",
        ours.server_name,
        origin=synapse_peer.server_name,
        signing_key=synapse_peer.signing_key(),
    )
    refused(
        requests.get(
            ours.url + uri, headers={"Authorization": header}, timeout=60, verify=str(ours.ca)
        )
    )
    refused(signed_get(ours, synapse_peer, uri, destination="someone-else.example.org"))
    # A key Synapse does not publish (looked up at Synapse, not found).
    refused(signed_get(ours, synapse_peer, uri, key=generate_signing_key("notsynapses")))
