"""The real mautrix-python client (PyPI ``mautrix``) against the live server."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aiohttp import ClientResponseError
from mautrix.api import HTTPAPI
from mautrix.client import ClientAPI
from mautrix.types import UserID

from msc3870.models import Media, MediaState

from .helpers import make_token, media_of, msc3870_settings


def run_client(live_url: str, token: str, scenario: Any) -> Any:
    async def main() -> Any:
        api = HTTPAPI(base_url=live_url, token=token, default_retry_count=0)
        client = ClientAPI(UserID("@alice:localhost"), api=api)
        try:
            return await scenario(client)
        finally:
            await api.session.close()

    return asyncio.run(main())


def test_async_upload_to_url_then_download(live_url: str, transactional_db: None) -> None:
    token = make_token("@alice:localhost")
    data = os.urandom(256 * 1024)

    async def scenario(client: ClientAPI) -> tuple[str, bytes, Any]:
        versions = await client.versions()
        mxc = await client.upload_media(
            data, mime_type="application/x-test", filename="bridge.bin", async_upload=True
        )
        # async_upload returns at once and uploads in the background (upload URL, then
        # /complete); the download waits for it.
        downloaded = await client.download_media(mxc, timeout_ms=20_000)
        return mxc, downloaded, versions

    mxc, downloaded, versions = run_client(live_url, token, scenario)
    assert downloaded == data
    assert "v1.11" in [str(v) for v in versions.versions] or versions.supports("v1.11")
    media = media_of(mxc)
    assert media.state == MediaState.COMPLETE
    assert media.upload_method == "url"  # it used the MSC3870 upload URL, not the PUT
    assert media.filename == "bridge.bin"


def test_plain_upload_download_and_config(live_url: str, transactional_db: None) -> None:
    token = make_token("@alice:localhost")

    async def scenario(client: ClientAPI) -> tuple[str, bytes, int]:
        mxc = await client.upload_media(b"plain upload", mime_type="text/plain")
        downloaded = await client.download_media(mxc)
        config = await client.get_media_repo_config()
        return mxc, downloaded, config.upload_size

    with msc3870_settings(PUBLIC_BASEURL=live_url, MAX_UPLOAD_SIZE=123_456):
        _, downloaded, upload_size = run_client(live_url, token, scenario)
    assert downloaded == b"plain upload"
    assert upload_size == 123_456
    assert Media.objects.get().upload_method == "post"


def test_create_mxc_and_errors_reach_the_client(live_url: str, transactional_db: None) -> None:
    token = make_token("@alice:localhost")

    async def scenario(client: ClientAPI) -> tuple[Any, Any]:
        created = await client.create_mxc()
        try:
            await client.download_media(created.content_uri, timeout_ms=200)
        except ClientResponseError as exc:
            return created, exc
        return created, None

    created, error = run_client(live_url, token, scenario)
    assert created.unstable_upload_url.startswith(live_url)
    assert created.unused_expired_at > 0
    assert error is not None
    # mautrix downloads with aiohttp's raise_for_status: the status is what it sees.
    assert error.status == 504


def test_upload_into_a_created_mxc_with_the_msc2246_put(
    live_url: str, transactional_db: None
) -> None:
    """``upload_media(mxc=...)`` PUTs to ``/_matrix/media/v3/upload/{live_url}/{id}`` and
    reads ``content_uri`` from the answer (``MatrixResponseError`` without it)."""
    token = make_token("@alice:localhost")

    async def scenario(client: ClientAPI) -> tuple[str, str, bytes]:
        created = await client.create_mxc()
        mxc = await client.upload_media(
            b"into a reserved id", mime_type="text/plain", mxc=created.content_uri
        )
        return created.content_uri, mxc, await client.download_media(mxc)

    reserved, returned, downloaded = run_client(live_url, token, scenario)
    assert returned == reserved
    assert downloaded == b"into a reserved id"
    media = media_of(reserved)
    assert (media.state, media.upload_method) == (MediaState.COMPLETE, "put")
