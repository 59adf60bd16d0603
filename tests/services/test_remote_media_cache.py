"""Other servers' media on the deployed stack: fetched by a celery worker, which charges
the bytes to the user whose request started the fetch (in the Redis cache every process
shares), and evicted by beat's sweep past ``REMOTE_MEDIA_CACHE_MAX_BYTES``, objects and
thumbnails deleted from SeaweedFS. The other server is a TLS server of this test on
127.0.0.1 (opened in the outbound allowlist for this stack only)."""

from __future__ import annotations

import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from django.utils import timezone

from msc3870.federation.multipart import MultipartMedia
from msc3870.federation.remote_media import bucket_key
from msc3870.models import Media, MediaState, UploadMethod
from msc3870.ratelimit import LeakyBucket

from ..federation_helpers import local_server, self_signed_tls, send
from ..helpers import bearer, bucket_keys, png_bytes, wait_until
from .conftest import PrivateRedis, Stack

pytestmark = pytest.mark.services
FED = "/_matrix/federation/v1/media/download/"


def framed(body: bytes, content_type: str) -> tuple[bytes, str]:
    framing = MultipartMedia()
    chunks, _ = framing.file(content_type, "inline", [body], len(body))
    return b"".join(chunks), framing.content_type


def evict_every_second() -> None:
    """What an operator does in the admin: run the eviction sweep every second."""
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    from msc3870.schedule import install_default_schedule

    install_default_schedule()
    every, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
    assert PeriodicTask.objects.filter(task="msc3870.evict_remote_media").update(interval=every)


def test_a_worker_charges_the_fetch_and_beat_evicts_the_least_recently_served(
    make_stack: Any,
    private_redis: PrivateRedis,
    user_token: tuple[str, str],
    s3_client: Any,
    tmp_path: Path,
) -> None:
    user_id, token = user_token
    files = {
        "old": (png_bytes(64, 64), "image/png"),
        "older": (secrets.token_bytes(3000), "application/octet-stream"),
        "recent": (secrets.token_bytes(3000), "application/octet-stream"),
    }
    answers = {name: framed(*file) for name, file in files.items()}

    def federation(handler: Any) -> None:
        body, content_type = answers[handler.path.rsplit("/", 1)[1]]
        send(handler, 200, body, {"Content-Type": content_type})

    class Routes(dict[str, Any]):
        def get(self, path: str, default: Any = None) -> Any:  # type: ignore[override]
            return federation if path.startswith(FED) else default

    with local_server(Routes(), tls=self_signed_tls(tmp_path)) as remote:
        stack: Stack = make_stack(
            CELERY_BROKER_URL=private_redis.url,
            MSC3870_FEDERATION_IP_RANGE_ALLOWLIST="127.0.0.1/32",
            MSC3870_FEDERATION_VERIFY_TLS="0",
            # A byte a second: what was fetched stays in the bucket while the test runs.
            MSC3870_REMOTE_MEDIA_DOWNLOAD_PER_SECOND="1",
            MSC3870_REMOTE_MEDIA_DOWNLOAD_BURST_COUNT="1000000",
            MSC3870_REMOTE_MEDIA_CACHE_MAX_BYTES="6000",
        )
        stack.start_server(workers=1)
        stack.start_worker()
        base = f"{stack.base_url}/_matrix/client/v1/media"
        for name, (data, _) in files.items():
            got = requests.get(
                f"{base}/download/{remote.server_name}/{name}", headers=bearer(token)
            )
            assert got.status_code == 200, got.text
            assert got.content == data
        thumb = requests.get(
            f"{base}/thumbnail/{remote.server_name}/old?width=32&height=32", headers=bearer(token)
        )
        assert thumb.status_code == 200, thumb.text

    assert remote.hits == [FED + name for name in files]
    # Fetched by the worker, which charged the bytes it read to the user in the shared
    # cache (less a byte per second since).
    assert stack.tail("worker", 400).count("msc3870.fetch_remote_media") >= len(files)
    sent = sum(len(body) for body, _ in answers.values())
    level = LeakyBucket(capacity=1_000_000, per_second=1).level(bucket_key(user_id))
    assert sent - 120 <= level <= sent

    rows = {m.media_id: m for m in Media.objects.filter(server_name=remote.server_name)}
    assert {m.upload_method for m in rows.values()} == {UploadMethod.REMOTE}
    assert {m.state for m in rows.values()} == {MediaState.COMPLETE}
    now = timezone.now()
    for age, name in enumerate(["recent", "older", "old"], start=1):
        Media.objects.filter(pk=rows[name].pk).update(last_accessed_at=now - timedelta(days=age))
    prefix = "remote-thumbnails/" + remote.server_name.replace(":", "_")
    assert bucket_keys(s3_client, prefix)

    # Over 6000 bytes by the image: evicted down to 5400, least recently served first.
    evict_every_second()
    stack.start_beat()
    wait_until(
        lambda: (
            set(
                Media.objects.filter(server_name=remote.server_name).values_list(
                    "media_id", flat=True
                )
            )
            == {"recent"}
        ),
        60,
        "the eviction",
    )
    held = bucket_keys(s3_client, "remote/" + remote.server_name.replace(":", "_"))
    assert held == [rows["recent"].storage_key]
    assert bucket_keys(s3_client, prefix) == []
