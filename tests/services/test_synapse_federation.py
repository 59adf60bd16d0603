"""Serving media to a real Synapse over federation (issue 10, item 6, serving direction).

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

import hashlib
import hmac
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme
from signedjson.key import generate_signing_key, read_signing_keys

from msc3870.federation.xmatrix import sign_request

from .conftest import BIN, ROOT, Stack, base_env, free_port, wait_until
from .helpers import auth

pytestmark = pytest.mark.services

SCRIPT = ROOT / "scripts" / "synapse"
DOWNLOAD = "/_matrix/federation/v1/media/download/"


@dataclass(frozen=True)
class Certificates:
    ca: Path  # what clients of either server trust
    cert: Path  # one certificate for 127.0.0.1, used by both servers
    key: Path


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1")
    paths = Certificates(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    authority.cert_pem.write_to_path(str(paths.ca))
    issued.private_key_pem.write_to_path(str(paths.key))
    # The chain: leaf then intermediates (trustme issues straight from the root).
    with open(paths.cert, "wb") as handle:
        for blob in issued.cert_chain_pems:
            handle.write(blob.bytes())
    return paths


# --- Synapse -------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """The Synapse: where it answers, its server name and data directory."""

    url: str
    server_name: str
    directory: Path
    ca: Path

    def secret(self, name: str) -> str:
        return (self.directory / name).read_text().strip()

    def signing_key(self) -> Any:
        with open(self.directory / "localhost.signing.key") as handle:
            return read_signing_keys(handle)[0]

    def register(self, localpart: str) -> str:
        """A user's access token (shared-secret registration)."""
        endpoint = f"{self.url}/_synapse/admin/v1/register"
        nonce = requests.get(endpoint, timeout=10, verify=self.ca).json()["nonce"]
        password = secrets.token_urlsafe(12)
        mac = hmac.new(
            self.secret("registration_shared_secret").encode(),
            "\0".join((nonce, localpart, password, "notadmin")).encode(),
            hashlib.sha1,
        )
        response = requests.post(
            endpoint,
            json={
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": False,
                "mac": mac.hexdigest(),
            },
            timeout=30,
            verify=self.ca,
        )
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])


def synapse_script(action: str, env: dict[str, str], timeout: float) -> None:
    result = subprocess.run(
        [str(SCRIPT), *action.split()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        pytest.fail(f"scripts/synapse {action} failed:\n{result.stdout}\n{result.stderr}")


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory, certificates: Certificates) -> Iterator[Peer]:
    directory = tmp_path_factory.mktemp("synapse-federating")
    port = free_port()
    server_name = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "SYNAPSE_DIR": str(directory),
        "SYNAPSE_PORT": str(port),
        "SYNAPSE_SERVER_NAME": server_name,
        "SYNAPSE_TLS_CERT": str(certificates.cert),
        "SYNAPSE_TLS_KEY": str(certificates.key),
        "SYNAPSE_FEDERATION": "1",
    }
    synapse_script("install", env, timeout=900)
    synapse_script("start --fresh", env, timeout=120)
    try:
        yield Peer(f"https://{server_name}", server_name, directory, certificates.ca)
    finally:
        synapse_script("stop", env, timeout=60)


# --- this server, over TLS -----------------------------------------------------------


@dataclass
class TLSServer:
    stack: Stack
    server_name: str
    ca: Path

    @property
    def url(self) -> str:
        return f"https://{self.server_name}"

    def access_log(self) -> str:
        return (self.stack.logs / "server.log").read_text(errors="replace")


def start_tls_server(stack: Stack, certificates: Certificates, **extra_env: str) -> TLSServer:
    """gunicorn serving the ASGI app over TLS (``--certfile``/``--keyfile``), one worker,
    under the server name ``127.0.0.1:<port>``."""
    port = free_port()
    server_name = f"127.0.0.1:{port}"
    env = {
        **stack.env,
        **extra_env,
        "PORT": str(port),
        "WEB_CONCURRENCY": "1",
        "PUBLIC_BASEURL": f"https://{server_name}",
        "MATRIX_SERVER_NAME": server_name,
        "GUNICORN_CMD_ARGS": f"--certfile {certificates.cert} --keyfile {certificates.key}",
        # Synapse's keys are fetched from loopback, over its test certificate.
        "MSC3870_FEDERATION_IP_RANGE_ALLOWLIST": "127.0.0.1/32",
        "MSC3870_FEDERATION_VERIFY_TLS": "0",
        "MSC3870_FEDERATION_MEDIA_RATE": "0",
        # /complete answers with the verdict: the media is complete when Synapse asks.
        "MSC3870_COMPLETE_WAITS_FOR_CHECKS": "1",
    }
    process = stack._spawn(
        "server",
        [str(BIN / "gunicorn"), "-c", "mediarepo/gunicorn.conf.py", "mediarepo.asgi"],
        env,
    )
    url = f"https://{server_name}/_matrix/client/versions"

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"gunicorn exited: {stack.tail('server')}")
        try:
            return requests.get(url, timeout=1, verify=str(certificates.ca)).ok
        except requests.RequestException:
            return False

    wait_until(up, 30, "gunicorn to answer over TLS")
    return TLSServer(stack, server_name, certificates.ca)


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


@pytest.fixture
def token(transactional_db: None) -> str:
    from msc3870.models import AccessToken, digest_token

    token = "mr_" + secrets.token_urlsafe(16)
    AccessToken.objects.create(
        user_id=f"@u{secrets.token_hex(4)}:localhost", token_digest=digest_token(token)
    )
    return token


def upload(server: TLSServer, token: str, data: bytes, content_type: str, name: str) -> str:
    """create -> PUT to the presigned S3 URL -> /complete: the media id."""
    created = requests.post(
        f"{server.url}/_matrix/media/v1/create", headers=auth(token), timeout=30, verify=server.ca
    )
    assert created.status_code == 200, created.text
    body = created.json()
    put = requests.put(
        body["upload_url"], data=data, headers={"Content-Type": content_type}, timeout=60
    )
    assert put.status_code == 200, put.text
    path = body["content_uri"][len("mxc://") :]
    done = requests.post(
        f"{server.url}/_matrix/media/v1/upload/{path}/complete?filename={name}",
        json={},
        headers=auth(token),
        timeout=120,
        verify=server.ca,
    )
    assert done.status_code == 200, done.text
    return path.split("/", 1)[1]


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
    ours: TLSServer, peer: Peer, token: str, request: pytest.FixtureRequest
) -> None:
    redirected = request.node.callspec.params["ours"]
    data = os.urandom(70_000)
    media_id = upload(ours, token, data, "application/octet-stream", "blob.bin")
    user_token = peer.register(f"u{secrets.token_hex(4)}")

    response = requests.get(
        f"{peer.url}/_matrix/client/v1/media/download/{ours.server_name}/{media_id}",
        headers=auth(user_token),
        timeout=60,
        verify=str(peer.ca),
    )
    assert response.status_code == 200, response.text
    assert response.content == data
    assert "blob.bin" in response.headers.get("Content-Disposition", "")

    # What Synapse asked us: the federation endpoint, answered, and never the legacy one.
    asked = requests_for(ours, media_id)
    assert any(path.startswith(DOWNLOAD + media_id) and status == 200 for path, status in asked), (
        asked
    )
    assert not [path for path, _ in asked if path.startswith("/_matrix/media/")], asked
    # With redirects on, Synapse got the bytes from storage through the Location part.
    followed = [
        line
        for line in (peer.directory / "synapse.log").read_text(errors="replace").splitlines()
        if "File download redirected" in line and media_id in line
    ]
    assert bool(followed) == redirected, followed


def signed_get(
    ours: TLSServer, peer: Peer, uri: str, *, destination: str | None = None, key: Any = None
) -> requests.Response:
    header = sign_request(
        "GET",
        uri,
        destination or ours.server_name,
        origin=peer.server_name,
        signing_key=key or peer.signing_key(),
    )
    return requests.get(
        ours.url + uri, headers={"Authorization": header}, timeout=60, verify=str(ours.ca)
    )


def test_requests_signed_with_the_peers_own_key(ours: TLSServer, peer: Peer, token: str) -> None:
    data = b"signed by synapse"
    media_id = upload(ours, token, data, "text/plain", "note.txt")
    uri = DOWNLOAD + media_id
    accepted = signed_get(ours, peer, uri)
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
        origin=peer.server_name,
        signing_key=peer.signing_key(),
    )
    refused(
        requests.get(
            ours.url + uri, headers={"Authorization": header}, timeout=60, verify=str(ours.ca)
        )
    )
    refused(signed_get(ours, peer, uri, destination="someone-else.example.org"))
    # A key Synapse does not publish (looked up at Synapse, not found).
    refused(signed_get(ours, peer, uri, key=generate_signing_key("notsynapses")))
