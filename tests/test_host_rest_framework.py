"""A host's REST_FRAMEWORK must not change the wire.

DRF binds most policies (versioning, renderers, parsers, authentication, permissions,
throttles, metadata, JSON output) when it is imported, and reads others per request
(anonymous user, view name, format suffix). So the same checks run twice: in this
process under ``override_settings`` (what is read per request), and in a child pytest
whose settings carry the host's REST_FRAMEWORK from the start (what is bound at import).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from django.test import Client, override_settings

from .drf_host import HOST_REST_FRAMEWORK
from .helpers import MatrixClient, child_pytest, media_of, mxc_path, png_bytes

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = "MSC3870_DRF_PINNING_CHILD"


def check_the_wire(alice: MatrixClient) -> None:
    versions = Client().get("/_matrix/client/versions")
    assert versions.status_code == 200, versions.content
    assert versions["Content-Type"] == "application/json"
    assert "v1.11" in versions.json()["versions"]
    # Compact, as Matrix servers answer (COMPACT_JSON=False would add spaces).
    assert b'": ' not in versions.content and b", " not in versions.content

    # An upload through the upload URL, completed, downloaded.
    created = alice.create()
    data = png_bytes()
    put = alice.put_to_url(created["upload_url"], data, "image/png")
    assert put.status_code == 200, put.content
    path = mxc_path(created["content_uri"])
    done = alice.post(f"/_matrix/media/v1/upload/{path}/complete?filename=caf%C3%A9.png")
    assert done.status_code == 200, done.content
    assert done.json() == {"content_uri": created["content_uri"]}
    download = alice.get(f"/_matrix/client/v1/media/download/{path}")
    assert download.status_code == 200
    assert b"".join(download.streaming_content) == data
    assert media_of(created["content_uri"]).filename == "café.png"

    # A one-shot upload with a form content type: no host parser reads the body.
    one_shot = alice.post(
        "/_matrix/media/v3/upload", b"a=b", content_type="application/x-www-form-urlencoded"
    )
    assert one_shot.status_code == 200, one_shot.content

    # Errors stay Matrix errors, from this app's handler.
    missing = Client().get("/_matrix/client/v1/media/config")
    assert missing.status_code == 401
    assert missing.json()["errcode"] == "M_MISSING_TOKEN"
    unknown = alice.get("/_matrix/client/v1/media/download/localhost/nope?timeout_ms=0")
    assert unknown.status_code == 404
    assert unknown.json()["errcode"] == "M_NOT_FOUND"
    config = alice.get("/_matrix/client/v1/media/config")
    assert config.status_code == 200
    assert set(config.json()) == {"m.upload.size"}

    # OPTIONS answers {}, not a description of the view.
    options = alice.client.options(
        "/_matrix/client/v1/media/config", headers={"Authorization": f"Bearer {alice.token}"}
    )
    assert options.status_code == 200
    assert options.json() == {}


def test_host_rest_framework_read_per_request(alice: MatrixClient) -> None:
    with override_settings(REST_FRAMEWORK=HOST_REST_FRAMEWORK):
        check_the_wire(alice)


@pytest.mark.skipif(bool(os.environ.get(CHILD_ENV)), reason="runs in the parent only")
def test_host_rest_framework_from_startup(tmp_path: Path) -> None:
    env = {
        **os.environ,
        CHILD_ENV: "1",
        # Its own data directory and test database, not this process's.
        "MEDIAREPO_DATA_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "tests.settings_host_rest_framework",
    }
    done = child_pytest(
        "--ds=tests.settings_host_rest_framework",
        f"{Path(__file__).relative_to(ROOT)}::test_host_rest_framework_read_per_request",
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "1 passed" in done.stdout, done.stdout[-3000:]


def test_host_settings_are_really_seen_by_drf() -> None:
    """The check above means something only if DRF honours these settings elsewhere."""
    from rest_framework.settings import APISettings

    seen = APISettings(user_settings=HOST_REST_FRAMEWORK)
    assert seen.DEFAULT_VERSIONING_CLASS.__name__ == "URLPathVersioning"
    assert json.dumps(HOST_REST_FRAMEWORK)  # plain data, usable in a settings module
