"""Prometheus metrics (``msc3870.metrics``): each metric moves where its event happens,
labels are route names and states (never ids), and ``/metrics`` is served only on the
metrics listener to allowed networks. Across gunicorn's worker processes:
``test_operating_server.py``."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client
from prometheus_client import REGISTRY

from msc3870 import metrics, metrics_files
from msc3870.asgi import MediaASGIHandler
from msc3870.models import MediaState

from .asgi_driver import call, created_path, parked, request, run, until
from .federation_helpers import Remote
from .helpers import (
    BUCKET,
    V1_DOWNLOAD,
    MatrixClient,
    bearer,
    client_put,
    free_port,
    msc3870_settings,
    mxc_path,
    png_bytes,
)

pytestmark = pytest.mark.usefixtures("fetching_remote_media")
S = MediaState


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Delta:
    """Sample values before and after: ``delta[name, labels]``."""

    def __init__(self, *names: tuple[str, dict[str, str]]) -> None:
        self.names = names
        self.before = [sample(name, **labels) for name, labels in names]

    def __call__(self) -> list[float]:
        return [
            sample(name, **labels) - before
            for (name, labels), before in zip(self.names, self.before, strict=True)
        ]


def requests_of(route: str, method: str, status: int) -> tuple[str, dict[str, str]]:
    return (
        "msc3870_http_requests_total",
        {"route": route, "method": method, "status": str(status)},
    )


def test_requests_are_counted_and_timed_by_route_name_never_by_path(
    app: MediaASGIHandler, token: str
) -> None:
    delta = Delta(
        requests_of("create", "POST", 200),
        requests_of("upload-to-media", "PUT", 200),
        requests_of("download", "GET", 200),
        requests_of("download", "GET", 404),
        requests_of(metrics_unmatched(), "GET", 404),
        ("msc3870_http_request_duration_seconds_count", {"route": "download"}),
    )

    async def scenario() -> str:
        path = await created_path(app, token)
        put = await call(
            app, "PUT", f"/_matrix/media/v3/upload/{path}", body=b"x" * 100, headers=bearer(token)
        )
        assert put.status == 200
        for _ in range(2):
            got = await call(
                app, "GET", f"/_matrix/client/v1/media/download/{path}", headers=bearer(token)
            )
            assert got.status == 200
        missing = await call(
            app,
            "GET",
            "/_matrix/client/v1/media/download/localhost/nosuchid",
            headers=bearer(token),
        )
        assert missing.status == 404
        assert (await call(app, "GET", "/no/such/path/at/all")).status == 404
        return path

    path = run(scenario)
    assert delta() == [1, 1, 2, 1, 1, 3]
    exposition = metrics.exposition()[0].decode()
    media_id = path.split("/")[1]
    assert media_id not in exposition and "nosuchid" not in exposition
    assert "/no/such" not in exposition


def metrics_unmatched() -> str:
    from msc3870.asgi import UNMATCHED

    return UNMATCHED


def test_refusals_before_any_view_count_under_their_route(
    app: MediaASGIHandler, token: str
) -> None:
    """An upload refused before its body is read is still an upload request."""
    delta = Delta(requests_of("upload", "POST", 401))

    async def scenario() -> None:
        refused = await call(app, "POST", "/_matrix/media/v3/upload", body=b"x" * 10)
        assert refused.status == 401

    run(scenario)
    assert delta() == [1]


def test_waiters_parked_woken_and_gone(app: MediaASGIHandler, token: str) -> None:
    labels = {"kind": "authenticated"}
    delta = Delta(
        ("msc3870_waiters_parked_total", labels),
        ("msc3870_waiters_woken_total", labels),
        ("msc3870_waiters_gone_total", labels),
        ("msc3870_waiters_refused_total", labels),
    )

    async def scenario() -> None:
        path = await created_path(app, token)
        url = f"/_matrix/client/v1/media/download/{path}?timeout_ms=20000"
        waiting = [request(app, "GET", url, headers=bearer(token)) for _ in range(3)]
        await until(lambda: parked() == 3, "three waiters")
        assert sample("msc3870_waiters", **labels) == 3
        refused = await call(app, "GET", url, headers=bearer(token))
        assert refused.status == 429
        waiting[0].hang_up.set()
        await until(lambda: parked() == 2, "one gone")
        put = await call(
            app, "PUT", f"/_matrix/media/v3/upload/{path}", body=b"arrived", headers=bearer(token)
        )
        assert put.status == 200
        for waiter in waiting[1:]:
            assert (await waiter.reply()).status == 200
        assert sample("msc3870_waiters", **labels) == 0

    with msc3870_settings(WAIT_MAX_WAITERS_PER_MEDIA=3):
        run(scenario)
    assert delta() == [3, 2, 1, 1]


def test_transitions_screening_and_bytes(alice: MatrixClient) -> None:
    data = png_bytes()
    delta = Delta(
        ("msc3870_media_transitions_total", {"state": "pending"}),
        ("msc3870_media_transitions_total", {"state": "complete"}),
        ("msc3870_media_transitions_total", {"state": "rejected"}),
        ("msc3870_screening_duration_seconds_count", {"verdict": "complete"}),
        ("msc3870_screening_duration_seconds_count", {"verdict": "rejected"}),
        ("msc3870_uploaded_bytes_total", {"method": "put"}),
        ("msc3870_served_bytes_total", {"source": "local"}),
    )
    path = mxc_path(alice.create()["content_uri"])
    assert alice.put(f"/_matrix/media/v3/upload/{path}", data, "image/png").status_code == 200
    download = alice.get(f"/_matrix/client/v1/media/download/{path}")
    assert b"".join(download.streaming_content) == data
    ranged = alice.get(f"/_matrix/client/v1/media/download/{path}", headers={"Range": "bytes=0-9"})
    assert len(b"".join(ranged.streaming_content)) == 10
    with msc3870_settings(DENIED_CONTENT_TYPES=["image/*"]):
        denied = mxc_path(alice.create()["content_uri"])
        assert alice.put(f"/_matrix/media/v3/upload/{denied}", data, "image/png").status_code == 403
    assert delta() == [2, 1, 1, 1, 1, len(data), len(data) + 10]


def test_redirected_bytes_and_store_errors(s3: Any, alice: MatrixClient) -> None:
    data = b"redirected " * 100
    created = alice.create()
    client_put(s3, created, data, "text/plain")
    assert alice.complete(created["content_uri"]).status_code == 200
    delta = Delta(
        ("msc3870_served_bytes_total", {"source": "redirect"}),
        ("msc3870_uploaded_bytes_total", {"method": "url"}),
    )
    with msc3870_settings(REDIRECT_DOWNLOADS=True):
        got = alice.get(f"/_matrix/client/v1/media/download/{mxc_path(created['content_uri'])}")
    assert got.status_code == 307
    assert delta() == [len(data), 0]
    # The bucket gone: the store fails, and it is counted by the error's class.
    errors = Delta(("msc3870_store_errors_total", {"error": "NoSuchBucket"}))
    for item in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        s3.delete_object(Bucket=BUCKET, Key=item["Key"])
    s3.delete_bucket(Bucket=BUCKET)
    assert alice.post("/_matrix/media/v3/upload", b"x", "text/plain").status_code == 503
    assert errors() == [1]


def test_remote_fetches_and_their_bytes(alice: MatrixClient, remote: Remote) -> None:
    body = png_bytes()
    remote.files["held"] = (body, "image/png")
    delta = Delta(
        ("msc3870_remote_fetches_total", {"outcome": "complete"}),
        ("msc3870_remote_fetches_total", {"outcome": "failed"}),
        ("msc3870_remote_fetched_bytes_total", {}),
        ("msc3870_served_bytes_total", {"source": "remote"}),
    )
    got = alice.get(V1_DOWNLOAD + f"{remote.name}/held")
    assert got.status_code == 200
    assert b"".join(got.streaming_content) == body
    assert alice.get(V1_DOWNLOAD + f"{remote.name}/missing").status_code == 404
    complete_fetches, failed_fetches, fetched, served = delta()
    assert (complete_fetches, failed_fetches, served) == (1, 1, len(body))
    assert fetched >= len(body)  # the multipart framing and the 404's body too


# ------------------------------------------------------------------------ exposition


def scrape(port: str = "9100", address: str = "127.0.0.1") -> Any:
    return Client().get("/metrics", SERVER_PORT=port, REMOTE_ADDR=address)


def test_metrics_are_served_only_on_the_metrics_listener_to_allowed_networks(db: None) -> None:
    assert scrape().status_code == 404  # no METRICS_PORT: not served at all
    with msc3870_settings(METRICS_PORT=9100):
        served = scrape()
        assert served.status_code == 200
        assert served["Content-Type"].startswith("text/plain")
        assert b"msc3870_http_requests_total" in served.content
        assert b"msc3870_component_up" in served.content
        public = scrape(port="8008")  # the public port
        assert public.status_code == 404
        assert public.json()["errcode"] == "M_UNRECOGNIZED"
        assert scrape(address="192.0.2.7").status_code == 404
        assert scrape(address="::1").status_code == 200
        assert scrape(address="::ffff:127.0.0.1").status_code == 200
    with msc3870_settings(METRICS_PORT=9100, METRICS_ALLOWED_NETWORKS=["192.0.2.0/24"]):
        assert scrape(address="192.0.2.7").status_code == 200
        assert scrape().status_code == 404


def test_the_metrics_listener_answers_nothing_else(app: MediaASGIHandler) -> None:
    """On the metrics port the media API is not served; /metrics and /health are."""

    async def scenario() -> list[Any]:
        return [
            await call(app, "GET", "/_matrix/client/versions"),
            await call(app, "GET", "/metrics"),
        ]

    with msc3870_settings(METRICS_PORT=8008):  # the driver's requests arrive on 8008
        versions, scraped = run(scenario)
    assert versions.status == 404
    assert versions.json()["errcode"] == "M_UNRECOGNIZED"
    assert scraped.status == 200
    assert b"msc3870_http_requests_total" in scraped.body
    versions, scraped = run(scenario)  # another port: the media API, no metrics
    assert versions.status == 200
    assert scraped.status == 404


@pytest.fixture
def listener() -> Iterator[tuple[int, list[list[str]]]]:
    """A celery worker's listener of its own, with a mutable allowlist."""
    port = free_port()
    allowed = [["127.0.0.0/8"]]
    server = metrics.start_listener("127.0.0.1", port, lambda: allowed[0])
    yield port, allowed
    server.shutdown()
    server.server_close()


def test_a_worker_listener_serves_metrics_to_allowed_networks(
    listener: tuple[int, list[list[str]]],
) -> None:
    port, allowed = listener
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        assert answer.status == 200
        assert b"msc3870_media_transitions_total" in answer.read()
    with pytest.raises(urllib.error.HTTPError) as other:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/_matrix/client/versions", timeout=5)
    assert other.value.code == 404
    allowed[0] = ["192.0.2.0/24"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert refused.value.code == 404


def test_multiprocess_values_add_up_and_the_directory_is_cleaned(tmp_path: Any) -> None:
    """Two processes' files in one directory are one total; a start empties it."""
    import subprocess
    import sys

    directory = tmp_path / "metrics"
    metrics_files.clean_multiprocess_dir(str(directory))
    (directory / "counter_999999.db").write_bytes(b"left by an earlier run")
    metrics_files.clean_multiprocess_dir(str(directory))
    assert list(directory.iterdir()) == []
    script = (
        "from msc3870 import metrics; metrics.transitioned('complete', 2); metrics.parked('legacy')"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    text = subprocess.run(
        [
            sys.executable,
            "-c",
            "from msc3870 import metrics; print(metrics.exposition()[0].decode())",
        ],
        env=env,
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    ).stdout
    assert 'msc3870_media_transitions_total{state="complete"} 4.0' in text
    # Live gauges of dead processes do not count once their death is recorded.
    for path in directory.glob("gauge_livesum_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        metrics.multiprocess.mark_process_dead(pid, str(directory))
    assert not list(directory.glob("gauge_livesum_*.db"))


def test_a_hot_path_update_costs_microseconds() -> None:
    """What a request adds: one count and one latency observation."""
    import time

    rounds = 20_000
    started = time.perf_counter()
    for _ in range(rounds):
        metrics.request_done("versions", "GET", 200, 0.001)
    per_request = (time.perf_counter() - started) / rounds
    assert per_request < 50e-6, per_request


def test_the_gunicorn_master_starts_with_a_new_data_directory(tmp_path: Any) -> None:
    """With METRICS_PORT and a data directory never used, gunicorn's master makes and empties
    the metrics directory without making a metric itself: a metric made before the
    directory exists fails to open its file, and the server never starts."""
    import subprocess
    import sys

    data_dir = tmp_path / "new-data-dir"
    script = (
        "import runpy, sys\n"
        "config = runpy.run_path('mediarepo/gunicorn.conf.py')\n"
        "config['on_starting'](None)\n"
        "print('msc3870.metrics' in sys.modules)\n"
    )
    env = {**os.environ, "METRICS_PORT": "19999", "MEDIAREPO_DATA_DIR": str(data_dir)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert list((data_dir / "metrics" / "web-19999").iterdir()) == []
