"""The operator's surface on the deployed server (gunicorn, two uvicorn workers, as `make
run` starts it) with ``METRICS_PORT`` and ``LOG_FORMAT=json``: metrics add up across the
workers on their own listener (the directory emptied at start), the public port serves
none and the metrics port nothing else, ``/health`` answers with the in-process
scheduler's tick, and every line the server writes is JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from .helpers import free_port, mxc_path, wait_until
from .server_helpers import Server, start_server

VERSIONS = 'msc3870_http_requests_total{method="GET",route="versions",status="200"}'


@pytest.fixture(scope="module")
def operated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int, Path]]:
    data_dir = tmp_path_factory.mktemp("operated")
    metrics_port = free_port()
    directory = data_dir / "metrics" / f"web-{metrics_port}"
    directory.mkdir(parents=True)
    stale = directory / "counter_4242.db"
    stale.write_bytes(b"an earlier run's values")
    running = start_server(
        data_dir,
        "operated",
        migrate=True,
        WEB_CONCURRENCY="2",
        METRICS_PORT=str(metrics_port),
        LOG_FORMAT="json",
    )
    yield running, metrics_port, stale
    running.stop()


def scrape(port: int) -> str:
    answer = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.text


def value(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def json_lines(server: Server) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.log_text().splitlines() if line.strip()]


def test_metrics_add_up_across_the_workers(operated: tuple[Server, int, Path]) -> None:
    server, port, stale = operated
    assert not stale.exists(), "the master empties the directory at start"
    before = value(scrape(port), VERSIONS)
    lines_before = len(versions_lines(server))
    sent = 0
    # A new connection each time, until both workers have answered (which worker accepts
    # a connection is the kernel's choice: a busy machine may hand a run of them to one).
    while sent < 200 and (sent < 20 or len(answering_workers(server, lines_before)) < 2):
        with requests.Session() as session:
            assert session.get(f"{server.base_url}/_matrix/client/versions", timeout=10).ok
        sent += 1
        if sent >= 20:
            wait_until(
                lambda n=sent: len(versions_lines(server)) >= lines_before + n, 10, "request lines"
            )
    assert len(answering_workers(server, lines_before)) == 2, "both workers answered"
    assert value(scrape(port), VERSIONS) - before == sent, "and both were counted"


def answering_workers(server: Server, lines_before: int) -> set[Any]:
    return {line["process"] for line in versions_lines(server)[lines_before:]}


def versions_lines(server: Server) -> list[dict[str, Any]]:
    return [
        line
        for line in json_lines(server)
        if line["logger"] == "msc3870.requests" and line.get("route") == "versions"
    ]


def test_metrics_are_not_on_the_public_port_nor_the_api_on_the_metrics_port(
    operated: tuple[Server, int, Path],
) -> None:
    server, port, _ = operated
    public = requests.get(f"{server.base_url}/metrics", timeout=10)
    assert public.status_code == 404
    assert public.json()["errcode"] == "M_UNRECOGNIZED"
    api = requests.get(f"http://127.0.0.1:{port}/_matrix/client/versions", timeout=10)
    assert api.status_code == 404
    assert requests.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code in (200, 503)


def test_health_with_the_in_process_scheduler(operated: tuple[Server, int, Path]) -> None:
    server, port, _ = operated

    def healthy() -> Any:
        answer = requests.get(f"{server.base_url}/health", timeout=10)
        return answer.json() if answer.status_code == 200 else None

    body = wait_until(healthy, 30, "the scheduler's first tick")
    assert set(body["components"]) == {"database", "storage", "beat"}
    assert body["components"]["beat"]["age_seconds"] < 30
    head = requests.head(f"{server.base_url}/healthz", timeout=10)
    assert head.status_code == 200 and head.content == b""
    text = scrape(port)
    assert 'msc3870_component_up{component="storage"} 1.0' in text
    assert "msc3870_beat_last_tick_timestamp_seconds" in text


def test_every_line_is_json_and_says_who_did_what(operated: tuple[Server, int, Path]) -> None:
    server, _, _ = operated
    created = server.client.create()
    path = mxc_path(created["content_uri"])
    put = server.client.put_upload(created["content_uri"], b"operated bytes", "text/plain")
    assert put.status_code == 200, put.text
    media_id = path.split("/")[1]

    def lines_of_the_put() -> list[dict[str, Any]]:
        return [
            line
            for line in json_lines(server)  # raises if any line is not JSON
            if line.get("media_id") == media_id and line.get("route") == "upload-to-media"
        ]

    line = wait_until(lines_of_the_put, 10, "the PUT's line")[0]
    assert line["user"] == "@operated:localhost"
    assert line["state"] == "complete"
    assert line["screening_outcome"] == "complete"  # screened in the request, on its line
    assert line["message"].endswith(f'"PUT /_matrix/media/v3/upload/{path} HTTP/1.1" 200')
    loggers = {entry["logger"] for entry in json_lines(server)}
    # gunicorn's and uvicorn's own lines are JSON too; no access log of uvicorn's.
    assert {"gunicorn.error", "uvicorn.error", "msc3870.requests"} <= loggers
    assert "uvicorn.access" not in loggers
