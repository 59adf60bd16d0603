"""URL previews on the deployed stack: two gunicorn workers on PostgreSQL, a celery worker
and SeaweedFS. The pages are served by an HTTP server of this test on 127.0.0.1 (opened in
the previews' allowlist for this stack only)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import pytest
import requests

from msc3870.models import Media, MediaState, UploadMethod, URLPreview

from ..federation_helpers import local_server, send
from ..helpers import bearer, bucket_keys, png_bytes
from .conftest import PrivateRedis, Stack

pytestmark = pytest.mark.services


def test_one_fetch_for_requests_in_both_workers_the_image_in_s3(
    make_stack: Any, private_redis: PrivateRedis, user_token: tuple[str, str], s3_client: Any
) -> None:
    _user_id, token = user_token
    picture = png_bytes(48, 32)
    gate = threading.Event()

    def page(handler: Any) -> None:
        gate.wait(20)  # held until every request has arrived
        body = b'<title>Shared</title><meta property="og:image" content="/p.png">'
        send(handler, 200, body, {"Content-Type": "text/html"})

    def image(handler: Any) -> None:
        send(handler, 200, picture, {"Content-Type": "image/png"})

    with local_server({"/page": page, "/p.png": image}) as origin:
        stack: Stack = make_stack(
            CELERY_BROKER_URL=private_redis.url,
            MSC3870_URL_PREVIEW_ENABLED="1",
            MSC3870_URL_PREVIEW_IP_RANGE_ALLOWLIST="127.0.0.1/32",
        )
        stack.start_server(workers=2)
        stack.start_worker()
        url = f"{stack.base_url}/_matrix/client/v1/media/preview_url?url="
        url += quote(f"{origin.url}/page", safe="")

        def ask(_: int) -> requests.Response:
            # A connection each: spread over both web workers.
            return requests.get(url, headers={**bearer(token), "Connection": "close"}, timeout=60)

        with ThreadPoolExecutor(12) as pool:
            pending = [pool.submit(ask, n) for n in range(12)]
            # Every request is in (the claim's fetch waits at the gate) before it opens.
            for _ in range(200):
                if origin.hits:
                    break
                threading.Event().wait(0.05)
            threading.Event().wait(1.0)
            gate.set()
            answers = [future.result() for future in pending]

    assert [a.status_code for a in answers] == [200] * 12, [a.text for a in answers]
    bodies = [a.json() for a in answers]
    assert all(body == bodies[0] for body in bodies)
    assert bodies[0]["og:title"] == "Shared"
    assert (bodies[0]["og:image:width"], bodies[0]["og:image:height"]) == (48, 32)
    assert origin.hits == ["/page", "/p.png"]
    # The celery worker fetched it; the requests waited for its row, in whichever worker.
    assert "msc3870.fetch_url_preview" in stack.tail("worker", 400)
    row = URLPreview.objects.get()
    media = Media.objects.get(pk=row.media_id)
    assert media.upload_method == UploadMethod.PREVIEW and media.state == MediaState.COMPLETE
    assert bucket_keys(s3_client, "preview/") == [media.storage_key]
    mxc = bodies[0]["og:image"].removeprefix("mxc://")
    download = requests.get(
        f"{stack.base_url}/_matrix/client/v1/media/download/{mxc}",
        headers=bearer(token),
        timeout=30,
    )
    assert download.status_code == 200 and download.content == picture
