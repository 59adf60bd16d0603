"""A client of this server downloads media uploaded to a real Synapse: this server
discovers nothing (the Synapse's name is ``127.0.0.1:<port>``), asks Synapse's federation
media endpoint signed with its own key, and serves the bytes. Setup (TLS with trustme,
Synapse with federation on): the ``synapse_peer`` fixture."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from .conftest import Stack, base_env
from .synapse_helpers import Certificates, Peer, TLSServer, start_tls_server

pytestmark = pytest.mark.services


@pytest.fixture
def ours_fetching(
    django_db_setup: None, transactional_db: None, tmp_path: Path, certificates: Certificates
) -> Iterator[TLSServer]:
    """This server with fetching on and its tasks in-process (no broker: the fetch runs on
    a thread of the web process, as in the embedded default)."""
    stack = Stack(env=base_env(tmp_path), logs=tmp_path)
    try:
        yield start_tls_server(stack, certificates, CELERY_BROKER_URL="")
    finally:
        stack.stop_all()


def test_a_client_here_downloads_media_uploaded_to_synapse(
    ours_fetching: TLSServer, synapse_peer: Peer, token: str
) -> None:
    synapse_token = synapse_peer.register(f"remote{secrets.token_hex(3)}")
    data = secrets.token_bytes(70_000)
    uploaded = requests.post(
        f"{synapse_peer.url}/_matrix/media/v3/upload?filename=blob.bin",
        data=data,
        headers={
            "Authorization": f"Bearer {synapse_token}",
            "Content-Type": "application/octet-stream",
        },
        timeout=30,
        verify=synapse_peer.ca,
    )
    assert uploaded.status_code == 200, uploaded.text
    content_uri = uploaded.json()["content_uri"]
    server_name, media_id = content_uri.removeprefix("mxc://").split("/")
    assert server_name == synapse_peer.server_name

    response = requests.get(
        f"{ours_fetching.url}/_matrix/client/v1/media/download/{server_name}/{media_id}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
        verify=ours_fetching.ca,
    )
    assert response.status_code == 200, response.text
    assert response.content == data

    from msc3870.models import Media, MediaState, UploadMethod

    media = Media.objects.get(server_name=server_name, media_id=media_id)
    assert media.state == MediaState.COMPLETE
    assert media.upload_method == UploadMethod.REMOTE
    assert media.filename == "blob.bin"
    # Synapse served it through its federation endpoint (it logs the request it answered).
    log = "".join(p.read_text(errors="replace") for p in synapse_peer.directory.glob("*.log"))
    assert f"/_matrix/federation/v1/media/download/{media_id}" in log
