"""Two web nodes behind a load balancer (HAProxy with ``docker/haproxy.cfg``), sharing only
PostgreSQL, the broker, Redis, S3 and a celery worker: what one node does, the other sees
(wake-ups, moderation, limits, keys), and what stays per node is what the README says.

Each node is one gunicorn with one uvicorn worker and a data directory of its own; the
safety poll behind LISTEN is a minute, so a waiter answered within seconds was woken by
the other node's change, not found by a poll.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from signedjson.key import (
    decode_verify_key_bytes,
    encode_verify_key_base64,
    get_verify_key,
    read_signing_keys,
)
from signedjson.sign import verify_signed_json
from unpaddedbase64 import decode_base64

from ..federation_helpers import (
    DAY_MS,
    FED_DOWNLOAD,
    FakeRemote,
    local_server,
    parse_multipart,
    remote_media_server,
    self_signed_tls,
    send,
    signed,
)
from ..helpers import assert_matrix_error, body_of, mxc_path, png_bytes, wait_until
from ..redis_server import RedisServer
from ..server_helpers import read_response
from .conftest import Stack, TwoNodes, make_user_token, running_two_nodes
from .helpers import Waiters, results

pytestmark = [pytest.mark.services, pytest.mark.usefixtures("transactional_db")]

ADMIN = "@admin:localhost"
CREATE_RATE = 6  # per hour (none drains during a test), per user: counted in Redis, for both nodes
PENDING_MAX = 3  # per user: counted in the database
WAIT_MS = 30000
# A waiter answered within this long after the upload was woken by it: without the other
# node's notification it would wait for the safety poll (60 s) or its own timeout (30 s).
WOKEN_WITHIN = 10.0


@pytest.fixture(scope="module")
def two_nodes(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TwoNodes]:
    tmp = tmp_path_factory.mktemp("two-nodes")
    # A broker of their own: the session's stack has a worker on the shared one, which
    # would take some of these nodes' tasks with its own settings.
    broker = RedisServer(tmp / "broker")
    broker.start()
    try:
        with running_two_nodes(
            tmp,
            CELERY_BROKER_URL=broker.url(),
            MSC3870_WAKEUP_SAFETY_POLL_SECONDS="60",
            MSC3870_ADMINS=ADMIN,
            MSC3870_CREATE_RATE=f"{CREATE_RATE}/hour",
            MSC3870_MAX_PENDING_UPLOADS=str(PENDING_MAX),
            MSC3870_UPLOAD_BODIES_PER_ADDRESS_MAX="1",
            MSC3870_FEDERATION_IP_RANGE_ALLOWLIST="127.0.0.1/32",
            MSC3870_FEDERATION_VERIFY_TLS="0",
        ) as running:
            yield running
    finally:
        broker.stop(kill=True)


def metric(node: Stack, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples with ``labels`` on ``node``'s metrics listener."""
    port = node.env["METRICS_PORT"]
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        sample, _, value = line.rpartition(" ")
        if all(f'{key}="{wanted}"' in sample for key, wanted in labels.items()):
            total += float(value)
    return total


def user(two_nodes: TwoNodes) -> tuple[str, Any, Any]:
    """A new user's token, and its clients of node A and of node B."""
    token = make_user_token()
    return token, two_nodes.a.client(token), two_nodes.b.client(token)


def waiter_on(waiters: Waiters, node: Stack, content_uri: str, token: str) -> Any:
    """A download of ``content_uri`` waiting on ``node``, once it is parked there."""
    before = metric(node, "msc3870_waiters", kind="authenticated")
    url = f"{node.base_url}/_matrix/client/v1/media/download/{mxc_path(content_uri)}"
    [future] = waiters.get(f"{url}?timeout_ms={WAIT_MS}", {"Authorization": f"Bearer {token}"})
    wait_until(
        lambda: future.done() or metric(node, "msc3870_waiters", kind="authenticated") > before,
        20,
        "the download to park",
    )
    assert not future.done(), future.result()[:2]
    return future


# ------------------------------------------------------------------ the balancer


def test_requests_through_the_balancer_reach_both_nodes(two_nodes: TwoNodes) -> None:
    before = [
        metric(node, "msc3870_http_requests_total", route="versions") for node in two_nodes.nodes
    ]
    for _ in range(10):
        response = requests.get(f"{two_nodes.balancer_url}/_matrix/client/versions", timeout=10)
        assert response.status_code == 200
    after = [
        metric(node, "msc3870_http_requests_total", route="versions") for node in two_nodes.nodes
    ]
    served = [a - b for a, b in zip(after, before, strict=True)]
    # The balancer's health checks ask /versions too: at least ours, some on each node.
    assert sum(served) >= 10 and min(served) >= 3, served


def test_a_whole_upload_through_the_balancer(two_nodes: TwoNodes) -> None:
    """create, PUT to the presigned URL, /complete and download, each request to whichever
    node the balancer picks: every step finds what the previous one did elsewhere."""
    client = two_nodes.client(make_user_token())
    data = png_bytes(16, 16)
    content_uri = client.upload_through_url(data, "image/png")
    downloads = [client.download(content_uri) for _ in range(4)]
    assert {(d.status_code, d.content) for d in downloads} == {(200, data)}


# ------------------------------------------------------------------ waking across nodes


def test_an_upload_on_a_wakes_a_waiter_on_b(two_nodes: TwoNodes, waiters: Waiters) -> None:
    token, on_a, _ = user(two_nodes)
    content_uri = on_a.create()["content_uri"]
    waiting = waiter_on(waiters, two_nodes.b, content_uri, token)
    data = b"bytes uploaded to node A " + secrets.token_bytes(16)
    put = on_a.put_upload(content_uri, data, "application/octet-stream")
    uploaded_at = time.monotonic()
    assert put.status_code == 200, body_of(put)
    [(status, body, _)] = results([waiting])
    assert (status, body) == (200, data)
    assert time.monotonic() - uploaded_at < WOKEN_WITHIN


def test_an_upload_url_minted_by_a_and_completed_on_b_wakes_a_waiter_on_a(
    two_nodes: TwoNodes, waiters: Waiters
) -> None:
    """The URL from A's /create, the bytes PUT to it (S3), /complete on B; the waiter on
    A is woken by the worker's verdict."""
    token, on_a, on_b = user(two_nodes)
    created = on_a.create()
    waiting = waiter_on(waiters, two_nodes.a, created["content_uri"], token)
    data = png_bytes(12, 12)
    assert on_a.put_to_url(created["upload_url"], data, "image/png").status_code == 200
    done = on_b.complete(created["content_uri"])
    completed_at = time.monotonic()
    assert done.status_code == 200, body_of(done)
    [(status, body, _)] = results([waiting])
    assert (status, body) == (200, data)
    assert time.monotonic() - completed_at < WOKEN_WITHIN


# ------------------------------------------------------------------ moderation


def test_a_quarantine_on_a_is_404_on_b_at_once(two_nodes: TwoNodes) -> None:
    _, on_a, on_b = user(two_nodes)
    data = png_bytes(10, 10)
    content_uri = on_a.upload_through_url(data, "image/png")
    assert on_b.download(content_uri).content == data
    assert on_b.download(content_uri, legacy=True).status_code == 200
    admin = two_nodes.a.client(make_user_token(ADMIN))
    quarantined = admin.post(f"/_synapse/admin/v1/media/quarantine/{mxc_path(content_uri)}")
    assert quarantined.status_code == 200, body_of(quarantined)
    for response in (on_b.download(content_uri), on_b.download(content_uri, legacy=True)):
        assert_matrix_error(response.status_code, response.content, 404, "M_NOT_FOUND")


# ------------------------------------------------------------------ limits


def test_pending_uploads_are_counted_for_both_nodes_together(two_nodes: TwoNodes) -> None:
    _, on_a, on_b = user(two_nodes)
    for client in [on_a, on_b, on_a][:PENDING_MAX]:
        client.create()
    refused = on_b.post("/_matrix/media/v1/create")
    assert_matrix_error(refused.status_code, refused.content, 429, "M_LIMIT_EXCEEDED")
    assert "pending" in refused.json()["error"].lower()


def test_the_create_rate_is_counted_for_both_nodes_together(two_nodes: TwoNodes) -> None:
    """Each id is uploaded at once, so the pending limit never counts: the rate does."""
    _, on_a, on_b = user(two_nodes)
    for n in range(CREATE_RATE):
        client = (on_a, on_b)[n % 2]
        content_uri = client.create()["content_uri"]
        assert client.put_upload(content_uri, b"x").status_code == 200
    for client in (on_a, on_b):
        refused = client.post("/_matrix/media/v1/create")
        assert_matrix_error(refused.status_code, refused.content, 429, "M_LIMIT_EXCEEDED")
        assert refused.json()["retry_after_ms"] > 0
        assert "pending" not in refused.json()["error"].lower()


def held_upload(node: Stack, token: str) -> socket.socket:
    """An upload body being received by ``node``: 1 MiB announced, 4 KiB sent."""
    port = int(node.base_url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {1024 * 1024}\r\n\r\n"
    )
    sock.sendall(head.encode() + b"x" * 4096)
    return sock


def test_upload_bodies_are_capped_per_node(two_nodes: TwoNodes) -> None:
    """MSC3870_UPLOAD_BODIES_PER_ADDRESS_MAX=1 here: a body held on A fills A's place
    for this address; B, a process of its own, still admits one."""
    token, on_a, on_b = user(two_nodes)
    on_a.create(), on_b.create()  # the token is resolved: uploads are admitted at once
    with held_upload(two_nodes.a, token) as held:
        time.sleep(0.5)  # admitted, and its body being read
        with held_upload(two_nodes.a, token) as second:
            status, _, body = read_response(second, length_required=True)
        assert_matrix_error(status, body, 429, "M_LIMIT_EXCEEDED")
        uploaded = on_b.upload(b"admitted on B", "text/plain")
        assert uploaded.status_code == 200, body_of(uploaded)
        held.sendall(b"x" * (1024 * 1024 - 4096))
        assert read_response(held, length_required=True)[0] == 200


# ------------------------------------------------------------------ federation


def published_keys(node: Stack) -> dict[str, str]:
    answer = requests.get(f"{node.base_url}/_matrix/key/v2/server", timeout=10).json()
    return {key_id: key["key"] for key_id, key in answer["verify_keys"].items()}


def test_both_nodes_publish_the_shared_signing_key(two_nodes: TwoNodes) -> None:
    """The first node asked makes the key file (if no other process did); the other
    reads it, and publishes the same key."""
    first, second = published_keys(two_nodes.a), published_keys(two_nodes.b)
    path = Path(two_nodes.a.env["MSC3870_SIGNING_KEY_PATH"])
    [key] = read_signing_keys(path.read_text().splitlines())
    expected = {f"ed25519:{key.version}": encode_verify_key_base64(get_verify_key(key))}
    assert first == second == expected


def test_a_federation_request_is_answered_by_either_node(
    two_nodes: TwoNodes, tmp_path: Path
) -> None:
    """Another server (its key server on 127.0.0.1 over TLS) asks each node for media
    uploaded through the other; both check its signature and serve the bytes."""
    on_a = two_nodes.a.client(make_user_token())
    data = png_bytes(9, 9)
    content_uri = on_a.upload_through_url(data, "image/png")
    server_name, media_id = mxc_path(content_uri).split("/")
    routes: dict[str, Any] = {}
    with local_server(routes, tls=self_signed_tls(tmp_path)) as key_server:
        peer = FakeRemote(key_server.server_name)
        routes["/_matrix/key/v2/server"] = lambda handler: send(
            handler,
            200,
            json.dumps(peer.key_response(int(time.time() * 1000) + DAY_MS)).encode(),
        )
        uri = f"{FED_DOWNLOAD}{media_id}"
        for node in two_nodes.nodes:
            response = requests.get(
                node.base_url + uri, headers=signed(peer, uri, destination=server_name), timeout=30
            )
            assert response.status_code == 200, response.text
            metadata, media = parse_multipart(response.headers["Content-Type"], response.content)
            assert (metadata.data, media.data) == (b"{}", data)


def test_media_fetched_by_the_worker_is_signed_with_the_key_both_nodes_publish(
    two_nodes: TwoNodes, tmp_path: Path
) -> None:
    """A download through A of another server's media: the celery worker fetches it,
    signing with the shared key, which B's key server (where the other server may look)
    publishes."""
    on_a = two_nodes.a.client(make_user_token())
    with remote_media_server(tmp_path) as remote:
        remote.files["abc"] = (b"remote bytes", "text/plain")
        response = on_a.download(f"mxc://{remote.name}/abc", "?timeout_ms=20000")
        assert (response.status_code, response.content) == (200, b"remote bytes")
        [(path, authorization)] = remote.authorizations
    from msc3870.federation.xmatrix import parse_x_matrix, request_json

    [credential] = parse_x_matrix([authorization])
    published = published_keys(two_nodes.b)
    assert credential.key in published
    verify_key = decode_verify_key_bytes(credential.key, decode_base64(published[credential.key]))
    assert credential.destination == remote.name
    signed_json = request_json("GET", path, credential.origin, remote.name)
    signed_json["signatures"] = {credential.origin: {credential.key: credential.sig}}
    verify_signed_json(signed_json, credential.origin, verify_key)  # raises if it does not


# ------------------------------------------------------------------ periodic sweeps

RUNS_SWEEPS = b"This process runs the periodic sweeps"


def sweep_runners(node: Stack) -> int:
    return (node.logs / "server.log").read_bytes().count(RUNS_SWEEPS)


def test_without_a_broker_one_node_runs_the_sweeps_and_the_other_takes_over(
    django_db_setup: None, tmp_path: Path
) -> None:
    """No broker, so no beat: each node's worker would run the sweeps in-process. Their
    lock is the database's (the nodes share no directory): one node holds it; when that
    node dies, the other takes it."""
    with running_two_nodes(tmp_path, worker=False, CELERY_BROKER_URL="") as running:
        wait_until(
            lambda: sum(sweep_runners(node) for node in running.nodes) >= 1,
            20,
            "a node to take the sweeps",
        )
        holder, other = sorted(running.nodes, key=sweep_runners, reverse=True)
        # Both nodes are up (start_server waited), so a lock of each node's own would have
        # been taken at start, at once, as the file locks were.
        time.sleep(1)
        assert (sweep_runners(holder), sweep_runners(other)) == (1, 0)
        holder.kill("server")
        wait_until(lambda: sweep_runners(other) == 1, 30, "the other node to take over")


def test_a_node_whose_lock_connection_drops_stops_running_the_sweeps() -> None:
    """PostgreSQL ends the session holding the advisory lock (a restart, a network cut):
    its holder learns it has lost the lock, and another process takes it."""
    import threading

    from django.db import connection

    from mediarepo.embedded import DatabaseLock

    first, second = DatabaseLock(), DatabaseLock()
    first.acquire()
    taken = threading.Event()
    thread = threading.Thread(target=lambda: (second.acquire(), taken.set()), daemon=True)
    thread.start()
    try:
        assert first.held() and not taken.wait(1)
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [first.connection.info.backend_pid])
        assert not first.held()
        assert taken.wait(15), "the second process never took the lock"
    finally:
        for lock in (first, second):
            if lock.connection is not None:
                lock.connection.close()
