"""What the services tests do as a Matrix client, and how they look at the results."""

from __future__ import annotations

from typing import Any

import requests

from msc3870.models import Media

from .conftest import Stack, bucket_keys


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def mxc_path(content_uri: str) -> str:
    return content_uri[len("mxc://") :]


def media_of(content_uri: str) -> Media:
    server, media_id = mxc_path(content_uri).split("/")
    return Media.objects.get(server_name=server, media_id=media_id)


def create(stack: Stack, token: str) -> dict[str, Any]:
    response = requests.post(f"{stack.base_url}/_matrix/media/v1/create", headers=auth(token))
    assert response.status_code == 200, response.text
    return response.json()


def complete(stack: Stack, token: str, content_uri: str, query: str = "") -> requests.Response:
    return requests.post(
        f"{stack.base_url}/_matrix/media/v1/upload/{mxc_path(content_uri)}/complete{query}",
        json={},
        headers=auth(token),
        timeout=120,
    )


def download(stack: Stack, content_uri: str, query: str = "") -> requests.Response:
    return requests.get(
        f"{stack.base_url}/_matrix/media/v3/download/{mxc_path(content_uri)}{query}", timeout=120
    )


def keys_of(s3_client: Any, media: Media) -> list[str]:
    """The media's objects: its incoming and served keys, and the keys of its upload
    requests (``Media.upload_key``: the served key, a dot and a suffix)."""
    return [
        k for k in bucket_keys(s3_client) if k.rsplit("/", 1)[-1].split(".", 1)[0] == media.media_id
    ]


def upload_through_url(
    stack: Stack, token: str, data: bytes, *, query: str = "", content_type: str = "text/plain"
) -> str:
    """create -> PUT to the upload URL -> /complete; the content URI."""
    response = requests.post(
        f"{stack.base_url}/_matrix/media/v1/create{query}", headers=auth(token), timeout=30
    )
    assert response.status_code == 200, response.text
    created = response.json()
    put = requests.put(
        created["upload_url"], data=data, headers={"Content-Type": content_type}, timeout=60
    )
    assert put.status_code == 200, put.text
    done = complete(stack, token, created["content_uri"], query)
    assert done.status_code == 200, done.text
    return created["content_uri"]
