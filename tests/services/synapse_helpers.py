"""Real Synapses beside the media server (PyPI ``matrix-synapse`` run by
``scripts/synapse``), and this server served over TLS to federate with one.

``synapse_script`` drives ``scripts/synapse``; ``register`` is Synapse's shared-secret
registration; ``issue_certificates`` makes the test CA and the one certificate for
127.0.0.1 that both servers use; ``Peer`` is a federating Synapse (the ``synapse_peer``
fixture), ``start_tls_server`` this server under an IP-literal server name.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme
from signedjson.key import read_signing_keys

from ..helpers import MatrixClient, free_port, wait_until
from ..process_stack import BIN
from .conftest import ROOT, Stack

SCRIPT = ROOT / "scripts" / "synapse"


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


def register(
    url: str,
    directory: Path,
    localpart: str,
    password: str,
    *,
    admin: bool = False,
    verify: bool | str = True,
) -> dict[str, Any]:
    """Shared-secret registration (``POST /_synapse/admin/v1/register``) with the secret
    in the Synapse's data directory: the answer (user id, access token, device)."""
    endpoint = f"{url}/_synapse/admin/v1/register"
    nonce = requests.get(endpoint, timeout=10, verify=verify).json()["nonce"]
    secret = (directory / "registration_shared_secret").read_text().strip()
    signed = (nonce, localpart, password, "admin" if admin else "notadmin")
    mac = hmac.new(secret.encode(), "\0".join(signed).encode(), hashlib.sha1)
    response = requests.post(
        endpoint,
        json={
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        },
        timeout=30,
        verify=verify,
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# --- federating over TLS -------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca: Path  # what clients of either server trust
    cert: Path  # one certificate for 127.0.0.1, used by both servers
    key: Path


def issue_certificates(directory: Path) -> Certificates:
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


@dataclass(frozen=True)
class Peer:
    """A Synapse that federates: where it answers, its server name and data directory."""

    url: str
    server_name: str
    directory: Path
    ca: Path

    def signing_key(self) -> Any:
        with open(self.directory / "localhost.signing.key") as handle:
            return read_signing_keys(handle)[0]

    def register(self, localpart: str) -> str:
        """A new user's access token."""
        password = secrets.token_urlsafe(12)
        body = register(self.url, self.directory, localpart, password, verify=str(self.ca))
        return str(body["access_token"])


@dataclass
class TLSServer:
    stack: Stack
    server_name: str
    ca: Path

    @property
    def url(self) -> str:
        return f"https://{self.server_name}"

    def client(self, token: str = "") -> MatrixClient:
        """A client of this server with ``token``, trusting the test CA."""
        return MatrixClient.over_http(self.url, token, verify=str(self.ca))

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
    process = stack.spawn(
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
